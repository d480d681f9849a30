"""The teacher's Markov chain (DESIGN §2, Algorithm 1 step 1) and the distillation batch stream.

:class:`TeacherChain` owns the teacher network, the labelled training set, the minibatch order and
the sampler. Each :meth:`TeacherChain.advance` takes one step on the minibatch potential

    Ũ(θ) = −(N/M)·Σ_{i∈S} log p(y_i|x_i,θ)      (the sampler adds the prior τθ and the noise)

and after burn-in B, every H-th step (t > B and t mod H = 0), the current θ is a posterior sample.
Minibatches walk through seeded random permutations (epochs), so every example is seen equally
often. Everything random comes from two generators whose states are part of :meth:`state_dict`,
so a restored chain continues exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SamplerConfig
from ..errors import GpedError
from .samplers import SAMPLERS


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


#: on CUDA the chain looks at its minibatch loss (a device-to-host copy, which waits for the GPU)
#: only every this many steps and at posterior samples; on the CPU it looks at every step
CUDA_CHECK_EVERY = 50


class TeacherChain:
    """The teacher's chain. Nothing in :meth:`advance` waits for the GPU: the minibatch order is
    uploaded once per epoch and the loss is checked on the host every ``CUDA_CHECK_EVERY`` steps."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SamplerConfig, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.cfg = cfg
        self.num_train = len(self.x)
        self.batch_size = min(cfg.batch_size, self.num_train)
        self.order_rng = seeded_generator(cfg.seed * 2 + 1)
        self.noise_rng = seeded_generator(cfg.seed * 2 + 2, self.device)
        self.sampler = SAMPLERS[cfg.name](
            self.model.parameters(),
            step_size=cfg.step_size,
            prior_precision=cfg.prior_precision,
            temperature=cfg.temperature,
            generator=self.noise_rng,
            **({"friction": cfg.friction} if cfg.name == "sghmc" else {}),
        )
        self.step = 0
        self._perm = torch.randperm(self.num_train, generator=self.order_rng)
        self._perm_on_device: torch.Tensor | None = None
        self._pos = 0
        self._loss = torch.tensor(float("nan"))
        self._check_every = CUDA_CHECK_EVERY if self.device.type == "cuda" else 1

    def _next_batch(self) -> torch.Tensor:
        if self._pos + self.batch_size > self.num_train:
            self._perm = torch.randperm(self.num_train, generator=self.order_rng)
            self._perm_on_device = None
            self._pos = 0
        if self._perm_on_device is None:  # once per epoch, not once per step
            self._perm_on_device = self._perm.to(self.device)
        idx = self._perm_on_device[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx

    @property
    def last_loss(self) -> float:
        """The last step's minibatch mean negative log-likelihood (waits for the GPU)."""
        return float(self._loss)

    def check(self) -> None:
        """Raise GpedError if the last step's loss was not finite (a sync on CUDA)."""
        if self.step:
            self._check(self.step)

    def _check(self, step: int) -> None:
        """Raise GpedError if the last minibatch loss is not finite (the chain has diverged)."""
        loss = self.last_loss
        if not math.isfinite(loss):
            raise GpedError(
                f"the chain diverged by step {step} (minibatch NLL {loss}); lower sampler.step_size "
                f"(now {self.cfg.step_size}) or raise sampler.prior_precision"
            )

    def advance(self) -> None:
        """One sampler step. The loss is checked before the update on the CPU; on CUDA every
        ``CUDA_CHECK_EVERY`` steps and at each sample (a diverged chain is caught a few steps late)."""
        idx = self._next_batch()
        self.model.train()
        logits = self.model(self.x[idx])
        mean_nll = F.cross_entropy(logits, self.y[idx])
        self.model.zero_grad(set_to_none=False)
        (mean_nll * self.num_train).backward()  # (N/M)·Σ = N·mean
        self._loss = mean_nll.detach()
        if (self.step + 1) % self._check_every == 0:
            self._check(self.step + 1)  # before the update: a diverged step never reaches θ
        self.sampler.step()
        self.step += 1
        if self._check_every > 1 and self.is_sample():
            self._check(self.step)

    def is_sample(self) -> bool:
        """Whether the current θ is a posterior sample: past burn-in and on the thinning grid."""
        return self.step > self.cfg.burn_in and self.step % self.cfg.thin == 0

    @property
    def sample_id(self) -> int:
        """Index of the current sample (0-based) if :meth:`is_sample`, counting from the first."""
        first = (self.cfg.burn_in // self.cfg.thin + 1) * self.cfg.thin
        return (self.step - first) // self.cfg.thin

    def state_dict(self) -> dict:
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "sampler": self.sampler.state_dict(),
            "step": torch.tensor(self.step),
            "perm": self._perm.clone(),
            "pos": torch.tensor(self._pos),
            "order_rng": self.order_rng.get_state(),
            "noise_rng": self.noise_rng.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self._perm = state["perm"].clone()
        self._perm_on_device = None
        self._pos = int(state["pos"])
        self.order_rng.set_state(state["order_rng"])
        self.noise_rng.set_state(state["noise_rng"])


class DistillStream:
    """Seeded stream of distillation batches: M′ distinct indices of D′ and a noise seed each.

    The noise seed lets any holder of the same data rebuild the perturbed inputs exactly
    (:func:`gped.core.data.distill_inputs`), so only indices and a seed travel on the wire.
    """

    def __init__(self, num_distill: int, batch_size: int, seed: int):
        self.num_distill = int(num_distill)
        self.batch_size = min(int(batch_size), self.num_distill)
        self.rng = seeded_generator(seed)

    def next(self) -> tuple[torch.Tensor, int]:
        indices = torch.randperm(self.num_distill, generator=self.rng)[: self.batch_size]
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
        return indices, noise_seed

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])


@torch.no_grad()
def evaluate_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Teacher logits on ``x`` in eval mode, in batches (keeps memory flat on large test sets)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)

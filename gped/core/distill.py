"""One student's distillation step (DESIGN §2, Algorithm 1 step 2) and the teacher ensemble.

:class:`Distiller` is pure: it takes a distillation batch (inputs, their indices in D′, and the
teacher's logits for one posterior sample), folds the sample into each expectation's estimator
(U_s or U_o) and takes one Adam step on the mean over the batch of Σ_expectations ℓ(target, student).
The paper writes the objective as (N′/M′)·Σ ℓ; that constant factor does not change Adam's steps
(up to its ε), so the mean is used and the loss values stay readable.

:class:`EnsembleAccumulator` keeps the teacher ensemble's running predictive E[p] and expected
entropy E[H[p]] on a fixed evaluation set — the reference students are scored against.
"""

from __future__ import annotations

import math

import torch

from ..config import StudentConfig
from ..errors import GpedError
from .estimators import ESTIMATORS
from .expectations import entropy_of, get_expectation, resolve
from .models import build_student
from .pruning import Masks, apply_masks, check_masks, group_lasso_penalty


class Distiller:
    def __init__(self, cfg: StudentConfig, input_shape, num_classes: int, num_distill: int, device="cpu",
                 batch_size: int | None = None):
        """``batch_size``: rows per distillation batch when it is not the student's own (targets mode)."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.heads = resolve(cfg.expectations)
        self.expectations = {name: get_expectation(name) for name in self.heads}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = build_student(
                cfg.model.arch, input_shape, {n: e.dim(num_classes) for n, e in self.expectations.items()},
                cfg.model.k1, cfg.model.k2, cfg.model.dropout,
            ).to(self.device)
        self.estimators = {
            name: ESTIMATORS[cfg.estimator](num_distill, exp.dim(num_classes), self.device)
            for name, exp in self.expectations.items()
        }
        # on CUDA one fused kernel per step instead of several per tensor; the CPU keeps the default
        # implementation, whose results every CPU figure in the README was made with
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=self.device.type == "cuda" or None)
        steps_per_epoch = max(1, math.ceil(num_distill / (batch_size or cfg.batch_size)))
        halve_every = int(round(cfg.lr_halve_epochs * steps_per_epoch))
        self.scheduler = (
            torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=halve_every, gamma=0.5) if halve_every > 0 else None
        )
        self.updates = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            self.rng_state = torch.get_rng_state()  # this student's dropout stream
        self.cuda_rng_state = None
        #: pruning keep masks per hidden layer (see :mod:`gped.core.pruning`); empty = nothing pruned
        self.masks: Masks = {}

    def set_masks(self, masks: Masks) -> None:
        """Prune: zero the masked units now and after every optimizer step from here on."""
        self.masks = check_masks(self.model, masks)
        apply_masks(self.model, self.masks)

    def targets(self, indices: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fold one posterior sample's statistics into the estimators; return the training targets."""
        return {
            name: self.estimators[name].update(indices, exp.statistic(teacher_logits.to(self.device)))
            for name, exp in self.expectations.items()
        }

    def train_step(self, inputs: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        raw = self._forward_with_own_rng(inputs.to(self.device))
        losses = {name: exp.loss(targets[name], raw[name]).mean() for name, exp in self.expectations.items()}
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise GpedError(
                f"student {self.cfg.name!r} diverged at update {self.updates + 1} (loss {float(total)}); lower its lr (now {self.cfg.lr})"
            )
        # --- group lasso and pruning (gped.core.pruning): + λ·R(φ); pruned units stay zero ---
        if self.cfg.group_lasso > 0:
            penalty = group_lasso_penalty(self.model)
            total = total + self.cfg.group_lasso * penalty
            losses["group_lasso"] = penalty
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.masks:
            apply_masks(self.model, self.masks)
        # --- end group lasso and pruning ---
        if self.scheduler is not None:
            self.scheduler.step()
        self.updates += 1
        return {name: float(v.detach()) for name, v in losses.items()}

    def _forward_with_own_rng(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training forward pass. Dropout draws from this student's own RNG stream (saved in its
        checkpoint), so several students in one process, or one resumed, draw exactly what one
        uninterrupted student process draws."""
        if not self.cfg.model.dropout:
            return self.model(inputs)
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.set_rng_state(self.rng_state)
            if cuda and self.cuda_rng_state is not None:
                torch.cuda.set_rng_state(self.cuda_rng_state, self.device)
            raw = self.model(inputs)
            self.rng_state = torch.get_rng_state()
            if cuda:
                self.cuda_rng_state = torch.cuda.get_rng_state(self.device)
        return raw

    def observe(self, inputs: torch.Tensor, indices: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
        """Algorithm 1 step 2 for one batch: update targets with this sample, one student step."""
        return self.train_step(inputs, self.targets(indices, teacher_logits))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 2048) -> dict[str, torch.Tensor]:
        """The student's predictions of every expectation it covers (derived ones included), eval mode."""
        self.model.eval()
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.heads}
        for i in range(0, len(x), batch_size):
            raw = self.model(x[i : i + batch_size].to(self.device))
            for name, exp in self.expectations.items():
                parts[name].append(exp.predict(raw[name]).cpu())
        out = {name: torch.cat(v) for name, v in parts.items()}
        for name in self.cfg.expectations:
            exp = get_expectation(name)
            if exp.derived:
                out[name] = exp.derive(out)
        return out

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "estimators": {name: est.state_dict() for name, est in self.estimators.items()},
            "updates": torch.tensor(self.updates),
            "masks": {name: mask.cpu().clone() for name, mask in self.masks.items()},
            "rng": self.rng_state.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for name, est in self.estimators.items():
            est.load_state_dict(state["estimators"][name])
        self.updates = int(state["updates"])
        self.set_masks(state.get("masks", {}))  # checkpoints from before pruning existed have none
        if "rng" in state:
            self.rng_state = state["rng"].cpu().clone()


class EnsembleAccumulator:
    """Running teacher-ensemble statistics on a fixed set of inputs (float64 sums)."""

    def __init__(self, num_examples: int, num_classes: int):
        self.sum_probs = torch.zeros(num_examples, num_classes, dtype=torch.float64)
        self.sum_entropy = torch.zeros(num_examples, dtype=torch.float64)
        self.count = 0

    def add(self, logits: torch.Tensor) -> None:
        probs = torch.softmax(logits.detach().cpu().double(), dim=-1)
        self.sum_probs += probs
        self.sum_entropy += entropy_of(probs)
        self.count += 1

    @property
    def predictive(self) -> torch.Tensor:
        return self.sum_probs / max(self.count, 1)

    @property
    def expected_entropy(self) -> torch.Tensor:
        return self.sum_entropy / max(self.count, 1)

    @property
    def mutual_information(self) -> torch.Tensor:
        return (entropy_of(self.predictive) - self.expected_entropy).clamp_min(0.0)

    def state_dict(self) -> dict:
        return {"sum_probs": self.sum_probs.clone(), "sum_entropy": self.sum_entropy.clone(), "count": torch.tensor(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.sum_probs.copy_(state["sum_probs"])
        self.sum_entropy.copy_(state["sum_entropy"])
        self.count = int(state["count"])

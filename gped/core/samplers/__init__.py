"""Registered stochastic-gradient MCMC samplers with one interface.

A sampler updates a list of parameter tensors in place, like a ``torch.optim.Optimizer``: the caller
puts the gradient of the *likelihood part* of the potential, ∇Ũ(θ) = −(N/M)·Σ_{i∈S} ∇log p(y_i|x_i,θ),
into ``p.grad`` and calls :meth:`Sampler.step`; the sampler adds the Gaussian prior
N(0, τ⁻¹ I) (∇ −log p(θ) = τθ) and its own noise. Samplers draw noise only from the
``torch.Generator`` they are given, so their state (:meth:`state_dict`) plus the generator's state
continue a chain exactly.

New samplers subclass :class:`Sampler` and register with :func:`register_sampler`.
"""

from __future__ import annotations

from typing import Callable

import torch

SAMPLERS: dict[str, type["Sampler"]] = {}


def register_sampler(name: str) -> Callable[[type["Sampler"]], type["Sampler"]]:
    def wrap(cls: type["Sampler"]) -> type["Sampler"]:
        cls.name = name
        SAMPLERS[name] = cls
        return cls

    return wrap


class Sampler:
    """Base class: holds the parameters, step size η, prior precision τ, temperature T and generator."""

    name = "base"

    def __init__(
        self,
        params,
        *,
        step_size: float,
        prior_precision: float = 0.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        **options,
    ):
        self.params = [p for p in params]
        if not step_size > 0:
            raise ValueError(f"step size must be positive, got {step_size}")
        self.step_size = float(step_size)
        self.prior_precision = float(prior_precision)
        self.temperature = float(temperature)
        self.generator = generator
        self.options = options

    def gradient(self, p: torch.Tensor) -> torch.Tensor:
        """∇U(θ) for one tensor: the likelihood gradient in ``p.grad`` plus the prior's τθ."""
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if self.prior_precision:
            grad = grad + self.prior_precision * p.detach()
        return grad

    def noise(self, p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=self.generator, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Extra state beyond the parameters (momenta, ...); empty for memoryless samplers."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


from . import sghmc, sgld  # noqa: E402,F401  (registration side effects)

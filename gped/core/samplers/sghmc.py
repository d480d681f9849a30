"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin, 2014), eq. (15):

    v ← (1 − α)·v − η·∇Ũ(θ) + N(0, 2·α·η·T·I),   θ ← θ + v

with friction α ∈ (0, 1] (``friction``) and learning rate η (``step_size``); the gradient-noise
estimate β̂ is taken as 0. With α = 1 this is SGLD with step size 2η.
"""

from __future__ import annotations

import math

import torch

from . import Sampler, register_sampler


@register_sampler("sghmc")
class SGHMC(Sampler):
    def __init__(self, params, *, friction: float = 0.1, **kwargs):
        super().__init__(params, **kwargs)
        if not 0 < friction <= 1:
            raise ValueError(f"SGHMC friction must be in (0, 1], got {friction}")
        self.friction = float(friction)
        self.momenta = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        eta, alpha = self.step_size, self.friction
        noise_scale = math.sqrt(2 * alpha * eta * self.temperature)
        for p, v in zip(self.params, self.momenta):
            v.mul_(1 - alpha).add_(self.gradient(p), alpha=-eta)
            if noise_scale:
                v.add_(self.noise(p), alpha=noise_scale)
            p.add_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"momentum.{i}": v.clone() for i, v in enumerate(self.momenta)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, v in enumerate(self.momenta):
            v.copy_(state[f"momentum.{i}"])

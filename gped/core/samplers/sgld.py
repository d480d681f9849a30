"""Stochastic gradient Langevin dynamics (Welling & Teh, 2011), as in GPED's Algorithm 1.

    θ ← θ − (η/2)·∇Ũ(θ) + z,   z ~ N(0, η·T·I)

with ∇Ũ(θ) = τθ − (N/M)·Σ_{i∈S} ∇log p(y_i|x_i,θ) (prior N(0, τ⁻¹I), minibatch S of size M),
fixed step size η and temperature T (T = 1 is the true posterior; T < 1 sharpens it). With
exact gradients and η → 0 the chain's stationary law is p(θ|D)^{1/T}.
"""

from __future__ import annotations

import math

import torch

from . import Sampler, register_sampler


@register_sampler("sgld")
class SGLD(Sampler):
    @torch.no_grad()
    def step(self) -> None:
        eta = self.step_size
        noise_scale = math.sqrt(eta * self.temperature)
        for p in self.params:
            grad = self.gradient(p)
            p.add_(grad, alpha=-0.5 * eta)
            if noise_scale:
                p.add_(self.noise(p), alpha=noise_scale)

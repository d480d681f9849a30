"""Target estimators (DESIGN §2, "Target estimators").

* ``single`` — U_s: the current posterior sample only, ĝ_i = g(x_i, θ_t).
* ``online`` — U_o: for every distillation example i a running Monte Carlo mean over the samples
  it has been part of, ĝ_i ← ĝ_i + (g(x_i, θ_t) − ĝ_i)/(m_i + 1), m_i ← m_i + 1.  After m_i
  updates ĝ_i equals the batch mean of those m_i values; it costs N′ × dim floats and N′ counts.
"""

from __future__ import annotations

from typing import Callable

import torch

ESTIMATORS: dict[str, type["Estimator"]] = {}


def register_estimator(name: str) -> Callable[[type["Estimator"]], type["Estimator"]]:
    def wrap(cls):
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return wrap


class Estimator:
    name = "base"

    def __init__(self, num_examples: int, dim: int, device: torch.device | str = "cpu"):
        self.num_examples = int(num_examples)
        self.dim = int(dim)
        self.device = torch.device(device)

    def update(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Fold one sample's statistics ``values`` [B, dim] for ``indices`` [B]; return the targets."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


@register_estimator("single")
class SingleSample(Estimator):
    def update(self, indices, values):
        return values


@register_estimator("online")
class OnlineAverage(Estimator):
    def __init__(self, num_examples: int, dim: int, device="cpu"):
        super().__init__(num_examples, dim, device)
        self.means = torch.zeros(self.num_examples, self.dim, dtype=torch.float32, device=self.device)
        self.counts = torch.zeros(self.num_examples, dtype=torch.int64, device=self.device)

    def update(self, indices, values):
        indices = indices.to(self.device)
        if indices.unique().numel() != indices.numel():
            raise ValueError("U_o update needs distinct indices within one batch")
        counts = self.counts[indices] + 1
        means = self.means[indices]
        means = means + (values.to(self.device, torch.float32) - means) / counts.unsqueeze(-1)
        self.means[indices] = means
        self.counts[indices] = counts
        return means.to(values.device, values.dtype)

    def state_dict(self):
        return {"means": self.means.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state):
        if tuple(state["means"].shape) != tuple(self.means.shape):
            raise ValueError(f"U_o table shape {tuple(state['means'].shape)} does not match {tuple(self.means.shape)}")
        self.means.copy_(state["means"])
        self.counts.copy_(state["counts"])

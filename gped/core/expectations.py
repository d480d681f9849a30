"""Posterior expectations as registered plug-ins (DESIGN §2, "Expectations").

An expectation E_{p(θ|D)}[g(x, θ)] is defined by

* ``statistic(logits)``: g for *one* posterior sample θ, computed from the teacher's logits
  on a batch, shape [B, dim];
* ``dim(C)``: the width of g and of the student head that predicts it;
* ``predict(raw)``: the student head's activation (raw head output → predicted target);
* ``loss(target, raw)``: the per-example distillation loss ℓ(target, student), shape [B].

Samples are combined by the arithmetic mean (the Monte Carlo estimate of the expectation), which the
estimators in :mod:`gped.core.estimators` compute. A *derived* expectation has no head of its own:
it is computed from other expectations' predictions (``requires`` / ``derive``); mutual information
(knowledge uncertainty) is H[E p] − E H[p], from the predictive and the expected entropy.

Register a new one from Python::

    @register_expectation("max_prob")
    class MaxProb(Expectation):
        def dim(self, C): return 1
        def statistic(self, logits): return logits.softmax(-1).amax(-1, keepdim=True)
        def predict(self, raw): return torch.sigmoid(raw)
        def loss(self, target, raw): return (target - torch.sigmoid(raw)).abs().sum(-1)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError

EXPECTATIONS: dict[str, "Expectation"] = {}


def register_expectation(name: str) -> Callable[[type["Expectation"]], type["Expectation"]]:
    """Class decorator: register an instance of the class under ``name``."""

    def wrap(cls: type["Expectation"]) -> type["Expectation"]:
        cls.name = name
        EXPECTATIONS[name] = cls()
        return cls

    return wrap


def get_expectation(name: str) -> "Expectation":
    try:
        return EXPECTATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown expectation {name!r}; choose one of {', '.join(EXPECTATIONS)}") from None


def entropy_of(probs: torch.Tensor) -> torch.Tensor:
    """H[p] = −Σ_y p_y log p_y over the last axis, with 0·log 0 = 0."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


class Expectation:
    name = "base"
    #: names of the expectations a derived expectation is computed from; empty for headed ones
    requires: tuple[str, ...] = ()
    #: True when only single-sample targets make sense (U_s), e.g. fitting a distribution to samples
    single_sample_only = False

    @property
    def derived(self) -> bool:
        return bool(self.requires)

    def dim(self, num_classes: int) -> int:
        raise NotImplementedError

    def statistic(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, target: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derive(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


@register_expectation("predictive")
class Predictive(Expectation):
    """Posterior predictive p(y|x,D) = E[p(y|x,θ)]; softmax head; cross-entropy −Σ t log s.

    The loss is minimal (equal to H[t]) exactly at s = t (Gibbs' inequality).
    """

    def dim(self, num_classes: int) -> int:
        return num_classes

    def statistic(self, logits):
        return torch.softmax(logits, dim=-1)

    def predict(self, raw):
        return torch.softmax(raw, dim=-1)

    def loss(self, target, raw):
        return -(target * F.log_softmax(raw, dim=-1)).sum(-1)


@register_expectation("expected_entropy")
class ExpectedEntropy(Expectation):
    """Expected data uncertainty E[H[p(y|x,θ)]]; one scalar head with exp activation; loss |t − s|."""

    def dim(self, num_classes: int) -> int:
        return 1

    def statistic(self, logits):
        return entropy_of(torch.softmax(logits, dim=-1)).unsqueeze(-1)

    def predict(self, raw):
        return torch.exp(raw)

    def loss(self, target, raw):
        return (target - torch.exp(raw)).abs().sum(-1)


@register_expectation("class_variance")
class ClassVariance(Expectation):
    """E[p(y|x,θ)(1 − p(y|x,θ))] per class (paper §3.1); sigmoid head; summed absolute error."""

    def dim(self, num_classes: int) -> int:
        return num_classes

    def statistic(self, logits):
        p = torch.softmax(logits, dim=-1)
        return p * (1 - p)

    def predict(self, raw):
        return torch.sigmoid(raw)

    def loss(self, target, raw):
        return (target - torch.sigmoid(raw)).abs().sum(-1)


@register_expectation("dirichlet")
class Dirichlet(Expectation):
    """EnD² (Malinin et al., 2020), the paper's baseline: fit Dir(α(x)) to the samples' tempered
    predictive p(y|x,θ)^{1/T} (T = 2.5) by the Dirichlet negative log-likelihood; α = exp(raw).

    Its target is each sample itself, not a mean, so it only makes sense with U_s.
    """

    temperature = 2.5
    single_sample_only = True

    def dim(self, num_classes: int) -> int:
        return num_classes

    def statistic(self, logits):
        return torch.softmax(logits / self.temperature, dim=-1)

    def predict(self, raw):
        alpha = torch.exp(raw)
        return alpha / alpha.sum(-1, keepdim=True)

    def loss(self, target, raw):
        alpha = torch.exp(raw.clamp(max=30))
        log_norm = torch.lgamma(alpha.sum(-1)) - torch.lgamma(alpha).sum(-1)
        return -(log_norm + ((alpha - 1) * torch.log(target.clamp_min(1e-8))).sum(-1))


@register_expectation("mutual_information")
class MutualInformation(Expectation):
    """Knowledge uncertainty I[y; θ | x, D] = H[E p] − E H[p] ≥ 0 (Jensen), derived, no head."""

    requires = ("predictive", "expected_entropy")

    def dim(self, num_classes: int) -> int:
        return 1

    def derive(self, parts):
        total = entropy_of(parts["predictive"]).unsqueeze(-1)
        return (total - parts["expected_entropy"]).clamp_min(0.0)


def resolve(names: list[str]) -> list[str]:
    """The headed expectations a student needs for ``names`` (derived ones pull in what they require)."""
    headed: list[str] = []
    for name in names:
        exp = get_expectation(name)
        for part in exp.requires if exp.derived else (name,):
            if part not in headed:
                headed.append(part)
    return headed

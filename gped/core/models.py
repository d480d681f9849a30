"""Teacher and student networks (DESIGN §2, "Models").

Every network is a *body* (feature extractor ending in a hidden layer) followed by one or more
linear *heads*. A teacher is a :class:`Classifier`: body + one head of C logits. A student is a
:class:`MultiHeadStudent`: the same kind of body with one head per distilled expectation, each head's
width declared by the expectation (C for the predictive, 1 for the expected entropy, ...), so no
head reuses another's layer.

Widths follow the paper: every conv width is scaled by K1 and every FC width by K2 (for the MLP,
the first hidden layer by K1 and the second by K2). Input shape and class count always come from
the data set. Dropout is an ``nn.Dropout`` and therefore follows ``model.training``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError


def _width(base: int, k: float) -> int:
    return max(1, int(round(base * k)))


def _conv_out(size: int, kernel: int) -> int:
    return size - kernel + 1


class MLPBody(nn.Module):
    """FC(400·K1) - ReLU - FC(400·K2) - ReLU: the Bayesian Dark Knowledge MLP without its output layer."""

    def __init__(self, input_shape: tuple[int, ...], k1: float = 1.0, k2: float = 1.0, dropout: float = 0.0):
        super().__init__()
        d_in = math.prod(input_shape)
        h1, h2 = _width(400, k1), _width(400, k2)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(d_in, h1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.out_features = h2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearBody(nn.Module):
    """Identity feature map: with one head this is multinomial logistic (softmax) regression."""

    def __init__(self, input_shape: tuple[int, ...], k1: float = 1.0, k2: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.flatten = nn.Flatten()
        self.out_features = math.prod(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(x)


class ConvBody(nn.Module):
    """conv(c1·K1, k×k) - maxpool2 - conv(c2·K1, k×k) - maxpool2 - FC(f·K2) ... with ReLU everywhere."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: tuple[int, int],
        kernel: int,
        fc: tuple[int, ...],
        k1: float,
        k2: float,
        dropout: float,
        name: str,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"{name} needs image inputs (C, H, W), got shape {tuple(input_shape)}")
        c_in, h, w = input_shape
        c1, c2 = _width(channels[0], k1), _width(channels[1], k1)
        for _ in range(2):
            h, w = _conv_out(h, kernel), _conv_out(w, kernel)
            if h < 2 or w < 2:
                raise ConfigError(
                    f"{name} needs larger inputs: {tuple(input_shape)} leaves no room for two "
                    f"{kernel}x{kernel} convolutions with 2x2 pooling (use 'mlp' or 'linear' for small images)"
                )
            h, w = h // 2, w // 2
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c1, kernel),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        ]
        d = c2 * h * w
        for width in fc:
            width = _width(width, k2)
            layers += [nn.Linear(d, width), nn.ReLU(), nn.Dropout(dropout)]
            d = width
        self.net = nn.Sequential(*layers)
        self.out_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mnist_cnn(input_shape, k1, k2, dropout):
    return ConvBody(input_shape, (10, 20), 4, (80,), k1, k2, dropout, "cnn-mnist")


def _cifar_cnn(input_shape, k1, k2, dropout):
    return ConvBody(input_shape, (16, 32), 5, (200, 50), k1, k2, dropout, "cnn-cifar")


#: architecture name -> body factory(input_shape, k1, k2, dropout)
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "linear": LinearBody,
    "mlp": MLPBody,
    "cnn-mnist": _mnist_cnn,
    "cnn-cifar": _cifar_cnn,
}


def build_body(arch: str, input_shape: tuple[int, ...], k1: float = 1.0, k2: float = 1.0, dropout: float = 0.0) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](tuple(input_shape), k1=k1, k2=k2, dropout=dropout)


class Classifier(nn.Module):
    """A teacher: body followed by a linear layer of C logits."""

    def __init__(self, body: nn.Module, num_classes: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.out_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MultiHeadStudent(nn.Module):
    """A student: one body, one linear head per distilled expectation; returns raw head outputs.

    The expectation that owns a head turns the raw output into its prediction (softmax, exp, ...).
    """

    def __init__(self, body: nn.Module, head_dims: dict[str, int]):
        super().__init__()
        if not head_dims:
            raise ConfigError("a student needs at least one head")
        self.body = body
        self.heads = nn.ModuleDict({name: nn.Linear(body.out_features, dim) for name, dim in head_dims.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {name: head(features) for name, head in self.heads.items()}


def build_teacher(arch: str, input_shape, num_classes: int, k1: float = 1.0, k2: float = 1.0, dropout: float = 0.0) -> Classifier:
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    return Classifier(build_body(arch, input_shape, k1, k2, dropout), num_classes)


def build_student(arch: str, input_shape, head_dims: dict[str, int], k1: float = 1.0, k2: float = 1.0, dropout: float = 0.0) -> MultiHeadStudent:
    return MultiHeadStudent(build_body(arch, input_shape, k1, k2, dropout), head_dims)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters as one contiguous 1-D tensor (a copy, in ``model.parameters()`` order)."""
    return torch.nn.utils.parameters_to_vector([p.detach() for p in model.parameters()])


def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Inverse of :func:`flat_parameters`; checks the length so a wrong snapshot cannot half-load."""
    n = count_parameters(model)
    if flat.ndim != 1 or flat.numel() != n:
        raise ValueError(f"parameter vector has {flat.numel()} entries, model needs {n}")
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat.to(next(model.parameters()).device, next(model.parameters()).dtype), model.parameters())

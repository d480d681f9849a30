"""Process-level plumbing shared by the roles and the reference loop: threads, devices, data, seeds."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import RunConfig
from .errors import ConfigError

log = logging.getLogger(__name__)

#: the targets-mode distillation stream is seeded from the sampler seed plus this offset
TARGETS_STREAM_OFFSET = 1_000_003


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads; several roles on a few cores must not oversubscribe them."""
    torch.set_num_threads(max(1, int(n)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def pick_device(spec: str) -> torch.device:
    """``auto`` → CUDA when present else CPU; ``cpu``, ``cuda``, ``cuda:N`` as given (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available on this machine")
    return device


def prepared_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.prepared) if cfg.data.prepared else Path(cfg.run_dir) / "data"


def load_data(cfg: RunConfig, prepare: bool = True):
    """The persisted data set of this run: prepared once (by whoever comes first), then reused."""
    from .core import data

    path = prepared_dir(cfg)
    if prepare:
        return data.prepare(cfg.data, path)
    return data.load_prepared(path)


def build_teacher_for(cfg: RunConfig, data) -> torch.nn.Module:
    """The teacher network, initialised from the sampler seed (identical in every process)."""
    from .core.models import build_teacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.sampler.seed)
        return build_teacher(cfg.teacher.arch, data.input_shape, data.num_classes, cfg.teacher.k1, cfg.teacher.k2, cfg.teacher.dropout)

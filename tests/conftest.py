"""Shared fixtures: small run configs on free loopback ports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support import SMALL_RUN, free_port_pair

torch.set_num_threads(1)


@pytest.fixture
def small_run(tmp_path):
    """Write a small synthetic-data run config; returns a function(mode, steps) -> config path."""

    def make(mode: str = "targets", steps: int = 600, name: str = "run.toml", port: int | None = None) -> Path:
        port = port or free_port_pair()
        run_dir = tmp_path / "run"
        path = tmp_path / name
        path.write_text(SMALL_RUN.format(run_dir=run_dir, mode=mode, steps=steps, port=port))
        return path

    return make



"""Checkpoints: atomic, checksummed, and loaded without unpickling arbitrary objects.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts written with ``torch.save``
to a temporary file in the same folder, flushed to disk, and renamed over the old one, so a crash
leaves either the old or the new file, never half of one. A SHA-256 of the bytes is written beside
it (``<file>.sha256``, also atomically, after the file); loading checks it and uses
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from .errors import GpedError


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    # the checksum goes first under a temporary name so file + checksum are replaced as a pair:
    # a crash between the two renames leaves a mismatch that load_checkpoint reports, never silence
    _atomic_write_bytes(path, payload)
    _atomic_write_bytes(path.with_name(path.name + ".sha256"), (digest + "\n").encode())
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GpedError(f"checkpoint not found: {path}")
    payload = path.read_bytes()
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise GpedError(f"checkpoint {path} has no checksum file {sidecar.name}; refusing to trust it")
    expected = sidecar.read_text().strip()
    if hashlib.sha256(payload).hexdigest() != expected:
        raise GpedError(f"checkpoint {path} is corrupt (checksum mismatch); use an older one or start afresh")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load means an unusable file
        raise GpedError(f"checkpoint {path} cannot be loaded safely: {exc}") from None
    if not isinstance(state, dict):
        raise GpedError(f"checkpoint {path} does not hold a state dict")
    return state

"""Checkpoints: atomic, checksummed, and loaded without unpickling arbitrary objects.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts written with ``torch.save``
to a temporary file in the same folder with a SHA-256 of its bytes as a trailer, flushed to disk,
and renamed over the old one, so a crash leaves either the old or the new file, never half of one
and never a file with someone else's checksum. Loading checks the checksum and uses
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


TRAILER = b"\nGPED-SHA256:"
TRAILER_LEN = len(TRAILER) + 64


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` with its SHA-256 as a trailer of the same file, replaced by one atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    _atomic_write_bytes(path, payload + TRAILER + hashlib.sha256(payload).hexdigest().encode())
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GpedError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    payload, trailer = data[:-TRAILER_LEN], data[-TRAILER_LEN:]
    if not trailer.startswith(TRAILER):
        raise GpedError(f"checkpoint {path} has no checksum trailer (truncated or not a gped checkpoint)")
    if hashlib.sha256(payload).hexdigest().encode() != trailer[len(TRAILER):]:
        raise GpedError(f"checkpoint {path} is corrupt (checksum mismatch); use an older one or start afresh")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load means an unusable file
        raise GpedError(f"checkpoint {path} cannot be loaded safely: {exc}") from None
    if not isinstance(state, dict):
        raise GpedError(f"checkpoint {path} does not hold a state dict")
    return state

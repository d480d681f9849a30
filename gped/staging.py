"""Host ↔ device transfers for the wire that do not stall the GPU's host thread.

* Device → host (the sampler's snapshots and teacher outputs): :class:`HostStager` copies on a side
  CUDA stream into pinned host memory with ``non_blocking=True`` and records an event; the chain's
  next steps are launched while the copy runs (the copy engine works beside the compute engine),
  and the sample is published once :meth:`Staged.ready` sees the event done.
* Host → device (what a student receives): :func:`to_device` copies the received bytes once, into
  pinned memory, and uploads them with ``non_blocking=True``.

On the CPU both are plain copies that are ready at once, so the CPU run (and every test that runs
on it) takes the same code path with the waiting left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class Staged:
    """Host copies of some device tensors, usable once :meth:`ready` (or after :meth:`wait`)."""

    def __init__(self, host: dict[str, torch.Tensor], event: Any | None = None):
        self._host = host
        self._event = event
        self._pinned = event is not None

    def ready(self) -> bool:
        """Whether the copies have landed (never waits)."""
        return self._event is None or bool(self._event.query())

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The host copies as numpy arrays (waiting for them if needed).

        Pinned buffers are copied once more into ordinary memory and released at once: a message
        may sit in ZeroMQ's queue for a slow subscriber for long, and page-locked memory held that
        long (and kept by torch's caching host allocator afterwards) is memory the OS cannot swap
        or reuse. A host memcpy costs far less than the device copy it follows."""
        self.wait()
        arrays = {name: tensor.numpy().copy() if self._pinned else tensor.numpy() for name, tensor in self._host.items()}
        self._host = {}
        return arrays


class HostStager:
    """Copies device tensors to the host without making the caller wait for the device."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    def stage(self, tensors: dict[str, torch.Tensor]) -> Staged:
        """Start copying ``tensors`` to the host. They must be fresh results the caller does not
        modify afterwards (a snapshot, an evaluation): on the CPU they are handed over as they are."""
        if not self.cuda:
            return Staged({name: t.detach().cpu() for name, t in tensors.items()})
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # after the kernels that produced them
        host: dict[str, torch.Tensor] = {}
        with torch.cuda.stream(stream):
            for name, t in tensors.items():
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t.detach(), non_blocking=True)
                t.record_stream(stream)  # the allocator must not hand t's memory out before the copy ran
                host[name] = buf
            event = torch.cuda.Event()
            event.record(stream)
        return Staged(host, event)


def to_device(array: np.ndarray, device: torch.device, dtype: np.dtype | None = None) -> torch.Tensor:
    """A tensor on ``device`` holding ``array`` (a read-only wire buffer is never aliased).

    CPU: one copy into a writable array. CUDA: one copy into pinned memory and an asynchronous
    upload; the caching host allocator keeps the pinned block until the upload has run.
    """
    src = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    if device.type != "cuda":
        return torch.from_numpy(np.array(src, copy=True))
    host = torch.empty(src.shape, dtype=torch.from_numpy(np.empty(0, src.dtype)).dtype, pin_memory=True)
    host.numpy()[...] = src
    return host.to(device, non_blocking=True)

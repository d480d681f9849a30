"""Encode messages to ZeroMQ multipart frames and decode them back, validating everything.

Wire format (protocol version :data:`~gped.wire.messages.PROTOCOL_VERSION`)::

    frame 0      msgpack map: {"v": 1, "t": "Targets", "sender": str, "seq": uint, "step": int,
                               "sample": int, <the type's scalar fields>,
                               "arrays": [[dtype, shape], ...]}
    frame 1..k   the raw bytes of each array field, C order, little-endian, in declaration order

Arrays leave as zero-copy ``memoryview`` s of (a C-contiguous little-endian version of) the
message's arrays, and arrive as read-only ``np.frombuffer`` views of the received frames.  With
``send_multipart(frames, copy=False)`` the caller must not modify a sent array until ZeroMQ has
released it (``track=True`` and ``MessageTracker.wait``, or simply never reuse the array).

:func:`decode` trusts nothing: it bounds every size before allocating, unpacks the header with
msgpack size limits (never pickle), checks keys, types, version, dtypes against a whitelist,
shapes against buffer lengths, and builds the message through its validating constructor.  Any
bad input raises :class:`~gped.wire.messages.ProtocolError` and nothing else.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ArraySpec,
    Message,
    MessageSpec,
    ProtocolError,
    show,
    spec_of,
)

#: Largest whole message (header plus arrays) accepted by default; overridable per call.
MAX_MESSAGE_BYTES = 256 * 2**20
#: Largest msgpack header frame; headers are small (a few hundred bytes typically).
MAX_HEADER_BYTES = 64 * 2**10
#: Most array frames any message may have (bounds the frame count checked before anything else).
MAX_ARRAYS = 16
#: Largest single array dimension accepted on the wire.
MAX_DIM = 2**40

# msgpack limits: the header frame is at most MAX_HEADER_BYTES, so no container or string can
# ask for more than that; there is no use for bin or ext data in a header at all.  Per-field
# string limits are checked afterwards and reported as kind "size".
_UNPACK_LIMITS = dict(
    max_str_len=MAX_HEADER_BYTES,
    max_bin_len=0,
    max_ext_len=0,
    max_array_len=1024,
    max_map_len=1024,
)

#: dtype strings allowed on the wire: little-endian (or single-byte) integers and floats only.
#: No bool (arbitrary bytes are not valid numpy bools), object, string, void or datetime.
WIRE_DTYPES: dict[str, np.dtype] = {
    np.dtype(code).newbyteorder("<").str: np.dtype(code).newbyteorder("<")
    for code in ("i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8")
}

Frame = Any  # bytes, bytearray, memoryview, or a zmq.Frame-like object with a ``.buffer``

logger = logging.getLogger("gped.wire")


# --------------------------------------------------------------------------------------------------
# encode


def encode(
    msg: Message,
    *,
    sender: str | None = None,
    seq: int | None = None,
    max_message_bytes: int | None = None,
) -> list[bytes | memoryview]:
    """Frames for ``msg``: the msgpack header, then one zero-copy buffer per array field.

    ``sender`` and ``seq`` override the message's header fields (a socket layer stamps its own
    sequence numbers this way without rebuilding a frozen message).  Raises
    :class:`ProtocolError` if a scalar field was mutated into something invalid after
    construction or the message exceeds ``max_message_bytes``; ``TypeError`` if ``msg`` is not a
    registered message.
    """
    spec = spec_of(msg)
    limit = _limit(max_message_bytes)
    msg.validate(arrays=False)
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": spec.name}
    for scalar_spec in spec.header + spec.scalars:
        header[scalar_spec.name] = getattr(msg, scalar_spec.name)
    if sender is not None:
        header["sender"] = spec.scalar("sender").validate(sender)
    if seq is not None:
        header["seq"] = spec.scalar("seq").validate(seq)
    buffers, metas = _array_buffers(msg, spec)
    header["arrays"] = metas
    header_bytes = msgpack.packb(header, use_bin_type=True)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError("size", f"header is {len(header_bytes)} bytes, limit {MAX_HEADER_BYTES}")
    total = len(header_bytes) + sum(buf.nbytes for buf in buffers)
    if total > limit:
        raise ProtocolError("size", f"{spec.name} is {total} bytes, limit {limit}")
    return [header_bytes, *buffers]


def _array_buffers(msg: Message, spec: MessageSpec) -> tuple[list[memoryview], list[list[Any]]]:
    buffers: list[memoryview] = []
    metas: list[list[Any]] = []
    for array_spec in spec.arrays:
        wire = to_wire_array(getattr(msg, array_spec.name))
        metas.append([wire.dtype.str, list(wire.shape)])
        buffers.append(memoryview(wire.reshape(-1).view(np.uint8)))
    return buffers, metas


def to_wire_array(values: np.ndarray) -> np.ndarray:
    """``values`` as a C-contiguous little-endian array; no copy when it already is one."""
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))


def _limit(max_message_bytes: int | None) -> int:
    if max_message_bytes is None:
        return MAX_MESSAGE_BYTES
    if type(max_message_bytes) is not int or max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be a positive int, got {max_message_bytes!r}")
    return max_message_bytes


# --------------------------------------------------------------------------------------------------
# decode


def decode(frames: Sequence[Frame], *, max_message_bytes: int | None = None) -> Message:
    """The message in ``frames`` (as produced by :func:`encode`), fully validated.

    Arrays are read-only views of the frame buffers (no copy), except that a buffer not aligned
    for its dtype is copied.  Raises :class:`ProtocolError` -- and nothing else -- for any input.
    """
    limit = _limit(max_message_bytes)
    try:
        return _decode(frames, limit)
    except ProtocolError:
        raise
    except Exception as exc:  # a decoder bug; the contract is ProtocolError only, so wrap it
        raise ProtocolError("internal", f"{type(exc).__name__}: {show(str(exc), 200)}") from exc


def _decode(frames: Sequence[Frame], limit: int) -> Message:
    buffers = _frame_buffers(frames)
    total = sum(buf.nbytes for buf in buffers)
    if total > limit:
        raise ProtocolError("size", f"message is {total} bytes, limit {limit}")
    header = _unpack_header(buffers[0])
    claimed = header.get("sender")
    sender = claimed if type(claimed) is str and claimed.isprintable() and len(claimed) <= 80 else show(claimed, 80)
    try:
        return _build_message(header, buffers[1:], limit)
    except ProtocolError as exc:
        exc.sender = sender
        raise


def _frame_buffers(frames: Sequence[Frame]) -> list[memoryview]:
    """Flat byte views of the frames; kind "frames" for a bad frame list."""
    if not isinstance(frames, (list, tuple)):
        raise ProtocolError("frames", f"frames must be a list, got {type(frames).__name__}")
    if not 1 <= len(frames) <= 1 + MAX_ARRAYS:
        raise ProtocolError("frames", f"{len(frames)} frames, expected 1..{1 + MAX_ARRAYS}")
    return [_byte_view(frame, index) for index, frame in enumerate(frames)]


def _byte_view(frame: Frame, index: int) -> memoryview:
    try:
        source = frame
        if not isinstance(frame, (bytes, bytearray, memoryview)) and hasattr(frame, "buffer"):
            source = frame.buffer  # zmq.Frame: its memoryview, no copy
        return memoryview(source).cast("B")
    except Exception:
        raise ProtocolError("frames", f"frame {index} ({type(frame).__name__}) is not a contiguous buffer") from None


def _unpack_header(buffer: memoryview) -> dict[Any, Any]:
    if buffer.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("size", f"header is {buffer.nbytes} bytes, limit {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            buffer,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_unique_keys_map,
            **_UNPACK_LIMITS,
        )
    except Exception as exc:  # msgpack raises many types (ValueError, StackError, UnicodeError...)
        raise ProtocolError("header", f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header", f"header is a msgpack {type(header).__name__}, not a map")
    return header


def _unique_keys_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """msgpack map hook: refuse duplicate keys, which other parsers might resolve differently."""
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        raise ValueError("duplicate map key")
    return mapping


def _build_message(header: dict[Any, Any], array_frames: list[memoryview], limit: int) -> Message:
    cls = _message_class(header)
    spec = spec_of(cls)
    if len(array_frames) != len(spec.arrays):
        raise ProtocolError(
            "frames", f"{spec.name} has {len(spec.arrays)} array frame(s), got {len(array_frames)}"
        )
    _check_keys(header, spec)
    budget = limit
    fields: dict[str, Any] = {s.name: header[s.name] for s in spec.header + spec.scalars}
    metas = _array_metas(header["arrays"], spec)
    for array_spec, meta, buffer in zip(spec.arrays, metas, array_frames):
        values = _build_array(array_spec, meta, buffer, budget)
        budget -= values.nbytes
        fields[array_spec.name] = values
    return cls(**fields)


def _message_class(header: dict[Any, Any]) -> type[Message]:
    if "v" not in header:
        raise ProtocolError("header", "header has no protocol version 'v'")
    version = header["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {show(version)}, this side speaks {PROTOCOL_VERSION}")
    if "t" not in header:
        raise ProtocolError("header", "header has no message type 't'")
    name = header["t"]
    if type(name) is not str or name not in MESSAGE_TYPES:
        raise ProtocolError("type", f"unknown message type {show(name)}")
    return MESSAGE_TYPES[name]


def _check_keys(header: dict[Any, Any], spec: MessageSpec) -> None:
    expected = spec.wire_keys
    keys = set(header)
    if keys != expected:
        missing = sorted(show(k) for k in expected - keys)[:5]
        extra = sorted(show(k) for k in keys - expected)[:5]
        raise ProtocolError("header", f"{spec.name} header keys: missing {missing}, unexpected {extra}")


def _array_metas(metas: Any, spec: MessageSpec) -> list[tuple[np.dtype, list[int]]]:
    """Parse ``[[dtype, shape], ...]`` against the type's array specs (dtype and ndim only)."""
    if type(metas) is not list or len(metas) != len(spec.arrays):
        raise ProtocolError("header", f"'arrays' must list {len(spec.arrays)} [dtype, shape] pairs")
    parsed = []
    for array_spec, meta in zip(spec.arrays, metas):
        if type(meta) is not list or len(meta) != 2:
            raise ProtocolError("header", f"{array_spec.name}: array entry must be [dtype, shape]")
        parsed.append((_wire_dtype(array_spec, meta[0]), _wire_shape(array_spec, meta[1])))
    return parsed


def _wire_dtype(array_spec: ArraySpec, code: Any) -> np.dtype:
    dtype = WIRE_DTYPES.get(code) if type(code) is str else None
    if dtype is None:
        raise ProtocolError("dtype", f"{array_spec.name}: dtype {show(code)} is not allowed on the wire")
    if not array_spec.allows(dtype):
        raise ProtocolError("dtype", f"{array_spec.name}: dtype {dtype} is not allowed for this field")
    return dtype


def _wire_shape(array_spec: ArraySpec, shape: Any) -> list[int]:
    if type(shape) is not list or len(shape) != array_spec.ndim:
        raise ProtocolError("shape", f"{array_spec.name}: shape must be a list of {array_spec.ndim} dimensions")
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise ProtocolError("shape", f"{array_spec.name}: bad dimension {show(dim)}")
    return shape


def _build_array(
    array_spec: ArraySpec, meta: tuple[np.dtype, list[int]], buffer: memoryview, budget: int
) -> np.ndarray:
    dtype, shape = meta
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > budget:
        raise ProtocolError("size", f"{array_spec.name}: declared {nbytes} bytes exceed the message limit")
    if nbytes != buffer.nbytes:
        raise ProtocolError("shape", f"{array_spec.name}: shape {shape} needs {nbytes} bytes, frame has {buffer.nbytes}")
    values = np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)
    if not values.flags.aligned:  # rare (tiny zmq messages live inline); unaligned math is slow or unsafe
        values = values.copy()
    return values


# --------------------------------------------------------------------------------------------------
# rejection accounting


class RejectCounter:
    """Counts rejected messages by :class:`ProtocolError` kind (safe to share between threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, kind: str) -> int:
        """Count one rejection of ``kind``; return how many of that kind there have been."""
        with self._lock:
            count = self._counts.get(kind, 0) + 1
            self._counts[kind] = count
            return count

    @property
    def total(self) -> int:
        """All rejections so far."""
        with self._lock:
            return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """A snapshot ``{kind: count}``."""
        with self._lock:
            return dict(self._counts)


#: log the first LOG_FIRST rejections of each kind, then every LOG_EVERY-th
LOG_FIRST = 10
LOG_EVERY = 1000


def should_log(count: int) -> bool:
    """Rate limit for rejection warnings: the first few of a kind, then one in LOG_EVERY."""
    return count <= LOG_FIRST or count % LOG_EVERY == 0


def safe_decode(
    frames: Sequence[Frame],
    counter: RejectCounter,
    log: logging.Logger | None = None,
    *,
    max_message_bytes: int | None = None,
) -> Message | None:
    """:func:`decode`, but a rejected message is counted, logged (rate-limited) and returns None."""
    try:
        return decode(frames, max_message_bytes=max_message_bytes)
    except ProtocolError as exc:
        count = counter.add(exc.kind)
        if should_log(count):
            (log or logger).warning(
                "rejected message from %s (%s #%d): %s", exc.sender or "?", exc.kind, count, exc.reason
            )
        return None


# --------------------------------------------------------------------------------------------------
# sequence tracking


@dataclass(frozen=True)
class SeqStatus:
    """What one sequence number says about the stream it came from.

    ``gap``: messages missed since the previous one from the same key; ``stale``: not newer than
    the last one seen (a duplicate or reordered message: drop it); ``restarted``: the numbering
    restarted at 0, i.e. the sender is a new process, and counting starts over.
    """

    gap: int = 0
    stale: bool = False
    restarted: bool = False


class SeqTracker:
    """Per-stream sequence tracking for receivers: counts what was missed, flags what is stale.

    A key is whatever identifies one numbered stream, usually the sender's name, or
    ``(sender, message type)`` when a sender numbers each type separately.  The first number seen
    from a key starts the count (a late joiner missed nothing *it* could have had); a later
    jump ``last -> seq`` misses ``seq - last - 1``; seq 0 after others means a restarted sender.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[Hashable, int] = {}
        self._stats: dict[Hashable, dict[str, int]] = {}

    def observe(self, key: Hashable, seq: int) -> SeqStatus:
        """Record ``seq`` from stream ``key`` and report the gap before it."""
        with self._lock:
            stats = self._stats.setdefault(key, {"received": 0, "missed": 0, "stale": 0, "restarts": 0})
            last = self._last.get(key)
            status = self._classify(last, seq)
            stats["received"] += 1
            stats["missed"] += status.gap
            stats["stale"] += status.stale
            stats["restarts"] += status.restarted
            if not status.stale:
                self._last[key] = seq
            return status

    @staticmethod
    def _classify(last: int | None, seq: int) -> SeqStatus:
        if last is None:
            return SeqStatus()
        if seq > last:
            return SeqStatus(gap=seq - last - 1)
        if seq == 0:
            return SeqStatus(restarted=True)
        return SeqStatus(stale=True)

    def missed(self, key: Hashable | None = None) -> int:
        """Messages missed from ``key`` (or from all keys)."""
        with self._lock:
            if key is not None:
                return self._stats.get(key, {}).get("missed", 0)
            return sum(stats["missed"] for stats in self._stats.values())

    def forget(self, key: Hashable) -> None:
        """Drop ``key`` (e.g. after its sender said goodbye); its next seq starts afresh."""
        with self._lock:
            self._last.pop(key, None)
            self._stats.pop(key, None)

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{str(key): {"received", "missed", "stale", "restarts", "last_seq"}}``."""
        with self._lock:
            return {
                str(key): {**stats, "last_seq": self._last.get(key, -1)} for key, stats in self._stats.items()
            }

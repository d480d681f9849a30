"""Tests of the pure wire protocol: round trips, zero copy, every rejection kind, fuzzing, seq gaps."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import pytest

from gped.wire import (
    MAX_HEADER_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    REJECT_KINDS,
    CheckpointDone,
    CheckpointRequest,
    Heartbeat,
    Hello,
    Message,
    Params,
    ProtocolError,
    RejectCounter,
    Report,
    SeqTracker,
    Start,
    Stop,
    Targets,
    Welcome,
    array,
    decode,
    encode,
    message,
    safe_decode,
    scalar,
)

HEADER = {"sender": "sampler", "seq": 7, "step": 1_200, "sample": 3}


def _probs(rng: np.random.Generator, rows: int, classes: int) -> np.ndarray:
    raw = rng.random((rows, classes)) + 0.01
    return (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)


def targets(rows: int = 5, classes: int = 10, dtype: Any = np.float32, seed: int = 0) -> Targets:
    rng = np.random.default_rng(seed)
    return Targets(
        **HEADER,
        noise_seed=12345,
        indices=rng.integers(0, 1000, rows).astype(np.int64),
        logits=rng.normal(size=(rows, classes)).astype(dtype),
    )


def one_of_each() -> list[Message]:
    """A representative message of every registered type."""
    rng = np.random.default_rng(1)
    return [
        Hello(
            **HEADER, role="student", name="s-small", pid=4242, config_hash="ab12", chain_hash="cd34",
            data_fingerprint="ef56", mode="targets", resume_step=100,
        ),
        Welcome(**HEADER, accepted=False, reason="config hash differs", run_dir="/runs/x", stop_step=10**6),
        Heartbeat(**HEADER, role="sampler", name="sgld", status={"steps": 10, "rate": 12.5, "state": "burn-in"}),
        Params(**HEADER, params=rng.normal(size=1000).astype(np.float32)),
        targets(),
        Report(
            **HEADER, student="s-small", metrics={"nll": 0.08, "acc": 0.98},
            probs=_probs(rng, 20, 10), entropy=rng.random(20).astype(np.float32),
        ),
        CheckpointRequest(**HEADER, tag="ckpt-000100"),
        CheckpointDone(**HEADER, tag="ckpt-000100", path="/runs/x/ckpt/student.pt", ok=True),
        Start(**HEADER),
        Stop(**HEADER, reason="stop step reached"),
    ]


def as_bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(frame) for frame in frames]


def crafted(msg: Message, edit_header: Callable[[dict], Any] | None = None) -> list[bytes]:
    """The frames of ``msg`` with its header unpacked, edited and packed again."""
    frames = as_bytes(encode(msg))
    if edit_header is not None:
        header = msgpack.unpackb(frames[0], raw=False)
        edit_header(header)
        frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def rejects(frames: Any, kind: str, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames, **kwargs)
    assert info.value.kind == kind, str(info.value)
    return info.value


# --------------------------------------------------------------------------------------------------
# round trips and zero copy


def test_registry_holds_every_type() -> None:
    assert {type(m).__name__ for m in one_of_each()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", one_of_each(), ids=lambda m: type(m).__name__)
def test_round_trip_every_type(msg: Message) -> None:
    back = decode(as_bytes(encode(msg)))
    assert type(back) is type(msg)
    assert back == msg
    for spec in msg.SPEC.arrays:
        np.testing.assert_array_equal(getattr(back, spec.name), getattr(msg, spec.name))
        assert getattr(back, spec.name).dtype == getattr(msg, spec.name).dtype
    assert back.sender == "sampler" and back.seq == 7 and back.step == 1_200 and back.sample == 3


def test_encode_is_zero_copy_for_contiguous_arrays() -> None:
    msg = targets()
    frames = encode(msg)
    assert isinstance(frames[0], bytes)
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), msg.logits)
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), msg.indices)


def test_decode_is_zero_copy_over_frame_buffers() -> None:
    frames = as_bytes(encode(targets()))
    back = decode(frames)
    assert np.shares_memory(back.logits, np.frombuffer(frames[2], np.uint8))
    assert np.shares_memory(back.indices, np.frombuffer(frames[1], np.uint8))
    assert not back.logits.flags.writeable  # a view of immutable bytes


def test_end_to_end_memory_is_shared_without_copies() -> None:
    msg = targets()
    back = decode(encode(msg))
    assert np.shares_memory(back.logits, msg.logits)


class FakeZmqFrame:
    """Stands in for zmq.Frame: exposes its data as ``.buffer``."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.buffer = memoryview(data)


def test_decode_accepts_frame_objects_with_buffer() -> None:
    msg = targets()
    frames = [FakeZmqFrame(bytes(f)) for f in encode(msg)]
    back = decode(frames)
    assert back == msg
    assert np.shares_memory(back.logits, np.frombuffer(frames[2]._data, np.uint8))


def test_decode_accepts_real_zmq_frames() -> None:
    zmq = pytest.importorskip("zmq")
    msg = targets()
    assert decode([zmq.Frame(bytes(f)) for f in encode(msg)]) == msg


def test_decode_accepts_bytearray_and_tuple() -> None:
    msg = targets()
    assert decode(tuple(bytearray(f) for f in encode(msg))) == msg


def test_non_contiguous_arrays_are_sent_correctly() -> None:
    base = np.arange(60, dtype=np.float32).reshape(10, 6)
    for logits in (base[:, ::2], base.T[:3].T, base[::2]):
        assert not logits.flags.c_contiguous
        msg = Targets(noise_seed=1, indices=np.arange(logits.shape[0], dtype=np.int64), logits=logits)
        back = decode(as_bytes(encode(msg)))
        np.testing.assert_array_equal(back.logits, logits)
        assert back.logits.flags.c_contiguous


def test_big_endian_input_is_sent_little_endian() -> None:
    logits = np.arange(12, dtype=">f8").reshape(3, 4)
    msg = Targets(noise_seed=1, indices=np.arange(3, dtype=">i8"), logits=logits)
    frames = encode(msg)
    header = msgpack.unpackb(frames[0])
    assert header["arrays"] == [["<i8", [3]], ["<f8", [3, 4]]]
    back = decode(as_bytes(frames))
    np.testing.assert_array_equal(back.logits, logits)
    np.testing.assert_array_equal(back.indices, [0, 1, 2])


def test_unaligned_frames_are_copied_aligned() -> None:
    msg = Params(params=np.linspace(-1, 1, 33))  # float64
    frames = encode(msg)
    shifted = bytearray(frames[1].nbytes + 1)
    shifted[1:] = bytes(frames[1])
    back = decode([frames[0], memoryview(shifted)[1:]])
    assert back.params.flags.aligned
    np.testing.assert_array_equal(back.params, msg.params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_and_float64_accepted_where_allowed(dtype: Any) -> None:
    back = decode(as_bytes(encode(targets(dtype=dtype))))
    assert back.logits.dtype == dtype
    back = decode(as_bytes(encode(Params(params=np.ones(7, dtype=dtype)))))
    assert back.params.dtype == dtype and back.numel == 7


def test_report_with_empty_entropy_round_trips() -> None:
    rng = np.random.default_rng(0)
    msg = Report(student="s", probs=_probs(rng, 4, 3), entropy=np.zeros(0, np.float32))
    back = decode(as_bytes(encode(msg)))
    assert back.entropy.shape == (0,) and back == msg


def test_empty_targets_batch_round_trips() -> None:
    msg = Targets(noise_seed=0, indices=np.zeros(0, np.int64), logits=np.zeros((0, 10), np.float32))
    assert decode(as_bytes(encode(msg))) == msg


def test_numpy_scalars_are_normalised_to_python_types() -> None:
    msg = Heartbeat(
        role="student", name="a", step=np.int64(5),
        status={"loss": np.float32(0.5), "n": np.int64(3)},
    )
    assert type(msg.step) is int and type(msg.status["loss"]) is float and type(msg.status["n"]) is int
    assert decode(encode(msg)) == msg


def test_metrics_accept_ints_as_floats() -> None:
    rng = np.random.default_rng(0)
    msg = Report(student="s", metrics={"acc": 1}, probs=_probs(rng, 2, 2), entropy=np.zeros(0, np.float32))
    assert msg.metrics == {"acc": 1.0} and type(msg.metrics["acc"]) is float


def test_encode_overrides_sender_and_seq() -> None:
    back = decode(encode(Stop(reason="x"), sender="coordinator", seq=99))
    assert back.sender == "coordinator" and back.seq == 99
    with pytest.raises(ProtocolError) as info:
        encode(Stop(), seq=-1)
    assert info.value.kind == "value"


def test_encode_enforces_size_limit_and_rejects_non_messages() -> None:
    with pytest.raises(ProtocolError) as info:
        encode(Params(params=np.zeros(1000, np.float32)), max_message_bytes=1000)
    assert info.value.kind == "size"
    with pytest.raises(TypeError):
        encode("not a message")  # type: ignore[arg-type]


def test_encode_revalidates_mutated_status() -> None:
    msg = Heartbeat(role="student", name="a")
    msg.status["bad"] = object()  # frozen-ish: the dict itself is mutable
    with pytest.raises(ProtocolError) as info:
        encode(msg)
    assert info.value.kind == "field"


def test_messages_are_frozen() -> None:
    msg = Stop(reason="x")
    with pytest.raises(AttributeError):
        msg.reason = "y"  # type: ignore[misc]


def test_adding_a_type_is_one_dataclass() -> None:
    @message
    class Ping(Message):
        note: str = scalar("", max_len=16)
        weights: np.ndarray = array(np.float32, ndim=1, finite=True)

    try:
        msg = Ping(note="hi", weights=np.ones(3, np.float32))
        assert decode(encode(msg)) == msg
        rejects(crafted(msg, lambda h: h.update(note="x" * 17)), "size")
    finally:
        MESSAGE_TYPES.pop("Ping")


def test_wire_package_is_pure() -> None:
    code = "import sys, gped.wire; assert not {'torch', 'zmq'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --------------------------------------------------------------------------------------------------
# construction rejects what decode would


@pytest.mark.parametrize(
    "build, kind",
    [
        (lambda: Targets(noise_seed=1, indices=np.arange(3, dtype=np.int32), logits=np.zeros((3, 2), np.float32)), "dtype"),
        (lambda: Targets(noise_seed=1, indices=[0, 1], logits=np.zeros((2, 2), np.float32)), "field"),
        (lambda: Targets(noise_seed=-1, indices=np.arange(2), logits=np.zeros((2, 2), np.float32)), "value"),
        (lambda: Targets(noise_seed=2**63, indices=np.arange(2), logits=np.zeros((2, 2), np.float32)), "value"),
        (lambda: Targets(noise_seed=1, indices=np.arange(2), logits=np.zeros((2, 0), np.float32)), "shape"),
        (lambda: Params(params=np.zeros((2, 2), np.float32)), "shape"),
        (lambda: Params(params=np.zeros(3, np.float16)), "dtype"),
        (lambda: Params(params=np.zeros(3, np.float32), numel=4), "shape"),
        (lambda: Params(params=np.array([1.0, np.inf])), "nonfinite"),
        (lambda: Hello(role="teacher", name="a", pid=1, config_hash="", chain_hash="", data_fingerprint="", mode=""), "value"),
        (lambda: Hello(role="student", name="../etc", pid=1, config_hash="", chain_hash="", data_fingerprint="", mode=""), "value"),
        (lambda: Hello(role="student", name="a", pid=True, config_hash="", chain_hash="", data_fingerprint="", mode=""), "field"),
        (lambda: Welcome(accepted=1), "field"),
        (lambda: Report(student="s", metrics={"x": 2**2000}, probs=np.ones((1, 1), np.float32), entropy=np.zeros(0, np.float32)), "value"),
        (lambda: Heartbeat(role="student", name="a", status={"nested": {"x": 1}}), "field"),
        (lambda: Heartbeat(role="student", name="a", status={"flag": True}), "field"),
        (lambda: Heartbeat(role="student", name="a", status={str(i): i for i in range(65)}), "size"),
        (lambda: Heartbeat(role="student", name="a", status={"": 1}), "size"),
        (lambda: Heartbeat(role="student", name="a", status={"s": "x" * 300}), "size"),
        (lambda: CheckpointRequest(tag="a/b"), "value"),
        (lambda: CheckpointRequest(tag=".hidden"), "value"),
        (lambda: Stop(reason="\ud800"), "value"),
        (lambda: Stop(reason="x", step=-1), "value"),
        (lambda: Stop(reason="x", sample=-2), "value"),
    ],
)
def test_construction_validates(build: Callable[[], Message], kind: str) -> None:
    with pytest.raises(ProtocolError) as info:
        build()
    assert info.value.kind == kind, str(info.value)


# --------------------------------------------------------------------------------------------------
# every rejection kind, from crafted frames


def test_reject_truncated_array_frame() -> None:
    frames = crafted(targets())
    frames[2] = frames[2][:-4]
    rejects(frames, "shape")


def test_reject_extra_frame() -> None:
    rejects(crafted(targets()) + [b"\x00" * 8], "frames")


def test_reject_missing_frame() -> None:
    rejects(crafted(targets())[:2], "frames")
    rejects(crafted(Stop(reason="x")) + [b""], "frames")


@pytest.mark.parametrize("frames", [[], None, 5, "abc", b"abc", [None], ["text"], [b"\x80", 3], [memoryview(b"abcd")[::2]]])
def test_reject_bad_frame_lists(frames: Any) -> None:
    rejects(frames, "frames")


def test_reject_too_many_frames_before_looking_at_them() -> None:
    rejects([b"x"] * 100, "frames")


def test_reject_wrong_version() -> None:
    error = rejects(crafted(targets(), lambda h: h.update(v=PROTOCOL_VERSION + 1)), "version")
    assert error.sender == "sampler"  # who sent it, for the log line
    error = rejects(crafted(targets(), lambda h: h.update(v=0, sender="evil\nINFO: fake line")), "version")
    assert "\n" not in error.sender
    rejects(crafted(targets(), lambda h: h.update(v=True)), "version")
    rejects(crafted(targets(), lambda h: h.pop("v")), "header")


def test_reject_unknown_type() -> None:
    rejects(crafted(Stop(), lambda h: h.update(t="Pickle")), "type")
    rejects(crafted(Stop(), lambda h: h.update(t=1)), "type")
    rejects(crafted(Stop(), lambda h: h.pop("t")), "header")


@pytest.mark.parametrize("key", ["step", "seq", "sample", "noise_seed"])
def test_reject_bool_in_int_field(key: str) -> None:
    rejects(crafted(targets(), lambda h: h.update({key: True})), "field")


def test_reject_wrong_scalar_types() -> None:
    rejects(crafted(targets(), lambda h: h.update(step=1.0)), "field")
    rejects(crafted(targets(), lambda h: h.update(sender=b"")), "field")
    rejects(crafted(targets(), lambda h: h.update(sender=b"x")), "header")  # no bin data in headers at all
    rejects(crafted(CheckpointDone(tag="a", path="p", ok=True), lambda h: h.update(ok=1)), "field")
    rejects(crafted(Heartbeat(role="student", name="a"), lambda h: h.update(status=[1, 2])), "field")


@pytest.mark.parametrize("code", ["|O", "O", "object", ">f4", ">i8", "<c16", "|b1", "|V8", "<U4", "<M8[s]", "f4,f4", "(2,)f4", 4, None])
def test_reject_bad_dtype_strings(code: Any) -> None:
    def edit(header: dict) -> None:
        header["arrays"][1][0] = code

    rejects(crafted(targets(), edit), "dtype")


def test_reject_wire_dtype_not_allowed_for_field() -> None:
    def edit(header: dict) -> None:
        header["arrays"][0][0] = "<u8"  # indices must be int64; same byte length

    rejects(crafted(targets(), edit), "dtype")
    msg = Report(student="s", probs=np.full((2, 2), 0.5, np.float32), entropy=np.zeros(0, np.float32))

    def as_float64(header: dict) -> None:
        header["arrays"][0][0] = "<f8"
        header["arrays"][0][1] = [1, 2]  # same 16 bytes, now float64

    rejects(crafted(msg, as_float64), "dtype")


def test_reject_shape_mismatch() -> None:
    def edit(header: dict) -> None:
        header["arrays"][1][1] = [5, 9]

    rejects(crafted(targets(rows=5, classes=10), edit), "shape")


@pytest.mark.parametrize("shape", [[-5, 10], [5], [5, 10, 1], [5.0, 10], [5, True], [5, 2**41], "5x10", None])
def test_reject_bad_shapes(shape: Any) -> None:
    def edit(header: dict) -> None:
        header["arrays"][1][1] = shape

    rejects(crafted(targets(), edit), "shape")


def test_reject_oversized_declared_shape() -> None:
    def edit(header: dict) -> None:
        header["arrays"][1][1] = [2**30, 2**20]

    rejects(crafted(targets(), edit), "size")


def test_reject_over_per_call_size_limit() -> None:
    frames = crafted(Params(params=np.zeros(1000, np.float32)))
    rejects(frames, "size", max_message_bytes=2000)
    assert decode(frames, max_message_bytes=5000).numel == 1000


def test_reject_nan_in_logits() -> None:
    frames = crafted(targets())
    logits = np.frombuffer(frames[2], np.float32).copy()
    logits[7] = np.nan
    frames[2] = logits.tobytes()
    rejects(frames, "nonfinite")
    logits[7] = -np.inf
    frames[2] = logits.tobytes()
    rejects(frames, "nonfinite")


def test_reject_inf_in_params_even_with_huge_finite_values() -> None:
    params = np.array([1e308, 1e308, 0.0])  # the float64 sum overflows but every value is finite
    assert decode(encode(Params(params=params))).numel == 3
    frames = crafted(Params(params=params))
    values = np.frombuffer(frames[1], np.float64).copy()
    values[2] = np.inf
    frames[1] = values.tobytes()
    rejects(frames, "nonfinite")


def test_reject_negative_indices() -> None:
    frames = crafted(targets())
    indices = np.frombuffer(frames[1], np.int64).copy()
    indices[2] = -1
    frames[1] = indices.tobytes()
    rejects(frames, "value")


def test_reject_rows_mismatch() -> None:
    five, four = targets(rows=5), targets(rows=4)
    frames = crafted(five)
    four_frames = crafted(four)
    header = msgpack.unpackb(frames[0])
    header["arrays"][0] = [header["arrays"][0][0], [4]]
    rejects([msgpack.packb(header), four_frames[1], frames[2]], "shape")


def test_reject_report_constraints() -> None:
    rng = np.random.default_rng(0)
    msg = Report(student="s", probs=_probs(rng, 4, 3), entropy=rng.random(4).astype(np.float32))
    frames = crafted(msg)
    probs = np.frombuffer(frames[1], np.float32).copy()
    probs[0] += 0.01
    rejects([frames[0], probs.tobytes(), frames[2]], "value")
    three = as_bytes(encode(Report(student="s", probs=_probs(rng, 3, 3), entropy=np.zeros(3, np.float32))))
    rejects([frames[0], frames[1], three[2]], "shape")  # header still says entropy [4]
    header = msgpack.unpackb(frames[0])
    header["arrays"][1][1] = [3]
    rejects([msgpack.packb(header), frames[1], three[2]], "shape")  # 3 entropies for 4 rows


def test_reject_header_that_is_not_a_map() -> None:
    rejects([msgpack.packb([1, "Targets"])] + crafted(targets())[1:], "header")
    rejects([msgpack.packb("Stop")], "header")


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xc1", b"\x81", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\x91" * 5000,
     b"\x81\x01\x02", b"\x81\xa1v\xc4\x04abcd", b"\x81\xa1v\xd6\xff\x00\x00\x00\x00", b"\xa3\xff\xfe\xfd",
     b"\x82\xa1v\x01\xa1v\x01", b"\x82\xa1v\x01\xa1v\x02", b"\x80extra", b"\x81\x80\x01"],
)
def test_reject_garbage_header(garbage: bytes) -> None:
    rejects([garbage], "header")


def test_reject_missing_and_extra_header_keys() -> None:
    rejects(crafted(targets(), lambda h: h.pop("noise_seed")), "header")
    rejects(crafted(targets(), lambda h: h.update(pickle="cos\nsystem")), "header")
    rejects(crafted(Stop(), lambda h: h.update(arrays=[["<f4", [1]]])), "header")
    rejects(crafted(targets(), lambda h: h.update(arrays=[["<i8", [5]], ["<f4", [5, 10], 1]])), "header")


def test_reject_huge_strings() -> None:
    rejects(crafted(Stop(), lambda h: h.update(reason="x" * 10_000)), "size")
    big = crafted(Stop(), lambda h: h.update(reason="x" * (MAX_HEADER_BYTES + 10)))
    rejects(big, "size")
    rejects(crafted(Stop(), lambda h: h.update(sender="y" * 1000)), "size")


def test_reject_unsafe_names_on_the_wire() -> None:
    rejects(crafted(CheckpointRequest(tag="ok"), lambda h: h.update(tag="../../etc/passwd")), "value")
    msg = Report(student="s", probs=np.full((1, 2), 0.5, np.float32), entropy=np.zeros(0, np.float32))
    rejects(crafted(msg, lambda h: h.update(student="a\nb")), "value")


def test_every_reject_kind_is_known() -> None:
    assert REJECT_KINDS >= {"frames", "header", "version", "type", "field", "value", "dtype", "shape", "size", "nonfinite"}


# --------------------------------------------------------------------------------------------------
# fuzzing

_EDGE_INTS = [0, 1, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
_DTYPE_POOL = ["<f4", "<f8", "<i8", "<i4", "|u1", "|i1", "<f2", "|O", ">f4", "<c8", "|b1", "", "<f4\x00"]


def _random_value(rng: np.random.Generator, depth: int = 0) -> Any:
    """A random msgpack-able value, nested up to 3 levels."""
    choice = rng.integers(11 if depth < 3 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return bool(rng.integers(2))
    if choice == 2:
        return _EDGE_INTS[rng.integers(len(_EDGE_INTS))]
    if choice == 3:
        return int(rng.integers(-1000, 1000))
    if choice == 4:
        return [float("nan"), float("inf"), -0.0, 1.5, 1e308][rng.integers(5)]
    if choice == 5:
        return "".join(chr(c) for c in rng.integers(32, 0x2FF, rng.integers(0, 12)))
    if choice == 6:
        return rng.bytes(int(rng.integers(0, 6)))
    if choice == 7:
        return ["sampler", "student", "Targets", "../x", "", "s" * 300][rng.integers(6)]
    if choice in (8, 9):
        return [_random_value(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    return {str(_random_value(rng, 3))[:8]: _random_value(rng, depth + 1) for _ in range(rng.integers(0, 4))}


def _mutate_header(rng: np.random.Generator, header: dict) -> None:
    keys = list(header)
    action = rng.integers(5)
    if action == 0:
        header[keys[rng.integers(len(keys))]] = _random_value(rng)
    elif action == 1:
        header.pop(keys[rng.integers(len(keys))])
    elif action == 2:
        header[str(_random_value(rng))[:10]] = _random_value(rng)
    elif action == 3 and header["arrays"]:
        entry = header["arrays"][rng.integers(len(header["arrays"]))]
        entry[0] = _DTYPE_POOL[rng.integers(len(_DTYPE_POOL))]
    elif header["arrays"]:
        entry = header["arrays"][rng.integers(len(header["arrays"]))]
        entry[1] = [int(d) for d in rng.integers(-2, 12, rng.integers(0, 4))]


def _flip_bits(rng: np.random.Generator, data: bytes) -> bytes:
    if not data:
        return data
    buffer = bytearray(data)
    for _ in range(rng.integers(1, 9)):
        position = rng.integers(len(buffer))
        buffer[position] ^= 1 << int(rng.integers(8))
    return bytes(buffer)


def _fuzz_case(rng: np.random.Generator, valid: list[list[bytes]]) -> list[Any]:
    frames = list(valid[rng.integers(len(valid))])
    action = rng.integers(8)
    if action == 0:
        return [rng.bytes(int(rng.integers(0, 64))) for _ in range(rng.integers(0, 5))]
    index = int(rng.integers(len(frames)))
    if action == 1:
        frames[index] = _flip_bits(rng, frames[index])
    elif action == 2:
        frames[index] = frames[index][: rng.integers(0, len(frames[index]) + 1)]
    elif action == 3:
        if rng.integers(2) and len(frames) > 1:
            frames.pop(index)
        else:
            frames.insert(index, frames[index] if rng.integers(2) else rng.bytes(int(rng.integers(0, 16))))
    elif action in (4, 5):
        header = msgpack.unpackb(frames[0], raw=False)
        _mutate_header(rng, header)
        frames[0] = msgpack.packb(header, use_bin_type=True)
    elif action == 6:
        frames[0] = msgpack.packb(_random_value(rng), use_bin_type=True)
    else:
        frames[index] = frames[index] + rng.bytes(int(rng.integers(1, 9)))
    return frames


def test_fuzz_decode_never_raises_anything_but_protocol_error() -> None:
    rng = np.random.default_rng(20200517)
    valid = [as_bytes(encode(m)) for m in one_of_each()]
    valid += [as_bytes(encode(targets(rows=3, classes=2, dtype=np.float64, seed=s))) for s in range(3)]
    valid.append(as_bytes(encode(Params(params=np.array([1.0, -2.0, 3.0], np.float64)))))
    outcomes: dict[str, int] = {}
    for _ in range(4000):
        frames = _fuzz_case(rng, valid)
        try:
            msg = decode(frames)
        except ProtocolError as error:
            assert error.kind in REJECT_KINDS and error.kind != "internal", str(error)
            outcomes[error.kind] = outcomes.get(error.kind, 0) + 1
        else:
            assert isinstance(msg, Message)
            encode(msg)  # anything decode accepts can be sent again
            outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert outcomes.get("ok", 0) > 100
    assert {"frames", "header", "field", "dtype", "shape", "nonfinite"} <= set(outcomes), outcomes


# --------------------------------------------------------------------------------------------------
# rejection accounting


def test_safe_decode_counts_and_rate_limits_logging(caplog: pytest.LogCaptureFixture) -> None:
    counter = RejectCounter()
    log = logging.getLogger("test.wire")
    with caplog.at_level(logging.WARNING, logger="test.wire"):
        for _ in range(25):
            assert safe_decode([b"\xc1"], counter, log) is None
        for _ in range(3):
            assert safe_decode([], counter, log) is None
        assert safe_decode(encode(Stop(reason="ok")), counter, log) == Stop(reason="ok")
    assert counter.as_dict() == {"header": 25, "frames": 3}
    assert counter.total == 28
    assert len(caplog.records) == 13  # first 10 "header" + 3 "frames"
    assert "header #1" in caplog.records[0].getMessage()


def test_safe_decode_logs_every_thousandth(caplog: pytest.LogCaptureFixture) -> None:
    counter = RejectCounter()
    with caplog.at_level(logging.WARNING, logger="gped.wire"):
        for _ in range(2000):
            safe_decode([], counter)
    assert counter.as_dict() == {"frames": 2000}
    assert len(caplog.records) == 12


# --------------------------------------------------------------------------------------------------
# sequence tracking


def test_seq_tracker_counts_gaps_per_sender() -> None:
    tracker = SeqTracker()
    assert tracker.observe("sampler", 5).gap == 0  # late joiner: nothing missed yet
    assert tracker.observe("sampler", 6).gap == 0
    assert tracker.observe("sampler", 10).gap == 3
    assert tracker.observe("other", 0).gap == 0
    assert tracker.observe("other", 2).gap == 1
    assert tracker.missed("sampler") == 3 and tracker.missed("other") == 1 and tracker.missed() == 4


def test_seq_tracker_flags_stale_and_restart() -> None:
    tracker = SeqTracker()
    tracker.observe("s", 3)
    tracker.observe("s", 4)
    stale = tracker.observe("s", 4)
    assert stale.stale and stale.gap == 0
    assert tracker.observe("s", 2).stale
    restart = tracker.observe("s", 0)
    assert restart.restarted and not restart.stale and restart.gap == 0
    assert tracker.observe("s", 1).gap == 0
    assert tracker.observe("s", 3).gap == 1
    stats = tracker.as_dict()["s"]
    assert stats == {"received": 7, "missed": 1, "stale": 2, "restarts": 1, "last_seq": 3}
    tracker.forget("s")
    assert tracker.observe("s", 50).gap == 0


def test_seq_tracker_with_decoded_messages() -> None:
    tracker = SeqTracker()
    sent = [encode(Stop(reason="x"), sender="sampler", seq=seq) for seq in range(10)]
    received = [decode(frames) for i, frames in enumerate(sent) if i not in (3, 4, 8)]
    gaps = [tracker.observe(msg.sender, msg.seq).gap for msg in received]
    assert sum(gaps) == 3 and tracker.missed("sampler") == 3

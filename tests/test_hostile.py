"""Hostile and malformed input against a live loopback run (DESIGN §3, "Wire").

Every bound socket of a run is attacked while the run streams:

1. the coordinator's ROUTER gets thousands of malformed (and valid-but-unauthorised) message frame
   lists from a stranger's DEALER; the coordinator's rejection counts must equal, kind by kind, what
   :func:`gped.wire.decode` says locally, every decodable message must be answered (never scored),
   and the run must finish exactly as an unattacked one would;
2. both bound TCP ports get raw bytes that are not ZMTP at all;
3. a stranger subscribes to the sampler's PUB with odd subscriptions and never reads.

Each test runs real role processes, is bounded in time, and leaves no process or port behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from gped.config import load_config
from gped.roles.common import HELLO_FIRST
from gped.runtime import load_data
from gped.wire import (
    PROTOCOL_VERSION,
    CheckpointRequest,
    Heartbeat,
    Hello,
    Params,
    ProtocolError,
    Report,
    Start,
    Stop,
    Targets,
    Welcome,
    decode,
    encode,
)

from support import assert_clean, finish, free_port_pair, port_free, spawn

pytestmark = pytest.mark.slow

SEED = 20240611
N_FUZZ = 3600
BOGUS_CONFIG_HASH = "X" * 16  # no hex digit is one bit away from "X": a few bit flips never fix it
MB = 2**20


# --------------------------------------------------------------------------------------------------
# running a small loopback run by hand


quiet_port_pair = free_port_pair  # below the ephemeral range (see support.free_port_pair)


class Run:
    """Coordinator, two students and the sampler as separate processes, on the config at ``path``."""

    def __init__(self, path: Path):
        self.path = path
        self.cfg = load_config(path)
        self.run_dir = Path(self.cfg.run_dir)
        self.port = self.cfg.coordinator.port
        self.data = load_data(self.cfg)  # prepared here once; every role reuses it
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def expected_samples(self) -> int:
        s = self.cfg.sampler
        return (s.steps - s.burn_in) // s.thin

    def start(self) -> None:
        self.procs["coordinator"] = spawn("coordinator", str(self.path))
        for name in ("pred", "ent"):
            self.procs[name] = spawn("student", str(self.path), "--name", name)
        self.procs["sampler"] = spawn("sampler", str(self.path))

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Until a student's first report reached the coordinator: samples are flowing."""
        deadline = time.monotonic() + timeout
        while not (self.run_dir / "metrics.jsonl").exists():
            dead = {n: p for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                logs = "\n".join(f"--- {n} exited {p.returncode}:\n{p.communicate()[0][-3000:]}" for n, p in dead.items())
                pytest.fail(f"roles exited before streaming:\n{logs}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not start streaming")
            time.sleep(0.05)

    def finish_all(self, timeout: float = 120.0) -> dict[str, tuple[int, str]]:
        deadline = time.monotonic() + timeout
        return {n: finish(p, timeout=max(1.0, deadline - time.monotonic())) for n, p in self.procs.items()}

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.communicate()

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def check_completed(self, outputs: dict[str, tuple[int, str]]) -> dict:
        """Every role exited 0 and the run is complete: every sample reached everyone."""
        for name, (code, out) in outputs.items():
            assert code == 0, f"{name} exited {code}:\n{out[-4000:]}"
        summary = self.summary()
        n = self.expected_samples
        assert summary["sampler"] == "done"
        assert summary["samples"] == n and summary["ensemble_missed"] == 0
        assert set(summary["students"]) == {"pred", "ent"}
        for name in ("pred", "ent"):
            metrics = summary["students"][name]
            assert metrics["final"] == 1.0 and metrics["missed"] == 0 and metrics["samples"] == n, (name, metrics)
        assert set(summary["scores"]) == {"teacher ensemble", "pred", "ent"}
        assert_clean(str(self.run_dir), self.port)
        return summary


# --------------------------------------------------------------------------------------------------
# the fuzz corpus: seeded frame lists, classified locally by gped.wire.decode


def _bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def base_messages(run: Run, rng: np.random.Generator) -> dict[str, object]:
    """Valid messages a stranger could send: none may be scored, and every Hello is refused."""
    cfg, data = run.cfg, run.data
    n_test, classes = len(data.test_x), data.num_classes
    hello = dict(role="student", name="intruder", pid=4242, protocol=PROTOCOL_VERSION, config_hash=BOGUS_CONFIG_HASH,
                 chain_hash=cfg.chain_hash(), data_fingerprint=data.fingerprint, mode=cfg.sampler.mode)
    probs = np.full((n_test, classes), 1.0 / classes, np.float32)
    return {
        "hello": Hello(**hello),
        "hello_sampler": Hello(**{**hello, "role": "sampler", "name": "sampler"}),
        "hello_protocol": Hello(**{**hello, "protocol": PROTOCOL_VERSION + 1}),
        # impersonations of attached roles, from a peer that never said hello
        "heartbeat": Heartbeat(sender="student:pred", role="student", name="pred",
                               status={"samples": 10**6, "sampler_pid": 1, "state": "done", "x": 0.5}),
        "heartbeat_sampler": Heartbeat(role="sampler", name="sampler", status={"state": "running", "pid": 1}),
        "report": Report(sender="student:pred", sample=7, student="pred", metrics={"final": 1.0, "intruder": 1.0},
                         probs=probs, entropy=np.zeros(n_test, np.float32)),
        "report_probs_only": Report(student="ent", metrics={"intruder": 2.0}, probs=probs, entropy=np.zeros(0, np.float32)),
        "params": Params(step=150, sample=5, params=rng.standard_normal(257).astype(np.float32)),
        "params64": Params(params=rng.standard_normal(33)),
        "targets": Targets(sample=3, noise_seed=9, indices=np.arange(50, dtype=np.int64),
                           logits=rng.standard_normal((50, classes)).astype(np.float32)),
        "stop": Stop(reason="intruder says stop"),
        "start": Start(),
        "welcome": Welcome(accepted=True, run_dir="/tmp/elsewhere", stop_step=1),
        "checkpoint": CheckpointRequest(tag="intruder"),
    }


def _repack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _header(frames: list[bytes]) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def _flip_bits(buf: bytes, r: random.Random, count: int) -> bytes:
    out = bytearray(buf)
    for _ in range(count):
        i = r.randrange(len(out))
        out[i] ^= 1 << r.randrange(8)
    return bytes(out)


def _set_array(frames: list[bytes], index: int, values: np.ndarray) -> list[bytes]:
    """``frames`` with array ``index`` replaced by ``values`` (header entry included)."""
    header = _header(frames)
    header["arrays"][index] = [values.dtype.str, list(values.shape)]
    frames = [_repack(header), *frames[1:]]
    frames[1 + index] = values.tobytes()
    return frames


class Fuzzer:
    """Generates the seeded mix of hostile frame lists, one category at a time."""

    def __init__(self, run: Run, seed: int):
        self.r = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.bases = {k: _bytes(encode(m)) for k, m in base_messages(run, self.np).items()}
        self.array_bases = [k for k, f in self.bases.items() if len(f) > 1]
        self.categories = {
            "random_bytes": (8, self.random_bytes),
            "empty": (2, self.empty),
            "truncated": (8, self.truncated),
            "bit_flips": (10, self.bit_flips),
            "frame_dropped": (4, self.frame_dropped),
            "extra_frames": (4, self.extra_frames),
            "version": (5, self.version),
            "unknown_type": (5, self.unknown_type),
            "bool_in_int": (4, self.bool_in_int),
            "field_type": (5, self.field_type),
            "bad_value": (6, self.bad_value),
            "dtype": (6, self.dtype),
            "shape": (6, self.shape),
            "huge_shape": (4, self.huge_shape),
            "nonfinite": (6, self.nonfinite),
            "cross_field": (4, self.cross_field),
            "keys": (4, self.keys),
            "msgpack": (5, self.msgpack_tricks),
            "oversized_header": (2, self.oversized_header),
            "valid": (8, self.valid),
        }
        self.big_params = _bytes(encode(Params(params=self.np.standard_normal(MB // 4 * 3).astype(np.float32))))  # 3 MB

    def pick(self) -> tuple[str, list[bytes]]:
        names = list(self.categories)
        name = self.r.choices(names, weights=[self.categories[n][0] for n in names])[0]
        return name, self.categories[name][1]()

    def huge(self, i: int) -> tuple[str, list[bytes]]:
        """Frames of a few MB: as a header, as valid arrays, with one NaN, with the wrong length."""
        r, big = self.r, self.big_params
        kind = i % 4
        if kind == 0:
            return "huge", [self.np.bytes(r.randint(2, 4) * MB)]
        if kind == 1:
            return "huge", list(big)
        if kind == 2:
            values = np.frombuffer(big[1], np.float32).copy()
            values[r.randrange(values.size)] = r.choice([np.nan, np.inf, -np.inf])
            return "huge", [big[0], values.tobytes()]
        return "huge", [big[0], big[1][: -4 * r.randint(1, 1000)]]

    # --- categories ----------------------------------------------------------------------------

    def base(self, arrays: bool = False) -> tuple[str, list[bytes]]:
        key = self.r.choice(self.array_bases if arrays else list(self.bases))
        return key, list(self.bases[key])

    def random_bytes(self):
        r = self.r
        frames = [self.np.bytes(r.choice([1, 2, 7, 64, 300, 4000])) for _ in range(r.choice([1, 1, 1, 2, 3, 17, 18]))]
        if r.random() < 0.3:  # looks like a msgpack map at first
            frames[0] = bytes([0x80 | r.randrange(16)]) + frames[0]
        return frames

    def empty(self):
        return [b""] * self.r.choice([1, 1, 2, 3])

    def truncated(self):
        _, frames = self.base()
        i = self.r.randrange(len(frames))
        frames[i] = frames[i][: self.r.randrange(len(frames[i]))] if frames[i] else frames[i]
        return frames

    def bit_flips(self):
        _, frames = self.base()
        i = 0 if self.r.random() < 0.7 else self.r.randrange(len(frames))
        if frames[i]:
            frames[i] = _flip_bits(frames[i], self.r, self.r.randint(1, 4))
        return frames

    def frame_dropped(self):
        _, frames = self.base(arrays=True)
        del frames[self.r.randrange(len(frames))]
        return frames

    def extra_frames(self):
        _, frames = self.base()
        extra = [self.np.bytes(self.r.choice([0, 4, 40])) for _ in range(self.r.choice([1, 2, 3, 20]))]
        return frames + extra

    def _tamper(self, arrays: bool = False):
        key, frames = self.base(arrays)
        return key, frames, _header(frames)

    def version(self):
        _, frames, header = self._tamper()
        choice = self.r.choice([0, 2, 255, -1, "1", 1.0, True, None, 2**64 - 1, [1], "missing"])
        if choice == "missing":
            del header["v"]
        else:
            header["v"] = choice
        return [_repack(header), *frames[1:]]

    def unknown_type(self):
        _, frames, header = self._tamper()
        choice = self.r.choice(["Bogus", "", "hello", "HELLO", "Message", "ProtocolError", "Hello\x00", 7, None, True,
                                ["Hello"], "__class__", "missing"])
        if choice == "missing":
            del header["t"]
        else:
            header["t"] = choice
        return [_repack(header), *frames[1:]]

    def bool_in_int(self):
        key, frames, header = self._tamper()
        ints = [k for k in ("seq", "step", "sample", "pid", "protocol", "resume_step", "numel", "noise_seed", "stop_step")
                if k in header]
        header[self.r.choice(ints)] = self.r.choice([True, False])
        return [_repack(header), *frames[1:]]

    def field_type(self):
        _, frames, header = self._tamper()
        field = self.r.choice([k for k in header if k not in ("v", "t", "arrays")])
        header[field] = self.r.choice([1.5, "7", None, [1, 2], {"a": 1}, -3, "", {"nested": {"a": 1}}, [["x"]]])
        return [_repack(header), *frames[1:]]

    def bad_value(self):
        key, frames, header = self._tamper()
        r = self.r
        options = [
            ("seq", -1), ("step", -5), ("sample", -2), ("step", 2**63), ("sender", "x" * 200), ("sender", "a\x00b"),
            ("name", "../etc"), ("name", ".hidden"), ("name", "a/b"), ("name", ""), ("name", "n\n"), ("name", "y" * 300),
            ("student", "../../pred"), ("role", "teacher"), ("role", ""), ("reason", "r" * 5000), ("tag", "a\\b"),
            ("status", {f"k{i}": i for i in range(100)}), ("status", {"": 1}), ("status", {"k" * 200: 1}),
            ("status", {"k": True}), ("status", {"k": None}), ("status", {"k": "v" * 300}), ("metrics", {"m": "text"}),
            ("metrics", {"m": None}), ("metrics", {"m": 2**64 - 1}), ("noise_seed", 2**63), ("noise_seed", -1),
            ("pid", -1), ("numel", -2), ("config_hash", "h" * 200), ("stop_step", -1), ("accepted", 1),
        ]
        present = [(k, v) for k, v in options if k in header]
        k, v = r.choice(present)
        header[k] = v
        return [_repack(header), *frames[1:]]

    def dtype(self):
        key, frames, header = self._tamper(arrays=True)
        i = self.r.randrange(len(header["arrays"]))
        header["arrays"][i][0] = self.r.choice([">f4", ">f8", "|b1", "|O", "<c8", "<c16", "<U4", "|S4", "<M8[s]", "|V4",
                                                "float32", "f4", "<f16", "<i8", "<u1", "<f2", 4, None, ["<f4"], ""])
        return [_repack(header), *frames[1:]]

    def shape(self):
        key, frames, header = self._tamper(arrays=True)
        i = self.r.randrange(len(header["arrays"]))
        shape = list(header["arrays"][i][1])
        choice = self.r.randrange(9)
        if choice == 0:
            shape = shape + [1]  # wrong ndim
        elif choice == 1:
            shape = shape[:-1]
        elif choice == 2:
            shape[0] = -1
        elif choice == 3:
            shape[0] = shape[0] + 1  # frame too short for it
        elif choice == 4:
            shape[-1] = float(shape[-1])
        elif choice == 5:
            shape[0] = True
        elif choice == 6:
            shape = "".join(map(str, shape))
        elif choice == 7:
            shape = {"0": shape[0]}
        else:
            shape = [max(0, shape[0] - 1)] + shape[1:]
        header["arrays"][i][1] = shape
        return [_repack(header), *frames[1:]]

    def huge_shape(self):
        key, frames, header = self._tamper(arrays=True)
        i = self.r.randrange(len(header["arrays"]))
        ndim = len(header["arrays"][i][1])
        big = self.r.choice([2**40, 2**40 + 1, 2**63 - 1, 2**31, 10**12])
        header["arrays"][i][1] = [big] + [self.r.choice([1, 2**39, 2**40])] * (ndim - 1)
        return [_repack(header), *frames[1:]]

    def nonfinite(self):
        key = self.r.choice(["params", "params64", "targets", "report", "report_probs_only"])
        frames = list(self.bases[key])
        header = _header(frames)
        i = 0 if key != "targets" else 1  # the float array: params, probs or logits
        dtype, shape = header["arrays"][i]
        values = np.frombuffer(frames[1 + i], np.dtype(dtype)).reshape(shape).copy()
        bad = self.r.choice([np.nan, np.inf, -np.inf])
        for _ in range(self.r.choice([1, 1, 3])):
            values.reshape(-1)[self.r.randrange(values.size)] = bad
        if key.startswith("report") and self.r.random() < 0.5 and len(frames) > 2 and len(frames[2]):
            ent = np.frombuffer(frames[2], np.float32).copy()  # or the entropy array
            ent[self.r.randrange(ent.size)] = bad
            frames[2] = ent.tobytes()
        frames[1 + i] = values.tobytes()
        return frames

    def cross_field(self):
        r = self.r
        choice = r.randrange(6)
        if choice == 0:  # numel disagrees with params
            frames = list(self.bases["params"])
            header = _header(frames)
            header["numel"] = header["numel"] + r.choice([-1, 1, 1000])
            return [_repack(header), *frames[1:]]
        if choice == 1:  # logits rows != indices
            frames = list(self.bases["targets"])
            indices = np.arange(49, dtype=np.int64)
            return _set_array(frames, 0, indices)
        if choice == 2:  # negative indices
            frames = list(self.bases["targets"])
            indices = np.frombuffer(frames[1], np.int64).copy()
            indices[r.randrange(indices.size)] = -r.randint(1, 10**9)
            return _set_array(frames, 0, indices)
        frames = list(self.bases["report"])
        header = _header(frames)
        probs = np.frombuffer(frames[1], np.float32).reshape(header["arrays"][0][1]).copy()
        if choice == 3:
            probs[r.randrange(len(probs))] *= 1.5  # a row not summing to 1
        elif choice == 4:
            probs[r.randrange(len(probs)), 0] = -0.25  # negative, row still sums to 1
            probs[r.randrange(len(probs)), 1] += 0.25
        else:  # entropy length neither 0 nor N_test
            return _set_array(frames, 1, np.zeros(len(probs) - 1, np.float32))
        return _set_array(frames, 0, probs)

    def keys(self):
        key, frames, header = self._tamper()
        choice = self.r.randrange(5)
        if choice == 0:
            del header[self.r.choice([k for k in header if k not in ("v", "t")])]
        elif choice == 1:
            header["extra"] = 1
        elif choice == 2:
            header["arrays"] = [["<f4", [0]]] * 3
        elif choice == 3:
            del header["arrays"]
        else:  # a duplicate key, which parsers may resolve differently
            items = list(header.items())
            packer = msgpack.Packer(use_bin_type=True)
            dup = self.r.choice(items)
            raw = packer.pack_map_header(len(items) + 1)
            for k, v in items + [(dup[0], dup[1])]:
                raw += packer.pack(k) + packer.pack(v)
            return [raw, *frames[1:]]
        return [_repack(header), *frames[1:]]

    def msgpack_tricks(self):
        key, frames, header = self._tamper()
        r = self.r
        choice = r.randrange(9)
        if choice == 0:
            raw = _repack(header) + b"\x00"  # trailing bytes after the map
        elif choice == 1:
            raw = _repack(list(header.items()))  # not a map
        elif choice == 2:
            raw = _repack(r.choice([1, "Hello", None, 3.5, [], True]))
        elif choice == 3:
            header["sender"] = b"binary sender"  # bin data in a header
            raw = _repack(header)
        elif choice == 4:
            header["sender"] = msgpack.ExtType(5, b"ext")
            raw = _repack(header)
        elif choice == 5:  # nested far too deep
            raw = b"\x91" * 5000 + b"\xc0"
        elif choice == 6:  # a non-string key
            raw = msgpack.packb({**header, 1: 2}, use_bin_type=True, strict_types=False)
        elif choice == 7:  # a str claiming more bytes than there are
            raw = b"\x81\xa1v\xdb\xff\xff\xff\xf0abc"
        else:  # an array claiming 2**32-1 entries
            raw = b"\xdd\xff\xff\xff\xff\x01"
        return [raw, *frames[1:]]

    def oversized_header(self):
        _, frames, header = self._tamper()
        header["sender"] = "s" * (70 * 1024)
        return [_repack(header), *frames[1:]]

    def valid(self):
        _, frames = self.base()
        return frames


def build_corpus(run: Run, seed: int, n: int) -> list[tuple[str, list[bytes]]]:
    fuzzer = Fuzzer(run, seed)
    corpus = [fuzzer.huge(i) for i in range(24)]
    # every base message clean at least once, including the wrong-config Hellos
    corpus += [("valid", list(f)) for f in fuzzer.bases.values()]
    while len(corpus) < n:
        corpus.append(fuzzer.pick())
    fuzzer.r.shuffle(corpus)
    # last, a valid message: its answer proves that the coordinator has read everything before it
    corpus.append(("sentinel", list(fuzzer.bases["heartbeat"])))
    return corpus


def classify(corpus, cfg) -> tuple[Counter, list[tuple[int, object]]]:
    """Rejections by kind, and the decodable messages (index, message) the coordinator must answer."""
    rejected: Counter = Counter()
    accepted: list[tuple[int, object]] = []
    for index, (category, frames) in enumerate(corpus):
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            rejected[exc.kind] += 1
            continue
        # (any other exception propagates: decode's contract is ProtocolError only)
        assert not (isinstance(msg, Hello) and msg.config_hash == cfg.config_hash()), "the fuzz made a real hello"
        accepted.append((index, msg))
    return rejected, accepted


# --------------------------------------------------------------------------------------------------
# 1. the coordinator under fire


def test_coordinator_counts_every_malformed_message_and_the_run_completes(small_run):
    run = Run(small_run(mode="targets", steps=20000, port=quiet_port_pair()))
    corpus = build_corpus(run, SEED, N_FUZZ)
    expected_rejects, answerable = classify(corpus, run.cfg)
    assert "internal" not in expected_rejects, expected_rejects
    assert sum(expected_rejects.values()) + len(answerable) == len(corpus) >= 3000
    by_category = Counter(c for c, _ in corpus)

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)  # never make the coordinator drop an answer to us
    dealer.setsockopt(zmq.SNDTIMEO, 30_000)
    replies: list[list[bytes]] = []

    def drain(timeout_ms: int = 0) -> None:
        while dealer.poll(timeout_ms, zmq.POLLIN):
            replies.append(dealer.recv_multipart())
            timeout_ms = 0

    try:
        run.start()
        dealer.connect(f"tcp://127.0.0.1:{run.port}")
        # a first volley while the roles start up and shake hands...
        first = len(corpus) // 5
        for _, frames in corpus[:first]:
            dealer.send_multipart(frames)
            drain()
        run.wait_streaming()
        # ...and the rest while samples stream, in bursts
        sent_while_streaming = time.monotonic()
        for i, (_, frames) in enumerate(corpus[first:]):
            dealer.send_multipart(frames)
            drain()
            if i % 100 == 99:
                time.sleep(0.1)  # spread over a few seconds of streaming
        deadline = time.monotonic() + 60
        while len(replies) < len(answerable) and time.monotonic() < deadline:
            drain(100)
        fuzz_s = time.monotonic() - sent_while_streaming
        still_running = run.procs["sampler"].poll() is None
        outputs = run.finish_all(timeout=150)
    finally:
        dealer.close()
        ctx.term()
        run.kill_all()

    summary = run.check_completed(outputs)
    # every malformed message counted by kind, exactly; nothing unaccounted for on the sample stream
    got = summary["rejected_messages"]
    assert got["control"] == dict(expected_rejects), (got, dict(expected_rejects))
    assert got["samples"] == {}

    # every decodable message answered, in order: "hello first", or a refused Hello (never accepted)
    assert len(replies) == len(answerable), (
        f"{len(replies)} answers for {len(answerable)} decodable messages (sampler still running when the fuzz "
        f"ended: {still_running}; if not, the run ended before the coordinator read everything)")
    hello_reasons = Counter()
    for (index, msg), frames in zip(answerable, replies):
        welcome = decode(frames)
        assert isinstance(welcome, Welcome) and not welcome.accepted, (corpus[index][0], welcome)
        if isinstance(msg, Hello):
            assert welcome.reason != HELLO_FIRST, (msg, welcome)
            hello_reasons[welcome.reason.split(" ")[0]] += 1
            if msg.protocol == PROTOCOL_VERSION and msg.chain_hash == run.cfg.chain_hash() \
                    and msg.data_fingerprint == run.data.fingerprint:
                assert welcome.reason.startswith("config differs"), welcome.reason
        else:
            assert welcome.reason == HELLO_FIRST, (msg, welcome)
    assert hello_reasons["config"] > 0 and hello_reasons["protocol"] > 0
    # and both kinds are counted in the summary too: nothing goes uncounted
    assert summary["refused_hellos"] >= sum(hello_reasons.values())  # + the test's own 'intruder' hello
    assert summary["messages_without_handshake"] == len(answerable) - sum(hello_reasons.values())

    # nothing from the stranger was scored or changed the run
    for line in (run.run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["student"] in ("pred", "ent") and "intruder" not in record["student_metrics"], record
    coordinator_log = outputs["coordinator"][1]
    assert "before any handshake" in coordinator_log and "intruder says stop" not in coordinator_log
    assert "refused student 'intruder'" in coordinator_log

    print(f"\nfuzz: {len(corpus)} frame lists ({sum(len(f) for _, f in corpus)} frames, "
          f"{sum(len(x) for _, f in corpus for x in f) / MB:.1f} MB), last {len(corpus) - first} sent while streaming "
          f"over {fuzz_s:.1f} s (sampler still running after: {still_running})")
    print(f"categories: {dict(sorted(by_category.items()))}")
    print(f"rejected by kind: {dict(sorted(expected_rejects.items()))} = {sum(expected_rejects.values())}")
    print(f"answered: {len(replies)} ({dict(hello_reasons)} refused hellos)")


# --------------------------------------------------------------------------------------------------
# 2. raw TCP garbage on both bound ports


def _connect(port: int, timeout: float = 2.0) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return None


def _wait_bound(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = _connect(port)
        if s is not None:
            s.close()
            return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on port {port}")


def _send_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:  # the peer may hang up on garbage at any time: that is fine
        pass


ZMTP3_HALF_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03"
ZMTP3_NULL_GREETING = ZMTP3_HALF_GREETING + b"\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def _garbage_volley(port: int, rng: random.Random, held: list[socket.socket]) -> int:
    """Open and close, send random bytes, half greetings; returns the number of connections made."""
    made = 0
    for i in range(150):  # open/close churn, half of it with a reset instead of a FIN
        s = _connect(port)
        if s is None:
            continue
        made += 1
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    payloads = [
        rng.randbytes(rng.choice([1, 10, 64, 1000])) for _ in range(20)
    ] + [
        b"\xff" + rng.randbytes(200),  # looks versioned, then garbage
        ZMTP3_NULL_GREETING[:-1] + rng.randbytes(5000),
        ZMTP3_HALF_GREETING[:10] + b"\x09" + b"\x00" * 53,  # an unknown major version
        b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\x00") + b"\x00" * 32,  # a mechanism not offered
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00" * 100_000,
        rng.randbytes(300_000),
    ]
    for data in payloads:
        s = _connect(port)
        if s is None:
            continue
        made += 1
        _send_quietly(s, data)
        s.close()
    for data in (ZMTP3_HALF_GREETING, ZMTP3_NULL_GREETING[:40], b""):  # stalled peers, held to the end of the run
        s = _connect(port)
        if s is not None:
            made += 1
            _send_quietly(s, data)
            held.append(s)
    return made


def test_raw_tcp_garbage_on_both_ports_does_not_disturb_the_run(small_run):
    # long enough that the volleys land while samples stream, even on an idle machine
    run = Run(small_run(mode="targets", steps=12000, port=quiet_port_pair()))
    rng = random.Random(SEED + 2)
    held: list[socket.socket] = []
    try:
        run.start()
        _wait_bound(run.port, 60)
        made = _garbage_volley(run.port, rng, held)  # during the handshake
        run.wait_streaming()
        _wait_bound(run.port + 1, 10)
        made += _garbage_volley(run.port + 1, rng, held)
        made += _garbage_volley(run.port, rng, held)
        while_streaming = run.procs["sampler"].poll() is None
        outputs = run.finish_all(timeout=120)  # with the stalled connections still open
    finally:
        for s in held:
            s.close()
        run.kill_all()
    summary = run.check_completed(outputs)
    assert while_streaming
    print(f"\nraw TCP: {made} connections, {len(held)} stalled ones held through shutdown; "
          f"rejections counted by gped: {summary['rejected_messages']}")


# --------------------------------------------------------------------------------------------------
# 3. a stranger subscribes to the sample stream with odd subscriptions


def _zmtp_frame(body: bytes, command: bool = False) -> bytes:
    flags = 0x04 if command else 0x00
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return buf


def zmtp_subscriber(port: int, subscriptions: list[bytes]) -> socket.socket:
    """A hand-made ZMTP 3.0 SUB peer (NULL mechanism) that sends ``subscriptions`` and never reads.

    Hand-made because a libzmq SUB socket holding a very long subscription crashes its *own*
    process when it is closed (libzmq 4.3.5 frees its subscription trie recursively), and this test
    is about what the sampler's PUB does with one, not about our side.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(ZMTP3_NULL_GREETING)
    _recv_exact(s, 64)
    s.sendall(_zmtp_frame(b"\x05READY\x0bSocket-Type" + struct.pack(">I", 3) + b"SUB", command=True))
    flags, size = _recv_exact(s, 2)
    _recv_exact(s, size if not flags & 0x02 else struct.unpack(">Q", bytes([size]) + _recv_exact(s, 7))[0])
    for topic in subscriptions:
        try:
            s.sendall(_zmtp_frame(b"\x01" + topic))
        except (ConnectionResetError, BrokenPipeError):
            cut_off.append(s)  # the sampler's PUB refuses oversized subscriptions (MAXMSGSIZE)
            break
    return s


cut_off: list[socket.socket] = []


def test_odd_subscribers_on_the_sample_stream_do_not_slow_or_crash_the_run(small_run):
    run = Run(small_run(mode="targets", steps=6000, port=quiet_port_pair()))
    rng = random.Random(SEED + 3)
    ctx = zmq.Context()
    samples = f"tcp://127.0.0.1:{run.port + 1}"
    subs: list[zmq.Socket] = []
    raw: list[socket.socket] = []

    def sub(hwm: int = 1000) -> zmq.Socket:
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.RCVBUF, 4096)
        subs.append(s)
        return s

    # everything, never read, with the smallest queue: the slowest possible subscriber
    hog = sub(hwm=1)
    hog.setsockopt(zmq.SUBSCRIBE, b"")
    # thousands of random subscriptions, some of them prefixes of the real topics
    many = sub()
    for _ in range(3000):
        many.setsockopt(zmq.SUBSCRIBE, rng.randbytes(rng.randint(1, 40)))
    # a reader of the targets stream, which also checks that what it hears is well formed
    reader = sub()
    for topic in (b"t", b"t", b"t\x00", b"c"):
        reader.setsockopt(zmq.SUBSCRIBE, topic)
    reader.setsockopt(zmq.UNSUBSCRIBE, b"t\x00")
    for s in subs:
        s.connect(samples)
    heard: Counter = Counter()
    try:
        run.start()
        _wait_bound(run.port + 1, 60)  # the sampler binds after its handshake, before it streams
        long_topic = b"t" + rng.randbytes(256 * 1024)
        cut_off.clear()
        raw.append(zmtp_subscriber(run.port + 1, [long_topic, b"", b"\xff" * 1000, long_topic[:1000]]))
        raw.append(zmtp_subscriber(run.port + 1, [bytes([i]) * rng.randint(1, 255) for i in range(256)]))
        # a 256 KiB subscription would cost the sampler ~100 bytes of memory per byte: it is cut off
        # (or, if the reset races the send, the peer is simply never served); short ones are fine
        assert raw[1] not in cut_off
        run.wait_streaming()
        t0 = time.monotonic()
        churned = 0
        while run.procs["sampler"].poll() is None and time.monotonic() - t0 < 60:
            # subscription churn from ever new subscribers
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            for _ in range(50):
                topic = rng.randbytes(rng.randint(0, 8))
                s.setsockopt(zmq.SUBSCRIBE, topic)
                s.setsockopt(zmq.UNSUBSCRIBE, topic)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(samples)
            s.close()
            churned += 1
            while reader.poll(20, zmq.POLLIN):
                frames = reader.recv_multipart()
                msg = decode(frames[1:])  # the stream itself must be well formed
                heard[type(msg).__name__] += 1
        outputs = run.finish_all(timeout=120)  # the raw subscribers stay connected, unread, to the end
    finally:
        for s in subs:
            s.close()
        ctx.term()
        for s in raw:
            s.close()
        run.kill_all()
    summary = run.check_completed(outputs)
    sampler_log = outputs["sampler"][1]
    assert "send_failures=0" in sampler_log
    rates = [float(x) for x in re.findall(r"rate=([0-9.]+) step/s", sampler_log)]
    assert heard["Targets"] > 0, heard
    print(f"\nsubscribers: {len(subs)} odd zmq + {len(raw)} hand-made ZMTP + {churned} churned; "
          f"the reader heard {dict(heard)}; sampler rates {rates} step/s; rejections {summary['rejected_messages']}")

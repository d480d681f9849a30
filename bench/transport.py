"""Transport: gped's wire against raw pyzmq for the same bytes, same sockets, same machine.

Set-up (both sides identical but for the code that makes and reads each message):

* a sender (this process, pinned to the sampler's core) binds a PUB socket on loopback TCP, as the
  sampler does; a receiver process (pinned to the other cores) connects a SUB socket, as a student
  does, and subscribes to the topics;
* a PAIR socket beside them carries commands and credit: the receiver acknowledges every
  ``ack_every`` messages and the sender keeps at most ``window`` messages in flight, so PUB never
  drops (its high-water mark is never reached) and what is measured is delivered, decoded messages;
* **gped**: the sender builds each message (``Params``/``Targets``, which validates it, finite check
  included) and sends it with :class:`gped.transport.Channel` (``encode`` + ``send_multipart(copy=False)``
  with the topic frame); the receiver takes it with ``Channel.recv`` (``recv_multipart(copy=False)`` +
  ``safe_decode``, which validates everything again);
* **raw**: the sender sends the same frames (topic, a header of the same size, the same array
  buffer) with ``send_multipart(copy=False)``; the receiver takes them with
  ``recv_multipart(copy=False)`` and ``np.frombuffer`` on the array frames.

A measurement sends for ``seconds`` and stops at a multiple of ``ack_every``; the time runs from the
first send to the last acknowledgement.  gped and raw alternate, ``repeats`` times each; the table
has the medians and gped/raw.  A codec-only row (no sockets) shows what encode/decode alone cost.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from .common import CoreLayout, Spawned, free_port_pair, median, python_cmd, spread, table, write_json

TOPIC_PROBE = b"z"


@dataclass(frozen=True)
class TransportSettings:
    #: float32 parameter snapshot sizes (elements)
    snapshots: tuple[int, ...] = (500_000, 5_000_000)
    #: a targets batch: M' rows of C logits plus M' int64 indices
    target_rows: int = 100
    target_classes: int = 10
    seconds: float = 1.0
    #: at least this many messages per measurement (large snapshots go at tens per second)
    min_messages: int = 32
    repeats: int = 3
    #: messages in flight (snapshots are large: a few; target batches are small: many)
    window_params: int = 8
    window_targets: int = 512
    ack_every_targets: int = 64
    codec_seconds: float = 0.3


PRESETS = {
    "tiny": TransportSettings(snapshots=(50_000,), seconds=0.2, min_messages=4, repeats=1, codec_seconds=0.05),
    "quick": TransportSettings(seconds=0.5, repeats=3, codec_seconds=0.15),
    "full": TransportSettings(snapshots=(500_000, 5_000_000, 25_000_000), seconds=3.0, repeats=5, codec_seconds=1.0),
}


@dataclass
class Payload:
    name: str
    topic: bytes
    kind: str  # "params" | "targets"
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def message(self, i: int):
        from gped.wire import Params, Targets

        if self.kind == "params":
            return Params(step=i, sample=i, numel=self.arrays["params"].size, params=self.arrays["params"])
        return Targets(step=i, sample=i, noise_seed=12345 + i, indices=self.arrays["indices"], logits=self.arrays["logits"])


def payloads(settings: TransportSettings) -> list[Payload]:
    rng = np.random.default_rng(0)
    out = []
    for n in settings.snapshots:
        arr = rng.standard_normal(n, dtype=np.float32)
        out.append(Payload(f"params {_count(n)} f32", b"p", "params", {"params": arr}))
    rows, classes = settings.target_rows, settings.target_classes
    out.append(Payload(f"targets {rows}x{classes}", b"t", "targets", {
        "indices": rng.permutation(60_000)[:rows].astype(np.int64),
        "logits": rng.standard_normal((rows, classes), dtype=np.float32),
    }))
    return out


def _count(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 or n % 100_000 == 0 and n >= 100_000 else f"{n / 1e3:g}k"


# --------------------------------------------------------------------------------------------------
# receiver process


def receiver(data_addr: str, ctl_addr: str) -> None:
    """Subscribe to the sender's PUB; decode (gped) or just view (raw) what arrives; send credit."""
    from gped.transport import TOPIC_PARAMS, TOPIC_TARGETS, Channel, make_socket

    ctx = zmq.Context()
    sub = make_socket(ctx, zmq.SUB)
    for topic in (TOPIC_PARAMS, TOPIC_TARGETS, TOPIC_PROBE):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(data_addr)
    ctl = ctx.socket(zmq.PAIR)
    ctl.connect(ctl_addr)
    channel = Channel(sub, "bench-receiver")
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(ctl, zmq.POLLIN)
    mode, ack_every, count, synced = None, 1, 0, False
    while True:
        ready = dict(poller.poll(1000))
        if ctl in ready:
            cmd = json.loads(ctl.recv())
            if cmd["op"] == "stop":
                ctl.send(json.dumps({"rejected": channel.rejected.as_dict()}).encode())
                break
            mode, ack_every, count = cmd["impl"], int(cmd["ack_every"]), 0
            ctl.send(b"ok")
        if sub not in ready:
            continue
        while True:  # drain what is queued
            if mode == "gped":
                got = channel.recv(prefix_frames=1)
                if got is None:
                    break
                if got[0] == [TOPIC_PROBE]:
                    continue
            else:
                try:
                    frames = sub.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if frames[0].bytes == TOPIC_PROBE:
                    if not synced:
                        synced = True
                        ctl.send(b"synced")
                    continue
                for frame in frames[2:]:
                    np.frombuffer(frame.buffer, dtype=np.uint8)
            count += 1
            if count % ack_every == 0:
                ctl.send(struct.pack("<q", count))
    sub.close(linger=0)
    ctl.close(linger=0)
    ctx.term()


# --------------------------------------------------------------------------------------------------
# sender


class Sender:
    def __init__(self, ctx: zmq.Context):
        from gped.transport import Channel, make_socket

        port = free_port_pair()
        self.data_addr, self.ctl_addr = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
        self.pub = make_socket(ctx, zmq.PUB)
        self.pub.bind(self.data_addr)
        self.ctl = ctx.socket(zmq.PAIR)
        self.ctl.bind(self.ctl_addr)
        self.channel = Channel(self.pub, "bench-sender")

    def sync(self, timeout_s: float = 30.0) -> None:
        """Send probes until the receiver has one: its subscriptions are in place (no slow joiner)."""
        from gped.wire import Heartbeat, encode

        probe = [TOPIC_PROBE, *encode(Heartbeat(role="sampler", name="bench", status={}))]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pub.send_multipart(probe)
            if self.ctl.poll(20) and self.ctl.recv() == b"synced":
                return
        raise RuntimeError("transport receiver never saw a probe")

    def measure(self, payload: Payload, impl: str, seconds: float, window: int, ack_every: int, min_messages: int = 1) -> dict[str, float]:
        from gped.wire import encode

        self.ctl.send(json.dumps({"op": "measure", "impl": impl, "ack_every": ack_every}).encode())
        if not self.ctl.poll(30_000) or self.ctl.recv() != b"ok":
            raise RuntimeError("transport receiver did not answer")
        frames = [payload.topic, *encode(payload.message(0), sender="bench-sender", seq=0)]
        header, buffers = frames[1], frames[2:]
        topic = payload.topic
        sent = acked = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            if sent - acked >= window:
                acked = self._ack()
                continue
            if sent % ack_every == 0 and sent >= min_messages and time.perf_counter() >= deadline:
                break
            if impl == "gped":
                self.channel.send(payload.message(sent), [topic])
            else:
                self.pub.send_multipart([topic, header, *buffers], flags=zmq.NOBLOCK, copy=False)
            sent += 1
            while self.ctl.poll(0):
                acked = max(acked, self._ack(block=False))
        while acked < sent:
            acked = self._ack()
        elapsed = time.perf_counter() - start
        return {"messages": sent, "seconds": elapsed, "msgs_s": sent / elapsed, "GBps": sent * payload.nbytes / elapsed / 1e9}

    def _ack(self, block: bool = True) -> int:
        if block and not self.ctl.poll(30_000):
            raise RuntimeError("transport receiver stopped acknowledging")
        return struct.unpack("<q", self.ctl.recv())[0]

    def stop(self) -> dict[str, Any]:
        self.ctl.send(json.dumps({"op": "stop"}).encode())
        reply = json.loads(self.ctl.recv()) if self.ctl.poll(10_000) else {}
        self.pub.close(linger=0)
        self.ctl.close(linger=0)
        return reply


def codec_costs(payload: Payload, seconds: float) -> dict[str, float]:
    """Microseconds per message for build+encode and for decode, no sockets (one core)."""
    from gped.wire import decode, encode

    def per_call(fn) -> float:
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and n >= 3:
                return elapsed / n * 1e6

    frames = [bytes(f) for f in encode(payload.message(0))]
    return {"encode_us": per_call(lambda: encode(payload.message(1))), "decode_us": per_call(lambda: decode(frames))}


def run(settings: TransportSettings, layout: CoreLayout, log_dir: Path | None = None) -> dict[str, Any]:
    """Measure every payload with gped and raw, alternating; returns rows for the table and JSON."""
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    old_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(layout.sampler))  # before the context: its I/O thread inherits this
    ctx = zmq.Context()
    sender = Sender(ctx)
    proc = Spawned("transport-receiver", python_cmd("-m", "bench.transport", "--receiver", sender.data_addr, sender.ctl_addr),
                   cores=layout.others, log_path=log_dir / "transport-receiver.log" if log_dir else None)
    rows = []
    try:
        sender.sync()
        for payload in payloads(settings):
            big = payload.kind == "params"
            window = settings.window_params if big else settings.window_targets
            ack_every = 1 if big else settings.ack_every_targets
            runs: dict[str, list[dict[str, float]]] = {"gped": [], "raw": []}
            sender.measure(payload, "raw", min(0.2, settings.seconds), window, ack_every)  # warm-up (TCP, caches)
            for _ in range(settings.repeats):
                for impl in ("gped", "raw"):
                    runs[impl].append(sender.measure(payload, impl, settings.seconds, window, ack_every, settings.min_messages))
            g = median([r["msgs_s"] for r in runs["gped"]])
            r = median([r["msgs_s"] for r in runs["raw"]])
            row = {
                "payload": payload.name,
                "kind": payload.kind,
                "bytes": payload.nbytes,
                "gped_msgs_s": g,
                "raw_msgs_s": r,
                "gped_GBps": g * payload.nbytes / 1e9,
                "raw_GBps": r * payload.nbytes / 1e9,
                "ratio": g / r,
                "gped_spread": spread([x["msgs_s"] for x in runs["gped"]]),
                "raw_spread": spread([x["msgs_s"] for x in runs["raw"]]),
                "repeats": settings.repeats,
                "messages": sum(x["messages"] for x in runs["gped"] + runs["raw"]),
            }
            row.update(codec_costs(payload, settings.codec_seconds))
            rows.append(row)
        receiver_report = sender.stop()
    finally:
        if proc.wait(10) is None:
            proc.stop()
        ctx.term()
        os.sched_setaffinity(0, old_affinity)
    return {"settings": asdict(settings), "core_layout": layout.as_dict(), "rows": rows,
            "receiver_rejected": receiver_report.get("rejected", {})}


COLUMNS = ["payload", "bytes", "gped_msgs_s", "raw_msgs_s", "gped_GBps", "raw_GBps", "ratio", "encode_us", "decode_us"]


def render(result: dict[str, Any]) -> str:
    return table(result["rows"], COLUMNS, "transport: gped wire vs raw pyzmq (PUB/SUB, loopback TCP)") + (
        f"\n\n{result['core_layout']['text']}; medians of {result['settings']['repeats']} alternating runs; "
        "encode/decode: codec alone, µs per message (build+validate+encode / decode+validate)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receiver", nargs=2, metavar=("DATA", "CTL"), help=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.receiver:
        receiver(*args.receiver)
        return
    settings = PRESETS[args.preset]
    if args.seconds:
        settings = replace(settings, seconds=args.seconds)
    result = run(settings, CoreLayout.detect())
    print(render(result))
    if args.out:
        write_json(args.out, {"transport": result})


if __name__ == "__main__":
    main(sys.argv[1:])

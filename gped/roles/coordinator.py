"""The coordinator role: handshake, run directory, ensemble, evaluation and stop (DESIGN §3).

* Handshake: a role is accepted only if its protocol version, config hash, chain hash and data
  fingerprint equal the coordinator's; a second live sampler and unknown or duplicate students are
  refused with the reason.
* Start: the sampler streams only once every configured student has seen the sampler's heartbeats
  on the sample stream (so nobody misses the first samples to the slow-joiner effect), or after
  ``wait_for_students_s``.
* Ensemble: from every parameter snapshot it evaluates the teacher on the test set (and OOD set),
  keeping the running predictive and expected entropy — the reference every student is scored on.
* Evaluation: each student Report is scored (NLL, accuracy, ECE, Brier, KL to the ensemble,
  entropy MAE) and appended to ``metrics.jsonl``.
* Stop: when the sampler's stream ends and every student has sent its final report (or after a
  timeout), or on SIGINT/SIGTERM, it broadcasts Stop and writes ``summary.json`` / ``summary.md``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zmq

from ..checkpoint import save_checkpoint
from ..config import RunConfig, save_config
from ..core.chain import evaluate_logits
from ..core.distill import EnsembleAccumulator
from ..core.evaluate import ensemble_scores, student_scores, summary_table
from ..core.models import load_flat_parameters
from ..errors import GpedError
from ..log import setup_logging
from ..runtime import build_teacher_for, load_data, set_threads
from ..transport import TOPIC_CONTROL, TOPIC_PARAMS, Addresses, Channel, Security, bind, make_socket
from ..wire import PROTOCOL_VERSION, Heartbeat, Hello, Message, Params, Report, Start, Stop, Welcome
from .common import BUSY, CLEAN_LINGER_MS, HELLO_FIRST, STREAM_ENDED, Every, StopFlag, checkpoint_path, checkpoint_state, close_all, load_role_checkpoint, restore

log = logging.getLogger("gped.coordinator")

FINAL_REPORT_TIMEOUT_S = 60.0


@dataclass
class Peer:
    role: str
    name: str
    pid: int
    last_seen: float
    status: dict = field(default_factory=dict)
    since: float = 0.0
    final: bool = False
    lost: bool = False


class CoordinatorRole:
    """Run bookkeeping; ``reply(identity, message)`` answers one peer on the control socket."""

    def __init__(self, cfg: RunConfig, data, reply: Callable[[bytes, Message], bool]):
        self.cfg = cfg
        self.data = data
        self.reply = reply
        self.run_dir = Path(cfg.run_dir)
        self.fingerprint = data.fingerprint
        self.teacher = build_teacher_for(cfg, data)
        self.test_x = torch.from_numpy(data.test_x)
        self.test_y = data.test_y
        self.ensemble = EnsembleAccumulator(len(data.test_x), data.num_classes)
        self.ood_x = torch.from_numpy(data.ood_x) if data.ood_x is not None else None
        self.ood_ensemble = EnsembleAccumulator(len(self.ood_x), data.num_classes) if self.ood_x is not None else None
        self.peers: dict[bytes, Peer] = {}
        #: pid of the sampler process that has been told to stream (0: none yet)
        self.started_pid = 0
        self.first_peer_time: float | None = None
        self.sampler_done: str | None = None
        self.sampler_done_time = 0.0
        self.end_sample = -1
        self.last_report_time = 0.0
        self.last_sample = -1
        self.reports: dict[str, dict] = {}
        self.unknown_messages = 0
        self.refused = 0
        self.ensemble_missed = 0
        self.rejected: dict[str, dict[str, int]] = {}
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # --- control socket ----------------------------------------------------------------------

    def on_control(self, identity: bytes, msg: Message) -> None:
        peer = self.peers.get(identity)
        if isinstance(msg, Hello):
            self.on_hello(identity, msg)
            return
        if peer is None:
            self.unknown_messages += 1
            if self.unknown_messages <= 10 or self.unknown_messages % 1000 == 0:
                log.warning("%s from %r before any handshake: asking it to say hello", type(msg).__name__, msg.sender)
            self.reply(identity, Welcome(accepted=False, reason=HELLO_FIRST, run_dir=str(self.run_dir), stop_step=self.cfg.sampler.steps))
            return
        if peer.lost:
            log.info("%s %r is back", peer.role, peer.name)
            peer.lost = False
        peer.last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            peer.status = dict(msg.status)
            self.reply(identity, Heartbeat(role="coordinator", name="coordinator"))  # so peers know we are alive
            if peer.role == "sampler" and msg.status.get("state") == "running":
                self.started_pid = peer.pid  # already streaming (this coordinator restarted): nothing to wait for
        elif isinstance(msg, Report):
            self.on_report(peer, msg)
        elif isinstance(msg, Stop) and peer.role == "sampler":
            log.info("sampler says: %s", msg.reason)
            self.end_stream(msg)  # the reliable copy of the end-of-stream marker

    def refusal(self, msg: Hello) -> str | None:
        """Why ``msg`` must be refused, or None to accept it."""
        if msg.protocol != PROTOCOL_VERSION:
            return f"protocol version {msg.protocol} != coordinator's {PROTOCOL_VERSION}; upgrade gped on both hosts"
        if msg.data_fingerprint != self.fingerprint:
            return f"data fingerprint {msg.data_fingerprint} != run's {self.fingerprint}; prepare the same data (gped data prepare)"
        if msg.chain_hash != self.cfg.chain_hash():
            return f"chain settings differ (chain hash {msg.chain_hash} != {self.cfg.chain_hash()}); use the run's config"
        if msg.config_hash != self.cfg.config_hash():
            return f"config differs (config hash {msg.config_hash} != {self.cfg.config_hash()}); use the run's config"
        now = time.monotonic()
        for identity, peer in self.peers.items():
            alive = now - peer.last_seen < self.cfg.coordinator.peer_timeout_s
            if peer.role == msg.role and peer.name == msg.name and alive and peer.pid != msg.pid and not peer.final:
                return f"{BUSY} a {msg.role} named {msg.name!r} (pid {peer.pid}) is already attached"
        if msg.role == "student" and msg.name not in {s.name for s in self.cfg.students}:
            return f"no student named {msg.name!r} in the run's config"
        if msg.role == "coordinator":
            return "a coordinator is already running this run"
        return None

    def on_hello(self, identity: bytes, msg: Hello) -> None:
        reason = self.refusal(msg)
        if reason:
            self.refused += 1
            if self.refused <= 10 or self.refused % 1000 == 0:
                log.error("refused %s %r (pid %d, refusal #%d): %s", msg.role, msg.name, msg.pid, self.refused, reason)
            self.reply(identity, Welcome(accepted=False, reason=reason, run_dir=str(self.run_dir), stop_step=self.cfg.sampler.steps))
            return
        # a restarted role comes back with a new identity: forget its old entry
        for old in [i for i, p in self.peers.items() if p.role == msg.role and p.name == msg.name and i != identity]:
            del self.peers[old]
        known = identity in self.peers
        self.peers[identity] = Peer(msg.role, msg.name, msg.pid, time.monotonic(), since=time.monotonic())
        self.first_peer_time = self.first_peer_time or time.monotonic()
        if not known:
            log.info("accepted %s %r (pid %d, resume step %d)", msg.role, msg.name, msg.pid, msg.resume_step)
        self.reply(identity, Welcome(accepted=True, reason="", run_dir=str(self.run_dir), stop_step=self.cfg.sampler.steps))
        if msg.role == "student" and self.sampler_done is not None:
            self.reply(identity, Stop(sample=self.end_sample, reason=STREAM_ENDED))  # came back after the end: report, finish

    @property
    def started(self) -> bool:
        return self.started_pid != 0

    def maybe_start(self) -> None:
        """Tell the (new) sampler to stream once every student it must not lose hears its heartbeats.

        Students report the pid of the sampler whose heartbeats reach them; the first start waits
        for every configured student, a restarted sampler for the students still attached; either
        way at most ``wait_for_students_s``. So no student misses samples to the slow-joiner effect.
        """
        found = self.find("sampler")
        if found is None or found[1].pid == self.started_pid:
            return
        identity, sampler = found
        students = [p for p in self.peers.values() if p.role == "student"]
        if self.started:
            expected = {p.name for p in students if not p.lost and not p.final}
        else:
            expected = {s.name for s in self.cfg.students}
        ready = {p.name for p in students if p.status.get("sampler_pid") == sampler.pid}
        waited = time.monotonic() - sampler.since
        if ready >= expected or waited > self.cfg.coordinator.wait_for_students_s:
            missing = sorted(expected - ready)
            if missing:
                log.warning("starting without students %s (waited %.0f s); they can join late", missing, waited)
            self.reply(identity, Start())
            log.info("%s sampler (pid %d) starts streaming", "the restarted" if self.started else "all set: the", sampler.pid)
            self.started_pid = sampler.pid

    def find(self, role: str) -> tuple[bytes, Peer] | None:
        for identity, peer in self.peers.items():
            if peer.role == role:
                return identity, peer
        return None

    # --- sample stream -----------------------------------------------------------------------

    def on_sample(self, msg: Message) -> None:
        if isinstance(msg, Params):
            if msg.sample <= self.last_sample:
                return  # a restarted sampler re-sends what we already have
            try:
                load_flat_parameters(self.teacher, torch.from_numpy(np.array(msg.params)))
            except ValueError as exc:
                log.warning("params message %d rejected: %s", msg.sample, exc)
                return
            self.ensemble_missed += msg.sample - self.last_sample - 1
            self.last_sample = msg.sample
            self.ensemble.add(evaluate_logits(self.teacher, self.test_x))
            if self.ood_ensemble is not None:
                self.ood_ensemble.add(evaluate_logits(self.teacher, self.ood_x))
        elif isinstance(msg, Stop):
            self.end_stream(msg)

    def end_stream(self, msg: Stop) -> None:
        """The sampler's stream is over (its PUB marker or its control-channel copy, whichever first):
        tell every student over the control channel too, with the last sample id, so a student whose
        sample queue overflowed still finishes what it has and reports instead of waiting."""
        if self.sampler_done is not None:
            return
        self.sampler_done = msg.reason
        self.sampler_done_time = time.monotonic()
        self.end_sample = msg.sample
        log.info("sample stream ended (%s) after sample %d; waiting for final reports", msg.reason, msg.sample)
        for identity, peer in self.peers.items():
            if peer.role == "student":
                self.reply(identity, Stop(sample=msg.sample, reason=STREAM_ENDED))

    # --- evaluation --------------------------------------------------------------------------

    def score(self, msg: Report) -> dict[str, float]:
        preds: dict[str, np.ndarray] = {}
        if msg.probs.shape[0]:
            preds["predictive"] = np.asarray(msg.probs, dtype=np.float64)
        if msg.entropy.shape[0]:
            preds["expected_entropy"] = np.asarray(msg.entropy, dtype=np.float64)
        n = len(self.test_y)
        if any(len(v) != n for v in preds.values()):
            raise ValueError(f"report has predictions for {[len(v) for v in preds.values()]} inputs, test set has {n}")
        return student_scores(preds, self.ensemble, self.test_y) if self.ensemble.count else {}

    def on_report(self, peer: Peer, msg: Report) -> None:
        if msg.student != peer.name:
            log.warning("report for %r from student %r ignored", msg.student, peer.name)
            return
        try:
            scores = self.score(msg)
        except ValueError as exc:
            log.warning("report from %r rejected: %s", peer.name, exc)
            return
        final = bool(msg.metrics.get("final"))
        self.last_report_time = time.monotonic()
        peer.final = peer.final or final
        record = {"time": time.time(), "student": peer.name, "sample": msg.sample, "ensemble_samples": self.ensemble.count,
                  "final": final, "scores": scores, "student_metrics": dict(msg.metrics)}
        self.reports[peer.name] = record
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{k}={v:.4f}" for k, v in scores.items())
        log.info("%s at sample %d (ensemble of %d): %s", peer.name, msg.sample, self.ensemble.count, shown)

    def all_final(self) -> bool:
        """The stream ended and every attached student has sent its final report."""
        students = [p for p in self.peers.values() if p.role == "student"]
        return self.sampler_done is not None and bool(students) and all(p.final for p in students)

    def finished(self) -> bool:
        if self.sampler_done is None:
            return False
        if self.all_final():
            return True
        # students still reporting are still working through their backlog: wait while there is progress
        return time.monotonic() - max(self.sampler_done_time, self.last_report_time) > FINAL_REPORT_TIMEOUT_S

    def summary(self) -> dict:
        rows = {"teacher ensemble": ensemble_scores(self.ensemble, self.test_y)} if self.ensemble.count else {}
        for name, record in sorted(self.reports.items()):
            rows[name] = record["scores"]
        return {"samples": self.ensemble.count, "last_sample": self.last_sample, "sampler": self.sampler_done or "not finished",
                "ensemble_missed": self.ensemble_missed, "rejected_messages": self.rejected,
                "messages_without_handshake": self.unknown_messages, "refused_hellos": self.refused,
                "scores": rows, "students": {n: r["student_metrics"] for n, r in self.reports.items()}}

    def write_summary(self) -> str:
        summary = self.summary()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = summary_table(summary["scores"])
        (self.run_dir / "summary.md").write_text(table + "\n")
        return table

    def check_liveness(self) -> float:
        """Warn once per peer that went silent; return how long the sampler has been silent (0 if fine)."""
        now = time.monotonic()
        sampler_silent = 0.0
        for peer in self.peers.values():
            silent = now - peer.last_seen
            if silent > self.cfg.coordinator.peer_timeout_s and not peer.final and not peer.lost:
                peer.lost = True
                log.warning("lost %s %r (pid %d): silent for %.0f s; waiting for it to come back", peer.role, peer.name, peer.pid, silent)
            if peer.role == "sampler" and peer.lost and self.sampler_done is None:
                sampler_silent = silent
        return sampler_silent

    def status_line(self) -> str:
        parts = [f"ensemble={self.ensemble.count}"]
        for peer in self.peers.values():
            keys = ("step", "samples", "missed", "superseded", "send_failures")
            parts.append(f"{peer.role}:{peer.name}[" + " ".join(f"{k}={peer.status[k]}" for k in keys if k in peer.status) + "]")
        return " ".join(parts)

    def state_dict(self) -> dict:
        state = {"ensemble": self.ensemble.state_dict(), "last_sample": self.last_sample, "ensemble_missed": self.ensemble_missed}
        if self.ood_ensemble is not None:
            state["ood_ensemble"] = self.ood_ensemble.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.ensemble.load_state_dict(state["ensemble"])
        if self.ood_ensemble is not None and "ood_ensemble" in state:
            self.ood_ensemble.load_state_dict(state["ood_ensemble"])
        self.last_sample = int(state["last_sample"])
        self.ensemble_missed = int(state["ensemble_missed"])


def run(cfg: RunConfig, resume: bool = False) -> int:
    setup_logging("coordinator")
    set_threads(cfg.threads)
    stop = StopFlag().install()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    data = load_data(cfg)
    addresses = Addresses.from_config(cfg.coordinator)
    ctx = zmq.Context()
    security = Security(ctx, cfg.coordinator.keys)
    router = make_socket(ctx, zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 0)
    security.server(router)
    sub = make_socket(ctx, zmq.SUB)
    security.client(sub)
    for topic in (TOPIC_PARAMS, TOPIC_CONTROL):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    control = Channel(router, "coordinator", log)
    samples = Channel(sub, "coordinator", log)
    linger = None
    try:
        bind(router, addresses.control_bind, cfg.coordinator, "the control socket")
        sub.connect(addresses.samples)
        role = CoordinatorRole(cfg, data, lambda identity, msg: control.send(msg, [identity]))
        ckpt = checkpoint_path(cfg, "coordinator", "coordinator")
        state = load_role_checkpoint(ckpt, cfg, data.fingerprint) if resume else None
        if state is not None:
            restore(role, state, ckpt)
            log.info("resumed from %s with an ensemble of %d samples", ckpt, role.ensemble.count)
        log.info("run %r in %s; control on %s; %d students configured; data %s", cfg.name, run_dir, addresses.control_bind,
                 len(cfg.students), data.fingerprint)
        _loop(role, control, samples, cfg, stop, lambda: save_checkpoint(ckpt, checkpoint_state(cfg, data.fingerprint, role.state_dict())))
        if role.all_final():
            linger = CLEAN_LINGER_MS  # every student reported its end and had its Stop (and 0.2 s to read it)
        table = role.write_summary()
        log.info("summary (%s):\n%s", run_dir / "summary.md", table)
        return 0
    except GpedError as exc:
        log.error("%s", exc)
        return 2
    finally:
        close_all(ctx, router, sub, security=security, linger_ms=linger)


def _loop(role: CoordinatorRole, control: Channel, samples: Channel, cfg: RunConfig, stop: StopFlag, checkpoint) -> None:
    """Serve until the run is finished. A stop request (signal) is passed to the sampler first, so its
    end-of-stream marker reaches every student and all checkpoints cover the same samples."""
    coord = cfg.coordinator
    status = Every(5.0)
    poller = zmq.Poller()
    poller.register(control.socket, zmq.POLLIN)
    poller.register(samples.socket, zmq.POLLIN)
    last_ckpt = role.ensemble.count
    stop_since: float | None = None
    while not role.finished():
        if stop and stop_since is None:
            stop_since = time.monotonic()
            log.info("stopping (%s): asking the sampler to end its stream", stop.reason)
            sampler = role.find("sampler")
            if sampler is not None and role.started:
                control.send(Stop(reason=stop.reason), [sampler[0]])
        if stop_since is not None and (time.monotonic() - stop_since > 2 * coord.peer_timeout_s or not role.started):
            break
        ready = dict(poller.poll(100))
        if control.socket in ready:
            got = control.recv(prefix_frames=1)
            if got and got[1] is not None and got[0]:
                role.on_control(got[0][0], got[1])
        if samples.socket in ready:
            got = samples.recv(prefix_frames=1)
            if got and got[1] is not None:
                role.on_sample(got[1])
                if role.ensemble.count - last_ckpt >= coord.checkpoint_every:
                    checkpoint()
                    last_ckpt = role.ensemble.count
        role.maybe_start()
        sampler_silent = role.check_liveness()
        if coord.give_up_s and sampler_silent > coord.give_up_s and stop_since is None:
            log.error("the sampler has been gone for %.0f s; stopping the run (checkpoints kept)", sampler_silent)
            stop.set("sampler gone")
        if status():
            role.rejected = {"control": control.rejected.as_dict(), "samples": samples.rejected.as_dict()}
            log.info("%s", role.status_line())
    role.rejected = {"control": control.rejected.as_dict(), "samples": samples.rejected.as_dict()}
    reason = stop.reason or f"sampler {role.sampler_done}"
    checkpoint()
    for identity in list(role.peers):
        control.send(Stop(reason=reason), [identity])
    log.info("stopping: %s", reason)
    time.sleep(0.2)


def main(cfg: RunConfig, resume: bool = False) -> None:
    sys.exit(run(cfg, resume))

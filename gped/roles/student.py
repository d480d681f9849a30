"""The student role: one student network distilling its expectations from the stream (DESIGN §3).

* targets mode — it rebuilds each batch's inputs from its own copy of the data (indices + noise
  seed) and takes one step on the teacher's logits that came with them;
* params mode — it loads the newest teacher snapshot into its own teacher copy and draws
  ``steps_per_sample`` batches from its own seeded stream, evaluating the teacher itself. When it
  falls behind it skips to the newest snapshot (``skip_stale``); older ones count as superseded.

Samples it never received (sampler queue overflow, a restart) show up as gaps in sample ids and
are counted as missed. Every ``eval_every`` samples, and at the end, it sends the coordinator its
test-set predictions for scoring.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable

import numpy as np
import torch
import zmq

from ..checkpoint import save_checkpoint
from ..config import RunConfig, StudentConfig
from ..core.chain import DistillStream, evaluate_logits
from ..core.data import distill_inputs
from ..core.distill import Distiller
from ..core.models import load_flat_parameters
from ..errors import GpedError
from ..log import Progress, setup_logging
from ..runtime import build_teacher_for, load_data, pick_device, set_threads
from ..staging import to_device
from ..transport import TOPIC_CONTROL, TOPIC_PARAMS, TOPIC_TARGETS, Addresses, Channel, Security, make_socket
from ..wire import Heartbeat, Message, Params, Report, Stop, Targets
from .common import (CLEAN_LINGER_MS, STREAM_ENDED, Every, restore, StopFlag, checkpoint_path, checkpoint_state, close_all, handshake, is_rehello,
                     load_role_checkpoint, make_hello)

log = logging.getLogger("gped.student")


class StudentRole:
    """One distiller fed by sample messages; ``send(message)`` reports to the coordinator."""

    def __init__(self, cfg: RunConfig, student: StudentConfig, data, device: torch.device, send: Callable[[Message], bool]):
        self.cfg = cfg
        self.student = student
        self.device = device
        self.send = send
        self.train_x = torch.from_numpy(data.train_x).to(device)
        self.test_x = torch.from_numpy(data.test_x)
        self.num_classes = data.num_classes
        targets = cfg.sampler.distill_batch if cfg.sampler.mode == "targets" else None
        self.distiller = Distiller(student, data.input_shape, data.num_classes, len(data.train_x), device, targets)
        self.teacher = build_teacher_for(cfg, data).to(device) if cfg.sampler.mode == "params" else None
        self.stream = DistillStream(len(data.train_x), student.batch_size, student.seed)
        self.last_sample = -1
        self.samples = 0
        self.missed = 0
        self.superseded = 0
        self.losses: dict[str, float] = {}

    def _count(self, msg: Message, superseded: int = 0) -> bool:
        """Track sample ids; False for a stale or duplicate sample (ignored). ``superseded`` samples
        of the gap did arrive but were skipped for a newer snapshot: they are not missed."""
        if msg.sample <= self.last_sample:
            return False
        self.missed += msg.sample - self.last_sample - 1 - superseded
        self.superseded += superseded
        self.last_sample = msg.sample
        if msg.sample % self.student.sample_every:
            return False  # thinned out on purpose: neither used nor missed
        self.samples += 1
        return True

    def on_targets(self, msg: Targets) -> bool:
        if not self._count(msg):
            return False
        indices = torch.from_numpy(np.array(msg.indices, dtype=np.int64))
        if int(indices.max()) >= len(self.train_x) or msg.logits.shape[1] != self.num_classes:
            log.warning("targets message %d does not fit this data set; ignored", msg.sample)
            return False
        inputs = distill_inputs(self.train_x, indices.to(self.device), msg.noise_seed, self.cfg.data.distill_noise)
        self.losses = self.distiller.observe(inputs, indices, to_device(msg.logits, self.device))
        return True

    def on_params(self, msg: Params, superseded: int = 0) -> bool:
        if not self._count(msg, superseded):
            return False
        try:
            load_flat_parameters(self.teacher, to_device(msg.params, self.device))
        except ValueError as exc:
            log.warning("params message %d rejected: %s", msg.sample, exc)
            return False
        for _ in range(self.student.steps_per_sample):
            indices, noise_seed = self.stream.next()
            inputs = distill_inputs(self.train_x, indices.to(self.device), noise_seed, self.cfg.data.distill_noise)
            self.losses = self.distiller.observe(inputs, indices, evaluate_logits(self.teacher, inputs))
        return True

    def report(self, final: bool = False) -> Report:
        preds = self.distiller.predict(self.test_x)
        probs = preds.get("predictive", preds.get("dirichlet"))  # EnD² is scored by its Dirichlet's mean
        probs = probs.numpy().astype(np.float32) if probs is not None else np.zeros((0, self.num_classes), np.float32)
        entropy = preds.get("expected_entropy")
        entropy = entropy.reshape(-1).numpy().astype(np.float32) if entropy is not None else np.zeros(0, np.float32)
        metrics = {f"loss.{k}": float(v) for k, v in self.losses.items()}
        metrics.update(final=float(final), samples=float(self.samples), missed=float(self.missed), updates=float(self.distiller.updates))
        msg = Report(step=0, sample=max(self.last_sample, -1), student=self.student.name, metrics=metrics, probs=probs, entropy=entropy)
        self.send(msg)
        return msg

    def status(self) -> dict:
        status = {"samples": self.samples, "last_sample": self.last_sample, "missed": self.missed, "superseded": self.superseded,
                  "updates": self.distiller.updates}
        status.update({f"loss.{k}": round(v, 5) for k, v in self.losses.items()})
        return status

    def state_dict(self) -> dict:
        return {"distiller": self.distiller.state_dict(), "stream": self.stream.state_dict(), "last_sample": self.last_sample,
                "samples": self.samples, "missed": self.missed, "superseded": self.superseded}

    def load_state_dict(self, state: dict) -> None:
        self.distiller.load_state_dict(state["distiller"])
        self.stream.load_state_dict(state["stream"])
        for key in ("last_sample", "samples", "missed", "superseded"):
            setattr(self, key, int(state[key]))


def run(cfg: RunConfig, name: str, resume: bool = False, device: str | None = None) -> int:
    student = cfg.student(name)
    setup_logging(f"student:{name}")
    set_threads(cfg.threads)
    stop = StopFlag().install()
    data = load_data(cfg)
    dev = pick_device(device or student.device)
    addresses = Addresses.from_config(cfg.coordinator)
    ctx = zmq.Context()
    security = Security(ctx, cfg.coordinator.keys)
    control_sock = make_socket(ctx, zmq.DEALER)
    security.client(control_sock)
    control_sock.connect(addresses.control)
    sub_sock = make_socket(ctx, zmq.SUB, hwm=DEFAULT_SUB_HWM)
    security.client(sub_sock)
    topic = TOPIC_TARGETS if cfg.sampler.mode == "targets" else TOPIC_PARAMS
    for t in (topic, TOPIC_CONTROL):
        sub_sock.setsockopt(zmq.SUBSCRIBE, t)
    sub_sock.connect(addresses.samples)  # subscribe before the handshake: no slow-joiner loss
    control = Channel(control_sock, f"student:{name}", log)
    samples = Channel(sub_sock, f"student:{name}", log)
    linger = None
    try:
        role = StudentRole(cfg, student, data, dev, control.send)
        ckpt = checkpoint_path(cfg, "student", name)
        state = load_role_checkpoint(ckpt, cfg, data.fingerprint) if resume else None
        if state is not None:
            restore(role, state, ckpt)
            log.info("resumed from %s after sample %d", ckpt, role.last_sample)
        hello = make_hello(cfg, "student", name, data.fingerprint, max(role.last_sample, 0))
        handshake(control, hello, cfg, stop, log)
        log.info("accepted; distilling %s with %s estimator on %s; waiting for samples from %s",
                 ",".join(student.expectations), student.estimator, dev, addresses.samples)
        if _loop(role, control, samples, cfg, stop, lambda: save_checkpoint(ckpt, checkpoint_state(cfg, data.fingerprint, role.state_dict())), hello):
            linger = CLEAN_LINGER_MS  # the coordinator has our final report and said stop: nothing left to deliver
        return 0
    except GpedError as exc:
        log.error("%s", exc)
        return 2
    finally:
        close_all(ctx, control_sock, sub_sock, security=security, linger_ms=linger)


DEFAULT_SUB_HWM = 1000
#: after the coordinator says the stream ended, how long to wait for the rest of it to arrive
END_DRAIN_S = 2.0


def _drain(samples: Channel, first: Params, every: int) -> tuple[Params, int, int, Stop | None]:
    """Params mode: take everything queued and keep the newest snapshot this student would use
    (its id passes ``sample_every``); return it, how many snapshots it supersedes, and the
    end-of-stream marker if one was queued behind it (to act on after using the snapshot), and
    the newest id seen (newer unusable ones are thinned out, not missed)."""
    queued = [first]
    end: Stop | None = None
    while end is None:
        got = samples.recv(prefix_frames=1)
        if got is None:
            break
        if isinstance(got[1], Params):
            queued.append(got[1])
        elif isinstance(got[1], Stop):
            end = got[1]
    usable = [m for m in queued if m.sample % every == 0]
    newest = usable[-1] if usable else queued[-1]
    return newest, sum(1 for m in queued if m.sample < newest.sample), queued[-1].sample, end


def _loop(role: StudentRole, control: Channel, samples: Channel, cfg: RunConfig, stop: StopFlag, checkpoint, hello) -> bool:
    """Consume samples until the sampler's end of stream. On a stop request keep consuming what the
    sampler still sends until its end-of-stream marker (at most ``peer_timeout_s``), so that every
    role's checkpoint covers the same samples and a resumed run continues exactly. Returns whether
    the coordinator confirmed the end (its Stop after our final report)."""
    coord = cfg.coordinator
    beat, warn = Every(coord.heartbeat_s), Every(coord.peer_timeout_s)
    progress = Progress(log, 5.0, unit="sample")
    last_heard = time.monotonic()
    sampler_seen = False
    sampler_pid = 0
    pending_final = False
    poller = zmq.Poller()
    poller.register(samples.socket, zmq.POLLIN)
    poller.register(control.socket, zmq.POLLIN)
    stop_since: float | None = None
    end_at: int | None = None  # last sample id of a stream the coordinator says has ended
    end_heard = 0.0
    while True:
        if end_at is not None and (role.last_sample >= end_at or time.monotonic() - max(end_heard, last_heard) > END_DRAIN_S):
            if role.last_sample < end_at:
                role.missed += end_at - role.last_sample  # the tail never arrived: count it
                role.last_sample = end_at
            log.info("the sampler's stream ended at sample %d; final report", end_at)
            pending_final = True
            break
        if stop and stop_since is None:
            stop_since = time.monotonic()
            log.info("stopping (%s): finishing what the sampler has sent", stop.reason)
        if stop_since is not None and (time.monotonic() - stop_since > coord.peer_timeout_s or not sampler_seen):
            break
        ready = dict(poller.poll(100))
        if samples.socket in ready:
            got = samples.recv(prefix_frames=1)
            msg = got[1] if got else None
            if msg is not None:
                last_heard, sampler_seen = time.monotonic(), True
                if isinstance(msg, Heartbeat):
                    sampler_pid = int(msg.status.get("pid", 0))
                skipped, newest_id, end = 0, -1, None
                if isinstance(msg, Params) and role.student.skip_stale:
                    msg, skipped, newest_id, end = _drain(samples, msg, role.student.sample_every)
                if isinstance(msg, Stop):
                    pending_final = True
                    log.info("sampler finished (%s); final report", msg.reason)
                    break
                handled = role.on_targets(msg) if isinstance(msg, Targets) else role.on_params(msg, skipped) if isinstance(msg, Params) else False
                if handled:
                    if role.samples % coord.eval_every == 0:
                        role.report()
                    if role.samples % coord.checkpoint_every == 0:
                        checkpoint()
                role.last_sample = max(role.last_sample, newest_id)
                if end is not None:
                    pending_final = True
                    log.info("sampler finished (%s); final report", end.reason)
                    break
        if control.socket in ready:
            got = control.recv()
            if got and isinstance(got[1], Stop):
                if got[1].reason == STREAM_ENDED:
                    end_at = got[1].sample
                    end_heard = time.monotonic()
                else:
                    stop.set(f"coordinator: {got[1].reason}")
            elif got and is_rehello(got[1]):
                log.info("the coordinator restarted; saying hello again")
                control.send(hello)
        if beat():
            control.send(Heartbeat(role="student", name=role.student.name, status={**role.status(), "sampler_pid": sampler_pid}))
        silent = time.monotonic() - last_heard
        if silent > coord.peer_timeout_s and warn():
            log.warning("no samples or heartbeats from the sampler for %.0f s; waiting", silent)
        if coord.give_up_s and silent > coord.give_up_s and stop_since is None:
            log.error("sampler silent for %.0f s; giving up (checkpoint kept)", silent)
            break
        progress.update(role.samples, missed=role.missed, superseded=role.superseded, **role.losses)
    checkpoint()
    final = role.report(final=pending_final)
    control.send(Heartbeat(role="student", name=role.student.name, status={**role.status(), "state": "done"}))
    progress.update(role.samples, force=True, missed=role.missed, superseded=role.superseded, **role.losses)
    return _await_stop(control, final, hello, coord.peer_timeout_s)


def _await_stop(control: Channel, final: Report, hello, timeout_s: float) -> bool:
    """Wait (bounded) for the coordinator's Stop, which it sends once it has every final report;
    a coordinator that restarted meanwhile asks for a handshake, then gets the report again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = control.recv(timeout_ms=100)
        if got and isinstance(got[1], Stop):
            return True
        if got and is_rehello(got[1]):
            control.send(hello)
            control.send(final)
    return False


def main(cfg: RunConfig, name: str, resume: bool = False, device: str | None = None) -> None:
    sys.exit(run(cfg, name, resume, device))

"""The sampler role: the teacher's SGLD chain, streaming posterior samples (DESIGN §3).

After burn-in, every H steps, it publishes the teacher's parameters (topic ``p``; the coordinator
builds the ensemble from them, params-mode students distil from them) and, in targets mode, the
teacher's logits on a distillation batch drawn from its own seeded stream (topic ``t``: indices
and a noise seed, never the inputs). Publishing never blocks the chain: a full queue drops for the
slow subscriber, who sees the gap in sequence numbers. Nor does copying it off the GPU: a sample is
staged (pinned host memory, a side stream, an event; :mod:`gped.staging`) and published once its
copy has landed, while the chain goes on; checkpoints and the end of the stream wait for it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from typing import Callable

import torch
import zmq

from ..checkpoint import save_checkpoint
from ..config import RunConfig
from ..core.chain import DistillStream, TeacherChain, evaluate_logits
from ..core.data import distill_inputs
from ..core.models import flat_parameters
from ..errors import GpedError
from ..log import Progress, setup_logging
from ..runtime import TARGETS_STREAM_OFFSET, build_teacher_for, load_data, pick_device, set_threads
from ..staging import HostStager
from ..transport import TOPIC_CONTROL, TOPIC_PARAMS, TOPIC_TARGETS, Addresses, Channel, Security, bind, make_socket
from ..wire import Heartbeat, Message, Params, ProtocolError, Start, Stop, Targets
from .common import (Every, restore, StopFlag, checkpoint_path, checkpoint_state, close_all, handshake, is_rehello,
                     load_role_checkpoint, make_hello)

log = logging.getLogger("gped.sampler")

Publish = Callable[[bytes, Message], bool]


class SamplerRole:
    """The chain plus what it emits; ``publish(topic, message)`` is the only way out."""

    def __init__(self, cfg: RunConfig, data, device: torch.device, publish: Publish):
        self.cfg = cfg
        self.device = device
        self.publish = publish
        self.train_x = torch.from_numpy(data.train_x).to(device)
        self.chain = TeacherChain(
            build_teacher_for(cfg, data), torch.from_numpy(data.labelled_x), torch.from_numpy(data.labelled_y), cfg.sampler, device
        )
        self.stream = DistillStream(len(data.train_x), cfg.sampler.distill_batch, cfg.sampler.seed + TARGETS_STREAM_OFFSET)
        self.samples_sent = 0
        self.send_failures = 0
        self.stager = HostStager(device)
        self._pending: deque = deque()

    @property
    def last_nll(self) -> float:
        """The last minibatch NLL (a GPU sync: read it for status lines, not every step)."""
        return self.chain.last_loss

    @property
    def done(self) -> bool:
        return self.chain.step >= self.cfg.sampler.steps

    def burn_in(self, steps: int = 10) -> bool:
        """Take up to ``steps`` burn-in steps; False once burn-in is over (or the budget is spent).

        Burn-in publishes nothing, so it needs no listener: the sampler runs it while the
        coordinator and students are still starting, instead of after they are ready. The chain is
        the same whenever its steps are taken, so the run is unchanged (and equals the reference).
        """
        n = min(steps, self.cfg.sampler.burn_in - self.chain.step, self.cfg.sampler.steps - self.chain.step)
        for _ in range(max(0, n)):
            self.chain.advance()
        return n > 0

    def step(self) -> int:
        """One chain step; on a posterior sample, stage it for publishing. Returns how many samples
        went out (staged samples leave once their device-to-host copies have landed: at once on
        the CPU, a few steps later on CUDA, while the chain goes on)."""
        self.chain.advance()
        if self.chain.is_sample():
            self._stage_sample()
        return self.flush() if self._pending else 0

    def _stage_sample(self) -> None:
        step, sample = self.chain.step, self.chain.sample_id
        tensors = {"params": flat_parameters(self.chain.model)}
        extra: dict = {}
        if self.cfg.sampler.mode == "targets":
            indices, noise_seed = self.stream.next()
            inputs = distill_inputs(self.train_x, indices.to(self.device), noise_seed, self.cfg.data.distill_noise)
            tensors["logits"] = evaluate_logits(self.chain.model, inputs).float()
            extra = {"indices": indices.numpy(), "noise_seed": noise_seed}
        self._pending.append((step, sample, self.stager.stage(tensors), extra))

    def flush(self, wait: bool = False) -> int:
        """Publish the staged samples whose copies have landed, oldest first (with ``wait``: all)."""
        sent = 0
        while self._pending and (wait or self._pending[0][2].ready()):
            step, sample, staged, extra = self._pending.popleft()
            arrays = staged.arrays()
            flat = arrays["params"]
            try:  # the message checks every value is finite; for our own snapshot only a diverged chain fails that
                params = Params(step=step, sample=sample, numel=flat.size, params=flat)
            except ProtocolError:
                raise GpedError(f"the chain diverged by step {step} (non-finite parameters); lower sampler.step_size") from None
            ok = self.publish(TOPIC_PARAMS, params)
            if "logits" in arrays:
                ok &= self.publish(TOPIC_TARGETS, Targets(step=step, sample=sample, logits=arrays["logits"], **extra))
            self.samples_sent += 1
            self.send_failures += not ok
            sent += 1
        return sent

    def status(self) -> dict:
        return {"step": self.chain.step, "samples": self.samples_sent, "send_failures": self.send_failures, "nll": round(self.last_nll, 5)}

    @property
    def samples_taken(self) -> int:
        """Samples published plus those staged and not yet out."""
        return self.samples_sent + len(self._pending)

    def state_dict(self) -> dict:
        self.flush(wait=True)  # a checkpoint covers every sample up to the chain's step
        self.chain.check()  # on CUDA the last steps' losses are not looked at yet: never save a diverged θ
        return {"chain": self.chain.state_dict(), "stream": self.stream.state_dict(), "samples_sent": self.samples_sent}

    def load_state_dict(self, state: dict) -> None:
        self.chain.load_state_dict(state["chain"])
        self.stream.load_state_dict(state["stream"])
        self.samples_sent = int(state["samples_sent"])


def run(cfg: RunConfig, resume: bool = False, device: str | None = None) -> int:
    """Process entry point: handshake, wait for the start signal, run the chain, stream, stop."""
    setup_logging("sampler")
    set_threads(cfg.threads)
    stop = StopFlag().install()
    data = load_data(cfg)
    dev = pick_device(device or cfg.sampler.device)
    addresses = Addresses.from_config(cfg.coordinator)
    ctx = zmq.Context()
    security = Security(ctx, cfg.coordinator.keys)
    control_sock = make_socket(ctx, zmq.DEALER)
    security.client(control_sock)
    control_sock.connect(addresses.control)
    pub_sock = make_socket(ctx, zmq.PUB)
    security.server(pub_sock)
    control = Channel(control_sock, "sampler", log)
    samples = Channel(pub_sock, "sampler", log)
    try:
        role = SamplerRole(cfg, data, dev, lambda topic, msg: samples.send(msg, [topic]))
        ckpt = checkpoint_path(cfg, "sampler", "sampler")
        state = load_role_checkpoint(ckpt, cfg, data.fingerprint) if resume else None
        if state is not None:
            restore(role, state, ckpt)
            log.info("resumed from %s at step %d", ckpt, role.chain.step)
        hello = make_hello(cfg, "sampler", "sampler", data.fingerprint, role.chain.step)
        early = role.chain.step
        log.info("chain ready at step %d; saying hello to the coordinator at %s (burn-in runs meanwhile)", early, addresses.control)
        welcome = handshake(control, hello, cfg, stop, log, idle=role.burn_in)
        bind(pub_sock, addresses.samples_bind, cfg.coordinator, "the sample stream")
        log.info("accepted by the coordinator (run dir %s); publishing on %s; waiting for the start signal", welcome.run_dir, addresses.samples_bind)
        if not _wait_for_start(control, samples, cfg, stop, hello, idle=role.burn_in):
            return 0
        if role.chain.step > early:
            log.info("burn-in: %d steps taken while the others started", role.chain.step - early)
        log.info("started: %s mode, %d steps, burn-in %d, thin %d, device %s", cfg.sampler.mode, cfg.sampler.steps, cfg.sampler.burn_in, cfg.sampler.thin, dev)
        _loop(role, control, samples, cfg, stop, ckpt, data.fingerprint)
        return 0
    except GpedError as exc:
        log.error("%s", exc)
        # tell everyone the stream is over, so nobody waits out give_up_s for a sampler that failed
        end = Stop(reason=f"sampler failed: {exc}"[:200])
        samples.send(end, [TOPIC_CONTROL])
        control.send(end)
        return 2
    finally:
        close_all(ctx, control_sock, pub_sock, security=security)


def _wait_for_start(control: Channel, samples: Channel, cfg: RunConfig, stop: StopFlag, hello,
                    idle: Callable[[], bool] | None = None) -> bool:
    """Publish heartbeats (so subscribers can tell they are connected) until the coordinator says
    start; heartbeat the coordinator too, say hello again if it restarted, give up after give_up_s.
    ``idle()`` (burn-in) runs between looks at the socket while it has work."""
    beat = Every(min(cfg.coordinator.heartbeat_s, 0.2))
    last_heard = time.monotonic()
    status = {"state": "waiting", "pid": os.getpid()}
    while not stop:
        if beat():
            samples.send(Heartbeat(role="sampler", name="sampler", status=status), [TOPIC_CONTROL])
            control.send(Heartbeat(role="sampler", name="sampler", status=status))
        busy = idle() if idle is not None else False
        got = control.recv(timeout_ms=0 if busy else 50)
        if got and got[1] is not None:
            last_heard = time.monotonic()
            if isinstance(got[1], Start):
                return True
            if isinstance(got[1], Stop):
                log.info("coordinator stopped the run before it started: %s", got[1].reason)
                return False
            if is_rehello(got[1]):
                log.info("the coordinator restarted; saying hello again")
                control.send(hello)
        silent = time.monotonic() - last_heard
        if cfg.coordinator.give_up_s and silent > cfg.coordinator.give_up_s:
            raise GpedError(f"no word from the coordinator for {silent:.0f} s while waiting to start")
    return False


def _loop(role: SamplerRole, control: Channel, samples: Channel, cfg: RunConfig, stop: StopFlag, ckpt, fingerprint: str) -> None:
    beat = Every(cfg.coordinator.heartbeat_s)
    poll = Every(0.05)
    progress = Progress(log, 5.0, unit="step")
    every_ckpt = cfg.coordinator.checkpoint_every
    next_ckpt = (role.samples_sent // every_ckpt + 1) * every_ckpt
    while not stop and not role.done:
        role.step()
        if role.samples_taken >= next_ckpt:
            # right after the boundary sample was taken (on CUDA: once its copy is out), so the
            # sampler's checkpoint covers exactly the samples the students' and coordinator's do
            save_checkpoint(ckpt, checkpoint_state(cfg, fingerprint, role.state_dict()))
            next_ckpt = (role.samples_sent // every_ckpt + 1) * every_ckpt
        if poll():
            got = control.recv()
            if got and isinstance(got[1], Stop):
                stop.set(f"coordinator: {got[1].reason}")
            elif got and is_rehello(got[1]):
                log.info("the coordinator restarted; saying hello again")
                control.send(make_hello(cfg, "sampler", "sampler", fingerprint, role.chain.step))
        if beat():
            status = {**role.status(), "state": "running", "pid": os.getpid()}
            control.send(Heartbeat(role="sampler", name="sampler", status=status))
            samples.send(Heartbeat(role="sampler", name="sampler", status=status), [TOPIC_CONTROL])
        if progress.due():
            progress.update(role.chain.step, samples=role.samples_sent, nll=role.last_nll, send_failures=role.send_failures)
    save_checkpoint(ckpt, checkpoint_state(cfg, fingerprint, role.state_dict()))
    reason = "done" if role.done else f"stopped: {stop.reason}"
    end = Stop(step=role.chain.step, sample=role.samples_sent - 1, reason=reason)
    samples.send(end, [TOPIC_CONTROL])
    control.send(Stop(step=role.chain.step, sample=role.samples_sent - 1, reason=reason))
    progress.update(role.chain.step, force=True, samples=role.samples_sent, nll=role.last_nll, send_failures=role.send_failures)
    log.info("chain %s at step %d after %d samples", reason, role.chain.step, role.samples_sent)
    time.sleep(0.2)  # let the end-of-stream marker leave before linger starts counting


def main(cfg: RunConfig, resume: bool = False, device: str | None = None) -> None:
    sys.exit(run(cfg, resume, device))

"""Plumbing every role process shares: stop flags, the handshake, heartbeats, checkpoint paths."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

import zmq

from ..config import RunConfig
from ..errors import GpedError
from ..transport import Channel
from ..wire import PROTOCOL_VERSION, Hello, Stop, Welcome


#: refusal reasons that mean "try again later" and "say hello (again)", e.g. after a coordinator restart
BUSY = "busy:"
HELLO_FIRST = "hello first"
#: the coordinator's Stop reason for a student that (re)joins after the sampler's stream has ended
STREAM_ENDED = "stream ended"


class StopFlag:
    """Set by SIGINT/SIGTERM (or by a Stop message); loops check it and wind down cleanly."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is not None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def install(self) -> "StopFlag":
        def handler(signum, _frame):
            self.set(signal.Signals(signum).name)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        return self


class Every:
    """True once every ``interval_s`` seconds (for heartbeats and status lines)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.last = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            return True
        return False


def make_hello(cfg: RunConfig, role: str, name: str, fingerprint: str, resume_step: int = 0) -> Hello:
    return Hello(
        role=role,
        name=name,
        pid=os.getpid(),
        protocol=PROTOCOL_VERSION,
        config_hash=cfg.config_hash(),
        chain_hash=cfg.chain_hash(),
        data_fingerprint=fingerprint,
        mode=cfg.sampler.mode,
        resume_step=resume_step,
    )


def handshake(control: Channel, hello: Hello, cfg: RunConfig, stop: StopFlag, log: logging.Logger,
              idle: Callable[[], bool] | None = None) -> Welcome:
    """Say hello to the coordinator until it answers; raise GpedError if refused or given up.

    The hello is re-sent every ``peer_timeout_s`` (a coordinator that starts later, or restarts,
    still gets one); after ``give_up_s`` without an answer the role stops cleanly. ``idle()``, if
    given, is called between looks at the socket and says whether it did some work; while it does,
    the socket is only checked, not waited on (the sampler burns in meanwhile).
    """
    start = time.monotonic()
    give_up = cfg.coordinator.give_up_s
    while not stop:
        control.send(hello)
        deadline = time.monotonic() + cfg.coordinator.peer_timeout_s
        while time.monotonic() < deadline and not stop:
            busy = idle() if idle is not None else False
            got = control.recv(timeout_ms=0 if busy else 200)
            if got is None or got[1] is None:
                continue
            msg = got[1]
            if isinstance(msg, Welcome):
                if msg.accepted:
                    return msg
                if msg.reason.startswith(BUSY):
                    log.warning("coordinator: %s; retrying until it is gone", msg.reason)
                    time.sleep(1.0)
                    break
                if msg.reason == HELLO_FIRST:
                    continue  # our hello is on its way; an answer to an older message
                raise GpedError(f"coordinator refused this {hello.role} {hello.name!r}: {msg.reason}")
            if isinstance(msg, Stop):
                raise GpedError(f"coordinator stopped the run before it started: {msg.reason}")
        waited = time.monotonic() - start
        if give_up and waited > give_up:
            raise GpedError(f"no answer from the coordinator at {cfg.coordinator.host}:{cfg.coordinator.port} after {waited:.0f} s")
        log.warning("waiting for the coordinator at %s:%d (%.0f s so far)", cfg.coordinator.host, cfg.coordinator.port, waited)
    raise GpedError(f"stopped ({stop.reason}) before the coordinator answered")


def is_rehello(msg) -> bool:
    """A coordinator that does not know us (it restarted) asks for a new handshake."""
    return isinstance(msg, Welcome) and not msg.accepted and msg.reason == HELLO_FIRST


def checkpoint_state(cfg: RunConfig, fingerprint: str, role_state: dict) -> dict:
    return {"role": role_state, "config_hash": cfg.config_hash(), "data_fingerprint": fingerprint}


def load_role_checkpoint(path: Path, cfg: RunConfig, fingerprint: str) -> dict | None:
    """The role state of a checkpoint made by this run (same config and data), or None if none.

    Always loaded onto the CPU: generator states must stay CPU byte tensors, and ``load_state_dict``
    moves everything else to the role's device."""
    from ..checkpoint import load_checkpoint

    if not path.exists():
        return None
    state = load_checkpoint(path, "cpu")
    if state.get("config_hash") != cfg.config_hash():
        raise GpedError(f"checkpoint {path} belongs to another config (hash {state.get('config_hash')} != {cfg.config_hash()})")
    if "role" not in state or not isinstance(state["role"], dict):
        raise GpedError(f"checkpoint {path} holds no role state")
    if state.get("data_fingerprint") != fingerprint:
        raise GpedError(f"checkpoint {path} was made with other data (fingerprint {state.get('data_fingerprint')} != {fingerprint})")
    return state["role"]


def restore(role, state: dict, path: Path) -> None:
    """``role.load_state_dict(state)``, with a clear error for a checkpoint of the wrong kind
    (e.g. one written by ``gped reference``, which keeps results but no stream positions)."""
    try:
        role.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise GpedError(f"checkpoint {path} cannot resume this role ({type(exc).__name__}: {exc}); "
                        "checkpoints of `gped reference` runs are for loading results, not for --resume") from None


def checkpoint_path(cfg: RunConfig, role: str, name: str) -> Path:
    return Path(cfg.run_dir) / "checkpoints" / f"{role}-{name}.pt"


#: linger after a clean finish: everything that mattered was sent and answered, and what is left
#: queued is for peers that are gone (a Stop to an exited sampler, a reconnecting subscription);
#: waiting the full LINGER_MS for it only delays the exit
CLEAN_LINGER_MS = 100


def close_all(ctx: zmq.Context, *sockets: zmq.Socket, security=None, linger_ms: int | None = None) -> None:
    """Close the sockets (waiting up to ``linger_ms`` for queued messages, default: the socket's
    own LINGER), the CURVE authenticator and the context."""
    for sock in sockets:
        sock.close(linger=linger_ms)
    if security is not None:
        security.close()
    ctx.term()

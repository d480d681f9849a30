"""``gped run``: every role of a run as a local process, with GPUs handed out and no orphans.

The launcher prepares the data once, writes the resolved config to the run directory, and starts
the coordinator, the students and the sampler, each as ``python -m gped <role> <run_dir>/config.json``
in its own session (so a terminal's Ctrl-C reaches the launcher only, which forwards it). GPUs:
the sampler gets the first one, the students share the rest round-robin (all share the one GPU when
there is only one); without CUDA every role runs on the CPU (the loopback mode).

Cores: the sampler's chain is the critical path, so the sampler gets ``threads`` cores of its own
(the first ones this process may use) and every other role shares the rest (``cpu_plan``); ZeroMQ's
I/O threads inherit their role's cores. Left to the scheduler, a student woken by a sample lands on
the sampler's core as often as not and the chain waits. ``--no-pin`` turns this off; with a single
usable core nothing is pinned.

Shutdown: when the coordinator exits, the others get ``shutdown_grace_s`` to finish, then SIGTERM,
then SIGKILL. A role that fails early (refused at handshake, bad data) stops the whole run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, save_config
from .log import setup_logging
from .runtime import load_data

log = logging.getLogger("gped.launcher")

SHUTDOWN_GRACE_S = 30.0


@dataclass
class Child:
    label: str
    proc: subprocess.Popen


def gpu_plan(num_gpus: int, students: list[str]) -> dict[str, str | None]:
    """CUDA_VISIBLE_DEVICES per role: sampler → GPU 0, students → GPUs 1.. round-robin."""
    if num_gpus <= 0:
        return {"sampler": None, **{s: None for s in students}}
    plan: dict[str, str | None] = {"sampler": "0"}
    pool = list(range(1, num_gpus)) or [0]
    for i, name in enumerate(students):
        plan[name] = str(pool[i % len(pool)])
    return plan


def cpu_plan(cpus: list[int], sampler_threads: int, labels: list[str]) -> dict[str, list[int] | None]:
    """Cores per role: the sampler gets its first ``sampler_threads`` (at least one, and at least one
    core is left for the others); every other label shares the rest. None everywhere: no pinning."""
    cpus = sorted(cpus)
    if len(cpus) < 2:
        return {"sampler": None, **{label: None for label in labels}}
    k = max(1, min(int(sampler_threads), len(cpus) - 1))
    return {"sampler": cpus[:k], **{label: cpus[k:] for label in labels}}


def _usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: leave placement to the OS
        return []


def _count_gpus() -> int:
    # no GPU device node, no GPU: spares the launcher a torch import (a second or more on a small box)
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg", "/dev/nvhost-ctrl", "/dev/nvgpu")  # NVIDIA, ROCm, WSL, Jetson
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not any(Path(p).exists() for p in nodes):
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means: run on the CPU
        return 0


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the launcher dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_setup(cores: list[int] | None):
    """What a child runs before exec: die with the launcher, and keep to ``cores`` (if given)."""

    def setup() -> None:
        _die_with_parent()
        if cores:
            try:
                os.sched_setaffinity(0, cores)
            except (AttributeError, OSError):  # a container that forbids it: run unpinned
                pass

    return setup


def _spawn(label: str, args: list[str], gpu: str | None, resume: bool, cores: list[int] | None = None) -> Child:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
    cmd = [sys.executable, "-m", "gped", *args] + (["--resume"] if resume else [])
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=child_setup(cores))
    where = [f"GPU {gpu}"] if gpu is not None else []
    where += [f"cores {','.join(map(str, cores))}"] if cores else []
    log.info("started %s (pid %d)%s", label, proc.pid, f" on {', '.join(where)}" if where else "")
    return Child(label, proc)


def _signal_all(children: list[Child], sig: int) -> None:
    for child in children:
        if child.proc.poll() is None:
            try:
                os.killpg(child.proc.pid, sig)
            except ProcessLookupError:
                pass


def _reap(children: list[Child], grace_s: float) -> None:
    """Wait up to ``grace_s`` for everyone, then SIGTERM, then SIGKILL: no orphans."""
    deadline = time.monotonic() + grace_s
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            _signal_all(children, sig)
            deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in children):
            time.sleep(0.05)
        if all(c.proc.poll() is not None for c in children):
            return


def launch(cfg: RunConfig, resume: bool = False, timeout_s: float = 0.0, grace_s: float = SHUTDOWN_GRACE_S, pin: bool = True) -> int:
    setup_logging("launcher")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    load_data(cfg)  # prepare once, before the roles race for it
    resolved = run_dir / "config.json"
    save_config(cfg, resolved)
    num_gpus = _count_gpus()
    names = [s.name for s in cfg.students]
    plan = gpu_plan(num_gpus, names)
    cores = cpu_plan(_usable_cpus() if pin else [], cfg.threads, ["coordinator", *names])
    log.info("run %r in %s: %d students, %s, %s", cfg.name, run_dir, len(names), f"{num_gpus} GPUs" if num_gpus else "CPU loopback mode",
             f"sampler on cores {cores['sampler']}, the others on {cores['coordinator']}" if cores["sampler"] else "roles not pinned to cores")
    base = [str(resolved)]
    interrupted: list[int] = []

    def forward(signum, _frame):
        interrupted.append(signum)

    old_int = signal.signal(signal.SIGINT, forward)
    old_term = signal.signal(signal.SIGTERM, forward)
    old_hup = signal.signal(signal.SIGHUP, forward)  # a dropped ssh session must not orphan the run
    children: list[Child] = []
    try:
        coordinator = _spawn("coordinator", ["coordinator", *base], None, resume, cores["coordinator"])
        children.append(coordinator)
        for name in names:
            device = "--device=cuda" if plan[name] is not None else "--device=cpu"
            children.append(_spawn(f"student {name}", ["student", *base, "--name", name, device], plan[name], resume, cores[name]))
        device = "--device=cuda" if plan["sampler"] is not None else "--device=cpu"
        children.append(_spawn("sampler", ["sampler", *base, device], plan["sampler"], resume, cores["sampler"]))
        start = time.monotonic()
        forwarded = False
        failed: Child | None = None
        lost: list[Child] = []
        while coordinator.proc.poll() is None:
            if interrupted and not forwarded:
                log.info("forwarding %s to every role", signal.Signals(interrupted[0]).name)
                _signal_all(children, signal.SIGINT)
                forwarded = True
            if timeout_s and time.monotonic() - start > timeout_s and not forwarded:
                log.warning("run timeout of %.0f s reached; stopping every role", timeout_s)
                _signal_all(children, signal.SIGINT)
                forwarded = True
            for child in children:
                code = child.proc.poll()
                if code in (None, 0) or child in lost:
                    continue
                lost.append(child)
                if child.label.startswith("student") and len(lost) < len(names):
                    # one student failing (say, diverged) must not end a days-long run for the others
                    log.error("%s exited with status %d; the run goes on without it", child.label, code)
                    continue
                failed = failed or child
                log.error("%s exited with status %d; stopping the run", child.label, code)
                _signal_all(children, signal.SIGINT)
                forwarded = True
            time.sleep(0.1)
        _reap(children, grace_s)
        codes = {c.label: c.proc.returncode for c in children}
        log.info("exit codes: %s", ", ".join(f"{k}={v}" for k, v in codes.items()))
        summary = run_dir / "summary.md"
        if summary.exists() and codes["coordinator"] == 0:
            print(f"\nrun {cfg.name!r}: summary ({summary})\n")
            print(summary.read_text())
        if interrupted:
            return 130
        return 0 if failed is None and not lost else 1
    finally:
        _reap(children, 0.0) if any(c.proc.poll() is None for c in children) else None
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)

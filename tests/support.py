"""Helpers for multi-process tests: free loopback ports, spawning roles, process/port hygiene."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port_pair() -> int:
    """A port p such that p and p+1 are both free on 127.0.0.1, taken *below* the kernel's
    ephemeral range: a pair from that range (what bind(0) gives) can see p+1 grabbed as the local
    end of some outgoing connection (zmq reconnects every 100 ms) before the sampler binds it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()  # not seeded: concurrent test sessions must not pick the same ports
    for _ in range(500):
        port = rng.randrange(max(1024, low - 12000), low - 2)
        if port_free(port) and port_free(port + 1):
            return port
    raise RuntimeError("no free port pair below the ephemeral range")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


SMALL_RUN = """
name = "test"
run_dir = "{run_dir}"
threads = 1
[data]
source = "synthetic"
[teacher]
arch = "mlp"
k1 = 0.25
k2 = 0.25
[sampler]
step_size = 2e-4
prior_precision = 1.0
batch_size = 50
burn_in = 100
thin = 10
steps = {steps}
seed = 0
mode = "{mode}"
distill_batch = 50
[[students]]
name = "pred"
expectations = ["predictive"]
model = {{ arch = "mlp", k1 = 0.25, k2 = 0.25 }}
lr = 3e-3
lr_halve_epochs = 0
batch_size = 50
seed = 1
skip_stale = false
[[students]]
name = "ent"
expectations = ["expected_entropy"]
estimator = "online"
model = {{ arch = "mlp", k1 = 0.25, k2 = 0.25 }}
lr = 3e-3
lr_halve_epochs = 0
batch_size = 50
seed = 2
skip_stale = false
[coordinator]
port = {port}
eval_every = 10
checkpoint_every = 20
heartbeat_s = 0.2
peer_timeout_s = 5.0
give_up_s = 60.0
"""


def gped_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gped", *args]


def spawn(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.Popen(gped_cmd(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for ``proc`` (killing its whole process group on timeout); return (code, output)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"process timed out after {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def gped_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_clean(marker: str, port: int) -> None:
    """No process of this run is left, and its two ports can be bound again."""
    deadline = time.monotonic() + 10
    while gped_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = gped_processes(marker)
    for p in left:
        p.kill()
    assert not left, f"processes left behind: {[p.pid for p in left]}"
    assert port_free(port) and port_free(port + 1), "ports still in use"

"""Helpers for multi-process tests: free loopback ports, spawning roles, process/port hygiene."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gped.transport import free_port_pair, port_free  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent


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


@contextlib.contextmanager
def reaped(procs: list[subprocess.Popen]):
    """Yield ``procs`` (append to it freely); on the way out kill any that still run, so a failing
    test leaves nothing behind."""
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def reference_after(cfg):
    """The sequential reference loop run to the config's last step: what a distributed run must equal."""
    from gped.reference import ReferenceRun

    ref = ReferenceRun(cfg)
    while ref.chain.step < cfg.sampler.steps:
        ref.step()
    return ref


def _role_state(run_dir: Path, name: str) -> dict:
    from gped.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / f"{name}.pt")["role"]


def assert_chain_equals_reference(run_dir: Path, ref) -> None:
    """The sampler's checkpointed teacher is bit for bit the reference loop's."""
    import torch

    state = _role_state(run_dir, "sampler-sampler")["chain"]["model"]
    for key, value in ref.chain.model.state_dict().items():
        assert torch.equal(state[key], value), key


def assert_students_equal_reference(run_dir: Path, ref, atol: float = 1e-6) -> None:
    """Every student's checkpoint has the reference's update count and weights (to ``atol``)."""
    import torch

    for name, distiller in ref.distillers.items():
        state = _role_state(run_dir, f"student-{name}")["distiller"]
        assert int(state["updates"]) == distiller.updates, name
        for key, value in distiller.model.state_dict().items():
            assert torch.allclose(state["model"][key], value, atol=atol), (name, key)


def assert_ensemble_equals_reference(run_dir: Path, ref, atol: float = 1e-9) -> None:
    import torch

    coord = _role_state(run_dir, "coordinator-coordinator")
    assert torch.allclose(coord["ensemble"]["sum_probs"], ref.ensemble.sum_probs, atol=atol)

"""Across "hosts": sampler and coordinator in one network namespace, students in another, joined
by a veth pair, over TCP with CURVE authentication. Needs root and ``ip netns``; skipped otherwise.

The run survives a link cut and restore, and a peer without the run's CURVE key gets nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gped.transport import make_keys
from support import REPO, finish

pytestmark = pytest.mark.slow

HOST_A, HOST_B = "10.231.77.1", "10.231.77.2"  # the test's own hosts, inside namespaces it makes


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"gpedprobe{uuid.uuid4().hex[:6]}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"ip netns is not usable here: {exc}"
    return None


@pytest.fixture
def two_hosts():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    a, b = f"gpedA{tag}", f"gpedB{tag}"
    veth_a, veth_b = f"va{tag}", f"vb{tag}"
    try:
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        sh("ip", "link", "set", veth_a, "netns", a)
        sh("ip", "link", "set", veth_b, "netns", b)
        for ns, dev, addr in ((a, veth_a, HOST_A), (b, veth_b, HOST_B)):
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield {"a": a, "b": b, "veth_b": veth_b}
    finally:
        subprocess.run(["ip", "netns", "pids", a], capture_output=True)
        for ns in (a, b):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


CONFIG = """
name = "netns"
run_dir = "{run_dir}"
[data]
source = "synthetic"
prepared = "{data_dir}"
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
steps = 40000
distill_batch = 50
[[students]]
name = "pred"
expectations = ["predictive"]
model = {{ arch = "mlp", k1 = 0.25, k2 = 0.25 }}
lr = 3e-3
lr_halve_epochs = 0
[coordinator]
host = "{host_a}"
bind = "{host_a}"
port = 47600
eval_every = 50
checkpoint_every = 100
heartbeat_s = 0.3
peer_timeout_s = 20.0
give_up_s = 60.0
keys = "{keys}"
"""


def in_ns(ns: str, *args: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "gped", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_run_across_namespaces_survives_link_cut_and_refuses_strangers(two_hosts, tmp_path):
    keys, wrong_keys = tmp_path / "keys", tmp_path / "wrong-keys"
    make_keys(str(keys))
    make_keys(str(wrong_keys))
    run_dir = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(run_dir=run_dir, data_dir=tmp_path / "data", host_a=HOST_A, keys=keys))
    a, b = two_hosts["a"], two_hosts["b"]
    procs = {
        "coordinator": in_ns(a, "coordinator", str(config), log=tmp_path / "coordinator.log"),
        "student": in_ns(b, "student", str(config), "--name", "pred", log=tmp_path / "student.log"),
        "sampler": in_ns(a, "sampler", str(config), log=tmp_path / "sampler.log"),
    }
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline, (tmp_path / "student.log").read_text()[-3000:]
            time.sleep(0.1)
        # cut the link between the hosts for a while, then restore it, mid-stream
        sh("ip", "netns", "exec", b, "ip", "link", "set", two_hosts["veth_b"], "down")
        time.sleep(3.0)
        sh("ip", "netns", "exec", b, "ip", "link", "set", two_hosts["veth_b"], "up")
        assert procs["sampler"].poll() is None, "the run ended before the link came back: make it longer"
        # a stranger with the wrong key, then one with no key at all: neither gets an answer
        for name, key_set in (("wrong", f'coordinator.keys="{wrong_keys}"'), ("none", 'coordinator.allow_insecure=true')):
            args = ["student", str(config), "--name", "pred", "--set", key_set, "--set", "coordinator.give_up_s=4",
                    "--set", "coordinator.peer_timeout_s=2"]
            if name == "none":
                args += ["--set", 'coordinator.keys=""']
            stranger = in_ns(b, *args, log=tmp_path / f"stranger-{name}.log")
            stranger.wait(timeout=60)
            text = (tmp_path / f"stranger-{name}.log").read_text()
            assert stranger.returncode != 0, text[-2000:]
            assert "no answer from the coordinator" in text, text[-2000:]
        for name, proc in procs.items():
            proc.wait(timeout=240)
            assert proc.returncode == 0, f"{name}:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    summary = json.loads((run_dir / "summary.json").read_text())
    pred = summary["students"]["pred"]
    assert pred["final"] == 1.0
    assert pred["samples"] + pred["missed"] == 3990
    assert summary["scores"]["pred"]["kl_to_ensemble"] < 0.1
    coordinator_log = (tmp_path / "coordinator.log").read_text()
    assert coordinator_log.count("accepted student 'pred'") == 1  # strangers never got through

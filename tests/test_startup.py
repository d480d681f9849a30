"""Start-up and shutdown of the distributed run: core layout, burn-in during start-up, clean exits.

These are what make ``gped run`` beat the sequential loop on a small machine (bench/end_to_end.py
measures that); here each piece is checked for correctness, not timed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from gped.config import load_config
from gped.launcher import child_setup, cpu_plan
from gped.roles.common import handshake, make_hello
from gped.roles.sampler import SamplerRole
from gped.runtime import load_data
from gped.wire import Welcome

from support import REPO


# --- core layout ---------------------------------------------------------------------------------

def test_cpu_plan_gives_the_sampler_cores_of_its_own():
    plan = cpu_plan([3, 0, 1, 2], 1, ["coordinator", "a", "b"])
    assert plan == {"sampler": [0], "coordinator": [1, 2, 3], "a": [1, 2, 3], "b": [1, 2, 3]}
    # threads=2: two cores for the chain; never all of them (the others need one)
    assert cpu_plan([0, 1, 2, 3], 2, ["x"]) == {"sampler": [0, 1], "x": [2, 3]}
    assert cpu_plan([0, 1], 8, ["x"]) == {"sampler": [0], "x": [1]}
    # one core (or an unknown layout): nothing is pinned
    assert cpu_plan([5], 1, ["x"]) == {"sampler": None, "x": None}
    assert cpu_plan([], 1, ["x"]) == {"sampler": None, "x": None}


def test_a_student_cannot_take_a_role_name(small_run):
    from gped.errors import ConfigError

    with pytest.raises(ConfigError, match="'sampler' is the name of a role"):
        load_config(small_run(), ['students.0.name="sampler"'])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores")
def test_child_setup_pins_the_child_before_exec():
    core = max(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                         preexec_fn=child_setup([core]), capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"[{core}]"
    out = subprocess.run([sys.executable, "-c", "import os; print(len(os.sched_getaffinity(0)))"],
                         preexec_fn=child_setup(None), capture_output=True, text=True, check=True).stdout
    assert int(out) == len(os.sched_getaffinity(0))


# --- burn-in while the others start ----------------------------------------------------------------

def test_burn_in_steps_publish_nothing_and_stop_at_burn_in(small_run):
    cfg = load_config(small_run(steps=300))
    sent = []
    role = SamplerRole(cfg, load_data(cfg), __import__("torch").device("cpu"), lambda topic, msg: sent.append((topic, msg)) or True)
    calls = 0
    while role.burn_in(7):
        calls += 1
    assert role.chain.step == cfg.sampler.burn_in == 100 and calls == 15  # 14 × 7 + 2
    assert sent == [] and not role.burn_in(7)
    # the stream goes on from there: the first sample is the first step past burn-in on the grid
    while not role.step():
        pass
    assert role.chain.step == 110 and {type(m).__name__ for _, m in sent} == {"Params", "Targets"}


def test_burn_in_never_runs_past_the_step_budget(small_run):
    cfg = load_config(small_run(steps=300), ["sampler.steps=40"])
    role = SamplerRole(cfg, load_data(cfg), __import__("torch").device("cpu"), lambda topic, msg: True)
    while role.burn_in(25):
        pass
    assert role.chain.step == 40 and role.done


class _SlowCoordinator:
    """A control channel whose coordinator answers the hello on the fifth look."""

    def __init__(self):
        self.looks, self.timeouts, self.sent = 0, [], []

    def send(self, msg, prefix=None):
        self.sent.append(msg)
        return True

    def recv(self, timeout_ms=0, prefix_frames=0):
        self.looks += 1
        self.timeouts.append(timeout_ms)
        if self.looks < 5:
            return None
        return [], Welcome(accepted=True, reason="", run_dir="r", stop_step=10)


def test_handshake_works_between_looks_and_only_waits_when_idle(small_run):
    cfg = load_config(small_run())
    hello = make_hello(cfg, "sampler", "sampler", "f" * 16)
    work = iter([True, True, False, False, True])
    channel = _SlowCoordinator()
    welcome = handshake(channel, hello, cfg, stop=_NoStop(), log=logging.getLogger("test"), idle=lambda: next(work))
    assert welcome.accepted and channel.looks == 5
    assert channel.timeouts == [0, 0, 200, 200, 0]  # busy: only a look; idle: wait for the answer
    channel = _SlowCoordinator()
    handshake(channel, hello, cfg, stop=_NoStop(), log=logging.getLogger("test"))
    assert channel.timeouts == [200] * 5


class _NoStop:
    reason = ""

    def __bool__(self):
        return False


# --- the console command ----------------------------------------------------------------------------

def _gped(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "gped", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_console_command_flushes_and_keeps_exit_codes(tmp_path):
    done = _gped("--version")
    assert done.returncode == 0 and "gped" in done.stdout
    bad = _gped("reference", str(tmp_path / "missing.toml"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    usage = _gped("no-such-command")
    assert usage.returncode == 2 and "No such command" in usage.stderr
    # output written through a pipe arrives whole although the interpreter skips its teardown
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'run_dir = "{tmp_path / "run"}"\n[data]\nsource = "synthetic"\n')
    prepared = _gped("data", "prepare", str(cfg))
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.strip() and "fingerprint" in (prepared.stdout + prepared.stderr)

"""The distributed run in loopback CPU mode: real OS processes talking over ZeroMQ.

Each test is bounded in time, and checks that no process of the run is left and its ports are free.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from gped.config import load_config

from support import (assert_chain_equals_reference, assert_clean, assert_ensemble_equals_reference, assert_students_equal_reference,
                     finish, reaped, reference_after, spawn)

pytestmark = pytest.mark.slow


def reports(run_dir, student):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["student"] == student]


@pytest.mark.parametrize("mode", ["targets", "params"])
def test_loopback_run_matches_reference_and_students_learn(small_run, mode):
    path = small_run(mode=mode, steps=600)
    cfg = load_config(path)
    code, out = finish(spawn("run", str(path)), timeout=240)
    assert code == 0, out[-4000:]
    run_dir = cfg.run_dir and __import__("pathlib").Path(cfg.run_dir)
    assert_clean(str(run_dir), cfg.coordinator.port)
    if len(os.sched_getaffinity(0)) >= 2:  # the launcher gives the sampler a core of its own
        assert re.search(r"started sampler \(pid \d+\) on cores \d", out) and re.search(r"started student pred \(pid \d+\) on cores \d", out)

    # the summary table is printed, with the ensemble and both students
    assert "| teacher ensemble |" in out and "| pred |" in out and "| ent |" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples"] == 50  # steps 101..600 on the thinning grid of 10
    for name in ("pred", "ent"):
        metrics = summary["students"][name]
        assert metrics["missed"] == 0 and metrics["samples"] == 50 and metrics["final"] == 1.0

    # students improve against the ensemble over the run
    pred = reports(run_dir, "pred")
    assert pred[-1]["scores"]["kl_to_ensemble"] < 0.5 * pred[0]["scores"]["kl_to_ensemble"]
    ent = reports(run_dir, "ent")
    assert ent[-1]["scores"]["entropy_mae"] < 0.7 * ent[0]["scores"]["entropy_mae"]
    assert ent[-1]["student_metrics"]["loss.expected_entropy"] < ent[0]["student_metrics"]["loss.expected_entropy"]

    # lockstep (nothing dropped): the distributed run equals the sequential reference loop
    ref = reference_after(cfg)
    assert_chain_equals_reference(run_dir, ref)
    assert_students_equal_reference(run_dir, ref)
    assert_ensemble_equals_reference(run_dir, ref)


def test_sampler_started_first_burns_in_while_waiting_and_the_run_is_unchanged(small_run, tmp_path):
    path = small_run(steps=300)
    cfg = load_config(path)
    run_dir = tmp_path / "run"
    with reaped([spawn("sampler", str(path))]) as procs:
        time.sleep(3.0)  # alone: no coordinator to answer its hello yet
        assert procs[0].poll() is None
        procs += [spawn("coordinator", str(path)), spawn("student", str(path), "--name", "pred"),
                  spawn("student", str(path), "--name", "ent")]
        outputs = [finish(p, timeout=180) for p in procs]
    for code, out in outputs:
        assert code == 0, out[-3000:]
    assert "burn-in: 100 steps taken while the others started" in outputs[0][1], outputs[0][1][-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples"] == 20 and all(m["missed"] == 0 and m["samples"] == 20 for m in summary["students"].values())
    assert_chain_equals_reference(run_dir, reference_after(cfg))
    assert_clean(str(run_dir), cfg.coordinator.port)


def test_second_sampler_with_other_config_is_refused_and_student_waits(small_run, tmp_path):
    path = small_run(steps=400)
    cfg = load_config(path)
    run_dir = tmp_path / "run"
    with reaped([spawn("coordinator", str(path)), spawn("student", str(path), "--name", "pred")]) as procs:
        time.sleep(4.0)  # the student is up before any sampler: it must wait, not fail
        assert procs[1].poll() is None
        other = spawn("sampler", str(path), "--set", "sampler.step_size=1e-3")
        code, out = finish(other, timeout=60)
        assert code == 2
        assert re.search(r"refused this sampler .*(chain settings differ|config differs)", out), out[-2000:]
        procs.append(spawn("student", str(path), "--name", "ent"))
        procs.append(spawn("sampler", str(path)))
        outputs = [finish(p, timeout=180) for p in procs]
    for code, out in outputs:
        assert code == 0, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["scores"]) == {"teacher ensemble", "pred", "ent"}
    assert_clean(str(run_dir), cfg.coordinator.port)


def test_unknown_student_name_and_data_mismatch_refused(small_run, tmp_path):
    path = small_run(steps=300)
    cfg = load_config(path)
    coordinator = spawn("coordinator", str(path))
    try:
        code, out = finish(spawn("student", str(path), "--name", "pred", "--set", "data.seed=5",
                                 "--set", f'data.prepared="{tmp_path / "other-data"}"'), timeout=60)
        assert code == 2 and "data fingerprint" in out, out[-2000:]
    finally:
        import os
        import signal

        os.killpg(coordinator.pid, signal.SIGINT)
        code, out = finish(coordinator, timeout=30)
    assert code == 0, out[-2000:]
    assert_clean(str(tmp_path / "run"), cfg.coordinator.port)

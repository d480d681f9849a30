"""Smoke tests of the benchmark suite (bench/): each benchmark runs at a tiny size and writes the
fields its table and JSON promise. Nothing here asserts a speed: benchmarks are reports."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, where bench/ lives

from bench import end_to_end, memory, profile_roles, run_all, sampler_throughput, transport  # noqa: E402
from bench.common import CoreLayout, table  # noqa: E402


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_transport_tiny(tmp_path):
    result = transport.run(transport.PRESETS["tiny"], CoreLayout.detect(), tmp_path)
    kinds = {row["kind"] for row in result["rows"]}
    assert kinds == {"params", "targets"}
    for row in result["rows"]:
        for key in ("gped_msgs_s", "raw_msgs_s", "gped_GBps", "raw_GBps", "ratio", "encode_us", "decode_us"):
            assert _positive(row[key]), (key, row)
        assert row["bytes"] > 0 and row["messages"] > 0
    assert result["receiver_rejected"] == {}  # every gped message decoded cleanly
    assert "gped wire vs raw pyzmq" in transport.render(result)


def test_profile_tiny(tmp_path):
    result = profile_roles.run(profile_roles.PRESETS["tiny"], tmp_path)
    for mode in ("targets", "params"):
        sampler, student, reference = result[f"sampler_{mode}"], result[f"student_{mode}"], result[f"reference_{mode}"]
        assert _positive(sampler["ms_per_step"]) and _positive(student["ms_per_sample"])
        assert any(p["part"].startswith("chain step") for p in sampler["parts"])
        assert any(p["part"].startswith("student step") for p in student["parts"])
        assert sampler["top"] and student["top"]
        assert 0 < reference["sampler_path_share"] <= 1 and reference["speedup_ceiling"] >= 1
    assert "speed-up ceiling" in profile_roles.render(result)


def test_memory_tiny():
    result = memory.run(memory.PRESETS["tiny"])
    assert result["baseline"]["with_torch_rss_mib"] > result["baseline"]["python_numpy_zmq_rss_mib"] > 0
    sizes = [row["distill_size"] for row in result["estimators"]]
    assert sizes == sorted(sizes)
    for row in result["estimators"]:
        assert row["bytes_per_example"] == row["dim"] * 4 + 8
    assert [row["k"] for row in result["models"]] == [0.5, 1.0]
    assert result["models"][1]["student_tensor_mib"] > result["models"][0]["student_tensor_mib"]
    assert {row["dataset"] for row in result["datasets"]} >= {"MNIST", "CIFAR10"}
    assert "U_o table" in memory.render(result)


@pytest.mark.slow
def test_sampler_throughput_tiny(tmp_path):
    result = sampler_throughput.run(sampler_throughput.PRESETS["tiny"], CoreLayout.detect(), tmp_path)
    rows = {(r["mode"], r["students"]): r for r in result["rows"]}
    assert set(rows) == {("targets", 0), ("targets", 1)}
    assert rows[("targets", 0)]["ratio_vs_alone"] == 1.0
    for row in rows.values():
        assert _positive(row["steps_per_s"]) and _positive(row["ratio_vs_alone"]) and _positive(row["cpu_share"])
        assert 0 < row["advance_share"] <= 1 and row["memory"]["sampler"]["peak_rss_mib"] > 0
    assert rows[("targets", 1)]["student_samples_min"] > 0
    for run in result["runs"]:
        assert run["exit_codes"]["sampler"] == 0
    assert "core" in result["core_layout"]["text"]


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path):
    result = end_to_end.run(end_to_end.PRESETS["tiny"], tmp_path)
    (row,) = result["rows"]
    assert row["samples_ref"] == row["samples_dist"] > 0
    assert row["updates_ref"] == row["updates_dist"]  # the same work
    assert _positive(row["wall_ref_s"]) and _positive(row["wall_dist_s"]) and _positive(row["speedup_wall"])
    models = {q["model"] for q in result["quality"]}
    assert "teacher ensemble" in models and len(models) >= 2
    assert all(q["distributed"] is not None for q in result["quality"])
    roles = set(result["runs"][0]["distributed"]["memory"])
    assert {"sampler", "coordinator", "launcher"} <= roles and any(r.startswith("student:") for r in roles)


def test_run_all_writes_json_and_tables(tmp_path, capsys):
    out = tmp_path / "results.json"
    code = run_all.main(["--tiny", "--only", "transport,memory", "--out", str(out), "--work", str(tmp_path / "work")])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results) >= {"meta", "headline", "transport", "memory"}
    assert results["meta"]["core_layout"]["sampler"] and results["meta"]["preset"] == "tiny"
    assert any(h["figure"].startswith("wire bandwidth") for h in results["headline"])
    text = out.with_suffix(".md").read_text()
    assert "### headline" in text and "### transport" in text
    assert "headline" in capsys.readouterr().out


def test_run_all_rejects_unknown_sections(tmp_path):
    with pytest.raises(SystemExit):
        run_all.main(["--tiny", "--only", "nope", "--out", str(tmp_path / "r.json")])


def test_table_formats_cells():
    text = table([{"a": 1234.5, "b": 0.123456, "c": None, "d": True}], ["a", "b", "c", "d"])
    assert "1,234" in text and "0.1235" in text and "| yes |" in text

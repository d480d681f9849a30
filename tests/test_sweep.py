"""Sweeps: grid parsing, a tiny two-point sweep collecting one table, resumption; sample thinning."""

import json

import pytest
from click.testing import CliRunner

from gped.cli import main
from gped.config import load_config
from gped.errors import ConfigError
from gped.reference import ReferenceRun
from gped.sweep import grid_points, parse_grid, point_name


def test_parse_grid_and_points():
    grid = parse_grid(["data.mask=0,5", 'students.0.estimator="online","single"', "data.classes=[0,1],[2,3]"])
    assert grid["data.mask"] == ["0", "5"]
    assert grid["data.classes"] == ["[0,1]", "[2,3]"]
    points = grid_points(grid)
    assert len(points) == 8 and points[0] == {"data.mask": "0", "students.0.estimator": '"online"', "data.classes": "[0,1]"}
    assert "/" not in point_name({"data.root": "/a/b"})
    with pytest.raises(ConfigError):
        parse_grid(["data.mask"])


TINY = ["data.source=\"synthetic\"", "teacher.k1=0.1", "teacher.k2=0.1", "sampler.step_size=2e-4", "sampler.prior_precision=1",
        "sampler.batch_size=50", "sampler.burn_in=50", "sampler.thin=10", "sampler.steps=300", "sampler.distill_batch=50",
        "students.0.model.k1=0.1", "students.0.model.k2=0.1", "students.0.lr_halve_epochs=0", "coordinator.eval_every=10"]


def test_sweep_runs_every_point_and_reuses_finished_ones(tmp_path):
    args = ["sweep"] + [a for item in TINY for a in ("--set", item)] + ["--grid", "data.mask=0,3", "--out", str(tmp_path / "sw")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert {(r["data.mask"], r["model"]) for r in rows} == {(m, n) for m in ("0", "3") for n in ("teacher ensemble", "student")}
    masked = [r for r in rows if r["data.mask"] == "3"]
    assert masked[0]["mask_rate"] == pytest.approx(9 / 64)
    assert "| data.mask | mask_rate | model |" in (tmp_path / "sw" / "results.md").read_text()
    before = (tmp_path / "sw" / "mask=0" / "summary.json").stat().st_mtime_ns
    result = CliRunner().invoke(main, args)  # a second call reuses both finished points
    assert result.exit_code == 0
    assert (tmp_path / "sw" / "mask=0" / "summary.json").stat().st_mtime_ns == before


def test_sample_every_thins_a_students_samples(tmp_path):
    cfg = load_config(None, TINY + [f'run_dir="{tmp_path}"', "students.0.sample_every=3"])
    run = ReferenceRun(cfg)
    while run.chain.step < cfg.sampler.steps:
        run.step()
    assert run.samples == 25
    assert run.distillers["student"].updates == 9  # samples 0, 3, ..., 24

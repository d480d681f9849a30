"""``gped report``: report.md and PNG figures that carry the data they claim (issue 5, item 4).

Two real tiny run directories made by the sequential reference loop on the synthetic data set
(4 classes of 8×8 blobs):

* ``full``: an OOD set (a ``.npy`` folder of uniform-noise images), one student distilling the
  predictive and the expected entropy and one distilling the expected entropy alone, plus a fake
  ``search.json`` / ``pareto.png`` and ``evaluation.json`` as ``gped search`` / ``gped evaluate`` leave
  them;
* ``bare``: no OOD set and one predictive-only student, and a damaged line in ``metrics.jsonl``:
  the figures that need what is missing are skipped with a note, nothing crashes.

Every PNG is checked to be a real PNG of the size its sidecar states, and every sidecar against the
run's own data: metrics.jsonl, ``gped.load_ensemble`` and ``gped.load_student(...).predict``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

import gped
from gped.cli import main
from gped.config import load_config
from gped.core import metrics
from gped.reference import run_reference
from gped.report import LEARNING_METRICS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUIET = {"GPED_LOG_LEVEL": "WARNING"}
ENSEMBLE = "teacher ensemble"
FIGURES = ("learning_curves", "entropy_scatter", "reliability", "ood_roc")
STUDENT = '{{name = "{name}", expectations = {exp}, lr = 3e-3, lr_halve_epochs = 0, batch_size = 50, seed = {seed}, model = {{ arch = "mlp", k1 = 0.25, k2 = 0.25 }}}}'


@pytest.fixture(autouse=True)
def _restore_root_logger():
    """``gped report`` calls setup_logging, which binds the root logger to CliRunner's stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


def tiny_run(run_dir: Path, students: list[tuple[str, list[str]]], steps: int, *extra: str) -> Path:
    entries = ", ".join(STUDENT.format(name=n, exp=json.dumps(e), seed=i + 1) for i, (n, e) in enumerate(students))
    cfg = load_config(None, [
        f'run_dir="{run_dir}"', 'name="tiny"', 'data.source="synthetic"', "teacher.k1=0.25", "teacher.k2=0.25",
        "sampler.step_size=2e-4", "sampler.prior_precision=1.0", "sampler.batch_size=50", "sampler.burn_in=100",
        "sampler.thin=10", f"sampler.steps={steps}", "sampler.distill_batch=50", "coordinator.eval_every=5",
        f"students=[{entries}]", *extra,
    ])
    run_reference(cfg, device="cpu", progress_s=1e9)
    return run_dir


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("full")
    ood = base / "ood-npy"
    ood.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 80)):
        np.save(ood / f"{split}_x.npy", rng.uniform(0, 1, (n, 1, 8, 8)).astype(np.float32))
        np.save(ood / f"{split}_y.npy", np.zeros(n, np.int64))
    run = tiny_run(base / "run", [("both", ["predictive", "expected_entropy"]), ("ent", ["expected_entropy"])], 300,
                   'data.ood_source="npy"', f'data.ood_root="{ood}"')
    # what `gped search` and `gped evaluate` leave in a run directory
    search = [{"name": "grid-k0.5", "k1": 0.5, "k2": 0.5, "lasso": None, "params": 1234, "flops": 2468, "latency_ms": 0.12,
               "nll": 0.2, "accuracy": 0.95, "entropy_mae": 0.03, "pareto_flops": True, "pareto_params": True},
              {"name": "lasso-1e-05", "k1": 1.0, "k2": 1.0, "lasso": 1e-5, "params": 4321, "flops": 8642, "latency_ms": 0.2,
               "nll": 0.25, "accuracy": 0.94, "entropy_mae": 0.04, "pareto_flops": False, "pareto_params": False}]
    (run / "search.json").write_text(json.dumps(search))
    (run / "chosen.json").write_text(json.dumps({"name": "grid-k0.5", "rule": "cheapest on the speed front"}))
    from gped.plots import learning_curves

    learning_curves({"stand-in": {"a": ([0, 1], [1.0, 2.0])}}, run / "pareto.png")  # a PNG and its .json sidecar
    (run / "evaluation.json").write_text(json.dumps({ENSEMBLE: {"auroc_total": 0.987654, "ndcg20": 0.5},
                                                    "both": {"auroc_total": 0.876543}}))
    return run


@pytest.fixture(scope="module")
def full_report(full_run) -> tuple[Path, object]:
    result = runner().invoke(main, ["report", str(full_run)], env=QUIET)
    assert result.exit_code == 0, (result.output, result.exc_info)
    return full_run / "report", result


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory) -> Path:
    run = tiny_run(tmp_path_factory.mktemp("bare") / "run", [("pred", ["predictive"])], 200)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"student": "pred", "sample": 99, "scor')  # a line cut short by a kill
    return run


def check_png(path: Path) -> dict:
    """A real PNG of the size its sidecar states, not blank; returns the sidecar."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["png"] == path.name
    image = imread(path)
    width, height = sidecar["size_px"]
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    assert image.shape[:2] == (height, width), (image.shape, sidecar["size_px"])
    assert image[..., :3].std() > 0.01, "blank figure"
    return sidecar


def series(panel: dict, *, data_only: bool = True) -> dict[str, dict]:
    return {s["name"]: s for s in panel["series"] if not (data_only and s["kind"] == "reference")}


def test_every_figure_is_a_png_with_its_sidecar_and_listed_in_the_report(full_report):
    out, result = full_report
    text = (out / "report.md").read_text()
    for stem in FIGURES:
        check_png(out / f"{stem}.png")
        assert f"({stem}.png)" in text and f"({stem}.json)" in text, stem
    for suffix in (".png", ".json"):  # copied from the search, with its own sidecar
        assert (out / f"pareto{suffix}").read_bytes() == (out.parent / f"pareto{suffix}").read_bytes()
    assert "(pareto.png)" in text
    assert str(out / "report.md") in result.stdout
    assert "skipped" not in text.split("## Notes")[0]  # every figure was drawn


def test_learning_curves_are_the_metrics_log(full_report, full_run):
    out, _ = full_report
    sidecar = check_png(out / "learning_curves.png")
    expected: dict[str, dict[str, dict[int, float]]] = {}
    for line in (full_run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record["scores"].items():
            expected.setdefault(key, {}).setdefault(record["student"], {})[record["sample"]] = value  # latest wins
    panels = {p["title"]: p for p in sidecar["panels"]}
    # the "both" student has both heads, so its knowledge-uncertainty MAE is scored too
    assert set(panels) == {LEARNING_METRICS[k] for k in ("nll", "kl_to_ensemble", "entropy_mae", "mi_mae")}
    assert set(series(panels[LEARNING_METRICS["mi_mae"]])) == {"both"}
    for key, title in LEARNING_METRICS.items():
        if title not in panels:
            continue
        drawn = series(panels[title])
        assert set(drawn) == set(expected[key]), (key, set(drawn))
        for model, points in expected[key].items():
            assert drawn[model]["x"] == sorted(points)
            assert drawn[model]["y"] == [points[s] for s in sorted(points)]
    assert ENSEMBLE in series(panels[LEARNING_METRICS["nll"]])
    assert set(series(panels[LEARNING_METRICS["entropy_mae"]])) == {"both", "ent"}
    # 300 steps, burn-in 100, thinning 10: samples 0..19, evaluated every 5, the last one twice
    assert series(panels[LEARNING_METRICS["nll"]])["both"]["x"] == [4, 9, 14, 19]


def test_entropy_scatter_is_student_against_ensemble(full_report, full_run):
    out, _ = full_report
    sidecar = check_png(out / "entropy_scatter.png")
    (panel,) = sidecar["panels"]
    drawn = series(panel)
    assert set(drawn) == {"both", "ent"}
    test_x = np.load(full_run / "data" / "test_x.npy")
    ensemble = gped.load_ensemble(full_run)["test"].expected_entropy.numpy()
    for name, s in drawn.items():
        student = gped.load_student(full_run, name).predict(test_x)["expected_entropy"]
        np.testing.assert_array_equal(s["x"], ensemble)
        np.testing.assert_allclose(s["y"], student, rtol=1e-6, atol=1e-9)
        assert s["mae"] == pytest.approx(metrics.mae(student, ensemble), rel=1e-6)
    line = series(panel, data_only=False)["y = x"]
    assert line["x"] == line["y"]


def test_reliability_counts_cover_the_test_set(full_report, full_run):
    out, _ = full_report
    sidecar = check_png(out / "reliability.png")
    accuracy_panel, count_panel = sidecar["panels"]
    test_y = np.load(full_run / "data" / "test_y.npy")
    drawn = series(accuracy_panel)
    assert set(drawn) == {ENSEMBLE, "both"}  # "ent" has no predictive
    for s in drawn.values():
        assert sum(s["count"]) == len(test_y)
    r = metrics.reliability(gped.load_ensemble(full_run)["test"].predictive.numpy(), test_y, sidecar["n_bins"])
    full = r.count > 0
    np.testing.assert_allclose(drawn[ENSEMBLE]["x"], r.confidence[full])
    np.testing.assert_allclose(drawn[ENSEMBLE]["y"], r.accuracy[full])
    assert series(count_panel)[ENSEMBLE]["y"] == r.count[full].tolist()


def test_ood_roc_by_total_and_knowledge_uncertainty(full_report, full_run):
    out, _ = full_report
    sidecar = check_png(out / "ood_roc.png")
    panels = {p["title"]: series(p) for p in sidecar["panels"]}
    assert set(panels) == {"total uncertainty", "knowledge uncertainty"}
    assert set(panels["total uncertainty"]) == set(panels["knowledge uncertainty"]) == {ENSEMBLE, "both"}
    ensemble = gped.load_ensemble(full_run)
    s_in, s_out = metrics.total_uncertainty(ensemble["test"].predictive), metrics.total_uncertainty(ensemble["ood"].predictive)
    fpr, tpr, _ = metrics.roc_curve_points(s_in, s_out)
    curve = panels["total uncertainty"][ENSEMBLE]
    np.testing.assert_allclose(curve["x"], fpr)
    np.testing.assert_allclose(curve["y"], tpr)
    assert curve["auroc"] == pytest.approx(metrics.auroc(s_in, s_out))
    assert (curve["n_in"], curve["n_out"]) == (200, 80)
    # the student's knowledge uncertainty: entropy of its predictive minus its expected-entropy head
    test_x, ood_x = (np.load(full_run / "data" / f"{k}.npy") for k in ("test_x", "ood_x"))
    student = gped.load_student(full_run, "both")
    p_in, p_out = student.predict(test_x), student.predict(ood_x)
    k_in = metrics.knowledge_uncertainty(p_in["predictive"], p_in["expected_entropy"])
    k_out = metrics.knowledge_uncertainty(p_out["predictive"], p_out["expected_entropy"])
    assert panels["knowledge uncertainty"]["both"]["auroc"] == pytest.approx(metrics.auroc(k_in, k_out), abs=1e-9)
    text = (out / "report.md").read_text()
    assert f"{curve['auroc']:.4f}" in text


def test_report_tables(full_report):
    out, result = full_report
    text = (out / "report.md").read_text()
    assert "# gped run report: tiny" in text
    assert "| teacher ensemble |" in text and "| both |" in text and "| ent |" in text  # summary table
    assert "| grid-k0.5 | 0.5000 | 0.5000 | – |" in text and "| ✓ | ✓ |" in text  # search.json
    assert "Chosen student: **grid-k0.5**" in text
    assert "0.9877" in text and "0.8765" in text  # evaluation.json
    assert "npy (80 inputs)" in text  # the OOD set
    assert "student 'ent' has no expected-entropy" not in text
    assert "student 'ent' does not predict the predictive" in text  # why it is not in the reliability diagram
    assert "note: student 'ent'" in result.stdout


def test_missing_inputs_skip_figures_with_a_note(bare_run, full_report, tmp_path):
    out = tmp_path / "shared-out"
    assert runner().invoke(main, ["report", str(full_report[0].parent), "--out", str(out)], env=QUIET).exit_code == 0
    assert (out / "ood_roc.png").is_file()
    # a second report into the same folder: no stale figure of the first one survives
    result = runner().invoke(main, ["report", str(bare_run), "--out", str(out)], env=QUIET)
    assert result.exit_code == 0, (result.output, result.exc_info)
    for stem in ("learning_curves", "reliability"):
        check_png(out / f"{stem}.png")
    for stem in ("entropy_scatter", "ood_roc", "pareto"):
        assert not (out / f"{stem}.png").exists() and not (out / f"{stem}.json").exists(), stem
    text = (out / "report.md").read_text()
    assert "`entropy_scatter.png` skipped: no student predicts the expected entropy" in text
    assert "`ood_roc.png` skipped: the run has no OOD set" in text
    assert "1 line(s) of metrics.jsonl could not be read" in text
    sidecar = json.loads((out / "learning_curves.json").read_text())
    assert 99 not in series(sidecar["panels"][0])["pred"]["x"]


def test_default_output_folder_and_library_call(bare_run):
    from gped.report import write_report

    report = write_report(bare_run)
    assert report.out_dir == bare_run / "report" and report.markdown.is_file()
    assert set(report.figures) == {"learning_curves", "reliability"}


@pytest.mark.parametrize("case", ["missing", "file", "empty-dir"])
def test_not_a_run_directory_is_one_error_line(tmp_path, case):
    path = tmp_path / "nothing"
    if case == "file":
        path.write_text("x")
    elif case == "empty-dir":
        path.mkdir()
    result = runner().invoke(main, ["report", str(path)], env=QUIET)
    assert result.exit_code == 2, (result.output, result.exc_info)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a gped run directory" in lines[0], result.stderr
    assert not (path / "report").exists()

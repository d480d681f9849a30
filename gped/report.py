"""Run reports: ``gped report RUN_DIR`` writes ``report.md`` and PNG figures (DESIGN §4, issue 5).

A run directory (from ``gped reference`` or a distributed ``gped run``; both use one layout) holds
``config.json``, the prepared data (``data/`` or ``data.prepared``), ``metrics.jsonl``,
``checkpoints/``, ``summary.json`` and, when other commands ran, ``search.json`` / ``pareto.png``
(``gped search``) and ``evaluation.json`` (``gped evaluate``).  The report reads them — models only
through :mod:`gped.api` — and writes into ``RUN_DIR/report`` (or ``--out``):

* ``learning_curves.png`` — every model's test scores (NLL, KL(ensemble ‖ student), expected-entropy
  MAE, knowledge-uncertainty MAE) against the posterior-sample id, from ``metrics.jsonl``;
* ``entropy_scatter.png`` — each student's predicted expected entropy against the ensemble's
  E_θ H[p(y|x,θ)] on the test set, with y = x and the MAE;
* ``reliability.png`` — reliability diagram of the ensemble's predictive and of every student that
  predicts the predictive;
* ``ood_roc.png`` — only for runs with an OOD set: ROC curves of OOD detection by total uncertainty
  H[E p] and by knowledge uncertainty H[E p] − E H[p], for the ensemble and every student that
  gives the score (knowledge uncertainty needs both the predictive and the expected-entropy head);
* ``pareto.png`` — copied from the run directory when ``gped search`` made one;

each PNG with its ``<name>.json`` sidecar (:mod:`gped.plots`).  A missing input (no OOD set, a
student without the head a figure needs, a checkpoint not written yet, an unreadable line) skips
that figure or series with a note in the report; only a path that is not a run directory is an
error.

A student's knowledge uncertainty for OOD detection is its entropy of the predictive minus its
predicted expected entropy *without* clipping at 0 (unlike ``predict()["mutual_information"]``):
clipping ties every input where the two heads disagree in sign, which flattens the ROC curve
(see :func:`gped.core.metrics.knowledge_uncertainty`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .api import data_meta, load_ensemble, load_run_config, load_student
from .config import RunConfig
from .core import metrics
from .core.evaluate import summary_table
from .errors import GpedError

log = logging.getLogger("gped.report")

ENSEMBLE = "teacher ensemble"
#: figure file stems, in the order the report shows them, with their headings
FIGURES = {
    "learning_curves": "Learning curves",
    "entropy_scatter": "Expected entropy: students vs the teacher ensemble",
    "reliability": "Reliability diagram",
    "ood_roc": "OOD detection: ROC curves",
    "pareto": "Architecture search: Pareto fronts",
}
#: metrics.jsonl score → learning-curve panel title
LEARNING_METRICS = {
    "nll": "test NLL (nats)",
    "kl_to_ensemble": "KL(ensemble ‖ student) (nats)",
    "entropy_mae": "expected-entropy MAE (nats)",
    "mi_mae": "knowledge-uncertainty MAE (nats)",
}
#: preferred column order of search.json records
SEARCH_COLUMNS = ("name", "k1", "k2", "lasso", "params", "flops", "latency_ms", "nll", "accuracy", "entropy_mae",
                  "units_kept", "units_total", "pareto", "pareto_flops", "pareto_params")
TOTAL, KNOWLEDGE = "total uncertainty", "knowledge uncertainty"


@dataclass
class Report:
    """What :func:`write_report` wrote: the markdown file, the figures (stem → PNG) and the notes."""

    out_dir: Path
    markdown: Path
    figures: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading the run directory


@dataclass
class RunInputs:
    """Everything the report reads from one run directory; what could not be read is None / empty."""

    run_dir: Path
    cfg: RunConfig
    notes: list[str]
    meta: dict | None = None
    data: Any = None  # gped.core.data.PreparedData
    records: list[dict] = field(default_factory=list)
    summary: dict | None = None
    ensemble: dict = field(default_factory=dict)  # "test" / "ood" -> EnsembleAccumulator
    test_preds: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    ood_preds: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def student_names(self) -> list[str]:
        return [s.name for s in self.cfg.students]

    def note(self, text: str) -> None:
        log.debug("note: %s", text)  # the notes go into report.md and the command prints them
        self.notes.append(text)


def read_run(run_dir: str | Path) -> RunInputs:
    """Load a run directory for reporting; raises :class:`GpedError` only if it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GpedError(f"{run_dir} is not a gped run directory (no such directory)")
    run = RunInputs(run_dir, load_run_config(run_dir), [])
    run.records = read_metrics(run_dir / "metrics.jsonl", run.note)
    run.summary = _read_json(run_dir / "summary.json", run.note, dict)
    _read_data(run)
    _read_models(run)
    return run


def read_metrics(path: Path, note=lambda text: None) -> list[dict]:
    """The well-formed records of ``metrics.jsonl`` in file order (a bad line is skipped with a note)."""
    if not path.is_file():
        note(f"{path.name} is missing: no learning curves")
        return []
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("student"), str) and _is_number(record.get("sample")) \
                and isinstance(record.get("scores"), dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        note(f"{bad} line(s) of {path.name} could not be read (a run killed mid-write?) and were skipped")
    return records


def learning_curve_data(records: list[dict], models: list[str] | None = None) -> dict[str, dict[str, tuple[list, list]]]:
    """Score → model → (sample ids, values), sorted by sample id.

    A sample id logged twice (the reference loop's last periodic and final evaluations, or a
    resumed run re-evaluating) keeps its latest record.  Models appear in ``models`` order, then in
    order of first appearance; only numeric scores are kept.
    """
    order = list(models or [])
    for record in records:
        if record["student"] not in order:
            order.append(record["student"])
    out: dict[str, dict[str, tuple[list, list]]] = {}
    for key in LEARNING_METRICS:
        panel = {}
        for model in order:
            points = {}
            for record in records:
                value = record["scores"].get(key)
                if record["student"] == model and _is_number(value):
                    points[int(record["sample"])] = float(value)
            if points:
                xs = sorted(points)
                panel[model] = (xs, [points[x] for x in xs])
        if panel:
            out[key] = panel
    return out


def _read_data(run: RunInputs) -> None:
    from .core.data import load_prepared

    try:
        run.meta = data_meta(run.cfg, run.run_dir)
        folder = Path(run.cfg.data.prepared) if run.cfg.data.prepared else run.run_dir / "data"
        run.data = load_prepared(folder)
    except GpedError as exc:
        run.note(f"prepared data unavailable ({exc}): figures on the test set are skipped")


def _read_models(run: RunInputs) -> None:
    """The ensemble's statistics and every student's predictions on the test (and OOD) inputs."""
    if run.data is None:
        return
    n_test = len(run.data.test_y)
    try:
        ensemble = load_ensemble(run.run_dir)
    except GpedError as exc:
        run.note(f"teacher ensemble unavailable ({exc})")
        ensemble = {}
    if "test" in ensemble and len(ensemble["test"].sum_entropy) != n_test:
        run.note(f"the ensemble's checkpoint covers {len(ensemble['test'].sum_entropy)} test inputs, the data {n_test}: left out")
        ensemble.pop("test")
    if "test" in ensemble and ensemble["test"].count == 0:
        run.note("the teacher ensemble holds no posterior sample yet: left out")
        ensemble = {}
    if "ood" in ensemble and (run.data.ood_x is None or len(ensemble["ood"].sum_entropy) != len(run.data.ood_x)):
        run.note("the ensemble's OOD statistics do not match the run's OOD set: left out")
        ensemble.pop("ood")
    run.ensemble = ensemble
    for name in run.student_names:
        try:
            student = load_student(run.run_dir, name)
            test = student.predict(run.data.test_x)
            ood = student.predict(run.data.ood_x) if run.data.ood_x is not None else None
        except (GpedError, RuntimeError, KeyError, ValueError) as exc:
            run.note(f"student {name!r} could not be loaded ({_one_line(exc)}): left out of the figures")
            continue
        bad = sorted({k for preds in (test, ood or {}) for k, v in preds.items() if not np.all(np.isfinite(v))})
        if bad:  # a diverged student: keep what is finite, drop its OOD scores
            run.note(f"student {name!r} predicts non-finite {', '.join(bad)}: left out of the figures that need them")
            test, ood = {k: v for k, v in test.items() if k not in bad}, None
        run.test_preds[name] = test
        if ood is not None:
            run.ood_preds[name] = ood


# ---------------------------------------------------------------------------------------------
# figures


def _colors(run: RunInputs) -> dict[str, str]:
    from .plots import default_colors

    return default_colors([ENSEMBLE, *run.student_names])


def figure_learning_curves(run: RunInputs, path: Path) -> str | None:
    """Draw the figure, or return why it was skipped (likewise for every ``figure_*``)."""
    from .plots import learning_curves

    data = learning_curve_data(run.records, [ENSEMBLE, *run.student_names])
    if not data:
        return "metrics.jsonl holds no scores yet"
    learning_curves({LEARNING_METRICS[k]: v for k, v in data.items()}, path, colors=_colors(run))
    return None


def figure_entropy_scatter(run: RunInputs, path: Path) -> str | None:
    from .plots import entropy_scatter

    if "test" not in run.ensemble:
        return "the teacher ensemble's test statistics are unavailable"
    students = {n: p["expected_entropy"] for n, p in run.test_preds.items() if "expected_entropy" in p}
    for name, preds in run.test_preds.items():
        if "expected_entropy" not in preds:
            run.note(f"student {name!r} has no expected-entropy head: not in the entropy scatter")
    if not students:
        return "no student predicts the expected entropy"
    entropy_scatter(run.ensemble["test"].expected_entropy.numpy(), students, path, colors=_colors(run))
    return None


def figure_reliability(run: RunInputs, path: Path, n_bins: int = 15) -> str | None:
    from .plots import reliability_diagram

    if run.data is None:
        return "the test labels are unavailable"
    probs = {ENSEMBLE: run.ensemble["test"].predictive.numpy()} if "test" in run.ensemble else {}
    for name, preds in run.test_preds.items():
        if "predictive" in preds:
            probs[name] = preds["predictive"]
        else:
            run.note(f"student {name!r} does not predict the predictive: not in the reliability diagram")
    if not probs:
        return "neither the ensemble nor any student gives a predictive"
    reliability_diagram(run.data.test_y, probs, path, n_bins=n_bins, colors=_colors(run))
    return None


def ood_scores(run: RunInputs) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Score → model → (in-distribution scores, OOD scores); higher means more likely OOD."""
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {TOTAL: {}, KNOWLEDGE: {}}
    if "test" in run.ensemble and "ood" in run.ensemble:
        test, ood = run.ensemble["test"], run.ensemble["ood"]
        scores[TOTAL][ENSEMBLE] = (metrics.total_uncertainty(test.predictive), metrics.total_uncertainty(ood.predictive))
        scores[KNOWLEDGE][ENSEMBLE] = (test.mutual_information.numpy(), ood.mutual_information.numpy())
    for name, ood in run.ood_preds.items():
        test = run.test_preds.get(name, {})
        if "predictive" not in test or "predictive" not in ood:
            run.note(f"student {name!r} does not predict the predictive: no total or knowledge uncertainty for OOD detection")
            continue
        scores[TOTAL][name] = (metrics.total_uncertainty(test["predictive"]), metrics.total_uncertainty(ood["predictive"]))
        if "mutual_information" in test and "mutual_information" in ood:
            scores[KNOWLEDGE][name] = (
                metrics.knowledge_uncertainty(test["predictive"], test["expected_entropy"]),
                metrics.knowledge_uncertainty(ood["predictive"], ood["expected_entropy"]),
            )
        else:
            run.note(f"student {name!r} has no expected-entropy head: no knowledge uncertainty for OOD detection")
    return {k: v for k, v in scores.items() if v}


def figure_ood_roc(run: RunInputs, path: Path) -> str | None:
    from .plots import ood_roc

    if run.data is None:
        return "the prepared data is unavailable"
    if run.data.ood_x is None:
        return "the run has no OOD set (set data.ood_source)"
    if "ood" not in run.ensemble:
        run.note("the teacher ensemble has no OOD statistics: it is left out of the ROC curves")
    scores = ood_scores(run)
    if not scores:
        return "no model gives an OOD score"
    ood_roc(scores, path, colors=_colors(run))
    return None


def figure_pareto(run: RunInputs, path: Path) -> str | None:
    source = run.run_dir / "pareto.png"
    if not source.is_file():
        if (run.run_dir / "search.json").is_file():
            return "search.json has no pareto.png beside it"
        return "no architecture search in this run directory (gped search writes pareto.png)"
    if source.resolve() != path.resolve():
        shutil.copyfile(source, path)
        if source.with_suffix(".json").is_file():  # gped search's own sidecar of the plotted data
            shutil.copyfile(source.with_suffix(".json"), path.with_suffix(".json"))
    return None


# ---------------------------------------------------------------------------------------------
# the report


def write_report(run_dir: str | Path, out: str | Path | None = None, n_bins: int = 15) -> Report:
    """Write ``report.md`` and the figures for ``run_dir`` into ``out`` (default ``run_dir/report``)."""
    run = read_run(run_dir)
    out_dir = Path(out) if out is not None else run.run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_old_outputs(out_dir, run.run_dir)
    report = Report(out_dir, out_dir / "report.md", notes=run.notes)
    makers = {
        "learning_curves": figure_learning_curves,
        "entropy_scatter": figure_entropy_scatter,
        "reliability": lambda r, p: figure_reliability(r, p, n_bins),
        "ood_roc": figure_ood_roc,
        "pareto": figure_pareto,
    }
    skipped: dict[str, str] = {}
    for stem, make in makers.items():
        path = out_dir / f"{stem}.png"
        try:
            reason = make(run, path)
        except (GpedError, ValueError) as exc:  # bad numbers in one figure must not cost the others
            reason = f"could not be drawn: {_one_line(exc)}"
            log.debug("figure %s failed", stem, exc_info=True)
        if reason is None:
            report.figures[stem] = path
        else:
            skipped[stem] = reason
            if stem != "pareto" or (run.run_dir / "search.json").is_file():  # most runs have no search: no note
                run.note(f"{stem}.png skipped: {reason}")
    report.markdown.write_text(render_markdown(run, report, skipped))
    log.info("report for %s written to %s (%d figures, %d notes)", run.run_dir, out_dir, len(report.figures), len(report.notes))
    return report


def _clear_old_outputs(out_dir: Path, run_dir: Path) -> None:
    """Remove figures of an earlier report that this one may skip (never the run's own pareto.png)."""
    for stem in FIGURES:
        for suffix in (".png", ".json"):
            path = out_dir / f"{stem}{suffix}"
            if stem == "pareto" and out_dir.resolve() == run_dir.resolve():
                continue
            if path.is_file():
                path.unlink()


def render_markdown(run: RunInputs, report: Report, skipped: dict[str, str]) -> str:
    cfg = run.cfg
    lines = [f"# gped run report: {cfg.name}", "", f"Run directory `{run.run_dir}`, reported by gped {__version__}.", ""]
    lines += _run_section(run)
    lines += _data_section(run)
    lines += _config_section(run)
    lines += ["## Results on the test set", ""] + _summary_lines(run) + [""]
    lines += ["## Figures", ""]
    for stem, title in FIGURES.items():
        lines += [f"### {title}", ""]
        if stem in report.figures:
            lines.append(f"![{title}]({stem}.png)")
            if (report.out_dir / f"{stem}.json").is_file():
                lines += ["", f"Plotted data: [{stem}.json]({stem}.json)"]
        else:
            lines.append(f"*`{stem}.png` skipped: {skipped[stem]}.*")
        lines.append("")
        if stem == "ood_roc" and stem in report.figures:
            lines += _auroc_lines(report.figures[stem])
        if stem == "pareto":
            lines += _search_lines(run)
    lines += _evaluation_lines(run)
    if run.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in run.notes] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _run_section(run: RunInputs) -> list[str]:
    s = run.summary or {}
    facts = []
    for key, label in (("samples", "posterior samples in the ensemble"), ("steps", "chain steps"), ("wall_s", "wall time (s)"),
                       ("sampler", "sample stream"), ("ensemble_missed", "samples the ensemble missed")):
        if key in s and not isinstance(s[key], (dict, list)):
            facts.append(f"- {label}: {_fmt(s[key])}")
    if not facts:
        return []
    return ["## Run", ""] + facts + [""]


def _data_section(run: RunInputs) -> list[str]:
    d = run.cfg.data
    rows = [("source", d.source + (f" ({d.root})" if d.root else ""))]
    if getattr(d, "classes", None) is not None:
        rows.append(("classes kept", str(d.classes)))
    rows.append(("occlusion square m", str(d.mask)))
    meta = run.meta
    if meta:
        arrays = meta.get("arrays", {})
        rows += [
            ("labelled examples N", _fmt(meta.get("num_train"))),
            ("distillation inputs N′", _fmt(meta.get("num_distill"))),
            ("test inputs", _fmt(arrays.get("test_x", {}).get("shape", ["?"])[0])),
            ("input shape / classes", f"{tuple(meta.get('input_shape', []))} / {_fmt(meta.get('num_classes'))}"),
            ("masking rate", _fmt(meta.get("mask_rate"))),
        ]
        if "ood_x" in arrays:
            rows.append(("OOD set", f"{d.ood_source} ({arrays['ood_x'].get('shape', ['?'])[0]} inputs)"))
        rows.append(("fingerprint", f"`{meta.get('fingerprint')}`"))
    elif d.ood_source:
        rows.append(("OOD set", d.ood_source))
    return ["## Data", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _config_section(run: RunInputs) -> list[str]:
    cfg = run.cfg
    t, s = cfg.teacher, cfg.sampler
    lines = [
        "## Configuration", "",
        f"- teacher: {t.arch}, K1 = {t.k1:g}, K2 = {t.k2:g}",
        f"- sampler: {s.name}, step size η = {s.step_size:g}, prior precision τ = {s.prior_precision:g}, "
        f"batch M = {s.batch_size}, burn-in B = {s.burn_in}, thinning H = {s.thin}, steps T = {s.steps}, "
        f"mode {s.mode} (M′ = {s.distill_batch}), seed {s.seed}",
        f"- evaluation every {cfg.coordinator.eval_every} posterior samples",
        "", "| student | expectations | estimator | model | lr | batch | checkpoint |", "|---|---|---|---|---|---|---|",
    ]
    for st in cfg.students:
        m = st.model
        have = (run.run_dir / "checkpoints" / f"student-{st.name}.pt").is_file()
        lines.append(f"| {st.name} | {', '.join(st.expectations)} | {st.estimator} | {m.arch} K1={m.k1:g} K2={m.k2:g}"
                     f"{f' dropout={m.dropout:g}' if m.dropout else ''} | {st.lr:g} | {st.batch_size} | {'yes' if have else 'missing'} |")
    return lines + [""]


def _summary_lines(run: RunInputs) -> list[str]:
    rows = (run.summary or {}).get("scores")
    if isinstance(rows, dict) and rows and all(isinstance(v, dict) for v in rows.values()):
        return ["From `summary.json`:", "", summary_table(rows)]
    latest: dict[str, dict] = {}
    for record in run.records:
        latest[record["student"]] = record["scores"]
    if latest:
        run.note("summary.json is missing or unreadable: the results table shows each model's latest metrics.jsonl record")
        ordered = {k: latest[k] for k in [ENSEMBLE, *run.student_names] if k in latest}
        ordered.update({k: v for k, v in latest.items() if k not in ordered})
        return ["Latest scores in `metrics.jsonl` (the run has not written `summary.json`):", "", summary_table(ordered)]
    return ["*No scores yet: neither `summary.json` nor `metrics.jsonl` holds any.*"]


def _auroc_lines(png: Path) -> list[str]:
    """AUROC per model and score, read back from the ROC figure's sidecar (the numbers drawn)."""
    sidecar = json.loads(png.with_suffix(".json").read_text())
    table: dict[str, dict[str, float]] = {}
    columns = []
    for panel in sidecar["panels"]:
        columns.append(panel["title"])
        for series in panel["series"]:
            if series["kind"] != "reference":
                table.setdefault(series["name"], {})[panel["title"]] = series["auroc"]
    lines = ["OOD AUROC (in-distribution test inputs and OOD inputs scored together; 0.5 is chance):", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row[c]) if c in row else "–" for c in columns) + " |")
    return lines + [""]


def _search_lines(run: RunInputs) -> list[str]:
    path = run.run_dir / "search.json"
    if not path.is_file():
        return []
    records = _read_json(path, run.note, list)
    if not records or not all(isinstance(r, dict) for r in records):
        if records is not None:
            run.note("search.json is not a list of records: not shown")
        return []
    keys = [k for k in SEARCH_COLUMNS if any(k in r for r in records)]
    keys += sorted({k for r in records for k in r if k not in keys and not isinstance(r[k], (dict, list))})
    lines = [f"Students of the search (`search.json`, {len(records)} records; ✓ = on that Pareto front):", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in records:
        cells = [("✓" if r.get(k) else "") if k.startswith("pareto") else ("–" if r.get(k) is None else _fmt(r[k])) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = _read_json(run.run_dir / "chosen.json", run.note, dict)
    if chosen and "name" in chosen:
        rule = f" ({chosen['rule']})" if isinstance(chosen.get("rule"), str) else ""
        lines += ["", f"Chosen student: **{_fmt(chosen['name'])}**{rule}."]
    return lines + [""]


def _evaluation_lines(run: RunInputs) -> list[str]:
    path = run.run_dir / "evaluation.json"
    if not path.is_file():
        return []
    data = _read_json(path, run.note, dict)
    if data is None:
        return []
    rows = {name: _flatten(v) for name, v in data.items() if isinstance(v, dict)}
    other = {name: v for name, v in data.items() if not isinstance(v, dict)}
    lines = ["## Downstream evaluation (`evaluation.json`)", ""]
    if rows:
        columns: list[str] = []
        for row in rows.values():
            columns += [c for c in row if c not in columns]
        lines += ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row[c]) if c in row else "–" for c in columns) + " |")
        lines.append("")
    lines += [f"- {k}: {_fmt(v)}" for k, v in other.items()]
    return lines + ([""] if other else [])


# ---------------------------------------------------------------------------------------------
# small helpers


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_json(path: Path, note, kind: type):
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        note(f"{path.name} is not valid JSON ({exc}): not used")
        return None
    if not isinstance(data, kind):
        note(f"{path.name} holds a {type(data).__name__}, expected a {kind.__name__}: not used")
        return None
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

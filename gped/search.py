"""Student architecture search (DESIGN §2, "Student architecture search"): ``gped search``.

Every student of a search is distilled from **one** teacher chain at the same time — the same
posterior samples, the same distillation batches — so the students differ only in their shape (and
penalty), never in the chain's luck; the paper's one-run-per-student experiments cannot do that.

1. **Exhaustive grid.** One student per (K1, K2) pair, each a copy of the config's first student
   (its expectations, estimator, lr, schedule, architecture, seed) with that width multiplier pair.
2. **Group lasso.** For each λ, one more student of the largest grid shape (max K1, max K2),
   trained with the loss mean ℓ + λ·R(φ) (:mod:`gped.core.pruning`) on the same chain, in the same
   phase as the grid.  After the chain's ``sampler.steps`` steps, every unit whose incoming weights
   are all below 1e-3 in magnitude is pruned and the student is fine-tuned *without* the penalty for
   ``finetune_steps`` optimizer steps with a fresh Adam (the learning rate reset to the template's),
   keeping pruned units at zero.  Fine-tuning **continues the same chain**: the same
   :class:`~gped.reference.ReferenceRun` keeps stepping with the pruned students attached, so their
   targets come from new posterior samples of the same teacher ensemble (and their U_o tables carry
   on from the λ-student's).  By default (``equal_budget``) the grid students stay attached too and
   keep learning from those samples, so every reported student has taken the same number of steps
   on the same samples; without it only the pruned students continue and have ``finetune_steps``
   more steps than the grid (``search.md`` states which).  The grid's and the λ-students' scores are not
   frozen at the end of phase 1: *every* student is scored at the very end against the one final
   teacher ensemble, so entropy MAE compares like with like.
3. **Report.** Per student: parameters and multiply-adds per example (pruned units left out,
   :func:`gped.core.pruning.cost`), measured latency (median of timed forward passes of a fixed test
   batch on the CPU with one torch thread, the pruned students run as their compacted dense
   equivalent), test NLL, accuracy, entropy MAE, units kept.  Two Pareto fronts over (cost, test NLL):
   speed (FLOPs) and storage (parameters).  The chosen student is the cheapest (fewest FLOPs, then
   fewest parameters) point of the speed front whose NLL is within ``tolerance`` of the best NLL of
   any student.  Note that this picks on the *test* set (the only labelled held-out set gped keeps).

Outputs in the run directory, beside the usual ``config.json`` (listing every student, so
``gped.load_student(run_dir, name)`` loads any of them), ``metrics.jsonl``, ``checkpoints/`` and
``summary.{json,md}``: ``search.json`` (the records), ``search.md`` (the table), ``pareto.png`` and
``pareto.json`` (the plotted data), ``chosen.json``.  With the same config and seeds ``search.json``
is identical from run to run except for ``latency_ms``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, StudentConfig, save_config
from .core.evaluate import summary_table
from .core.expectations import resolve
from .core.pruning import PRUNE_THRESHOLD, compact, cost, prune_masks, units
from .errors import ConfigError
from .log import Progress
from .reference import ReferenceRun, save_run_checkpoints, write_records
from .runtime import pick_device

log = logging.getLogger("gped.search")

RECORD_FIELDS = (
    "name", "k1", "k2", "lasso", "params", "flops", "latency_ms", "nll", "accuracy", "entropy_mae",
    "units_kept", "units_total", "pareto_flops", "pareto_params",
)


@dataclass
class SearchSpec:
    """What to search: the K1 × K2 grid, the group-lasso strengths and how to measure."""

    k1: list[float]
    k2: list[float]
    lasso: list[float] = field(default_factory=list)
    #: optimizer steps of fine-tuning after pruning (each on a new posterior sample of the same chain)
    finetune_steps: int = 200
    #: chosen student: the cheapest speed-front point with NLL ≤ best NLL + tolerance (nats/example)
    tolerance: float = 0.01
    prune_threshold: float = PRUNE_THRESHOLD
    #: latency: one forward pass over this many test inputs, timed this many times (median)
    latency_batch: int = 100
    latency_repeats: int = 30
    #: keep the grid students learning during the fine-tuning phase, so every reported student has
    #: taken the same number of steps on the same samples (False: only the pruned ones continue)
    equal_budget: bool = True

    def validate(self) -> "SearchSpec":
        for what, values in (("k1", self.k1), ("k2", self.k2)):
            if not values:
                raise ConfigError(f"--{what} needs at least one value")
            for v in values:
                if not (math.isfinite(v) and v > 0):
                    raise ConfigError(f"--{what} values must be positive numbers, got {v}")
        for v in self.lasso:
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"--lasso values must be finite numbers >= 0, got {v}")
        self.k1, self.k2, self.lasso = (_unique(v) for v in (self.k1, self.k2, self.lasso))
        if self.finetune_steps < 0:
            raise ConfigError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ConfigError(f"--tolerance must be a finite number >= 0, got {self.tolerance}")
        if self.latency_batch <= 0 or self.latency_repeats <= 0:
            raise ConfigError("latency_batch and latency_repeats must be positive")
        return self


def parse_values(text: str | None, what: str) -> list[float]:
    """``"0.1,0.25, 1"`` → [0.1, 0.25, 1.0]; a clear ConfigError for anything else."""
    if text is None or not text.strip():
        return []
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise ConfigError(f"--{what} must be a comma-separated list of numbers, got {text!r}") from None
    return out


def _unique(values: list[float]) -> list[float]:
    return list(dict.fromkeys(float(v) for v in values))


def _tag(value: float) -> str:
    return repr(float(value))  # shortest exact text: distinct values give distinct names


def grid_name(k1: float, k2: float) -> str:
    return f"grid-k1_{_tag(k1)}-k2_{_tag(k2)}"


def lasso_name(lam: float) -> str:
    return f"lasso-{_tag(lam)}"


def pruned_name(lam: float) -> str:
    return f"pruned-{_tag(lam)}"


def search_config(cfg: RunConfig, spec: SearchSpec) -> RunConfig:
    """The run config of a search: the config's first student copied into every grid, λ and pruned student."""
    if not cfg.students:
        raise ConfigError("the search copies the config's first student as its template; the config has none")
    template = cfg.students[0]
    heads = resolve(template.expectations)
    if "predictive" not in heads:
        raise ConfigError(
            f"the search ranks students by test NLL, so its template student {template.name!r} must distil "
            f"'predictive' (it distils {', '.join(template.expectations)})"
        )

    def student(name: str, k1: float, k2: float, lam: float) -> StudentConfig:
        s = copy.deepcopy(template)
        s.name, s.group_lasso = name, lam
        s.model = dataclasses.replace(template.model, k1=k1, k2=k2)
        return s

    big = (max(spec.k1), max(spec.k2))
    students = [student(grid_name(a, b), a, b, 0.0) for a in spec.k1 for b in spec.k2]
    students += [student(lasso_name(lam), *big, lam) for lam in spec.lasso]
    # fine-tuning is without the penalty; the checkpoint's masks and zeroed weights carry the pruning
    students += [student(pruned_name(lam), *big, 0.0) for lam in spec.lasso]
    out = dataclasses.replace(cfg, students=students)
    return out.validate()


# ---------------------------------------------------------------------------------------------
# measuring


@torch.no_grad()
def measure_latency(model: torch.nn.Module, batch: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median wall time (ms) of one eval-mode forward pass of ``batch`` on the CPU, one torch thread."""
    model = copy.deepcopy(model).cpu().eval()
    batch = batch.cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            model(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 1e3 * statistics.median(times)


def pareto_front(costs: list[float], losses: list[float]) -> list[bool]:
    """For each point, whether no other point is at least as good in both and better in one (NaN: never)."""
    ok = [math.isfinite(c) and math.isfinite(l) for c, l in zip(costs, losses)]
    front = []
    for i, (ci, li) in enumerate(zip(costs, losses)):
        dominated = any(
            ok[j] and costs[j] <= ci and losses[j] <= li and (costs[j] < ci or losses[j] < li)
            for j in range(len(costs))
            if j != i
        )
        front.append(ok[i] and not dominated)
    return front


def choose(records: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The cheapest speed-front record (FLOPs, then parameters, then name) within ``tolerance`` of the best NLL."""
    finite = [r for r in records if r["nll"] is not None and math.isfinite(r["nll"])]
    if not finite:
        raise ConfigError("no student of the search has a finite test NLL; nothing to choose")
    best = min(r["nll"] for r in finite)
    eligible = [r for r in finite if r["pareto_flops"] and r["nll"] <= best + tolerance]
    return min(eligible, key=lambda r: (r["flops"], r["params"], r["name"]))


def _score(rows: dict, name: str, key: str) -> float | None:
    value = rows.get(name, {}).get(key)
    return None if value is None else float(value)


def _record(name: str, student: StudentConfig, distiller, rows, input_shape, latency_x, spec: SearchSpec, lam: float | None) -> dict:
    masks = distiller.masks
    counts = cost(distiller.model, input_shape, masks)
    kept, total = units(distiller.model, masks)
    return {
        "name": name,
        "k1": student.model.k1,
        "k2": student.model.k2,
        "lasso": lam,
        "params": counts["params"],
        "flops": counts["flops"],
        "latency_ms": measure_latency(compact(distiller.model, masks), latency_x, spec.latency_repeats),
        "nll": _score(rows, name, "nll"),
        "accuracy": _score(rows, name, "accuracy"),
        "entropy_mae": _score(rows, name, "entropy_mae"),
        "units_kept": kept,
        "units_total": total,
    }


# ---------------------------------------------------------------------------------------------
# the search


def run_search(cfg: RunConfig, spec: SearchSpec, device: str = "auto", progress_s: float = 5.0) -> dict[str, Any]:
    """Run the whole search in ``cfg.run_dir``; return {"records", "chosen", "before_pruning", "rows"}."""
    spec.validate()
    full = search_config(cfg, spec)
    run_dir = Path(full.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(full, run_dir / "config.json")
    template = full.students[0]
    # nn.Dropout draws from the global generator: seed it (and give the caller's state back) so the
    # same config gives the same search
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(template.seed)
        run = ReferenceRun(full, pick_device(device))
        pruned = {pruned_name(lam): run.distillers.pop(pruned_name(lam)) for lam in spec.lasso}
        log.info(
            "search: %d grid students (K1 %s × K2 %s) and %d group-lasso students on one chain of %d steps "
            "(burn-in %d, thin %d); then %d fine-tuning steps for the pruned ones",
            len(spec.k1) * len(spec.k2), spec.k1, spec.k2, len(spec.lasso), full.sampler.steps,
            full.sampler.burn_in, full.sampler.thin, spec.finetune_steps if spec.lasso else 0,
        )
        start = time.monotonic()
        with open(run_dir / "metrics.jsonl", "w") as metrics_log:
            _distil(run, metrics_log, full.sampler.steps, progress_s)
            samples_phase1 = run.samples
            if pruned:
                _prune_and_finetune(run, pruned, spec, metrics_log, progress_s)
            run.distillers = {**run.distillers, **pruned}
            rows = write_records(metrics_log, run, final=True)
        elapsed = time.monotonic() - start
        save_run_checkpoints(run, run_dir)
    (run_dir / "summary.json").write_text(json.dumps({
        "steps": run.chain.step, "samples": run.samples, "wall_s": elapsed, "scores": rows,
        "students": {n: {"samples": run.samples, "missed": 0, "updates": d.updates} for n, d in run.distillers.items()},
    }, indent=2) + "\n")
    (run_dir / "summary.md").write_text(summary_table(rows) + "\n")

    data = run.data
    latency_x = run.test_x[: spec.latency_batch]
    by_name = {s.name: s for s in full.students}
    records = [
        _record(grid_name(a, b), by_name[grid_name(a, b)], run.distillers[grid_name(a, b)], rows, data.input_shape, latency_x, spec, None)
        for a in spec.k1 for b in spec.k2
    ]
    records += [
        _record(pruned_name(lam), by_name[pruned_name(lam)], run.distillers[pruned_name(lam)], rows, data.input_shape, latency_x, spec, lam)
        for lam in spec.lasso
    ]
    before = [
        _record(lasso_name(lam), by_name[lasso_name(lam)], run.distillers[lasso_name(lam)], rows, data.input_shape, latency_x, spec, lam)
        for lam in spec.lasso
    ]
    for key in ("flops", "params"):
        for record, on in zip(records, pareto_front([r[key] for r in records], [_nan(r["nll"]) for r in records])):
            record[f"pareto_{key}"] = on
    records = [{k: r[k] for k in RECORD_FIELDS} for r in records]
    chosen = choose(records, spec.tolerance)
    context = {
        "samples_phase1": samples_phase1, "samples": run.samples, "steps": run.chain.step,
        "ensemble": rows["teacher ensemble"], "wall_s": elapsed, "latency_batch": len(latency_x),
    }
    write_outputs(run_dir, records, before, chosen, spec, full, context)
    log.info("search done in %.1f s: chosen %s (NLL %.4f, %d FLOPs, %d parameters)",
             elapsed, chosen["name"], chosen["nll"], chosen["flops"], chosen["params"])
    return {"records": records, "chosen": chosen, "before_pruning": before, "rows": rows, "run_dir": str(run_dir)}


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _distil(run: ReferenceRun, metrics_log, steps: int, progress_s: float) -> None:
    """Phase 1: ``steps`` chain steps with every attached student learning from each sample."""
    progress = Progress(log, progress_s, unit="step")
    for _ in range(steps):
        if run.step() and run.samples % run.cfg.coordinator.eval_every == 0:
            write_records(metrics_log, run, final=False)
        progress.update(run.chain.step, samples=run.samples)


def _prune_and_finetune(run: ReferenceRun, pruned: dict, spec: SearchSpec, metrics_log, progress_s: float) -> None:
    """Phase 2: prune each λ-student into its fresh twin, then continue the chain with only those attached."""
    for lam in spec.lasso:
        source, target = run.distillers[lasso_name(lam)], pruned[pruned_name(lam)]
        target.model.load_state_dict(source.model.state_dict())
        for name, est in target.estimators.items():
            est.load_state_dict(source.estimators[name].state_dict())
        # the twin's optimizer and schedule are fresh: Adam moments cleared, learning rate reset
        target.set_masks(prune_masks(target.model, spec.prune_threshold))
        kept, total = units(target.model, target.masks)
        log.info("λ=%g: pruned %d of %d hidden units, fine-tuning %d steps", lam, total - kept, total, spec.finetune_steps)
    if spec.finetune_steps == 0:
        return
    finished = run.distillers
    run.distillers = dict(pruned)
    if spec.equal_budget:
        run.distillers.update({n: d for n, d in finished.items() if n.startswith("grid-")})
    progress = Progress(log, progress_s, unit="step")
    while min(d.updates for d in pruned.values()) < spec.finetune_steps:
        if run.step() and run.samples % run.cfg.coordinator.eval_every == 0:
            write_records(metrics_log, run, final=False)
        progress.update(run.chain.step, samples=run.samples, finetune=min(d.updates for d in pruned.values()))
    run.distillers = finished


# ---------------------------------------------------------------------------------------------
# outputs


def write_outputs(run_dir: Path, records, before, chosen, spec: SearchSpec, cfg: RunConfig, context: dict) -> None:
    (run_dir / "search.json").write_text(json.dumps(records, indent=2) + "\n")
    (run_dir / "chosen.json").write_text(json.dumps({
        "name": chosen["name"],
        "rule": f"fewest FLOPs (then parameters) on the speed Pareto front with test NLL <= best + {spec.tolerance}",
        "record": chosen,
        "load": f"gped.load_student({str(run_dir)!r}, {chosen['name']!r})",
    }, indent=2) + "\n")
    pareto = pareto_data(records, chosen["name"])
    (run_dir / "pareto.json").write_text(json.dumps(pareto, indent=2) + "\n")
    plot_pareto(pareto, run_dir / "pareto.png")
    (run_dir / "search.md").write_text(search_markdown(records, before, chosen, spec, cfg, context))


FRONTS = {"flops": ("speed", "multiply-adds per example"), "params": ("storage", "parameters")}


def pareto_data(records, chosen: str) -> dict[str, Any]:
    """What ``pareto.png`` shows, point for point: each front's x, y and membership."""
    out: dict[str, Any] = {"y": "test NLL per example", "chosen": chosen, "fronts": {}}
    for key, (title, label) in FRONTS.items():
        points = [{"name": r["name"], "x": r[key], "y": r["nll"], "on_front": r[f"pareto_{key}"], "pruned": r["lasso"] is not None}
                  for r in records]
        front = sorted((p for p in points if p["on_front"]), key=lambda p: (p["x"], p["y"]))
        out["fronts"][key] = {"title": title, "x": label, "points": points, "front": [p["name"] for p in front]}
    return out


def plot_pareto(pareto: dict[str, Any], path: Path) -> None:
    """Two panels (speed, storage): every student, the front as a step line, the chosen one circled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    for ax, (key, front) in zip(fig.subplots(1, 2), pareto["fronts"].items()):
        points = [p for p in front["points"] if p["y"] is not None and math.isfinite(p["y"])]
        for pruned, marker, label in ((False, "o", "K1×K2 grid"), (True, "s", "group lasso, pruned")):
            sel = [p for p in points if p["pruned"] == pruned]
            if sel:
                ax.scatter([p["x"] for p in sel], [p["y"] for p in sel], marker=marker, label=label, zorder=3)
        line = [p for name in front["front"] for p in points if p["name"] == name]
        ax.step([p["x"] for p in line], [p["y"] for p in line], where="post", color="k", lw=1, label="Pareto front", zorder=2)
        chosen = [p for p in points if p["name"] == pareto["chosen"]]
        if chosen:
            ax.scatter([chosen[0]["x"]], [chosen[0]["y"]], s=180, facecolors="none", edgecolors="r", lw=2, label="chosen", zorder=4)
        for p in line:  # only the front is labelled (every point's name is in pareto.json)
            ax.annotate(p["name"], (p["x"], p["y"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(front["x"])
        ax.set_ylabel(pareto["y"])
        ax.set_title(f"{front['title']}: test NLL vs {key}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "✓" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _table(records, columns) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in records]
    return lines


def search_markdown(records, before, chosen, spec: SearchSpec, cfg: RunConfig, context: dict) -> str:
    ens = context["ensemble"]
    t = cfg.students[0]
    lines = [
        f"# Student architecture search: {cfg.name}",
        "",
        f"One chain ({cfg.sampler.name}, {context['steps']} steps, {context['samples']} posterior samples) for every student; "
        f"template: arch `{t.model.arch}`, expectations {', '.join(t.expectations)}, estimator {t.estimator}, lr {t.lr:g}.",
        f"Teacher ensemble on the test set: NLL {ens['nll']:.4f}, accuracy {ens['accuracy']:.4f}, "
        f"mean expected entropy {ens['expected_entropy']:.4f}.",
        "",
        _table_note(spec, context),
        "",
        *_table(records, ["name", "k1", "k2", "lasso", "params", "flops", "latency_ms", "nll", "accuracy",
                          "entropy_mae", "units_kept", "pareto_flops", "pareto_params"]),
        "",
        f"**Chosen: `{chosen['name']}`** — the fewest FLOPs (then parameters) on the speed front with test NLL within "
        f"{spec.tolerance:g} of the best ({min(r['nll'] for r in records if r['nll'] is not None):.4f}). "
        f"Load it with `gped.load_student({str(Path(cfg.run_dir))!r}, {chosen['name']!r})`. "
        "It is picked on the test set, the only labelled held-out set: treat its test NLL as optimistic.",
    ]
    if before:
        lines += ["", "Group-lasso students before pruning and fine-tuning (full shape, scored at the end too):", "",
                  *_table(before, ["name", "lasso", "params", "flops", "nll", "accuracy", "entropy_mae", "units_kept"])]
    return "\n".join(lines) + "\n"


def _table_note(spec: SearchSpec, context: dict) -> str:
    note = (
        f"flops = multiply-adds per example of the Linear/Conv2d layers (pruned units excluded); params likewise; "
        f"latency_ms = median of {spec.latency_repeats} forward passes of {context['latency_batch']} test inputs on the CPU "
        f"with one torch thread (pruned students compacted to their dense equivalent). Every student is scored against the "
        f"same final teacher ensemble."
    )
    if spec.lasso:
        note += (
            f" Grid and λ students learned from the first {context['samples_phase1']} samples; the pruned students "
            f"(units with every incoming weight < {spec.prune_threshold:g} removed) were then fine-tuned for "
            f"{spec.finetune_steps} more steps, without the penalty and with a reset learning rate, on the same chain's "
            f"following samples (λ is relative to the mean per-example loss); "
            + ("the grid students kept learning from those samples too (equal budget)."
               if spec.equal_budget else "the grid students did not (they have that many fewer steps).")
        )
    return note

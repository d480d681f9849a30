"""Downstream tasks on a finished run (DESIGN §2): OOD detection and uncertainty ranking.

* **OOD detection.** In- and out-of-distribution test inputs are scored together by an uncertainty
  (higher = more likely OOD) and summarised by AUROC: total uncertainty H[E p] and knowledge
  uncertainty I = H[E p] − E H[p] (mutual information). Scored for the teacher ensemble, every
  student that can give the score, a predictive + entropy student *pair* (two students of one run
  combine into I), the EnD² Dirichlet student, and a plain network trained by SGD (a point
  estimate: it has total uncertainty only).
* **Uncertainty ranking.** Draw 100 random test inputs, rank them by the student's uncertainty,
  score the ranking with nDCG@20 against the ensemble's, report mean ± sd over 500 draws.

Results go to ``evaluation.json`` and ``evaluation.md`` in the run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .api import TrainedStudent, load_ensemble, load_run_config, load_student
from .core import metrics
from .core.data import load_prepared
from .core.expectations import entropy_of
from .errors import GpedError
from .runtime import build_teacher_for, prepared_dir

log = logging.getLogger("gped.evaluate")


def uncertainties_of_student(student: TrainedStudent, x: np.ndarray) -> dict[str, np.ndarray]:
    out = student.predict(x)
    scores = {}
    if "total_uncertainty" in out:
        scores["total"] = out["total_uncertainty"]
    if "expected_entropy" in out:
        scores["expected_entropy"] = out["expected_entropy"]
    if "mutual_information" in out:
        # unclipped H[E p] − E H[p] from the two heads: clipping at 0 would tie inputs and bias AUROC
        scores["knowledge"] = out["total_uncertainty"] - out["expected_entropy"]
    if "dirichlet_total" in out:
        scores["total"] = out["dirichlet_total"]
        scores["expected_entropy"] = out["dirichlet_expected_entropy"]
        scores["knowledge"] = out["dirichlet_knowledge"]
    return scores


def train_sgd_baseline(cfg, data, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The teacher's architecture trained to a point estimate (MAP under the same prior) by SGD."""
    torch.manual_seed(seed)
    model = build_teacher_for(cfg, data)
    x, y = torch.from_numpy(data.labelled_x), torch.from_numpy(data.labelled_y)
    n = len(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=cfg.sampler.prior_precision / n)
    gen = torch.Generator().manual_seed(seed)
    batch = min(cfg.sampler.batch_size, n)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def network_uncertainties(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    probs = torch.softmax(model(torch.from_numpy(x)), -1)
    return {"total": entropy_of(probs).numpy(), "probs": probs.numpy()}


def evaluate_run(run_dir: str | Path, sgd_epochs: int = 30, draws: int = 500, subset: int = 100, k: int = 20, seed: int = 0) -> dict:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    data = load_prepared(prepared_dir(cfg) if cfg.data.prepared else run_dir / "data")
    ensembles = load_ensemble(run_dir)
    test = ensembles["test"]
    ood = ensembles.get("ood")
    if ood is None or data.ood_x is None:
        log.warning("this run has no OOD set (data.ood_source): OOD detection is skipped")
    reference = {"total": entropy_of(test.predictive).numpy(), "expected_entropy": test.expected_entropy.numpy(),
                 "knowledge": test.mutual_information.numpy()}
    results: dict[str, dict[str, float]] = {}

    def score(name: str, on_test: dict[str, np.ndarray], on_ood: dict[str, np.ndarray] | None) -> None:
        row: dict[str, float] = {}
        for kind, values in on_test.items():
            if kind not in reference:
                continue
            if on_ood is not None and kind in on_ood and kind != "expected_entropy":
                row[f"auroc_{kind}"] = metrics.auroc(values, on_ood[kind])
            if name != "teacher ensemble" and subset <= len(values):
                mean, sd = metrics.ranking_ndcg(np.clip(reference[kind], 0, None), values, k=k, subset=subset, draws=draws, seed=seed)
                row[f"ndcg{k}_{kind}"], row[f"ndcg{k}_{kind}_sd"] = mean, sd
        results[name] = row

    ens_ood = None
    if ood is not None:
        ens_ood = {"total": entropy_of(ood.predictive).numpy(), "knowledge": ood.mutual_information.numpy()}
    score("teacher ensemble", reference, ens_ood)

    students = {s.name: load_student(run_dir, s.name) for s in cfg.students}
    preds_test = {n: uncertainties_of_student(s, data.test_x) for n, s in students.items()}
    preds_ood = {n: uncertainties_of_student(s, data.ood_x) for n, s in students.items()} if data.ood_x is not None else {}
    for name in students:
        score(name, preds_test[name], preds_ood.get(name))

    # a predictive-only student plus an entropy-only student of the same run give knowledge uncertainty together
    pred_only = [n for n in students if "total" in preds_test[n] and "knowledge" not in preds_test[n]]
    ent_only = [n for n in students if "expected_entropy" in preds_test[n] and "total" not in preds_test[n]]
    if pred_only and ent_only:
        p, e = pred_only[0], ent_only[0]

        def pair(d):
            return {"total": d[p]["total"], "knowledge": d[p]["total"] - d[e]["expected_entropy"]}

        score(f"{p}+{e}", pair(preds_test), pair(preds_ood) if preds_ood else None)

    sgd = train_sgd_baseline(cfg, data, sgd_epochs, seed)
    sgd_test = network_uncertainties(sgd, data.test_x)
    sgd_ood = network_uncertainties(sgd, data.ood_x) if data.ood_x is not None else None
    score("SGD network", {"total": sgd_test["total"]}, sgd_ood)
    results["SGD network"].update(metrics.classification_report(sgd_test["probs"], data.test_y))

    out = {"run": cfg.name, "ood_set": cfg.data.ood_source, "ood_size": 0 if data.ood_x is None else len(data.ood_x),
           "ranking": {"k": k, "subset": subset, "draws": draws}, "models": results}
    (run_dir / "evaluation.json").write_text(json.dumps(out, indent=2) + "\n")
    (run_dir / "evaluation.md").write_text(evaluation_table(results) + "\n")
    return out


def evaluation_table(results: dict[str, dict[str, float]]) -> str:
    columns = sorted({c for row in results.values() for c in row if not c.endswith("_sd")}, key=_column_order)
    lines = ["| model | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in results.items():
        cells = []
        for c in columns:
            if c not in row:
                cells.append("–")
            elif f"{c}_sd" in row:
                cells.append(f"{row[c]:.3f} ± {row[c + '_sd']:.3f}")
            else:
                cells.append(f"{row[c]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _column_order(name: str) -> tuple[int, str]:
    return (0 if name.startswith("auroc") else 1 if name.startswith("ndcg") else 2, name)


def check_run_dir(run_dir: str | Path) -> None:
    if not (Path(run_dir) / "checkpoints" / "coordinator-coordinator.pt").is_file():
        raise GpedError(f"{run_dir} has no ensemble checkpoint (checkpoints/coordinator-coordinator.pt): is the run finished?")

"""Scoring students against the teacher ensemble, and the summary table (DESIGN §3, coordinator).

Every score compares a student's predictions on the test set with the teacher ensemble's running
estimates on the same inputs: the student's own NLL / accuracy / ECE / Brier against the labels,
KL(ensemble ‖ student) for the predictive, and the mean absolute error of its expected entropy
(and mutual information, when it covers both) against the ensemble's.
"""

from __future__ import annotations

import numpy as np

from . import metrics
from .distill import EnsembleAccumulator


def ensemble_scores(ensemble: EnsembleAccumulator, labels) -> dict[str, float]:
    scores = metrics.classification_report(ensemble.predictive.numpy(), labels)
    scores["expected_entropy"] = float(ensemble.expected_entropy.mean())
    scores["mutual_information"] = float(ensemble.mutual_information.mean())
    scores["samples"] = ensemble.count
    return scores


def student_scores(predictions: dict[str, np.ndarray], ensemble: EnsembleAccumulator, labels) -> dict[str, float]:
    """Metrics for one student's test-set predictions (keys present depend on what it distils)."""
    scores: dict[str, float] = {}
    if "predictive" not in predictions and "dirichlet" in predictions:
        predictions = {**predictions, "predictive": predictions["dirichlet"]}  # EnD²: the Dirichlet's mean
    if "predictive" in predictions and "expected_entropy" in predictions and "mutual_information" not in predictions:
        # a student with both heads also has knowledge uncertainty H[E p] − E H[p] (clipped at 0)
        total = metrics.total_uncertainty(np.asarray(predictions["predictive"], dtype=np.float64))
        mi = np.clip(total - np.asarray(predictions["expected_entropy"], dtype=np.float64).reshape(-1), 0, None)
        predictions = {**predictions, "mutual_information": mi}
    if "predictive" in predictions:
        probs = np.asarray(predictions["predictive"], dtype=np.float64)
        scores.update(metrics.classification_report(probs, labels))
        scores["kl_to_ensemble"] = metrics.kl(ensemble.predictive.numpy(), probs)
    if "expected_entropy" in predictions:
        ent = np.asarray(predictions["expected_entropy"], dtype=np.float64).reshape(-1)
        scores["entropy_mae"] = metrics.mae(ent, ensemble.expected_entropy.numpy())
    if "mutual_information" in predictions:
        mi = np.asarray(predictions["mutual_information"], dtype=np.float64).reshape(-1)
        scores["mi_mae"] = metrics.mae(mi, ensemble.mutual_information.numpy())
    return scores


SUMMARY_COLUMNS = ("nll", "accuracy", "ece", "brier", "kl_to_ensemble", "entropy_mae", "mi_mae")


def summary_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table, one row per model (teacher ensemble first), '–' where a metric does not apply."""
    header = "| model | " + " | ".join(SUMMARY_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(SUMMARY_COLUMNS) + 1)]
    for name, scores in rows.items():
        cells = [f"{scores[c]:.4f}" if c in scores else "–" for c in SUMMARY_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

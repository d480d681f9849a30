"""Evaluation metrics for classifiers, teacher ensembles and distilled students (DESIGN §2, §3).

Every function is pure: it takes numpy arrays (torch tensors are accepted and converted, on
any device, with gradients detached), computes in float64, and returns Python floats or float64
arrays.  Shapes are checked and a mismatch raises :class:`ValueError` with the shapes in the
message.

Conventions
-----------
* ``probs`` is an ``(n, C)`` array of class probabilities, one row per example; each row must be
  non-negative and sum to 1 (within :data:`PROB_SUM_ATOL`, to allow float32/float16 softmax
  output).  Entries that are negative by no more than :data:`PROB_NEG_ATOL` (rounding) are set to 0.
* ``labels`` is an ``(n,)`` array of integer class indices in ``[0, C)``.
* Logarithms are natural, so entropies, NLL and KL are in nats; ``0 log 0 = 0``.
* Where a logarithm of a probability that may be exactly 0 is needed (NLL, KL), the probability
  is clipped from below at ``eps`` (default :data:`EPS` = 1e-12); a single example then
  contributes at most ``-log(eps) ≈ 27.6`` nats.  This matters when a float32 softmax
  underflows to exactly 0 for a confidently wrong prediction: the reported value is then a
  (finite) lower bound rather than ``inf``.

Ensemble quantities (S posterior samples, member probabilities ``p_s(y|x)``):

* total uncertainty  ``H[E_s p_s]``   (entropy of the mean) — :func:`total_uncertainty`;
* expected entropy   ``E_s H[p_s]``   (expected data uncertainty) — :func:`expected_entropy`;
* knowledge uncertainty (mutual information) ``H[E_s p_s] − E_s H[p_s] ≥ 0`` by Jensen's
  inequality (entropy is concave) — :func:`knowledge_uncertainty`.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "EPS",
    "Reliability",
    "accuracy",
    "auroc",
    "brier",
    "classification_report",
    "distillation_report",
    "ece",
    "entropy",
    "expected_entropy",
    "kl",
    "knowledge_uncertainty",
    "mae",
    "ndcg_at_k",
    "nll",
    "ranking_ndcg",
    "reliability",
    "roc_curve_points",
    "total_uncertainty",
]

#: Lower clip applied to probabilities before taking their logarithm in :func:`nll` and :func:`kl`.
EPS = 1e-12
#: Tolerance on ``|Σ_c p_c − 1|`` for a row of probabilities.
PROB_SUM_ATOL = 1e-3
#: Negative probabilities down to ``-PROB_NEG_ATOL`` are taken as rounding and set to 0.
PROB_NEG_ATOL = 1e-6
#: Reference relevances for nDCG down to ``-NDCG_NEG_ATOL`` (e.g. a mutual information that is
#: ``-1e-17`` by rounding) are set to 0; more negative values are an error.
NDCG_NEG_ATOL = 1e-9


# --------------------------------------------------------------------------------------------
# Input conversion and validation
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; a torch tensor is detached, moved to the CPU and (if
    floating) cast to float64 first, which also handles dtypes numpy lacks (bfloat16)."""
    torch = sys.modules.get("torch")  # never import torch just to evaluate numpy arrays
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.to(torch.float64)
        return x.numpy()
    return np.asarray(x)


def _as_float(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == np.bool_ or not (
        np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _as_probs(x: Any, name: str = "probs", ndim: int | None = 2) -> np.ndarray:
    """Validated float64 probabilities, normalised along the last axis.

    ``ndim=None`` accepts any array with at least one axis (the last axis is the class axis).
    """
    p = _as_float(x, name)
    if ndim is not None and p.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D (examples, classes), got shape {p.shape}")
    if p.ndim == 0:
        raise ValueError(f"{name} must have a class axis, got a scalar")
    if p.size == 0:
        raise ValueError(f"{name} is empty (shape {p.shape})")
    if p.min() < -PROB_NEG_ATOL or p.max() > 1.0 + PROB_NEG_ATOL:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{p.min():.3g}, {p.max():.3g}]"
        )
    err = np.abs(p.sum(axis=-1) - 1.0).max()
    if err > PROB_SUM_ATOL:
        raise ValueError(
            f"{name} rows must sum to 1 (within {PROB_SUM_ATOL:g}); worst row is off by {err:.3g}"
        )
    return np.clip(p, 0.0, 1.0)


def _as_labels(x: Any, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    y = _to_numpy(x)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match probs, got {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        # integral floats (e.g. labels stored in a float tensor) are accepted, others are not
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{name} must be integer class indices")
    elif y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes}), got values in [{y.min()}, {y.max()}]"
        )
    return y


def _probs_and_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_probs(probs)
    return p, _as_labels(labels, p.shape[0], p.shape[1])


def _as_scores(x: Any, name: str) -> np.ndarray:
    s = _as_float(x, name)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}")
    if s.size == 0:
        raise ValueError(f"{name} is empty")
    return s


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x log y`` with the convention ``0 log y = 0`` (also for ``y = 0``)."""
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape))
    mask = x > 0
    np.multiply(x, np.log(y, where=mask, out=np.ones_like(out)), out=out, where=mask)
    return out


# --------------------------------------------------------------------------------------------
# Entropies and ensemble uncertainties
# --------------------------------------------------------------------------------------------


def entropy(probs: Any) -> np.ndarray:
    """Shannon entropy of each distribution along the last axis, in nats.

    ``H[p] = −Σ_c p_c log p_c`` with ``0 log 0 = 0``.  ``probs`` of shape ``(..., C)`` gives
    shape ``(...)``; e.g. ``(n, C) -> (n,)`` and ``(S, n, C) -> (S, n)`` for S ensemble members.
    Uniform over C classes gives ``log C``; a one-hot row gives 0.
    """
    p = _as_probs(probs, ndim=None)
    return -_xlogy(p, p).sum(axis=-1)


def expected_entropy(member_probs: Any) -> np.ndarray:
    """Expected entropy ``E_s H[p_s]`` of an ensemble, per example.

    ``member_probs`` has shape ``(S, n, C)`` (S members); returns ``(n,)``:
    ``(1/S) Σ_s −Σ_c p_{s,c} log p_{s,c}``.
    """
    p = _as_probs(member_probs, "member_probs", ndim=3)
    return entropy(p).mean(axis=0)


def total_uncertainty(mean_probs: Any) -> np.ndarray:
    """Total uncertainty: the entropy of the mean prediction, per example.

    ``H[E_s p_s] = −Σ_c p̄_c log p̄_c`` where ``p̄ = E_s p_s`` is ``mean_probs`` of shape ``(n, C)``.
    """
    return entropy(_as_probs(mean_probs, "mean_probs"))


def knowledge_uncertainty(mean_probs: Any, expected_entropy: Any) -> np.ndarray:
    """Knowledge (epistemic) uncertainty, the mutual information between y and θ, per example.

    ``I[y; θ | x] = H[E_s p_s] − E_s H[p_s]`` = :func:`total_uncertainty` of ``mean_probs``
    ``(n, C)`` minus ``expected_entropy`` ``(n,)``.

    For an exact ensemble it is ≥ 0 (Jensen; entropy is concave) up to rounding.  A student
    that predicts the two terms with separate heads can produce negative values; they are
    *not* clipped, because the value is used as an OOD / ranking score and clipping would
    create ties.
    """
    total = total_uncertainty(mean_probs)
    ee = _as_float(expected_entropy, "expected_entropy")
    _same_shape(total, ee, "entropy of mean_probs", "expected_entropy")
    return total - ee


# --------------------------------------------------------------------------------------------
# Classification metrics
# --------------------------------------------------------------------------------------------


def nll(probs: Any, labels: Any, eps: float = EPS) -> float:
    """Mean negative log-likelihood per example, in nats.

    ``NLL = −(1/n) Σ_i log max(p_i[y_i], eps)``.  The clip at ``eps`` (default 1e-12) keeps the
    value finite when a probability underflowed to 0; each example contributes at most
    ``−log eps``.
    """
    p, y = _probs_and_labels(probs, labels)
    p_true = p[np.arange(p.shape[0]), y]
    return float(-np.log(np.maximum(p_true, eps)).mean())


def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of examples whose arg-max class equals the label: ``(1/n) Σ_i 1[argmax p_i = y_i]``.

    Ties go to the lowest class index (``numpy.argmax``).
    """
    p, y = _probs_and_labels(probs, labels)
    return float((p.argmax(axis=1) == y).mean())


class Reliability(NamedTuple):
    """Per-bin statistics of a reliability diagram; empty bins have NaN confidence/accuracy."""

    confidence: np.ndarray  #: (n_bins,) mean max-probability of the examples in the bin
    accuracy: np.ndarray  #: (n_bins,) fraction of those examples predicted correctly
    count: np.ndarray  #: (n_bins,) number of examples in the bin (int64)
    edges: np.ndarray  #: (n_bins + 1,) bin edges, ``linspace(0, 1, n_bins + 1)``


def reliability(probs: Any, labels: Any, n_bins: int = 15) -> Reliability:
    """Reliability-diagram statistics over equal-width confidence bins.

    Confidence is ``conf_i = max_c p_i[c]``, the prediction is ``argmax_c p_i[c]``.  Bin b is
    ``(edges[b], edges[b+1]]`` with ``edges = linspace(0, 1, n_bins + 1)`` (the first bin also
    holds 0).  For each bin: mean confidence, accuracy and count.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n_bins = int(n_bins)
    p, y = _probs_and_labels(probs, labels)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left": edges[b] < conf <= edges[b+1]  ->  index b + 1
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return Reliability(mean_conf, mean_acc, count, edges)


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error over equal-width confidence bins.

    ``ECE = Σ_b (n_b / n) |acc_b − conf_b|`` where, for bin b of :func:`reliability`, ``n_b`` is
    its count, ``acc_b`` its accuracy and ``conf_b`` its mean confidence (max probability).
    """
    r = reliability(probs, labels, n_bins)
    full = r.count > 0
    w = r.count[full] / r.count.sum()
    return float(np.sum(w * np.abs(r.accuracy[full] - r.confidence[full])))


def brier(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: ``(1/n) Σ_i Σ_c (p_i[c] − 1[c = y_i])²``, in ``[0, 2]``."""
    p, y = _probs_and_labels(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


# --------------------------------------------------------------------------------------------
# Distillation fidelity
# --------------------------------------------------------------------------------------------


def kl(p: Any, q: Any, eps: float = EPS) -> float:
    """Mean over rows of ``KL(p ‖ q) = Σ_c p_c (log p_c − log max(q_c, eps))``, in nats.

    ``p`` is the reference (teacher ensemble's predictive), ``q`` the approximation (student),
    both ``(n, C)``.  Terms with ``p_c = 0`` are 0; ``q`` is clipped at ``eps`` as in :func:`nll`
    so a zero where ``p > 0`` gives a large finite value instead of ``inf``.  Per-row values are
    clipped at 0 to remove rounding (true KL is ≥ 0).
    """
    pp = _as_probs(p, "p")
    qq = _as_probs(q, "q")
    _same_shape(pp, qq, "p", "q")
    rows = (_xlogy(pp, pp) - _xlogy(pp, np.maximum(qq, eps))).sum(axis=1)
    return float(np.maximum(rows, 0.0).mean())


def mae(a: Any, b: Any) -> float:
    """Mean absolute error ``(1/n) Σ_i |a_i − b_i|`` (e.g. student vs ensemble expected entropy)."""
    x = _as_float(a, "a")
    z = _as_float(b, "b")
    _same_shape(x, z, "a", "b")
    if x.size == 0:
        raise ValueError("a and b are empty")
    return float(np.abs(x - z).mean())


# --------------------------------------------------------------------------------------------
# Downstream tasks: OOD detection and uncertainty ranking
# --------------------------------------------------------------------------------------------


def _ood_labels_and_scores(scores_in: Any, scores_out: Any) -> tuple[np.ndarray, np.ndarray]:
    s_in = _as_scores(scores_in, "scores_in")
    s_out = _as_scores(scores_out, "scores_out")
    labels = np.concatenate([np.zeros(s_in.size, np.int64), np.ones(s_out.size, np.int64)])
    return labels, np.concatenate([s_in, s_out])


def auroc(scores_in: Any, scores_out: Any) -> float:
    """Area under the ROC curve for telling out-of-distribution from in-distribution inputs.

    Both sets are scored together, out-of-distribution is the positive class and a higher score
    means "more likely OOD" (e.g. total or knowledge uncertainty).  Equivalently
    ``AUROC = P(s_out > s_in) + ½ P(s_out = s_in) = U / (n_in n_out)`` (Mann–Whitney U).
    1 is perfect separation, 0.5 is chance.
    """
    labels, scores = _ood_labels_and_scores(scores_in, scores_out)
    from sklearn.metrics import roc_auc_score  # imported here: sklearn costs a role ~1 s to load

    return float(roc_auc_score(labels, scores))


def roc_curve_points(
    scores_in: Any, scores_out: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of the OOD detector of :func:`auroc`: ``(fpr, tpr, thresholds)``.

    ``fpr`` is the fraction of in-distribution inputs with score ≥ threshold, ``tpr`` the
    fraction of OOD inputs; for plotting ``tpr`` against ``fpr``.
    """
    labels, scores = _ood_labels_and_scores(scores_in, scores_out)
    from sklearn.metrics import roc_curve  # imported here: sklearn costs a role ~1 s to load

    fpr, tpr, thresholds = roc_curve(labels, scores)
    return fpr, tpr, thresholds


def _as_relevance(reference: Any, name: str = "reference_scores") -> np.ndarray:
    r = _as_scores(reference, name)
    if r.min() < -NDCG_NEG_ATOL:
        raise ValueError(f"{name} are used as graded relevance and must be >= 0, min is {r.min():.3g}")
    return np.maximum(r, 0.0)


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def ndcg_at_k(reference_scores: Any, predicted_scores: Any, k: int = 20) -> float:
    """nDCG@k of the ranking by ``predicted_scores`` with ``reference_scores`` as relevance.

    Items are sorted by predicted uncertainty, highest first; with ``r`` the reference
    uncertainty (teacher ensemble) of the item at rank j,
    ``DCG@k = Σ_{j=1..k} r_(j) / log2(j + 1)`` and ``nDCG@k = DCG@k / IDCG@k``, IDCG being the
    DCG of the ranking by the reference itself (gain linear in r, as in
    ``sklearn.metrics.ndcg_score``; tied predictions are averaged over their orderings).
    1 means the top k agree with the reference's top k in order.  If every reference score is 0
    the result is 0 (sklearn's convention).  Reference values are relevances and must be ≥ 0
    (tiny rounding negatives down to ``-NDCG_NEG_ATOL`` are set to 0).
    """
    k = _check_k(k)
    ref = _as_relevance(reference_scores)
    pred = _as_scores(predicted_scores, "predicted_scores")
    _same_shape(ref, pred, "reference_scores", "predicted_scores")
    if ref.size < 2:
        raise ValueError("nDCG needs at least 2 items")
    from sklearn.metrics import ndcg_score  # imported here: sklearn costs a role ~1 s to load

    return float(ndcg_score(ref[None, :], pred[None, :], k=k))


def ranking_ndcg(
    reference: Any,
    predicted: Any,
    k: int = 20,
    subset: int = 100,
    draws: int = 500,
    seed: int = 0,
) -> tuple[float, float]:
    """The paper's uncertainty-ranking protocol: nDCG@k on random subsets, ``(mean, sd)``.

    ``draws`` times, draw ``subset`` test inputs uniformly without replacement (with
    ``numpy.random.default_rng(seed)``), rank them by ``predicted`` uncertainty and score
    :func:`ndcg_at_k` against ``reference`` (teacher ensemble) uncertainty.  Returns the mean and
    the standard deviation (``ddof=0``) over draws.  Paper: k=20, subset=100, draws=500.
    """
    k = _check_k(k)
    ref = _as_relevance(reference, "reference")
    pred = _as_scores(predicted, "predicted")
    _same_shape(ref, pred, "reference", "predicted")
    if int(subset) != subset or not 2 <= subset <= ref.size:
        raise ValueError(f"subset must be an integer in [2, {ref.size}], got {subset!r}")
    if int(draws) != draws or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    from sklearn.metrics import ndcg_score  # imported here: sklearn costs a role ~1 s to load

    rng = np.random.default_rng(seed)
    scores = np.empty(int(draws))
    for d in range(int(draws)):
        idx = rng.choice(ref.size, size=int(subset), replace=False)
        scores[d] = ndcg_score(ref[None, idx], pred[None, idx], k=k)
    return float(scores.mean()), float(scores.std())


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def classification_report(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, float]:
    """``{"nll", "accuracy", "ece", "brier"}`` of a probabilistic classifier, as Python floats."""
    p, y = _probs_and_labels(probs, labels)
    return {
        "nll": nll(p, y),
        "accuracy": accuracy(p, y),
        "ece": ece(p, y, n_bins),
        "brier": brier(p, y),
    }


def distillation_report(
    student_probs: Any,
    ensemble_probs: Any,
    labels: Any,
    student_entropy: Any = None,
    ensemble_expected_entropy: Any = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """Score a student against the labels and against the teacher ensemble it distils.

    Keys: the student's ``nll``, ``accuracy``, ``ece``, ``brier`` (:func:`classification_report`);
    ``kl_to_ensemble`` = :func:`kl` (ensemble ‖ student); and, only when both
    ``student_entropy`` and ``ensemble_expected_entropy`` (each ``(n,)``) are given,
    ``entropy_mae`` = :func:`mae` between them.
    """
    s = _as_probs(student_probs, "student_probs")
    e = _as_probs(ensemble_probs, "ensemble_probs")
    _same_shape(s, e, "student_probs", "ensemble_probs")
    report = classification_report(s, labels, n_bins)
    report["kl_to_ensemble"] = kl(e, s)
    if student_entropy is not None and ensemble_expected_entropy is not None:
        se = _as_float(student_entropy, "student_entropy")
        ee = _as_float(ensemble_expected_entropy, "ensemble_expected_entropy")
        if se.shape != (s.shape[0],):
            raise ValueError(f"student_entropy must have shape ({s.shape[0]},), got {se.shape}")
        _same_shape(se, ee, "student_entropy", "ensemble_expected_entropy")
        report["entropy_mae"] = mae(se, ee)
    return report

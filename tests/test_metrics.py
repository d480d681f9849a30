"""Metrics against hand-worked cases, closed forms and identities (DESIGN §5)."""

import math

import numpy as np
import pytest
import torch

from gped.core import metrics as m

# Three examples, three classes; labels pick 0.7, 0.8 and 0.25.
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5]])
LABELS = np.array([0, 1, 0])


def random_probs(rng, shape, alpha=1.0):
    return rng.dirichlet(np.full(shape[-1], alpha), size=shape[:-1])


# ---------------------------------------------------------------- entropy


def test_entropy_closed_forms():
    for c in (2, 3, 10):
        assert m.entropy(np.full((1, c), 1.0 / c))[0] == pytest.approx(math.log(c), abs=1e-15)
    onehot = np.eye(4)
    np.testing.assert_array_equal(m.entropy(onehot), np.zeros(4))  # 0 log 0 = 0, no NaN
    assert m.entropy([[0.5, 0.5, 0.0]])[0] == pytest.approx(math.log(2), abs=1e-15)
    # -(0.7 log 0.7 + 0.2 log 0.2 + 0.1 log 0.1)
    assert m.entropy(PROBS)[0] == pytest.approx(0.8018185525433373, abs=1e-12)


def test_entropy_last_axis_any_rank():
    rng = np.random.default_rng(0)
    p = random_probs(rng, (4, 6, 5))
    h = m.entropy(p)
    assert h.shape == (4, 6)
    np.testing.assert_allclose(h[2], m.entropy(p[2]), rtol=0, atol=0)


# ---------------------------------------------------------------- classification metrics


def test_nll_hand_worked():
    # -(log 0.7 + log 0.8 + log 0.25) / 3 = (0.356675 + 0.223144 + 1.386294) / 3
    expected = -(math.log(0.7) + math.log(0.8) + math.log(0.25)) / 3
    assert m.nll(PROBS, LABELS) == pytest.approx(expected, abs=1e-15)
    assert expected == pytest.approx(0.655371, abs=1e-6)


def test_nll_is_finite_at_zero_probability():
    # the true class got probability 0: clipped at eps, so the example costs -log(eps)
    assert m.nll([[1.0, 0.0]], [1]) == pytest.approx(-math.log(m.EPS))
    assert m.nll([[1.0, 0.0]], [1], eps=1e-6) == pytest.approx(-math.log(1e-6))


def test_accuracy_hand_worked():
    assert m.accuracy(PROBS, LABELS) == pytest.approx(2 / 3)  # third row predicts class 2


def test_brier_hand_worked():
    # row 0: 0.3² + 0.2² + 0.1² = 0.14; row 1: 0.1² + 0.2² + 0.1² = 0.06;
    # row 2: 0.75² + 0.25² + 0.5² = 0.875; mean = 1.075 / 3
    assert m.brier(PROBS, LABELS) == pytest.approx(1.075 / 3, abs=1e-15)
    assert m.brier(np.eye(3), [0, 1, 2]) == 0.0
    assert m.brier(np.eye(3), [1, 2, 0]) == 2.0  # the maximum


# Four binary examples, 5 bins with edges 0, .2, .4, .6, .8, 1:
#   [0.9, 0.1]   y=0  conf 0.90 correct  -> bin (0.8, 1]
#   [0.7, 0.3]   y=1  conf 0.70 wrong    -> bin (0.6, 0.8]
#   [0.35, 0.65] y=1  conf 0.65 correct  -> bin (0.6, 0.8]
#   [0.95, 0.05] y=0  conf 0.95 correct  -> bin (0.8, 1]
# bin (0.6, 0.8]: mean conf 0.675, acc 0.5 -> gap 0.175, weight 2/4
# bin (0.8, 1]:   mean conf 0.925, acc 1.0 -> gap 0.075, weight 2/4
# ECE = 0.5 * 0.175 + 0.5 * 0.075 = 0.125
ECE_PROBS = np.array([[0.9, 0.1], [0.7, 0.3], [0.35, 0.65], [0.95, 0.05]])
ECE_LABELS = np.array([0, 1, 1, 0])


def test_ece_hand_worked():
    assert m.ece(ECE_PROBS, ECE_LABELS, n_bins=5) == pytest.approx(0.125, abs=1e-15)


def test_reliability_hand_worked():
    r = m.reliability(ECE_PROBS, ECE_LABELS, n_bins=5)
    np.testing.assert_array_equal(r.count, [0, 0, 0, 2, 2])
    np.testing.assert_allclose(r.confidence[3:], [0.675, 0.925], atol=1e-15)
    np.testing.assert_allclose(r.accuracy[3:], [0.5, 1.0], atol=1e-15)
    assert np.isnan(r.confidence[:3]).all() and np.isnan(r.accuracy[:3]).all()
    np.testing.assert_allclose(r.edges, np.linspace(0, 1, 6))


def test_ece_zero_when_perfectly_calibrated_and_bins_cover_all():
    # confidence 0.75 in one bin, 3 of 4 correct -> ECE 0
    p = np.tile([0.75, 0.25], (4, 1))
    assert m.ece(p, [0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-15)
    r = m.reliability(p, [0, 0, 0, 1], n_bins=15)
    assert r.count.sum() == 4


def test_ece_rejects_bad_bins():
    with pytest.raises(ValueError):
        m.ece(ECE_PROBS, ECE_LABELS, n_bins=0)


# ---------------------------------------------------------------- KL, MAE


def test_kl_hand_worked():
    # KL([.5,.5] || [.25,.75]) = .5 log 2 + .5 log(2/3) = .5 log(4/3)
    # KL([1, 0] || [.5,.5])    = log 2   (the 0 log 0 term of p vanishes)
    p = np.array([[0.5, 0.5], [1.0, 0.0]])
    q = np.array([[0.25, 0.75], [0.5, 0.5]])
    expected = (0.5 * math.log(4 / 3) + math.log(2)) / 2
    assert m.kl(p, q) == pytest.approx(expected, abs=1e-15)


def test_kl_self_is_zero_and_nonnegative_random():
    rng = np.random.default_rng(1)
    for alpha in (0.05, 1.0, 10.0):  # small alpha: many near-zero entries
        p = random_probs(rng, (200, 10), alpha)
        q = random_probs(rng, (200, 10), alpha)
        assert m.kl(p, p) == pytest.approx(0.0, abs=1e-12)
        assert m.kl(p, q) >= 0.0
    p = np.array([[0.0, 0.3, 0.7]])
    assert m.kl(p, p) == 0.0


def test_kl_finite_when_q_has_zero_where_p_does_not():
    # .5 log(.5 / 1) + .5 log(.5 / eps) = log .5 - .5 log eps
    v = m.kl([[0.5, 0.5]], [[1.0, 0.0]])
    assert v == pytest.approx(math.log(0.5) - 0.5 * math.log(m.EPS), abs=1e-12)


def test_mae():
    assert m.mae([0.0, 1.0, 2.0], [1.0, 1.0, 0.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        m.mae([0.0, 1.0], [0.0, 1.0, 2.0])


# ---------------------------------------------------------------- ensemble uncertainties


def test_mutual_information_is_total_minus_expected_and_nonnegative():
    rng = np.random.default_rng(2)
    for alpha in (0.1, 1.0, 5.0):
        members = random_probs(rng, (7, 50, 5), alpha)  # S=7 members, n=50, C=5
        mean = members.mean(axis=0)
        ee = m.expected_entropy(members)
        total = m.total_uncertainty(mean)
        mi = m.knowledge_uncertainty(mean, ee)
        np.testing.assert_allclose(ee, m.entropy(members).mean(axis=0), atol=1e-15)
        np.testing.assert_allclose(mi, total - ee, atol=1e-15)
        assert (mi >= -1e-12).all()  # Jensen
        assert mi.max() > 1e-3  # and not trivially zero


def test_mutual_information_zero_when_members_agree():
    rng = np.random.default_rng(3)
    one = random_probs(rng, (20, 4))
    members = np.broadcast_to(one, (5, 20, 4))
    mi = m.knowledge_uncertainty(members.mean(axis=0), m.expected_entropy(members))
    np.testing.assert_allclose(mi, 0.0, atol=1e-12)


def test_knowledge_uncertainty_shape_mismatch():
    with pytest.raises(ValueError):
        m.knowledge_uncertainty(PROBS, np.zeros(4))


# ---------------------------------------------------------------- OOD AUROC


def test_auroc_separated_and_reversed():
    assert m.auroc([0.0, 1.0, 2.0], [3.0, 4.0]) == 1.0
    assert m.auroc([3.0, 4.0], [0.0, 1.0, 2.0]) == 0.0


def test_auroc_equals_mann_whitney_u():
    s_in = np.array([0.1, 0.4, 0.35, 0.8])
    s_out = np.array([0.3, 0.8, 0.9])
    # pairs with out > in, ties count 1/2:
    #   0.3 beats 0.1                         -> 1
    #   0.8 beats 0.1, 0.4, 0.35; ties 0.8    -> 3.5
    #   0.9 beats all four                    -> 4
    # U = 8.5, n_in * n_out = 12
    assert m.auroc(s_in, s_out) == pytest.approx(8.5 / 12, abs=1e-15)
    diff = s_out[:, None] - s_in[None, :]
    u = (diff > 0).sum() + 0.5 * (diff == 0).sum()
    assert u == 8.5


def test_auroc_chance_for_identical_distributions():
    rng = np.random.default_rng(4)
    n1, n2 = 2000, 1500
    a = m.auroc(rng.normal(size=n1), rng.normal(size=n2))
    sd = math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))  # null sd of AUROC, ≈ 0.0099 here
    assert abs(a - 0.5) < 4 * sd


def test_roc_curve_points():
    s_in = np.array([0.1, 0.4, 0.35, 0.8])
    s_out = np.array([0.3, 0.8, 0.9])
    fpr, tpr, thr = m.roc_curve_points(s_in, s_out)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(m.auroc(s_in, s_out))


def test_auroc_rejects_bad_scores():
    with pytest.raises(ValueError):
        m.auroc([], [1.0])
    with pytest.raises(ValueError):
        m.auroc([0.0, np.nan], [1.0])
    with pytest.raises(ValueError):
        m.auroc(np.zeros((2, 2)), [1.0])


# ---------------------------------------------------------------- nDCG


def test_ndcg_is_one_for_the_reference_ranking():
    rng = np.random.default_rng(5)
    ref = rng.random(100)
    assert m.ndcg_at_k(ref, ref) == pytest.approx(1.0)
    # only the order of the prediction matters
    assert m.ndcg_at_k(ref, np.exp(3 * ref) - 7) == pytest.approx(1.0)


def test_ndcg_hand_worked():
    # reference relevances [3, 2, 1, 0]; the prediction ranks item 3 first, then item 2.
    # DCG@2 = 0/log2(2) + 1/log2(3); IDCG@2 = 3/log2(2) + 2/log2(3)
    expected = (1 / math.log2(3)) / (3 + 2 / math.log2(3))
    got = m.ndcg_at_k([3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], k=2)
    assert got == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.148041, abs=1e-6)


def test_ndcg_reference_must_be_nonnegative():
    with pytest.raises(ValueError):
        m.ndcg_at_k([-0.5, 1.0, 2.0], [0.0, 1.0, 2.0])
    # a rounding-level negative mutual information is accepted as 0
    assert m.ndcg_at_k([-1e-17, 1.0, 2.0], [0.0, 1.0, 2.0]) == pytest.approx(1.0)


def test_ranking_ndcg_reproducible_and_bounded():
    rng = np.random.default_rng(6)
    ref = rng.random(400)
    pred = ref + 0.3 * rng.random(400)
    a = m.ranking_ndcg(ref, pred, k=20, subset=100, draws=50, seed=11)
    b = m.ranking_ndcg(ref, pred, k=20, subset=100, draws=50, seed=11)
    c = m.ranking_ndcg(ref, pred, k=20, subset=100, draws=50, seed=12)
    assert a == b
    assert a != c
    mean, sd = a
    assert 0.0 < mean < 1.0 and sd > 0.0
    assert m.ranking_ndcg(ref, ref, draws=20) == pytest.approx((1.0, 0.0))


def test_ranking_ndcg_matches_the_protocol():
    rng = np.random.default_rng(7)
    ref, pred = rng.random(150), rng.random(150)
    draw_rng = np.random.default_rng(3)
    by_hand = []
    for _ in range(10):
        idx = draw_rng.choice(150, size=100, replace=False)
        by_hand.append(m.ndcg_at_k(ref[idx], pred[idx], k=20))
    mean, sd = m.ranking_ndcg(ref, pred, draws=10, seed=3)
    assert mean == pytest.approx(np.mean(by_hand)) and sd == pytest.approx(np.std(by_hand))


def test_ranking_ndcg_rejects_bad_arguments():
    ref = np.random.default_rng(8).random(50)
    with pytest.raises(ValueError):
        m.ranking_ndcg(ref, ref, subset=100)  # more than there are
    with pytest.raises(ValueError):
        m.ranking_ndcg(ref, ref[:40], subset=20)
    with pytest.raises(ValueError):
        m.ranking_ndcg(ref, ref, subset=20, draws=0)
    with pytest.raises(ValueError):
        m.ranking_ndcg(ref, ref, subset=20, k=0)


# ---------------------------------------------------------------- reports


def test_classification_report():
    r = m.classification_report(PROBS, LABELS)
    assert set(r) == {"nll", "accuracy", "ece", "brier"}
    assert all(type(v) is float for v in r.values())
    assert r["nll"] == m.nll(PROBS, LABELS) and r["brier"] == m.brier(PROBS, LABELS)


def test_distillation_report():
    rng = np.random.default_rng(9)
    ens = random_probs(rng, (30, 4))
    stu = random_probs(rng, (30, 4))
    y = rng.integers(0, 4, size=30)
    r = m.distillation_report(stu, ens, y)
    assert set(r) == {"nll", "accuracy", "ece", "brier", "kl_to_ensemble"}
    assert r["nll"] == m.nll(stu, y) and r["kl_to_ensemble"] == m.kl(ens, stu)
    h_s, h_e = rng.random(30), rng.random(30)
    r = m.distillation_report(stu, ens, y, student_entropy=h_s, ensemble_expected_entropy=h_e)
    assert r["entropy_mae"] == m.mae(h_s, h_e)
    # one entropy alone: no entropy_mae
    assert "entropy_mae" not in m.distillation_report(stu, ens, y, student_entropy=h_s)
    with pytest.raises(ValueError):
        m.distillation_report(stu, ens[:20], y)
    with pytest.raises(ValueError):
        m.distillation_report(stu, ens, y, student_entropy=h_s[:10], ensemble_expected_entropy=h_e[:10])


# ---------------------------------------------------------------- inputs


def test_torch_inputs_match_numpy():
    p32 = torch.tensor(PROBS, dtype=torch.float32, requires_grad=True)
    y = torch.tensor(LABELS)
    assert m.nll(p32, y) == pytest.approx(m.nll(PROBS, LABELS), rel=1e-6)
    assert m.brier(p32.to(torch.bfloat16), y) == pytest.approx(m.brier(PROBS, LABELS), abs=1e-2)
    np.testing.assert_allclose(m.entropy(p32), m.entropy(PROBS), rtol=1e-6)
    assert m.entropy(p32).dtype == np.float64
    assert m.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0])) == 1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: m.nll(PROBS, LABELS[:2]),
        lambda: m.accuracy(PROBS, LABELS[:, None]),
        lambda: m.brier(PROBS[0], LABELS[:1]),
        lambda: m.ece(PROBS, np.array([0, 1])),
        lambda: m.kl(PROBS, PROBS[:2]),
        lambda: m.kl(PROBS, PROBS[:, :2] / PROBS[:, :2].sum(1, keepdims=True)),
        lambda: m.ndcg_at_k([1.0, 2.0, 3.0], [1.0, 2.0]),
        lambda: m.total_uncertainty(PROBS[0]),
        lambda: m.expected_entropy(PROBS),
    ],
)
def test_shape_mismatch_raises(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "probs, labels",
    [
        ([[0.6, 0.6]], [0]),  # rows do not sum to 1
        ([[1.5, -0.5]], [0]),  # outside [0, 1]
        ([[np.nan, 1.0]], [0]),
        ([[0.5, 0.5]], [2]),  # label out of range
        ([[0.5, 0.5]], [-1]),
        ([[0.5, 0.5]], [0.5]),  # not an integer
        (np.zeros((0, 3)), np.zeros(0, int)),  # empty
    ],
)
def test_bad_inputs_raise(probs, labels):
    with pytest.raises(ValueError):
        m.nll(probs, labels)

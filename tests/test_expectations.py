"""Expectations, estimators, the distiller and the ensemble accumulator against closed forms."""

import math

import pytest
import torch

from gped.config import StudentConfig, ModelConfig
from gped.core.distill import Distiller, EnsembleAccumulator
from gped.core.estimators import ESTIMATORS
from gped.core.expectations import EXPECTATIONS, Expectation, entropy_of, get_expectation, register_expectation, resolve
from gped.errors import ConfigError

torch.set_num_threads(1)


def random_logits(samples=50, batch=8, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(samples, batch, classes, generator=gen, dtype=torch.float64)


def test_statistics_closed_forms():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1e-40, 1e-40]], dtype=torch.float64))
    p = get_expectation("predictive").statistic(logits)
    assert torch.allclose(p, torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]], dtype=torch.float64))
    h = get_expectation("expected_entropy").statistic(logits).squeeze(-1)
    assert h[0].item() == pytest.approx(1.5 * math.log(2))  # −(½ log ½ + 2·¼ log ¼)
    assert h[1].item() == pytest.approx(0.0, abs=1e-12)
    v = get_expectation("class_variance").statistic(logits)
    assert torch.allclose(v[0], torch.tensor([0.25, 0.1875, 0.1875], dtype=torch.float64))


def test_mutual_information_identity_and_nonnegative():
    logits = random_logits()
    probs = torch.softmax(logits, -1)
    mean_p = probs.mean(0)
    expected_h = entropy_of(probs).mean(0)
    total = entropy_of(mean_p)
    mi = get_expectation("mutual_information").derive({"predictive": mean_p, "expected_entropy": expected_h.unsqueeze(-1)})
    assert torch.allclose(mi.squeeze(-1), total - expected_h)
    assert torch.all(total - expected_h >= -1e-12)  # Jensen: entropy is concave
    # identical members: no knowledge uncertainty
    same = torch.softmax(logits[:1].expand(10, -1, -1), -1)
    assert torch.allclose(entropy_of(same.mean(0)), entropy_of(same).mean(0))


@pytest.mark.parametrize("name", ["predictive", "expected_entropy", "class_variance"])
def test_loss_is_minimal_at_its_target(name):
    """Minimise ℓ(t, ·) over the raw head output by gradient descent: the prediction reaches t."""
    exp = get_expectation(name)
    logits = random_logits(samples=1, batch=4, classes=3)[0]
    target = exp.statistic(logits)
    raw = torch.zeros_like(target, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.05)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.998)  # absolute-error losses need a shrinking step
    for _ in range(3000):
        opt.zero_grad()
        exp.loss(target, raw).sum().backward()
        opt.step()
        decay.step()
    assert torch.allclose(exp.predict(raw.detach()), target, atol=2e-3)
    # and no perturbation of the exact optimum (predict⁻¹(t)) lowers the loss
    inverse = {"predictive": torch.log, "expected_entropy": torch.log, "class_variance": torch.logit}[name]
    optimum = inverse(target)
    best = exp.loss(target, optimum)
    for k in range(5):
        bumped = optimum + 0.1 * torch.randn(raw.shape, generator=torch.Generator().manual_seed(k), dtype=raw.dtype)
        assert torch.all(exp.loss(target, bumped) >= best - 1e-6)


def test_predictive_loss_equals_entropy_at_target():
    target = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    loss = get_expectation("predictive").loss(target, torch.log(target))
    assert loss.item() == pytest.approx(entropy_of(target).item())


def test_online_estimator_equals_batch_monte_carlo_mean():
    logits = random_logits(samples=40, batch=6)
    stat = get_expectation("predictive").statistic
    est = ESTIMATORS["online"](num_examples=10, dim=5)
    gen = torch.Generator().manual_seed(1)
    history = {i: [] for i in range(10)}
    for s in range(40):
        idx = torch.randperm(10, generator=gen)[:6]
        values = stat(logits[s])
        targets = est.update(idx, values)
        for row, i in enumerate(idx.tolist()):
            history[i].append(values[row])
            assert torch.allclose(targets[row], torch.stack(history[i]).mean(0).to(targets.dtype), atol=1e-6)
    assert est.counts.tolist() == [len(history[i]) for i in range(10)]


def test_single_estimator_returns_current_sample_and_online_state_roundtrip():
    values = torch.rand(3, 2)
    idx = torch.tensor([0, 2, 4])
    assert torch.equal(ESTIMATORS["single"](5, 2).update(idx, values), values)
    a = ESTIMATORS["online"](5, 2)
    a.update(idx, values)
    b = ESTIMATORS["online"](5, 2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.update(idx, values), b.update(idx, values))
    with pytest.raises(ValueError):
        a.update(torch.tensor([1, 1]), torch.rand(2, 2))


def test_user_defined_expectation_plugs_into_a_student():
    @register_expectation("max_prob_test")
    class MaxProb(Expectation):
        def dim(self, c):
            return 1

        def statistic(self, logits):
            return torch.softmax(logits, -1).amax(-1, keepdim=True)

        def predict(self, raw):
            return torch.sigmoid(raw)

        def loss(self, target, raw):
            return (target - torch.sigmoid(raw)).abs().sum(-1)

    try:
        cfg = StudentConfig(expectations=["max_prob_test", "mutual_information"], model=ModelConfig(arch="linear"))
        cfg.validate()
        d = Distiller(cfg, (1, 2, 2), 3, num_distill=8)
        assert set(d.model.heads) == {"max_prob_test", "predictive", "expected_entropy"}
        x = torch.randn(8, 1, 2, 2)
        losses = d.observe(x, torch.arange(8), torch.randn(8, 3))
        assert set(losses) == {"max_prob_test", "predictive", "expected_entropy"}
        preds = d.predict(x)
        assert preds["mutual_information"].shape == (8, 1) and torch.all(preds["mutual_information"] >= 0)
    finally:
        del EXPECTATIONS["max_prob_test"]


def test_resolve_and_unknown():
    assert resolve(["mutual_information"]) == ["predictive", "expected_entropy"]
    assert resolve(["expected_entropy", "predictive", "mutual_information"]) == ["expected_entropy", "predictive"]
    with pytest.raises(ConfigError, match="unknown expectation"):
        resolve(["nope"])


def test_distiller_learns_a_fixed_teacher_and_resumes_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=gen)
    w = torch.randn(16, 3, generator=gen)
    logits = x.flatten(1) @ w
    cfg = StudentConfig(expectations=["predictive", "expected_entropy"], model=ModelConfig(arch="mlp", k1=0.1, k2=0.1), lr=1e-2, seed=3)
    d = Distiller(cfg, (1, 4, 4), 3, num_distill=64)
    first = None
    for step in range(300):
        idx = torch.randperm(64, generator=gen)[:16]
        losses = d.observe(x[idx], idx, logits[idx])
        first = first or losses
        if step == 150:
            twin = Distiller(cfg, (1, 4, 4), 3, num_distill=64)
            twin.load_state_dict(d.state_dict())
            twin_gen = torch.Generator()
            twin_gen.set_state(gen.get_state())
    assert losses["expected_entropy"] < 0.3 * first["expected_entropy"]
    # the predictive cross-entropy falls towards its floor H[t]
    floor = entropy_of(torch.softmax(logits, -1)).mean().item()
    assert losses["predictive"] - floor < 0.3 * (first["predictive"] - floor)


def test_ensemble_accumulator_moments():
    logits = random_logits(samples=30, batch=4, classes=3)
    acc = EnsembleAccumulator(4, 3)
    for s in range(30):
        acc.add(logits[s])
    probs = torch.softmax(logits, -1)
    assert torch.allclose(acc.predictive, probs.mean(0))
    assert torch.allclose(acc.expected_entropy, entropy_of(probs).mean(0))
    assert torch.allclose(acc.mutual_information, entropy_of(probs.mean(0)) - entropy_of(probs).mean(0))

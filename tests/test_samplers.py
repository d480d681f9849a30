"""Statistical tests of the samplers against targets with known answers (DESIGN §5).

Many independent chains run side by side as one [K, d] parameter tensor, so the final states are
K independent draws and Monte Carlo tolerances follow from K alone.
"""

import math

import numpy as np
import pytest
import torch

from gped.config import SamplerConfig
from gped.core.chain import TeacherChain, seeded_generator
from gped.core.samplers import SAMPLERS

torch.set_num_threads(1)

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
PRECISION = torch.linalg.inv(SIGMA)


def run_gaussian(name, step_size, chains=4000, steps=3000, **options):
    theta = torch.zeros(chains, 2, dtype=torch.float64, requires_grad=True)
    sampler = SAMPLERS[name]([theta], step_size=step_size, generator=seeded_generator(0), **options)
    for _ in range(steps):
        theta.grad = (theta.detach() - MU) @ PRECISION  # ∇U for U = ½(θ−μ)ᵀΣ⁻¹(θ−μ)
        sampler.step()
    return theta.detach()


def sgld_stationary_covariance(step_size):
    """Exact stationary covariance of the SGLD recursion θ' = Aθ + c + √η z, A = I − (η/2)Σ⁻¹:
    S = A S Aᵀ + η I, solved by fixed-point iteration (the discretisation bias is then known)."""
    a = np.eye(2) - 0.5 * step_size * PRECISION.numpy()
    s = np.eye(2)
    for _ in range(100_000):
        s_new = a @ s @ a.T + step_size * np.eye(2)
        if np.abs(s_new - s).max() < 1e-14:
            break
        s = s_new
    return torch.tensor(s)


def test_sgld_gaussian_mean_and_covariance():
    eta = 0.02
    samples = run_gaussian("sgld", eta)
    k = len(samples)
    exact = sgld_stationary_covariance(eta)
    # the recursion's own bias is small (≈ ηλ/4) and is what SGLD is expected to have
    assert torch.allclose(exact, SIGMA, rtol=0.05, atol=0.02)
    mean = samples.mean(0)
    # Monte Carlo: sd of the mean is sqrt(S_ii / K); allow 4 sd
    assert torch.all((mean - MU).abs() < 4 * torch.sqrt(torch.diag(exact) / k))
    cov = torch.cov(samples.T)
    # sd of a sample covariance entry ≈ sqrt((S_ij² + S_ii S_jj) / K); allow 4 sd
    sd = torch.sqrt((exact**2 + torch.outer(torch.diag(exact), torch.diag(exact))) / k)
    assert torch.all((cov - exact).abs() < 4 * sd), (cov, exact)


def test_sgld_temperature_scales_covariance():
    eta = 0.02
    theta = torch.zeros(4000, 2, dtype=torch.float64, requires_grad=True)
    sampler = SAMPLERS["sgld"]([theta], step_size=eta, temperature=0.25, generator=seeded_generator(1))
    for _ in range(3000):
        theta.grad = (theta.detach() - MU) @ PRECISION
        sampler.step()
    cov = torch.cov(theta.detach().T)
    expected = 0.25 * sgld_stationary_covariance(eta)
    sd = torch.sqrt((expected**2 + torch.outer(torch.diag(expected), torch.diag(expected))) / 4000)
    assert torch.all((cov - expected).abs() < 4 * sd)


def test_sghmc_gaussian_moments():
    samples = run_gaussian("sghmc", step_size=0.005, friction=0.2)
    k = len(samples)
    mean, cov = samples.mean(0), torch.cov(samples.T)
    assert torch.all((mean - MU).abs() < 4 * torch.sqrt(torch.diag(SIGMA) / k))
    # SGHMC's discretisation bias is O(η); with η = 0.005 it stays within a few percent
    assert torch.allclose(cov, SIGMA, rtol=0.08, atol=0.03), cov


def test_prior_only_chain_samples_the_prior():
    """With no likelihood gradient, SGLD with prior precision τ samples N(0, 1/τ)."""
    theta = torch.zeros(4000, 1, dtype=torch.float64, requires_grad=True)
    tau, eta = 4.0, 0.01
    sampler = SAMPLERS["sgld"]([theta], step_size=eta, prior_precision=tau, generator=seeded_generator(2))
    for _ in range(2000):
        theta.grad = torch.zeros_like(theta)
        sampler.step()
    var = theta.detach().var().item()
    exact = 1.0 / (tau * (1 - eta * tau / 4))  # stationary variance of the discretised recursion
    assert abs(var - exact) < 4 * exact * math.sqrt(2 / 4000)


# --- Bayesian logistic regression against a grid-integrated posterior -----------------------

def blr_data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, generator=gen, dtype=torch.float64)
    p = torch.sigmoid(1.5 * x - 0.5)
    y = (torch.rand(30, generator=gen, dtype=torch.float64) < p).double()
    return x, y


def grid_predictive(x, y, tau, x_star):
    """p(y*=1|x*, D) = ∫ σ(w x* + b) p(w, b | D) dw db on a dense grid (posterior normalised on it)."""
    w = torch.linspace(-4, 7, 501, dtype=torch.float64)
    b = torch.linspace(-5, 4, 451, dtype=torch.float64)
    ww, bb = torch.meshgrid(w, b, indexing="ij")
    z = ww[..., None] * x + bb[..., None]
    loglik = (y * torch.nn.functional.logsigmoid(z) + (1 - y) * torch.nn.functional.logsigmoid(-z)).sum(-1)
    logpost = loglik - 0.5 * tau * (ww**2 + bb**2)
    post = torch.softmax(logpost.flatten(), 0).reshape(ww.shape)
    assert post[0].sum() + post[-1].sum() + post[:, 0].sum() + post[:, -1].sum() < 1e-6  # grid covers the mass
    return torch.stack([(post * torch.sigmoid(ww * xs + bb)).sum() for xs in x_star])


@pytest.mark.parametrize("minibatch", [None, 10])
def test_sgld_blr_matches_grid_posterior_predictive(minibatch):
    x, y = blr_data()
    n, tau, eta, chains = len(x), 1.0, 0.01, 2000
    x_star = torch.tensor([-2.0, 0.0, 0.7, 2.5], dtype=torch.float64)
    expected = grid_predictive(x, y, tau, x_star)
    gen = seeded_generator(4)
    batch_gen = seeded_generator(5)
    theta = torch.zeros(chains, 2, dtype=torch.float64, requires_grad=True)  # columns: w, b
    sampler = SAMPLERS["sgld"]([theta], step_size=eta, prior_precision=tau, generator=gen)
    predictive = torch.zeros(len(x_star), dtype=torch.float64)
    kept = 0
    for step in range(3000):
        if minibatch is None:
            xb, yb, scale = x.expand(chains, n), y.expand(chains, n), 1.0
        else:
            idx = torch.randint(0, n, (chains, minibatch), generator=batch_gen)
            xb, yb, scale = x[idx], y[idx], n / minibatch
        z = theta[:, :1] * xb + theta[:, 1:]
        nll = -(yb * torch.nn.functional.logsigmoid(z) + (1 - yb) * torch.nn.functional.logsigmoid(-z)).sum() * scale
        theta.grad = None
        nll.backward()
        sampler.step()
        if step >= 1000 and step % 100 == 0:
            with torch.no_grad():
                predictive += torch.sigmoid(theta[:, :1] * x_star + theta[:, 1:]).mean(0)
            kept += 1
    predictive /= kept
    # 20 × 2000 near-independent draws of a quantity in [0, 1]: MC sd ≤ 0.5/sqrt(2000·20·ρ), ρ ≥ 1/5;
    # SGLD's discretisation / minibatch-noise bias at η = 0.01 is below 0.01 on these points
    tol = 0.02 if minibatch is None else 0.03
    assert torch.allclose(predictive, expected, atol=tol), (predictive, expected)


# --- the teacher chain: exact continuation ---------------------------------------------------

def tiny_chain(seed=0):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 2, 2, generator=gen)
    y = (x.flatten(1).sum(1) > 0).long()
    torch.manual_seed(seed)
    from gped.core.models import build_teacher

    model = build_teacher("mlp", (1, 2, 2), 2, k1=0.05, k2=0.05)
    cfg = SamplerConfig(step_size=1e-3, batch_size=16, burn_in=5, thin=3, steps=100, seed=seed)
    return TeacherChain(model, x, y, cfg)


def flat(chain):
    return torch.cat([p.detach().flatten() for p in chain.model.parameters()])


@pytest.mark.parametrize("name", ["sgld", "sghmc"])
def test_chain_resume_is_exact(name):
    a = tiny_chain()
    a.cfg.name = name
    a.__init__(a.model, a.x, a.y, a.cfg)
    for _ in range(13):
        a.advance()
    state = a.state_dict()
    b = tiny_chain(seed=0)
    b.cfg.name = name
    b.__init__(b.model, b.x, b.y, b.cfg)
    b.load_state_dict(state)
    for _ in range(20):
        a.advance()
        b.advance()
    assert torch.equal(flat(a), flat(b))
    assert a.step == b.step == 33


def test_chain_sample_schedule():
    chain = tiny_chain()
    samples = []
    for _ in range(20):
        chain.advance()
        if chain.is_sample():
            samples.append((chain.step, chain.sample_id))
    assert samples == [(6, 0), (9, 1), (12, 2), (15, 3), (18, 4)]  # t > B=5 and t mod H=3 == 0

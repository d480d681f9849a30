"""Downstream tasks: OOD AUROC and nDCG ranking on a finished run; EnD²'s Dirichlet uncertainties."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gped.api import dirichlet_uncertainties
from gped.cli import main
from gped.config import load_config
from gped.core.expectations import entropy_of
from gped.reference import run_reference


def test_dirichlet_uncertainties_match_monte_carlo():
    alpha = torch.tensor([[2.0, 1.0, 0.5], [20.0, 20.0, 20.0], [0.3, 0.3, 0.3]], dtype=torch.float64)
    got = dirichlet_uncertainties(alpha)
    gen = torch.Generator().manual_seed(0)
    for i, a in enumerate(alpha):
        samples = torch.distributions.Dirichlet(a).sample((200_000,))
        expected_entropy = entropy_of(samples).mean().item()
        # MC sd of a mean of 200k entropies (each bounded by log 3) is below 0.003
        assert got["dirichlet_expected_entropy"][i] == pytest.approx(expected_entropy, abs=0.01)
        assert got["dirichlet_total"][i] == pytest.approx(entropy_of(a / a.sum()).item())
    assert np.all(got["dirichlet_knowledge"] >= 0)
    # a sharp, symmetric Dirichlet has little knowledge uncertainty; a flat one a lot
    assert got["dirichlet_knowledge"][1] < 0.05 < got["dirichlet_knowledge"][2]


@pytest.mark.slow
def test_evaluate_reports_ood_auroc_and_ranking(tmp_path):
    cfg = load_config(None, [
        f'run_dir="{tmp_path / "run"}"', 'data.source="digits"', "data.classes=[0,1,2,3,4]", 'data.ood_source="heldout"',
        'teacher.arch="mlp"', "teacher.k1=0.5", "teacher.k2=0.5", "sampler.step_size=5e-5", "sampler.prior_precision=10",
        "sampler.burn_in=300", "sampler.thin=4", "sampler.steps=1500",
        'students.0.name="both"', 'students.0.expectations=["predictive","expected_entropy"]', "students.0.lr=3e-3",
        "students.0.model.k1=0.5", "students.0.model.k2=0.5", "students.0.lr_halve_epochs=0",
        "coordinator.eval_every=1000",
    ])
    cfg.students.append(type(cfg.students[0])(name="end2", expectations=["dirichlet"], estimator="single", lr=3e-3,
                                              model=type(cfg.students[0].model)(arch="mlp", k1=0.5, k2=0.5), lr_halve_epochs=0))
    cfg.validate()
    run_reference(cfg, device="cpu")
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "run"), "--sgd-epochs", "10", "--draws", "50"])
    assert result.exit_code == 0, result.output
    assert "| teacher ensemble |" in result.output
    out = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    models = out["models"]
    assert out["ood_size"] > 100
    assert set(models) == {"teacher ensemble", "both", "end2", "SGD network"}
    # held-out digit classes are far from the training classes: the ensemble separates them well
    assert models["teacher ensemble"]["auroc_total"] > 0.8
    assert models["teacher ensemble"]["auroc_knowledge"] > 0.8
    for name in ("both", "end2"):
        assert 0.5 < models[name]["auroc_knowledge"] <= 1.0
        assert 0.0 < models[name]["ndcg20_total"] <= 1.0
    assert "auroc_knowledge" not in models["SGD network"]  # a point estimate has no knowledge uncertainty
    assert models["SGD network"]["accuracy"] > 0.9


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2
    assert "error:" in result.output

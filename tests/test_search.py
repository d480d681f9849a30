"""Student architecture search (gped/search.py) and group-lasso pruning (gped/core/pruning.py).

The end-to-end part runs a tiny search twice on the synthetic data set (4 classes of 1×8×8 blobs):
K1, K2 ∈ {0.1, 0.25} and one λ, one chain of 600 SGLD steps (100 posterior samples) and 20
fine-tuning steps; a few seconds each on one core.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gped
from gped.cli import main
from gped.config import StudentConfig, load_config
from gped.core.data import load_prepared
from gped.core.distill import Distiller
from gped.core.models import build_student, count_parameters
from gped.core.pruning import (
    apply_masks,
    compact,
    cost,
    group_lasso_penalty,
    group_norms,
    prune_masks,
    prunable_layers,
    units,
)
from gped.errors import ConfigError
from gped.search import SearchSpec, choose, pareto_front, parse_values, run_search

HEADS = {"predictive": 4, "expected_entropy": 1}


def tiny_config(run_dir):
    return load_config(None, [
        f'run_dir="{run_dir}"', 'data.source="synthetic"', "teacher.k1=0.25", "teacher.k2=0.25",
        "sampler.step_size=2e-4", "sampler.prior_precision=1.0", "sampler.batch_size=50", "sampler.burn_in=100",
        "sampler.thin=5", "sampler.steps=600", "sampler.distill_batch=50", "coordinator.eval_every=50",
        'students=[{name = "template", expectations = ["predictive", "expected_entropy"], lr = 3e-3, lr_halve_epochs = 0, seed = 3}]',
    ])


SPEC = dict(k1=[0.1, 0.25], k2=[0.1, 0.25], lasso=[1e-2], finetune_steps=20, latency_repeats=5)


@pytest.fixture(scope="module")
def searches(tmp_path_factory):
    """The same tiny search run twice in two run directories."""
    out = []
    for i in range(2):
        run_dir = tmp_path_factory.mktemp(f"search{i}")
        out.append(run_search(tiny_config(run_dir), SearchSpec(**SPEC), device="cpu", progress_s=1e9))
    return out


# ---------------------------------------------------------------------------------------------
# end to end


def test_search_reports_every_student_and_a_pareto_front(searches):
    result = searches[0]
    records = result["records"]
    assert [r["name"] for r in records] == [
        "grid-k1_0.1-k2_0.1", "grid-k1_0.1-k2_0.25", "grid-k1_0.25-k2_0.1", "grid-k1_0.25-k2_0.25", "pruned-0.01",
    ]
    for r in records:
        assert r["params"] > 0 and r["flops"] > 0 and r["latency_ms"] > 0
        assert math.isfinite(r["nll"]) and 0 <= r["accuracy"] <= 1 and r["entropy_mae"] >= 0
    # the tiny task is learned (4 well-separated blobs)
    assert min(r["accuracy"] for r in records) > 0.9
    # grid: units = 400·K1 + 400·K2, all kept; the pruned student starts from the largest shape
    assert records[0]["units_kept"] == records[0]["units_total"] == 80
    pruned = records[-1]
    assert pruned["k1"] == pruned["k2"] == 0.25 and pruned["lasso"] == 1e-2 and pruned["units_total"] == 200
    assert pruned["units_kept"] < 200 and pruned["params"] < records[3]["params"]
    for key in ("flops", "params"):
        assert any(r[f"pareto_{key}"] for r in records)
        # the cheapest student and the best-NLL student are always on the front
        assert min(records, key=lambda r: (r[key], r["nll"]))[f"pareto_{key}"]
        assert min(records, key=lambda r: (r["nll"], r[key]))[f"pareto_{key}"]
    assert result["chosen"]["pareto_flops"]


def test_search_writes_its_files_and_the_chosen_student_loads(searches):
    result = searches[0]
    run_dir = Path(result["run_dir"])
    records = json.loads((run_dir / "search.json").read_text())
    assert records == result["records"]
    assert set(records[0]) == {"name", "k1", "k2", "lasso", "params", "flops", "latency_ms", "nll", "accuracy",
                               "entropy_mae", "units_kept", "units_total", "pareto_flops", "pareto_params"}
    md = (run_dir / "search.md").read_text()
    assert all(r["name"] in md for r in records)
    # the plot is a valid PNG and its sidecar carries exactly the plotted records
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pareto = json.loads((run_dir / "pareto.json").read_text())
    for key in ("flops", "params"):
        points = pareto["fronts"][key]["points"]
        assert [(p["name"], p["x"], p["y"], p["on_front"]) for p in points] == [
            (r["name"], r[key], r["nll"], r[f"pareto_{key}"]) for r in records
        ]
    chosen = json.loads((run_dir / "chosen.json").read_text())["name"]
    assert chosen == result["chosen"]["name"] == pareto["chosen"]

    # every student is listed in config.json and loads; the chosen one predicts like in the search
    student = gped.load_student(run_dir, chosen)
    x = load_prepared(run_dir / "data").test_x
    out = student.predict(x[:50])
    assert out["predictive"].shape == (50, 4)
    np.testing.assert_allclose(out["predictive"].sum(1), 1, atol=1e-5)
    assert out["expected_entropy"].shape == (50,) and "mutual_information" in out
    pruned = gped.load_student(run_dir, "pruned-0.01")
    zero_rows = sum(int((layer.weight.abs().amax(1) == 0).sum()) for layer in prunable_layers(pruned.model).values())
    assert zero_rows == 200 - result["records"][-1]["units_kept"]


def test_search_is_reproducible_except_latency(searches):
    def strip(records):
        return [{k: v for k, v in r.items() if k != "latency_ms"} for r in records]

    assert strip(searches[0]["records"]) == strip(searches[1]["records"])
    assert searches[0]["chosen"]["name"] == searches[1]["chosen"]["name"]


# ---------------------------------------------------------------------------------------------
# cost: parameters and multiply-adds against hand counts


def test_cost_of_a_small_mlp_matches_a_hand_count():
    model = build_student("mlp", (1, 8, 8), HEADS, k1=0.1, k2=0.25)  # 64 → 40 → 100 → heads 4 + 1
    params = (64 * 40 + 40) + (40 * 100 + 100) + (100 * 4 + 4) + (100 * 1 + 1)
    flops = 64 * 40 + 40 * 100 + 100 * 5
    assert cost(model, (1, 8, 8)) == {"params": params, "flops": flops}
    assert count_parameters(model) == params

    # prune 10 of 40 first-layer units and 30 of 100 second-layer units
    masks = {"body.net.1": torch.arange(40) >= 10, "body.net.4": torch.arange(100) >= 30}
    params = (64 * 30 + 30) + (30 * 70 + 70) + (70 * 4 + 4) + (70 * 1 + 1)
    flops = 64 * 30 + 30 * 70 + 70 * 5
    assert cost(model, (1, 8, 8), masks) == {"params": params, "flops": flops}
    assert units(model, masks) == (100, 140)


def test_cost_of_a_small_cnn_matches_a_hand_count():
    # cnn-mnist at K1 = 0.5, K2 = 0.25 on 1×20×20: conv(5, 4×4) → 17×17 → pool 8×8 → conv(10, 4×4) → 5×5
    # → pool 2×2 → flatten 40 → FC 20 → heads 4 + 1
    model = build_student("cnn-mnist", (1, 20, 20), HEADS, k1=0.5, k2=0.25)
    params = (1 * 5 * 16 + 5) + (5 * 10 * 16 + 10) + (40 * 20 + 20) + (20 * 4 + 4) + (20 + 1)
    flops = 1 * 5 * 16 * 17 * 17 + 5 * 10 * 16 * 5 * 5 + 40 * 20 + 20 * 5
    assert cost(model, (1, 20, 20)) == {"params": params, "flops": flops}
    assert count_parameters(model) == params
    # drop 2 of 5 first channels, 4 of 10 second channels (each feeds 2×2 = 4 FC inputs), 5 of 20 FC units
    masks = {"body.net.0": torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool),
             "body.net.3": torch.arange(10) % 5 != 0, "body.net.7": torch.arange(20) >= 5}
    masks["body.net.3"][1] = masks["body.net.3"][2] = False  # 10 − {0, 5, 1, 2} = 6 kept
    params = (3 * 16 + 3) + (3 * 6 * 16 + 6) + (24 * 15 + 15) + (15 * 4 + 4) + (15 + 1)
    flops = 3 * 16 * 17 * 17 + 3 * 6 * 16 * 5 * 5 + 24 * 15 + 15 * 5
    assert cost(model, (1, 20, 20), masks) == {"params": params, "flops": flops}


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("cnn-mnist", (1, 20, 20))])
def test_compact_network_is_the_masked_network(arch, shape):
    torch.manual_seed(0)
    model = build_student(arch, shape, HEADS, k1=0.5, k2=0.25)
    masks = {name: torch.rand(layer.weight.shape[0]) > 0.4 for name, layer in prunable_layers(model).items()}
    apply_masks(model, masks)
    small = compact(model, masks)
    x = torch.rand(7, *shape)
    model.eval(), small.eval()
    big_out, small_out = model(x), small(x)
    for head in HEADS:
        torch.testing.assert_close(small_out[head], big_out[head], rtol=1e-5, atol=1e-6)
    assert count_parameters(small) == cost(model, shape, masks)["params"]
    assert cost(small, shape)["flops"] == cost(model, shape, masks)["flops"]


# ---------------------------------------------------------------------------------------------
# group lasso: value, gradient, pruning, fine-tuning


def test_group_lasso_penalty_equals_a_hand_computation():
    model = build_student("mlp", (1, 2, 2), {"predictive": 2}, k1=0.005, k2=0.005)  # 4 → 2 → 2 → head 2
    first, second = prunable_layers(model).values()
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0]]))  # norms 5, 3
        second.weight.copy_(torch.tensor([[0.0, 0.0], [6.0, 8.0]]))  # norms 0, 10
        model.heads["predictive"].weight.fill_(100.0)  # heads are not penalised
    assert float(group_lasso_penalty(model).detach()) == pytest.approx(5 + 3 + 0 + 10)

    # gradient: w/‖w‖ per non-zero row, and exactly 0 (not NaN) for the zero row
    model.zero_grad()
    group_lasso_penalty(model).backward()
    assert torch.isfinite(second.weight.grad).all()
    torch.testing.assert_close(second.weight.grad, torch.tensor([[0.0, 0.0], [0.6, 0.8]]))
    torch.testing.assert_close(first.weight.grad[0], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert model.heads["predictive"].weight.grad is None
    # a fully zero layer: value 0, gradient 0
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.zero_()
    norms = group_norms(layer)
    norms.sum().backward()
    assert norms.tolist() == [0.0, 0.0] and layer.weight.grad.abs().sum() == 0


def test_distiller_adds_the_penalty_to_its_loss():
    cfg = StudentConfig(expectations=["predictive"], model=dict_model(), group_lasso=0.5)
    distiller = Distiller(cfg, (1, 8, 8), 4, 20)
    x, logits = torch.rand(10, 1, 8, 8), torch.randn(10, 4)
    expected = float(group_lasso_penalty(distiller.model).detach())
    losses = distiller.observe(x, torch.arange(10), logits)
    assert losses["group_lasso"] == pytest.approx(expected, rel=1e-6)
    plain = Distiller(StudentConfig(expectations=["predictive"], model=dict_model()), (1, 8, 8), 4, 20)
    assert "group_lasso" not in plain.observe(x, torch.arange(10), logits)


def dict_model():
    from gped.config import ModelConfig

    return ModelConfig(arch="mlp", k1=0.05, k2=0.05)  # 20 and 20 hidden units


def test_pruning_zeroes_exactly_the_small_units_and_they_stay_zero(tmp_path):
    cfg = StudentConfig(expectations=["predictive", "expected_entropy"], model=dict_model(), lr=1e-2)
    distiller = Distiller(cfg, (1, 8, 8), 4, 20)
    first, second = prunable_layers(distiller.model).values()
    with torch.no_grad():
        first.weight[[2, 5]] *= 1e-4  # all incoming weights below 1e-3 → pruned
        first.weight[7] = 5e-4
        first.weight[7, 3] = 1e-3  # one weight at the threshold → kept
        second.weight[[0, 19]] = 0.0
    masks = prune_masks(distiller.model)
    assert torch.nonzero(~masks["body.net.1"]).flatten().tolist() == [2, 5]
    assert torch.nonzero(~masks["body.net.4"]).flatten().tolist() == [0, 19]
    before = {k: v.clone() for k, v in distiller.model.state_dict().items()}
    distiller.set_masks(masks)
    for _ in range(5):
        distiller.observe(torch.rand(10, 1, 8, 8), torch.randperm(20)[:10], torch.randn(10, 4) * 3)
    for layer, dropped in ((first, [2, 5]), (second, [0, 19])):
        assert layer.weight[dropped].abs().sum() == 0 and layer.bias[dropped].abs().sum() == 0
    # kept units did learn
    assert not torch.equal(first.weight[7], before["body.net.1.weight"][7])
    assert not torch.equal(second.weight[1:19], before["body.net.4.weight"][1:19])

    # the masks travel with the state dict and keep working after a reload
    again = Distiller(cfg, (1, 8, 8), 4, 20)
    again.load_state_dict(distiller.state_dict())
    assert set(again.masks) == set(masks) and all(torch.equal(again.masks[k], masks[k]) for k in masks)
    for _ in range(3):
        again.observe(torch.rand(10, 1, 8, 8), torch.randperm(20)[:10], torch.randn(10, 4) * 3)
    assert prunable_layers(again.model)["body.net.1"].weight[[2, 5]].abs().sum() == 0


def test_group_lasso_setting_is_validated():
    for bad in ("-1e-3", "inf", "nan"):
        with pytest.raises(ConfigError, match="group_lasso"):
            load_config(None, [f"students.0.group_lasso={bad}"])
    assert load_config(None, ["students.0.group_lasso=1e-4"]).students[0].group_lasso == 1e-4


# ---------------------------------------------------------------------------------------------
# pieces of the search


def test_pareto_front_and_choice():
    costs, nll = [1, 2, 3, 4, 2], [0.5, 0.3, 0.3, 0.1, float("nan")]
    assert pareto_front(costs, nll) == [True, True, False, True, False]
    records = [{"name": str(i), "flops": c, "params": c, "nll": l, "pareto_flops": f}
               for i, (c, l, f) in enumerate(zip(costs, nll, pareto_front(costs, nll)))]
    assert choose(records, 0.0)["name"] == "3"
    assert choose(records, 0.25)["name"] == "1"
    assert choose(records, 1.0)["name"] == "0"


@pytest.fixture
def _restore_root_logger():
    """CLI commands replace the root logger's handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_bad_search_arguments_are_clear_errors(tmp_path, _restore_root_logger):
    with pytest.raises(ConfigError, match="--k1"):
        parse_values("0.1,abc", "k1")
    with pytest.raises(ConfigError, match="--k2"):
        SearchSpec(k1=[0.1], k2=[0.0]).validate()
    with pytest.raises(ConfigError, match="--lasso"):
        SearchSpec(k1=[0.1], k2=[0.1], lasso=[-1.0]).validate()
    result = CliRunner().invoke(main, ["search", "--run-dir", str(tmp_path / "r"), "--k1", "0.1,x", "--k2", "0.1"],
                                env={"GPED_LOG_LEVEL": "WARNING"})
    assert result.exit_code == 2 and "error: --k1 must be a comma-separated list" in result.output
    cfg_only_entropy = ["--set", 'students=[{name = "e", expectations = ["expected_entropy"]}]']
    result = CliRunner().invoke(main, ["search", *cfg_only_entropy, "--run-dir", str(tmp_path / "r"), "--k1", "0.1", "--k2", "0.1"],
                                env={"GPED_LOG_LEVEL": "WARNING"})
    assert result.exit_code == 2 and "must distil 'predictive'" in result.output


def test_search_command_end_to_end(tmp_path, _restore_root_logger):
    """``gped search`` wires the options through: one grid student and one λ, a very short chain."""
    run_dir = tmp_path / "cli"
    args = ["search", "--run-dir", str(run_dir), "--k1", "0.1", "--k2", "0.1,0.1", "--lasso", "1e-2", "--finetune-steps", "5",
            "--no-equal-budget", "--device", "cpu",
            "--set", 'data.source="synthetic"', "--set", "teacher.k1=0.25", "--set", "teacher.k2=0.25",
            "--set", "sampler.step_size=2e-4", "--set", "sampler.prior_precision=1.0", "--set", "sampler.burn_in=50",
            "--set", "sampler.thin=5", "--set", "sampler.steps=200", "--set", "sampler.batch_size=50",
            "--set", 'students.0.expectations=["predictive"]']
    result = CliRunner().invoke(main, args, env={"GPED_LOG_LEVEL": "WARNING"})
    assert result.exit_code == 0, (result.output, result.exc_info)
    assert "| grid-k1_0.1-k2_0.1 |" in result.output and "Chosen:" in result.output
    records = json.loads((run_dir / "search.json").read_text())
    assert [r["name"] for r in records] == ["grid-k1_0.1-k2_0.1", "pruned-0.01"]  # duplicate K2 dropped
    assert records[0]["entropy_mae"] is None  # no expected-entropy head in this template
    states = {n: gped.load_student(run_dir, n) for n in ("grid-k1_0.1-k2_0.1", "lasso-0.01", "pruned-0.01")}
    assert states["pruned-0.01"].config.group_lasso == 0 and states["lasso-0.01"].config.group_lasso == 1e-2
    assert "did not" in (run_dir / "search.md").read_text()  # --no-equal-budget is stated

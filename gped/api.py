"""The Python API under the CLI: load what a run produced and use it.

    >>> import gped
    >>> student = gped.load_student("runs/quickstart", "predictive")
    >>> out = student.predict(images)          # numpy [N, C, H, W] or [N, H, W], values in [0, 1]
    >>> out["predictive"], out["total_uncertainty"]

A student predicts every expectation it distils; with both the predictive and the expected entropy
it also gives the knowledge uncertainty (mutual information) H[E p] − E H[p].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import RunConfig, StudentConfig, config_from_json
from .core.distill import EnsembleAccumulator
from .core.expectations import entropy_of, get_expectation, resolve
from .core.models import build_student
from .errors import GpedError


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise GpedError(f"{run_dir} is not a gped run directory (no config.json)")
    return config_from_json(path.read_text())


def data_meta(cfg: RunConfig, run_dir: str | Path) -> dict:
    folder = Path(cfg.data.prepared) if cfg.data.prepared else Path(run_dir) / "data"
    path = folder / "meta.json"
    if not path.is_file():
        raise GpedError(f"the run's prepared data description {path} is missing")
    return json.loads(path.read_text())


def dirichlet_uncertainties(alpha: torch.Tensor) -> dict[str, np.ndarray]:
    """EnD²'s uncertainties from concentrations α (α₀ = Σα): total H[α/α₀], expected data
    uncertainty E_{π~Dir(α)} H[π] = ψ(α₀+1) − Σ_c (α_c/α₀) ψ(α_c+1), knowledge = their difference."""
    a0 = alpha.sum(-1, keepdim=True)
    mean = alpha / a0
    total = entropy_of(mean)
    expected = torch.digamma(a0.squeeze(-1) + 1) - (mean * torch.digamma(alpha + 1)).sum(-1)
    return {"dirichlet_total": total.numpy(), "dirichlet_expected_entropy": expected.numpy(),
            "dirichlet_knowledge": (total - expected).clamp_min(0).numpy()}


@dataclass
class TrainedStudent:
    name: str
    config: StudentConfig
    model: torch.nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    device: torch.device

    @torch.no_grad()
    def predict(self, x, batch_size: int = 1024) -> dict[str, np.ndarray]:
        """Predictions for inputs ``x`` ([N, *input_shape] or [N, H, W] for one channel)."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if x.ndim == len(self.input_shape):  # missing channel axis
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise GpedError(f"inputs of shape {tuple(x.shape[1:])} do not fit this student, which takes {self.input_shape}")
        self.model.eval()
        heads = list(self.model.heads)
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
        alphas = []
        for i in range(0, len(x), batch_size):
            raw = self.model(x[i : i + batch_size].to(self.device))
            for h in heads:
                parts[h].append(get_expectation(h).predict(raw[h]).cpu())
            if "dirichlet" in raw:
                alphas.append(torch.exp(raw["dirichlet"].clamp(max=30)).double().cpu())
        out = {h: torch.cat(v) for h, v in parts.items()}
        result = {h: v.numpy() for h, v in out.items()}
        if alphas:
            result.update(dirichlet_uncertainties(torch.cat(alphas)))
        if "expected_entropy" in result:
            result["expected_entropy"] = result["expected_entropy"].reshape(-1)
        if "predictive" in out:
            result["total_uncertainty"] = entropy_of(out["predictive"]).numpy()
            if "expected_entropy" in out:
                result["mutual_information"] = np.clip(result["total_uncertainty"] - result["expected_entropy"], 0, None)
        return result


def load_student(run_dir: str | Path, name: str, device: str = "cpu") -> TrainedStudent:
    """The trained student ``name`` of a finished (or checkpointed) run, ready for inference."""
    cfg = load_run_config(run_dir)
    student = cfg.student(name)
    meta = data_meta(cfg, run_dir)
    input_shape, num_classes = tuple(meta["input_shape"]), int(meta["num_classes"])
    state = load_checkpoint(Path(run_dir) / "checkpoints" / f"student-{name}.pt", device)
    heads = {h: get_expectation(h).dim(num_classes) for h in resolve(student.expectations)}
    model = build_student(student.model.arch, input_shape, heads, student.model.k1, student.model.k2, student.model.dropout)
    model.load_state_dict(state["role"]["distiller"]["model"])
    model.to(device).eval()
    return TrainedStudent(name, student, model, input_shape, num_classes, torch.device(device))


def load_ensemble(run_dir: str | Path) -> dict[str, EnsembleAccumulator]:
    """The teacher ensemble's running statistics on the test set (and OOD set) of a run."""
    cfg = load_run_config(run_dir)
    meta = data_meta(cfg, run_dir)
    state = load_checkpoint(Path(run_dir) / "checkpoints" / "coordinator-coordinator.pt")["role"]
    out = {}
    for key, name in (("ensemble", "test"), ("ood_ensemble", "ood")):
        if key in state:
            acc = EnsembleAccumulator(len(state[key]["sum_entropy"]), int(meta["num_classes"]))
            acc.load_state_dict(state[key])
            out[name] = acc
    return out

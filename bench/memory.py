"""Memory: peak resident memory of every role over a run, and what makes it grow.

* per role: peak RSS (and USS/PSS — RSS counts shared library pages in every process; ``import
  torch`` alone maps hundreds of MiB) of sampler, coordinator, each student and the launcher over
  a distributed run, and of the single reference process (measured by :mod:`bench.end_to_end`);
* number of students: the whole run's memory with k students attached (measured by
  :mod:`bench.sampler_throughput`);
* distillation-set size: a U_o table (:class:`gped.core.estimators.OnlineAverage`, N′ × dim float32
  means + N′ int64 counts, per expectation) built and touched in this process for growing N′,
  next to the distillation inputs every role that holds D′ keeps (N′ × input floats);
* model size: a student (:class:`gped.core.distill.Distiller`: weights, gradients, Adam's two
  moments) after one step, for growing width multipliers, and the teacher's parameter snapshot
  (what params mode sends per posterior sample).

U_o tables are measured as RSS deltas with every table kept alive (allocations only grow, so the
deltas are not blurred by freed memory being reused), next to the bytes they should take; models
are small enough that the allocator blurs RSS deltas, so their live tensors are counted instead.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import mib, rss_bytes, table, write_json


@dataclass(frozen=True)
class MemorySettings:
    #: distillation-set sizes N' for the U_o tables
    distill_sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    #: expectation widths: C = 10 (predictive) and 1 (expected entropy)
    dims: tuple[int, ...] = (10, 1)
    #: student width multipliers k1 = k2
    widths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    #: input shapes for the models: the quickstart's 8x8 digits and MNIST's 28x28
    inputs: tuple[tuple[int, int, int], ...] = ((1, 8, 8), (1, 28, 28))


PRESETS = {
    "tiny": MemorySettings(distill_sizes=(1_000, 10_000), dims=(10,), widths=(0.5, 1.0), inputs=((1, 8, 8),)),
    "quick": MemorySettings(),
    "full": MemorySettings(distill_sizes=(1_000, 10_000, 60_000, 100_000, 1_000_000, 5_000_000), widths=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0)),
}

#: D' of the paper's data sets (N', input floats) for the "inputs every role holds" column
DATASETS = {"digits (quickstart)": (1_348, 64), "MNIST": (60_000, 784), "CIFAR10": (50_000, 3 * 32 * 32)}


def estimator_growth(settings: MemorySettings) -> list[dict[str, Any]]:
    """Measured in a fresh process: one that has freed memory before would hand it out again
    without its RSS growing, and the deltas would read zero."""
    import json
    import subprocess
    import sys

    from .common import REPO, bench_env

    out = subprocess.run([sys.executable, "-m", "bench.memory", "--estimator-child", json.dumps(asdict(settings))],
                         cwd=REPO, env=bench_env(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _estimator_growth_here(settings: MemorySettings) -> list[dict[str, Any]]:
    import torch

    from gped.core.estimators import OnlineAverage

    warm = OnlineAverage(100, 10)  # the first torch ops in a process allocate pools; keep them out
    warm.update(torch.arange(10), torch.rand(10, 10))
    keep = [warm]
    rows = []
    for dim in settings.dims:
        for n in settings.distill_sizes:
            gc.collect()
            before = rss_bytes()
            table_ = OnlineAverage(n, dim)
            table_.means.fill_(0.5)  # a long run touches every row; zeros alone are lazily mapped
            table_.counts.fill_(1)
            table_.update(torch.arange(min(n, 100)), torch.rand(min(n, 100), dim))
            measured = rss_bytes() - before
            keep.append(table_)
            expected = n * dim * 4 + n * 8
            rows.append({"what": "U_o table", "distill_size": n, "dim": dim, "expected_mib": mib(expected),
                         "measured_mib": mib(measured), "bytes_per_example": expected / n})
    del keep
    return rows


def dataset_rows(settings: MemorySettings) -> list[dict[str, Any]]:
    """Analytic: what D' costs each role that holds it, against the U_o table of a predictive student."""
    rows = []
    for name, (n, floats) in DATASETS.items():
        rows.append({"dataset": name, "distill_size": n, "inputs_mib_per_role": mib(n * floats * 4),
                     "uo_predictive_mib": mib(n * (10 * 4 + 8)), "uo_entropy_mib": mib(n * (4 + 8))})
    return rows


def tensor_bytes(distiller) -> int:
    """Bytes of every live tensor a student holds: weights, gradients, optimizer state, U_o tables."""
    import torch

    total = sum(p.numel() * p.element_size() for p in distiller.model.parameters())
    total += sum(p.grad.numel() * p.grad.element_size() for p in distiller.model.parameters() if p.grad is not None)
    for state in distiller.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    for est in distiller.estimators.values():
        total += sum(v.numel() * v.element_size() for v in est.state_dict().values())
    return total


def model_growth(settings: MemorySettings) -> list[dict[str, Any]]:
    """Student tensors after one Adam step, counted on the live objects (RSS deltas of allocations
    this small are dominated by the allocator), and the teacher's snapshot size."""
    import torch

    from gped.config import ModelConfig, StudentConfig
    from gped.core.distill import Distiller
    from gped.core.models import build_teacher, count_parameters

    rows = []
    n_distill = 1_000
    for shape in settings.inputs:
        for k in settings.widths:
            student = StudentConfig(name="m", expectations=["predictive", "expected_entropy"], model=ModelConfig("mlp", k, k), lr_halve_epochs=0)
            distiller = Distiller(student, shape, 10, n_distill, "cpu")
            distiller.observe(torch.rand(100, *shape), torch.arange(100), torch.randn(100, 10))
            params = count_parameters(distiller.model)
            t_params = count_parameters(build_teacher("mlp", shape, 10, k, k))
            rows.append({
                "input": "x".join(str(d) for d in shape), "k": k, "student_params": params,
                # float32 weights + gradients + Adam's exp_avg and exp_avg_sq, plus U_o tables for N' = 1000
                "student_expected_mib": mib(params * 4 * 4 + n_distill * ((10 + 1) * 4 + 2 * 8)),
                "student_tensor_mib": mib(tensor_bytes(distiller)),
                "teacher_params": t_params, "snapshot_mib": mib(t_params * 4),
            })
    return rows


def role_rows(end_to_end: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Peak memory of each process of the distributed run and of the reference run."""
    rows = []
    if not end_to_end:
        return rows
    for r in end_to_end.get("runs", []):
        for kind in ("distributed", "reference"):
            for role, m in r[kind]["memory"].items():
                rows.append({"mode": r["mode"], "run": kind, "role": role, "peak_rss_mib": m["peak_rss_mib"],
                             "peak_uss_mib": m["peak_uss_mib"], "peak_pss_mib": m["peak_pss_mib"],
                             "growth_50_90_mib": m["growth_50_90_mib"], "observed_s": m["observed_s"]})
        break  # the first repeat is enough
    return rows


def student_count_rows(throughput: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Whole-run memory against the number of students (from the sampler throughput runs)."""
    rows = []
    if not throughput:
        return rows
    for r in throughput.get("rows", []):
        students = [m for name, m in r["memory"].items() if name.startswith("student:")]
        rows.append({"mode": r["mode"], "students": r["students"], "total_rss_mib": r["total_rss_mib"], "total_uss_mib": r["total_uss_mib"],
                     "sampler_rss_mib": r["memory"].get("sampler", {}).get("peak_rss_mib"),
                     "coordinator_rss_mib": r["memory"].get("coordinator", {}).get("peak_rss_mib"),
                     "per_student_rss_mib": max((m["peak_rss_mib"] for m in students), default=None),
                     "per_student_uss_mib": max((m["peak_uss_mib"] for m in students), default=None)})
    return rows


def baseline() -> dict[str, float]:
    """What a process costs before gped does anything: python + numpy + zmq, and ``import torch``."""
    import subprocess
    import sys

    code = ("import psutil, sys; import numpy, zmq; a = psutil.Process().memory_full_info(); import torch; "
            "b = psutil.Process().memory_full_info(); print(a.rss, a.uss, b.rss, b.uss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    a_rss, a_uss, b_rss, b_uss = (int(v) for v in out.stdout.split())
    return {"python_numpy_zmq_rss_mib": mib(a_rss), "python_numpy_zmq_uss_mib": mib(a_uss),
            "with_torch_rss_mib": mib(b_rss), "with_torch_uss_mib": mib(b_uss)}


def run(settings: MemorySettings, end_to_end: dict[str, Any] | None = None, throughput: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "settings": asdict(settings),
        "baseline": baseline(),
        "roles": role_rows(end_to_end),
        "students": student_count_rows(throughput),
        "estimators": estimator_growth(settings),
        "datasets": dataset_rows(settings),
        "models": model_growth(settings),
    }


def render(result: dict[str, Any]) -> str:
    parts = []
    b = result["baseline"]
    parts.append(f"### memory\n\nbaseline per process: python+numpy+zmq {b['python_numpy_zmq_rss_mib']} MiB RSS; after `import torch` "
                 f"{b['with_torch_rss_mib']} MiB RSS / {b['with_torch_uss_mib']} MiB USS (unique to the process).")
    if result["roles"]:
        parts.append(table(result["roles"], ["mode", "run", "role", "peak_rss_mib", "peak_uss_mib", "peak_pss_mib", "growth_50_90_mib", "observed_s"],
                           "memory: peak per role over the end-to-end runs") + "\n\ngrowth_50_90: RSS change from 50 % to 90 % of the "
                     "process's observed life (on a long run: past start-up; steady growth would be a leak).")
    if result["students"]:
        parts.append(table(result["students"], ["mode", "students", "total_rss_mib", "total_uss_mib", "sampler_rss_mib", "coordinator_rss_mib",
                                                "per_student_rss_mib", "per_student_uss_mib"], "memory: whole run vs number of students"))
    parts.append(table(result["estimators"], ["what", "distill_size", "dim", "expected_mib", "measured_mib", "bytes_per_example"],
                       "memory: U_o table vs distillation-set size N'"))
    parts.append(table(result["datasets"], ["dataset", "distill_size", "inputs_mib_per_role", "uo_predictive_mib", "uo_entropy_mib"],
                       "memory: D' inputs held by every role vs U_o tables (bytes, analytic)"))
    parts.append(table(result["models"], ["input", "k", "student_params", "student_expected_mib", "student_tensor_mib", "teacher_params",
                                          "snapshot_mib"], "memory: student (weights+grads+Adam, one step) and teacher snapshot vs width k"))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Memory growth with U_o table size and model size (in-process).")
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--estimator-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.estimator_child:
        import json

        raw = json.loads(args.estimator_child)
        settings = MemorySettings(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                                     for k, v in raw.items()})
        print(json.dumps(_estimator_growth_here(settings)))
        return
    result = run(PRESETS[args.preset])
    print(render(result))
    if args.out:
        write_json(args.out, {"memory": result})


if __name__ == "__main__":
    main()

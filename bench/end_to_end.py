"""End to end: ``gped run`` (distributed) against ``gped reference`` (one process) for the same work.

Both run the same resolved config — the same teacher steps, the same posterior samples, the same
students with the same number of updates — on the whole machine, one after the other (order
alternates between repeats). Reported, side by side:

* wall time of the command (start-up, data, handshake, run, summary: what a user waits for) and of
  the run phase alone (reference: its own loop timer; distributed: from the sampler's "started"
  line to the coordinator's summary line, timed on arrival of the lines);
* the work done (posterior samples, each student's updates and missed samples) — equal work:
  students do not skip stale parameter snapshots here (``skip_stale = false``), so in both modes
  the distributed run does exactly the reference's updates and its scores must equal the
  reference's (a user's params-mode run may skip a snapshot to catch up, which changes the scores
  within noise);
* every student's scores from each run's ``summary.json`` — so speed is never bought with quality;
* peak memory of every process (RSS, and USS/PSS, which count shared library pages once), looked
  at once a second (USS/PSS every 10 s): the monitor's own CPU time must not tilt the comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .common import QUICKSTART, RSSMonitor, Spawned, make_config, median, prepare_data, python_cmd, table, write_json


@dataclass(frozen=True)
class EndToEndSettings:
    steps: int = 2000
    modes: tuple[str, ...] = ("targets",)
    repeats: int = 1
    base: str = str(QUICKSTART)
    overrides: tuple[str, ...] = ()
    timeout_s: float = 900.0


PRESETS = {
    "tiny": EndToEndSettings(steps=120, overrides=("data.source=\"synthetic\"", "sampler.burn_in=40", "teacher.k1=0.25", "teacher.k2=0.25",
                                                   "students.0.model.k1=0.25", "students.0.model.k2=0.25",
                                                   "students.1.model.k1=0.25", "students.1.model.k2=0.25",
                                                   "coordinator.eval_every=4", "coordinator.heartbeat_s=0.2")),
    "quick": EndToEndSettings(steps=2000),
    "full": EndToEndSettings(steps=16000, modes=("targets", "params"), repeats=2),
}


def _timed(label: str, args: list[str], log_path: Path, device: str, timeout_s: float) -> tuple[Spawned, float, float, dict]:
    """Run ``gped ARGS`` to its end: the process (log lines timed on arrival), its start (monotonic),
    wall seconds, memory.
    The memory monitor looks once a second (USS/PSS every 10 s): its own CPU time must not slow the
    five-process side more than the one-process side."""
    proc = Spawned(label, python_cmd("-m", "gped", *args), log_path=log_path, device=device)
    start = time.monotonic()
    with RSSMonitor({label: proc.pid}, interval_s=1.0, full_every_s=10.0) as rss:
        code = proc.wait(timeout_s)
    wall = time.monotonic() - start
    proc.stop()
    if code != 0:
        raise RuntimeError(f"gped {args[0]} failed ({code}):\n{proc.tail()}")
    return proc, start, wall, rss.report()


def _reference(config: Path, run_dir: Path, device: str, timeout_s: float) -> dict[str, Any]:
    _, _, wall, memory = _timed("reference", ["reference", str(config), "--device", device], run_dir / "reference.log", device, timeout_s)
    summary = json.loads((run_dir / "summary.json").read_text())
    students = {name: {"updates": None, "missed": 0} for name in summary["scores"] if name != "teacher ensemble"}
    return {"wall_s": wall, "run_s": summary["wall_s"], "samples": summary["samples"], "scores": summary["scores"],
            "students": students, "memory": memory}


def _distributed(config: Path, run_dir: Path, device: str, timeout_s: float) -> dict[str, Any]:
    proc, start, wall, memory = _timed("launcher", ["run", str(config)], run_dir / "run.log", device, timeout_s)
    summary = json.loads((run_dir / "summary.json").read_text())
    # the chain starts before the handshake (burn-in needs no listener) and streams after the start signal
    began, ended = proc.first_line("gped.sampler: chain ready at step"), proc.first_line("gped.coordinator: summary (")
    streaming = proc.first_line("gped.sampler: started:")
    spawned = proc.first_line("started coordinator")
    # where the time outside the run phase goes, from the arrival times of the roles' log lines
    phases = {
        "launcher_before_spawn_s": spawned - start if spawned else None,  # imports, config, data, GPU count
        "sampler_startup_s": began - spawned if began and spawned else None,  # the sampler's imports, data, model
        "burn_in_overlap_s": streaming - began if streaming and began else None,  # burn-in while the others start, then the start signal
        "after_summary_s": start + wall - ended if ended else None,  # final reports, stop, reaping
    }
    students = {name: {"updates": m.get("updates"), "missed": m.get("missed"), "samples": m.get("samples")}
                for name, m in summary.get("students", {}).items()}
    return {"wall_s": wall, "run_s": (ended - began) if began and ended else None, "samples": summary["samples"],
            "scores": summary["scores"], "students": students, "memory": memory,
            "ensemble_missed": summary.get("ensemble_missed"), "phases": phases}


def run(settings: EndToEndSettings, work: Path, device: str = "cpu") -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / "data"
    runs = []
    for rep in range(settings.repeats):
        for mode in settings.modes:
            results = {}
            order = ("reference", "distributed") if rep % 2 == 0 else ("distributed", "reference")
            for kind in order:
                run_dir = work / f"{mode}-{kind}-r{rep}"
                cfg, config = make_config(run_dir, base=Path(settings.base), prepared=prepared, device=device, skip_stale=False,
                                          overrides=[f'sampler.mode="{mode}"', f"sampler.steps={settings.steps}", *settings.overrides])
                prepare_data(cfg, prepared)
                go = _reference if kind == "reference" else _distributed
                results[kind] = go(config, run_dir, device, settings.timeout_s)
                # the reference loop updates a student on every sample_every-th sample, steps_per_sample times
                per_student = {s.name: (s.steps_per_sample, getattr(s, "sample_every", 1)) for s in cfg.students}
            samples = results["reference"]["samples"]
            for name, info in results["reference"]["students"].items():
                steps, every = per_student.get(name, (1, 1))
                info["updates"] = -(-samples // every) * steps
            runs.append({"mode": mode, "repeat": rep, **results})
    rows, quality = [], []
    for mode in settings.modes:
        mine = [r for r in runs if r["mode"] == mode]
        ref_wall = median([r["reference"]["wall_s"] for r in mine])
        dist_wall = median([r["distributed"]["wall_s"] for r in mine])
        ref_run = median([r["reference"]["run_s"] for r in mine])
        dist_run = median([r["distributed"]["run_s"] for r in mine if r["distributed"]["run_s"] is not None])
        last = mine[-1]
        rows.append({
            "mode": mode,
            "steps": settings.steps,
            "samples_ref": last["reference"]["samples"],
            "samples_dist": last["distributed"]["samples"],
            "updates_ref": ",".join(_int(v["updates"]) for v in last["reference"]["students"].values()),
            "updates_dist": ",".join(_int(v["updates"]) for v in last["distributed"]["students"].values()),
            "missed_dist": sum((v.get("missed") or 0) for v in last["distributed"]["students"].values()),
            "wall_ref_s": ref_wall,
            "wall_dist_s": dist_wall,
            "speedup_wall": ref_wall / dist_wall,
            "run_ref_s": ref_run,
            "run_dist_s": dist_run,
            "speedup_run": ref_run / dist_run if dist_run else None,
            # start-up (imports, data, handshake) and shutdown: what the run phase leaves out
            "outside_ref_s": ref_wall - ref_run,
            "outside_dist_s": dist_wall - dist_run if dist_run else None,
            **{k: median([r["distributed"]["phases"][k] for r in mine if r["distributed"]["phases"][k] is not None] or [float("nan")])
               for k in last["distributed"]["phases"]},
        })
        for model, ref_scores in last["reference"]["scores"].items():
            dist_scores = last["distributed"]["scores"].get(model, {})
            for metric, value in ref_scores.items():
                if metric == "samples" or not isinstance(value, (int, float)):
                    continue
                other = dist_scores.get(metric)
                quality.append({"mode": mode, "model": model, "metric": metric, "reference": value, "distributed": other,
                                "difference": (other - value) if isinstance(other, (int, float)) else None})
    return {"settings": asdict(settings), "device": device, "rows": rows, "quality": quality, "runs": runs}


def _int(value) -> str:
    return "?" if value is None else str(int(value))


COLUMNS = ["mode", "steps", "samples_ref", "samples_dist", "updates_ref", "updates_dist", "missed_dist", "wall_ref_s", "wall_dist_s",
           "speedup_wall", "run_ref_s", "run_dist_s", "speedup_run", "outside_ref_s", "outside_dist_s", "launcher_before_spawn_s",
           "sampler_startup_s", "burn_in_overlap_s", "after_summary_s"]
QUALITY_COLUMNS = ["mode", "model", "metric", "reference", "distributed", "difference"]


def render(result: dict[str, Any]) -> str:
    head = table(result["rows"], COLUMNS, f"end to end ({result['device']}): gped run vs gped reference, same work")
    quality = table(result["quality"], QUALITY_COLUMNS, "end to end: student quality from each run's summary.json")
    return (f"{head}\n\nspeedup = reference time / distributed time (> 1: the distributed run is faster); wall: the whole "
            f"command; run: the run phase alone (no start-up); outside: wall minus run (process start-up, imports, data, "
            f"handshake, shutdown). The distributed run phase starts when the sampler's chain does (it burns in while the "
            f"others start); outside it: the launcher's work before it spawns the roles, the sampler's own start-up, and the "
            f"end after the coordinator's summary. burn_in_overlap: from the chain's start to the start signal (burn-in, "
            f"then any wait for the students), inside the run phase.\n\n{quality}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="gped run vs gped reference: wall time and student quality.")
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("bench-work/end_to_end"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = PRESETS[args.preset]
    if args.steps:
        settings = replace(settings, steps=args.steps)
    result = run(settings, args.work, args.device)
    print(render(result))
    if args.out:
        write_json(args.out, {"end_to_end": result})


if __name__ == "__main__":
    main()

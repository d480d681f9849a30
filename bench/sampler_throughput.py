"""Sampler throughput: SGLD steps/s of the chain alone vs with k students attached, both modes.

Each configuration is a real run of real processes, started the way ``gped run`` starts them:
``python -m gped coordinator CONFIG``, ``python -m gped student CONFIG --name ...`` (k of them) and
the sampler — gped's own sampler role, run through :mod:`bench._sampler_entry`, which only times it.
The sampler is pinned to a core of its own; the coordinator and the students share the other
core(s) (:class:`bench.common.CoreLayout`). "Alone" is k = 0: the chain still streams (the
coordinator subscribes to the parameter snapshots for its ensemble), nobody distils.

The figure is the sampler's steps/s over its streaming phase only (from its first published
posterior sample to its last step), so process start-up, handshakes and burn-in never count; the
ratio is steps/s with k students over steps/s alone, in the same mode, on the same core.
Configurations are interleaved (mode, k, mode, k, ... per repeat) so that drift hits all of them;
medians over repeats. The sampler's own breakdown (chain step, snapshot, targets evaluation,
message building, publishing, checkpoints) shows where its time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .common import QUICKSTART, CoreLayout, RSSMonitor, Spawned, make_config, median, prepare_data, python_cmd, spread, table, write_json


@dataclass(frozen=True)
class ThroughputSettings:
    students: tuple[int, ...] = (0, 1, 2)
    modes: tuple[str, ...] = ("targets", "params")
    #: sampler steps after burn-in (the streaming phase)
    stream_steps: int = 800
    burn_in: int = 20
    repeats: int = 1
    #: run "alone" again after the runs with students (per mode and repeat): the two alone runs
    #: bracket the others, and their disagreement is the noise floor the ratios must beat
    bracket_alone: bool = True
    base: str = str(QUICKSTART)
    overrides: tuple[str, ...] = ()
    timeout_s: float = 300.0


PRESETS = {
    "tiny": ThroughputSettings(students=(0, 1), modes=("targets",), stream_steps=60, burn_in=10, bracket_alone=False,
                               overrides=("data.source=\"synthetic\"", "teacher.k1=0.25", "teacher.k2=0.25",
                                          "students.0.model.k1=0.25", "students.0.model.k2=0.25",
                                          "students.1.model.k1=0.25", "students.1.model.k2=0.25",
                                          "coordinator.eval_every=5", "coordinator.heartbeat_s=0.2")),
    "quick": ThroughputSettings(students=(0, 1, 2), stream_steps=1200, repeats=1),
    "full": ThroughputSettings(students=(0, 1, 2, 4), stream_steps=4000, repeats=3),
}


def run_one(settings: ThroughputSettings, mode: str, k: int, layout: CoreLayout, work: Path, prepared: Path,
            device: str, tag: str) -> dict[str, Any]:
    run_dir = work / f"{mode}-k{k}-{tag}"
    steps = settings.burn_in + settings.stream_steps
    cfg, config = make_config(
        run_dir, base=Path(settings.base), num_students=k, prepared=prepared, device=device,
        overrides=[f'sampler.mode="{mode}"', f"sampler.burn_in={settings.burn_in}", f"sampler.steps={steps}", *settings.overrides],
    )
    prepare_data(cfg, prepared)
    timing = run_dir / "sampler-timing.json"
    procs: list[Spawned] = []
    gped = lambda *a: python_cmd("-m", "gped", *a)  # noqa: E731
    start = time.monotonic()
    coordinator = Spawned("coordinator", gped("coordinator", str(config)), cores=layout.others,
                          log_path=run_dir / "coordinator.log", device=device)
    procs.append(coordinator)
    for s in cfg.students:
        procs.append(Spawned(f"student:{s.name}", gped("student", str(config), "--name", s.name, f"--device={device}"),
                             cores=layout.others, log_path=run_dir / f"student-{s.name}.log", device=device))
    sampler = Spawned("sampler", python_cmd("-m", "bench._sampler_entry", str(config), str(timing), device),
                      cores=layout.sampler, log_path=run_dir / "sampler.log", device=device)
    procs.append(sampler)
    with RSSMonitor({p.label: p.pid for p in procs}) as rss:
        code = sampler.wait(settings.timeout_s)
        sampler_done = time.monotonic()
        if k:
            coordinator.wait(max(30.0, settings.timeout_s - (sampler_done - start)))
    # k = 0: the coordinator would wait a minute for final reports nobody sends; it has done its part
    codes = {p.label: p.stop(grace_s=3.0 if k else 0.3) for p in procs}
    if code is None or not timing.exists():
        raise RuntimeError(f"sampler run {run_dir.name} failed (exit {codes.get('sampler')}):\n{sampler.tail()}")
    result = json.loads(timing.read_text())
    summary_path = run_dir / "summary.json"
    students = json.loads(summary_path.read_text()).get("students", {}) if summary_path.exists() else {}
    received = [m.get("samples", 0) for m in students.values()]
    missed = [m.get("missed", 0) for m in students.values()]
    return {
        "mode": mode,
        "students": k,
        "steps_per_s": result["steps_per_s"],
        "cpu_share": result["cpu_share"],
        "steps_per_cpu_s": result["steps_per_cpu_s"],
        "loadavg_1m": os.getloadavg()[0],
        "streaming_steps": result["streaming_steps"],
        "streaming_s": result["streaming_seconds"],
        "samples_sent": result["samples"],
        "student_samples_min": min(received) if received else None,
        "student_missed_max": max(missed) if missed else None,
        "share": result["share"],
        "startup_s": round(sampler_done - start - result["streaming_seconds"], 2),
        "memory": rss.report(),
        "exit_codes": codes,
    }


def run(settings: ThroughputSettings, layout: CoreLayout, work: Path, device: str = "cpu") -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / "data"
    runs: list[dict[str, Any]] = []
    old_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(layout.others))  # this process's monitor threads stay off the sampler's core
    try:
        for rep in range(settings.repeats):
            for mode in settings.modes:
                order = list(settings.students)
                if settings.bracket_alone and 0 in order and len(order) > 1:
                    order.append(0)
                for i, k in enumerate(order):
                    runs.append(run_one(settings, mode, k, layout, work, prepared, device, f"r{rep}-{i}"))
    finally:
        os.sched_setaffinity(0, old_affinity)
    rows = []
    for mode in settings.modes:
        alone = median([r["steps_per_s"] for r in runs if r["mode"] == mode and r["students"] == 0])
        alone_cpu = median([r["steps_per_cpu_s"] for r in runs if r["mode"] == mode and r["students"] == 0])
        for k in settings.students:
            mine = [r for r in runs if r["mode"] == mode and r["students"] == k]
            rate = median([r["steps_per_s"] for r in mine])
            share = {key: median([r["share"][key] for r in mine]) for key in mine[0]["share"]}
            rows.append({
                "mode": mode,
                "students": k,
                "steps_per_s": rate,
                "ratio_vs_alone": rate / alone if 0 in settings.students else None,
                "spread": spread([r["steps_per_s"] for r in mine]),
                "cpu_share": median([r["cpu_share"] for r in mine]),
                "steps_per_cpu_s": median([r["steps_per_cpu_s"] for r in mine]),
                # per CPU-second of the sampler process: what streaming costs it in work, whoever else
                # shares its core (on an idle machine this equals ratio_vs_alone)
                "cpu_ratio_vs_alone": median([r["steps_per_cpu_s"] for r in mine]) / alone_cpu if 0 in settings.students else None,
                "loadavg_1m": max(r["loadavg_1m"] for r in mine),
                "streaming_steps": mine[0]["streaming_steps"],
                "student_samples_min": mine[0]["student_samples_min"],
                "student_missed_max": max((r["student_missed_max"] or 0) for r in mine) if k else None,
                "advance_share": share["advance"],
                "stream_share": share["snapshot"] + share["targets_eval"] + share["build_message"] + share["publish"],
                "publish_share": share["publish"],
                "share": share,
                "total_rss_mib": median([sum(v["peak_rss_mib"] for v in r["memory"].values()) for r in mine]),
                "total_uss_mib": median([sum(v["peak_uss_mib"] for v in r["memory"].values()) for r in mine]),
                "memory": mine[0]["memory"],
            })
    return {"settings": asdict(settings), "core_layout": layout.as_dict(), "device": device, "rows": rows, "runs": runs}


COLUMNS = ["mode", "students", "steps_per_s", "ratio_vs_alone", "spread", "cpu_share", "steps_per_cpu_s", "cpu_ratio_vs_alone", "advance_share", "stream_share", "publish_share",
           "student_samples_min", "student_missed_max", "total_uss_mib", "loadavg_1m"]


def render(result: dict[str, Any]) -> str:
    reps = result["settings"]["repeats"]
    return table(result["rows"], COLUMNS, f"sampler throughput ({result['device']}): streaming phase, k students attached") + (
        f"\n\n{result['core_layout']['text']}. steps_per_s: median of {reps} run(s) of {result['settings']['stream_steps']} "
        "streaming steps (alone is also run again after the others: the spread on its row is how much those runs disagree, "
        "the noise floor of every ratio); advance/stream/publish_share: fraction of the sampler's streaming wall time in the chain step / "
        "in snapshot+targets evaluation+message building+publishing / in Channel.send alone; cpu_share: the sampler "
        "process's CPU time over that wall time (below ~0.95: it waited for its core — other load on the machine); "
        "cpu_ratio_vs_alone: the same ratio per CPU-second of the sampler (robust to other load, blind to waiting); "
        "loadavg_1m: the machine's load when the run ended (above the core count: the figures are contended)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sampler steps/s alone vs with students attached.")
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("bench-work/sampler"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = PRESETS[args.preset]
    if args.repeats:
        settings = replace(settings, repeats=args.repeats)
    result = run(settings, CoreLayout.detect(), args.work, args.device)
    print(render(result))
    if args.out:
        write_json(args.out, {"sampler_throughput": result})


if __name__ == "__main__":
    main()

"""Run the whole benchmark suite; print the tables; write them as JSON (and Markdown).

    python -m bench.run_all --quick --out bench-results.json         # ~2 minutes on 2 idle cores
    python -m bench.run_all --out bench-results.json                  # full: repeats, 4 students, both modes end to end
    python -m bench.run_all --quick --device cuda --out gpu.json      # sampler and students on CUDA

Sections run in this order: transport, profile, sampler throughput, end to end, memory (which
uses the per-process memory measured by the two before it). ``--only`` picks sections. The
headline table compares each figure with issue 6's bar; it is a report, never a test: on a
machine busy with other work the figures move, which is why every one is a ratio measured side by
side, and why the machine's load average is recorded with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import end_to_end, memory, profile_roles, sampler_throughput, transport
from .common import CoreLayout, machine_info, table, write_json

SECTIONS = ("transport", "profile", "sampler", "end_to_end", "memory")


def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    tr = results.get("transport")
    if tr:
        for r in tr["rows"]:
            if r["kind"] == "params":
                rows.append({"figure": f"wire bandwidth, {r['payload']}: gped / raw pyzmq", "value": r["ratio"], "bar": ">= 0.7",
                             "meets": r["ratio"] >= 0.7, "detail": f"{r['gped_GBps']:.3g} vs {r['raw_GBps']:.3g} GB/s"})
            else:
                rows.append({"figure": f"wire rate, {r['payload']}: gped / raw pyzmq", "value": r["ratio"], "bar": "(none)",
                             "meets": None, "detail": f"{r['gped_msgs_s']:,.0f} vs {r['raw_msgs_s']:,.0f} msgs/s"})
    sa = results.get("sampler_throughput")
    if sa:
        for r in sa["rows"]:
            if r["students"] == 0 and r["spread"]:
                rows.append({"figure": f"sampler steps/s, {r['mode']} mode, alone: disagreement of the alone runs (noise floor)",
                             "value": r["spread"], "bar": "(noise)", "meets": None,
                             "detail": f"{r['steps_per_s']:.4g} steps/s median; ratios closer to 1 than this are noise"})
            if r["students"] == 0 or r["ratio_vs_alone"] is None:
                continue
            bar = ">= 0.9" if r["students"] == 2 else "(none)"
            contended = r["cpu_share"] < 0.9
            rows.append({"figure": f"sampler steps/s, {r['mode']} mode, {r['students']} students / alone", "value": r["ratio_vs_alone"],
                         "bar": bar, "meets": r["ratio_vs_alone"] >= 0.9 if r["students"] == 2 else None,
                         "detail": f"{r['steps_per_s']:.4g} steps/s; per sampler CPU-second {r['cpu_ratio_vs_alone']:.3g}; "
                                   f"cpu share {r['cpu_share']:.2f}{' (CONTENDED: other load on the core)' if contended else ''}"})
    ee = results.get("end_to_end")
    if ee:
        for r in ee["rows"]:
            rows.append({"figure": f"end to end, {r['mode']} mode: reference wall / distributed wall", "value": r["speedup_wall"],
                         "bar": "> 1", "meets": r["speedup_wall"] > 1,
                         "detail": f"{r['wall_ref_s']:.1f} s vs {r['wall_dist_s']:.1f} s for {r['steps']} steps"})
            if r["speedup_run"]:
                rows.append({"figure": f"end to end, {r['mode']} mode: run phase only (no start-up)", "value": r["speedup_run"],
                             "bar": "(none)", "meets": None, "detail": f"{r['run_ref_s']:.1f} s vs {r['run_dist_s']:.1f} s"})
        diffs = [abs(q["difference"]) for q in ee["quality"] if q["difference"] is not None and q["model"] != "teacher ensemble"
                 and q["metric"] in ("nll", "kl_to_ensemble", "entropy_mae")]
        if diffs:
            rows.append({"figure": "end to end: largest |student nll / KL / entropy MAE difference|", "value": max(diffs),
                         "bar": "~0 (same work)", "meets": None, "detail": "distributed minus reference"})
    pr = results.get("profile")
    if pr:
        for mode in ("targets", "params"):
            ceiling = pr.get(f"reference_{mode}", {}).get("speedup_ceiling")
            if ceiling:
                rows.append({"figure": f"speed-up ceiling of gped run, {mode} mode (reference loop / its sampler-side part)",
                             "value": ceiling, "bar": "(bound)", "meets": None,
                             "detail": f"sampler-side share {pr[f'reference_{mode}']['sampler_path_share']:.2f} of the sequential loop"})
    return rows


def render_all(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [f"## gped benchmarks ({meta['preset']}, {meta['device']})",
             f"{meta['cpu']}, {meta['cores']} cores, {meta['memory_gib']} GiB; torch {meta.get('torch')}, pyzmq {meta['pyzmq']} "
             f"(libzmq {meta['libzmq']}); gped {meta.get('gped_commit') or '?'}{' + uncommitted changes' if meta.get('gped_dirty') else ''}; "
             f"{meta['core_layout']['text']}; load average {meta['loadavg_start']} at start, "
             f"{meta.get('loadavg_end')} at end; {meta.get('duration_s', 0):.0f} s.",
             table(results["headline"], ["figure", "value", "bar", "meets", "detail"], "headline")]
    renderers = {"transport": transport.render, "profile": profile_roles.render, "sampler_throughput": sampler_throughput.render,
                 "end_to_end": end_to_end.render, "memory": memory.render}
    for key, render in renderers.items():
        if key in results:
            parts.append(render(results[key]))
    if meta.get("warnings"):
        parts.append("### warnings\n\n" + "\n".join(f"- {w}" for w in meta["warnings"]))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="preset", const="quick", help="~2 minutes on 2 cores")
    size.add_argument("--tiny", action="store_const", dest="preset", const="tiny", help="smoke-test sizes (seconds per section)")
    size.add_argument("--full", action="store_const", dest="preset", const="full", help="the default: repeats, 4 students, both modes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the sampler and the students compute")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"), help="JSON results (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here (default: OUT with .md)")
    parser.add_argument("--work", type=Path, default=Path("bench-work"), help="run directories and logs (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="end to end: teacher steps (overrides the preset)")
    args = parser.parse_args(argv)
    preset = args.preset or "full"
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no CUDA device on this machine", file=sys.stderr)
            return 3
    layout = CoreLayout.detect()
    started = time.monotonic()
    meta = machine_info(layout, args.device)
    meta.update(preset=preset, sections=only, loadavg_start=round(os.getloadavg()[0], 2), warnings=[])
    if layout.shared:
        meta["warnings"].append("one core only: the sampler shares its core with everything else; ratios measure contention")
    results: dict[str, Any] = {"meta": meta}
    work = args.work.resolve()
    out_md = args.markdown or args.out.with_suffix(".md")

    def section(name: str, key: str, fn):
        t = time.monotonic()
        print(f"# {name} ...", file=sys.stderr, flush=True)
        results[key] = fn()
        results[key]["seconds"] = round(time.monotonic() - t, 1)
        results[key]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        print(f"# {name}: {results[key]['seconds']} s", file=sys.stderr, flush=True)
        write_json(args.out, results)  # partial results survive an interrupted run

    if "transport" in only:
        section("transport", "transport", lambda: transport.run(transport.PRESETS[preset], layout, work))
    if "profile" in only:
        section("profile", "profile", lambda: profile_roles.run(profile_roles.PRESETS[preset], work / "profile", args.device))
    if "sampler" in only:
        section("sampler throughput", "sampler_throughput",
                lambda: sampler_throughput.run(sampler_throughput.PRESETS[preset], layout, work / "sampler", args.device))
    if "end_to_end" in only:
        e2e = end_to_end.PRESETS[preset]
        if args.steps:
            e2e = replace(e2e, steps=args.steps)
        section("end to end", "end_to_end", lambda: end_to_end.run(e2e, work / "end_to_end", args.device))
    if "memory" in only:
        section("memory", "memory", lambda: memory.run(memory.PRESETS[preset], results.get("end_to_end"), results.get("sampler_throughput")))
    meta["loadavg_end"] = round(os.getloadavg()[0], 2)
    meta["duration_s"] = round(time.monotonic() - started, 1)
    busiest = max([meta["loadavg_start"], meta["loadavg_end"]] + [v.get("loadavg_1m_after", 0) for v in results.values() if isinstance(v, dict)])
    if busiest > meta["cores"]:
        meta["warnings"].append(f"the machine was busy (load average up to {busiest:.1f} on {meta['cores']} cores): other processes "
                                "shared the cores, so absolute rates are low and ratios noisier than on an idle machine")
    results["headline"] = headline(results)
    write_json(args.out, results)
    text = render_all(results)
    out_md.write_text(text)
    print(text)
    print(f"wrote {args.out} and {out_md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

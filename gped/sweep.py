"""Run a grid of experiments and collect one results table (``gped sweep``).

Each grid point is a config with some keys overridden (``--grid data.mask=0,5,10``); it runs as its
own run directory under the sweep's folder, either sequentially (``reference``, the default: one
process, the paper's Algorithm 1) or distributed (``run``, every role a process). A point whose
``summary.json`` already exists is skipped, so a sweep interrupted half way continues where it
stopped. The collected table has one row per (grid point, model) with every score.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

from .config import apply_overrides, load_config
from .errors import ConfigError

log = logging.getLogger("gped.sweep")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["a.b=1,2", "c=x,y"]`` → ``{"a.b": ["1", "2"], "c": ["x", "y"]}`` (values kept as TOML text).

    Values are split on commas outside brackets, so ``--grid 'data.classes=[0,1],[2,3]'`` works."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"grid entry {item!r} must look like key=v1,v2,...")
        key, values = item.split("=", 1)
        parts = [v.strip() for v in re.split(r",(?![^\[]*\])", values) if v.strip()]
        if not parts:
            raise ConfigError(f"grid entry {item!r} has no values")
        grid[key.strip()] = parts
    return grid


def point_name(point: dict[str, str]) -> str:
    text = "-".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text) or "default"


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_sweep(config: str | None, overrides: list[str], grid_items: list[str], out: str, mode: str = "reference",
              device: str = "cpu") -> list[dict]:
    grid = parse_grid(grid_items)
    points = grid_points(grid)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for point in points:  # validate every point before running any
        load_config(config, list(overrides) + [f"{k}={v}" for k, v in point.items()])
    rows: list[dict] = []
    for i, point in enumerate(points, 1):
        run_dir = out_dir / point_name(point)
        sets = list(overrides) + [f"{k}={v}" for k, v in point.items()] + [f"run_dir={json.dumps(str(run_dir))}"]
        if (run_dir / "summary.json").exists():
            log.info("[%d/%d] %s: done before, reusing", i, len(points), run_dir.name)
        else:
            log.info("[%d/%d] %s", i, len(points), run_dir.name)
            command = [sys.executable, "-m", "gped", mode]
            command += [config] if config else []
            for item in sets:
                command += ["--set", item]
            if mode == "reference":
                command += ["--device", device]
            code = subprocess.call(command, stdout=subprocess.DEVNULL)
            if code != 0:
                log.error("%s failed with status %d; continuing with the rest", run_dir.name, code)
                continue
        summary = json.loads((run_dir / "summary.json").read_text())
        meta_path = run_dir / "data" / "meta.json"
        mask_rate = json.loads(meta_path.read_text()).get("mask_rate") if meta_path.exists() else None
        for model, scores in summary["scores"].items():
            rows.append({"point": run_dir.name, **point, "mask_rate": mask_rate, "model": model, **scores})
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_table(rows, list(grid)) + "\n")
    return rows


COLUMNS = ("nll", "accuracy", "ece", "kl_to_ensemble", "entropy_mae", "mi_mae")


def results_table(rows: list[dict], keys: list[str]) -> str:
    head = keys + ["mask_rate", "model", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for c in head:
            v = row.get(c)
            cells.append("–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["apply_overrides", "grid_points", "parse_grid", "run_sweep", "results_table"]

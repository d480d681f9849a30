"""What every benchmark shares: the core layout, run configs, spawned roles, RSS sampling, tables.

Core layout (stated with every figure): the sampler gets the first core this process may use,
everything else (students, coordinator, the transport receiver) gets the other cores, so "sampler
alone" and "sampler with k students" run the chain on the very same core.  With one core only,
everything shares it and the layout says so.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from gped.transport import free_port_pair  # noqa: F401  (used here and by the other benchmarks)

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.toml"


# --------------------------------------------------------------------------------------------------
# cores


@dataclass(frozen=True)
class CoreLayout:
    sampler: tuple[int, ...]
    others: tuple[int, ...]

    @classmethod
    def detect(cls) -> "CoreLayout":
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) == 1:
            return cls((cores[0],), (cores[0],))
        return cls((cores[0],), tuple(cores[1:]))

    @property
    def shared(self) -> bool:
        return set(self.sampler) & set(self.others) != set()

    def describe(self) -> str:
        text = f"sampler on core {_cores(self.sampler)}; students, coordinator and receivers on core(s) {_cores(self.others)}"
        return text + (" (one core only: everything shares it)" if self.shared else "")

    def as_dict(self) -> dict[str, Any]:
        return {"sampler": list(self.sampler), "others": list(self.others), "text": self.describe()}


def _cores(cores: Iterable[int]) -> str:
    return ",".join(str(c) for c in cores)


def pinned(cores: Iterable[int]) -> Callable[[], None]:
    """A ``preexec_fn`` that pins the child (and every thread it starts, ZeroMQ's I/O thread too)."""
    cores = set(cores)

    def pin() -> None:
        os.sched_setaffinity(0, cores)

    return pin


# --------------------------------------------------------------------------------------------------
# ports and configs


def student_set(base_students: list, k: int) -> list:
    """``k`` students cycling through the base config's students (names s0.., distinct seeds)."""
    out = []
    for i in range(k):
        s = copy.deepcopy(base_students[i % len(base_students)])
        s.name = f"s{i}-{s.expectations[0].replace('_', '-')}"
        s.seed = i + 1
        out.append(s)
    return out


def make_config(
    run_dir: Path,
    *,
    base: Path | None = QUICKSTART,
    overrides: Iterable[str] = (),
    num_students: int | None = None,
    prepared: Path | None = None,
    device: str = "cpu",
    skip_stale: bool | None = None,
):
    """A resolved RunConfig for one benchmark run, written to ``run_dir/bench-config.json``.

    ``num_students`` replaces the students with that many copies of the base config's (cycling);
    ``prepared`` shares one prepared data folder between runs (it is not part of the config hash);
    ``skip_stale`` (if given) sets every student's ``skip_stale``.
    """
    from gped.config import load_config, save_config

    cfg = load_config(base, [f'run_dir="{run_dir}"', *overrides])
    if num_students is not None:
        cfg.students = student_set(cfg.students, num_students)
    cfg.coordinator.port = free_port_pair()
    cfg.sampler.device = device
    for s in cfg.students:
        s.device = device
        if skip_stale is not None:
            s.skip_stale = skip_stale
    if prepared is not None:
        cfg.data.prepared = str(prepared)
    cfg.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "bench-config.json"
    save_config(cfg, path)
    return cfg, path


def prepare_data(cfg, folder: Path) -> None:
    """Prepare the run's data once, in this process, so spawned roles only load it."""
    from gped.core.data import prepare

    prepare(cfg.data, folder)


# --------------------------------------------------------------------------------------------------
# spawned processes


def bench_env(extra: dict[str, str] | None = None, device: str = "cpu") -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


class Spawned:
    """A child process in its own session; every output line is kept with its arrival time."""

    def __init__(self, label: str, cmd: list[str], *, cores: Iterable[int] | None = None, log_path: Path | None = None,
                 env: dict[str, str] | None = None, device: str = "cpu"):
        self.label = label
        self.cmd = cmd
        self.lines: list[tuple[float, str]] = []
        self._log = open(log_path, "w") if log_path else None
        preexec = None
        if cores:
            if shutil.which("taskset"):  # exec'd in place: the pid stays the role's own
                cmd = ["taskset", "-c", _cores(cores), *cmd]
            else:
                preexec = pinned(cores)
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env or bench_env(device=device), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True, preexec_fn=preexec,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            if self._log:
                self._log.write(line)
        if self._log:
            self._log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 3.0) -> int:
        """SIGINT, then SIGTERM, then SIGKILL this child's own process group (nothing else)."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            self.wait(grace_s)
        code = self.proc.wait()
        self._reader.join(timeout=2.0)
        return code

    def first_line(self, needle: str) -> float | None:
        """Arrival time of the first output line containing ``needle``."""
        for t, line in list(self.lines):
            if needle in line:
                return t
        return None

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


# --------------------------------------------------------------------------------------------------
# resident memory


def role_label(cmdline: list[str]) -> str:
    """'sampler', 'coordinator', 'student:<name>', 'launcher', 'reference' from a gped command line."""
    parts = list(cmdline)
    for i, part in enumerate(parts):
        if part == "student" or part.endswith("student"):
            if "--name" in parts:
                return "student:" + parts[parts.index("--name") + 1]
        if part in ("sampler", "coordinator", "reference"):
            return part
        if part == "run":
            return "launcher"
        if part.endswith("_sampler_entry"):
            return "sampler"
    return " ".join(parts[-2:])


@dataclass
class RSSMonitor:
    """Samples the memory of some processes (and their children) while a benchmark runs.

    Resident set size (RSS) every ``interval_s``; every ``full_every_s`` also the unique (USS) and
    proportional (PSS) set sizes, which do not count the shared library pages (torch's alone are
    hundreds of MiB) once per process. The peak RSS is the kernel's own high-water mark (VmHWM), so
    it is exact however seldom the monitor looks. Looking costs about 1 ms of CPU per process (10 ms
    for USS/PSS): where wall time is measured, look seldom, or the monitor itself slows a run of
    five processes more than one of a single process.
    """

    roots: dict[str, int]
    interval_s: float = 0.1
    full_every_s: float = 2.0
    peak: dict[str, int] = field(default_factory=dict)
    first: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)
    peak_uss: dict[str, int] = field(default_factory=dict)
    peak_pss: dict[str, int] = field(default_factory=dict)
    #: (seconds since start, rss) about once a second per process, for growth over a run
    series: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    samples: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RSSMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def add(self, label: str, pid: int) -> None:
        self.roots[label] = pid

    def _processes(self):
        import psutil

        for label, pid in list(self.roots.items()):
            try:
                root = psutil.Process(pid)
                root_cmdline = root.cmdline()
                yield label, root
                for child in root.children(recursive=True):
                    try:
                        cmdline = child.cmdline()
                    except psutil.Error:
                        continue
                    # empty: being reaped; the root's own command line: forked, not yet exec'd
                    if cmdline and cmdline != root_cmdline:
                        yield role_label(cmdline), child
            except psutil.Error:
                continue

    def _run(self) -> None:
        import psutil

        started = time.monotonic()
        next_full = started + 0.5
        next_series = started
        while not self._stop.is_set():
            record = time.monotonic() >= next_series
            if record:
                next_series += 1.0
            full = time.monotonic() >= next_full
            if full:
                next_full = time.monotonic() + self.full_every_s
            for name, proc in self._processes():
                try:
                    if full:
                        info = proc.memory_full_info()
                        self.peak_uss[name] = max(self.peak_uss.get(name, 0), info.uss)
                        self.peak_pss[name] = max(self.peak_pss.get(name, 0), info.pss)
                        rss = info.rss
                    else:
                        rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak.get(name, 0), rss, _high_water_mark(proc.pid))
                self.first.setdefault(name, rss)
                self.last[name] = rss
                if record:
                    self.series.setdefault(name, []).append((round(time.monotonic() - started, 1), rss))
            self.samples += 1
            self._stop.wait(self.interval_s)

    def report(self) -> dict[str, dict[str, float]]:
        """Per process: peak RSS/USS/PSS, and RSS growth from 50 % to 90 % of its observed life (past
        start-up on a long run, before shutdown frees anything; steady growth there would be a leak)."""
        out = {}
        for name in sorted(self.peak):
            series = self.series.get(name, [])
            growth = series[int(0.9 * (len(series) - 1))][1] - series[len(series) // 2][1] if len(series) >= 4 else 0
            out[name] = {"peak_rss_mib": mib(self.peak[name]), "last_rss_mib": mib(self.last[name]),
                         "peak_uss_mib": mib(self.peak_uss.get(name, 0)), "peak_pss_mib": mib(self.peak_pss.get(name, 0)),
                         "growth_50_90_mib": mib(growth), "observed_s": series[-1][0] if series else 0.0}
        return out


def _high_water_mark(pid: int) -> int:
    """The process's peak resident set size so far (Linux VmHWM), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def mib(nbytes: float) -> float:
    return round(nbytes / 2**20, 2)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# --------------------------------------------------------------------------------------------------
# results


def machine_info(layout: CoreLayout, device: str) -> dict[str, Any]:
    import numpy
    import zmq

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "numpy": numpy.__version__,
        "device": device,
        "core_layout": layout.as_dict(),
        "gped_commit": _git("rev-parse", "--short", "HEAD"),
        # uncommitted changes under gped/ (someone editing while this ran) make the figures a snapshot
        "gped_dirty": bool(_git("status", "--porcelain", "--", "gped")),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    return info


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> str:
    """A Markdown table of ``rows`` (missing cells are blank, floats to 4 significant figures)."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    text = "\n".join([head, rule, *body])
    return f"### {title}\n\n{text}" if title else text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def median(values: list[float]) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def spread(values: list[float]) -> float:
    """(max - min) / median: how much repeated measurements disagree."""
    m = median(values)
    return (max(values) - min(values)) / m if values and m else float("nan")

"""Logging that names the role and the pid, and a rate-limited progress line for long loops."""

from __future__ import annotations

import logging
import os
import sys
import time

FORMAT = "%(asctime)s.%(msecs)03d %(levelname).1s [{role} pid={pid}] %(name)s: %(message)s"


def setup_logging(role: str, level: str | int = "INFO", stream=None) -> logging.Logger:
    """Configure the root logger of this process so every line says which role and pid wrote it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT.format(role=role, pid=os.getpid()), datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    wanted = os.environ.get("GPED_LOG_LEVEL", level)
    try:
        root.setLevel(wanted.upper() if isinstance(wanted, str) else wanted)
    except ValueError:
        root.setLevel(logging.INFO)
        root.warning("GPED_LOG_LEVEL=%r is not a log level (DEBUG, INFO, WARNING, ERROR); using INFO", wanted)
    return logging.getLogger(f"gped.{role}")


class Progress:
    """Logs one status line at most every ``interval_s`` seconds, with the rate since the last line."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0, unit: str = "steps"):
        self.logger = logger
        self.interval_s = interval_s
        self.unit = unit
        self._last_time = time.monotonic()
        self._last_count = 0

    def due(self) -> bool:
        """Whether the next :meth:`update` will log (so costly fields are computed only then)."""
        return time.monotonic() - self._last_time >= self.interval_s

    def update(self, count: int, force: bool = False, **fields) -> bool:
        now = time.monotonic()
        if not force and now - self._last_time < self.interval_s:
            return False
        rate = (count - self._last_count) / max(now - self._last_time, 1e-9)
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        self.logger.info("%s=%d %s rate=%.1f %s/s", self.unit, count, parts, rate, self.unit)
        self._last_time, self._last_count = now, count
        return True


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

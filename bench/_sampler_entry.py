"""``python -m bench._sampler_entry CONFIG OUT.json DEVICE``: gped's sampler role, timed.

It runs :func:`gped.roles.sampler.run` unchanged (handshake, start signal, chain, streaming, stop)
and only wraps a few callables at class/module level to record, on ``time.perf_counter``:

* when every :meth:`SamplerRole.step` ends, and which steps published a posterior sample, so the
  streaming phase is measured from the end of the first published sample to the end of the last
  step (loop overhead between steps — polls, heartbeats, progress lines, checkpoints — included);
* the time inside the chain step (``TeacherChain.advance``), the snapshot (``flat_parameters``),
  the targets evaluation (``evaluate_logits``), message construction (``Params``/``Targets``, which
  validates), the sends on the sample stream (``Channel.send`` with a topic) and checkpoints.

The wrappers cost a few ``perf_counter`` calls per step (well under 1 µs), the same in every run.
Results go to OUT.json when the role returns.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

TIMED = ("advance", "snapshot", "targets_eval", "build_message", "publish", "checkpoint")


class Recorder:
    def __init__(self) -> None:
        self.totals = {name: 0.0 for name in TIMED}
        self.calls = {name: 0 for name in TIMED}
        self.first_sample_end: float | None = None
        self.first_sample_cpu = 0.0
        self.last_cpu = 0.0
        self.first_sample_step = 0
        self.last_end = 0.0
        self.last_step = 0
        self.steps_total = 0
        self.samples = 0
        self.marks: dict[str, float] = {}  # totals when the streaming phase began

    def timed(self, name: str, fn):
        totals, calls = self.totals, self.calls

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
                calls[name] += 1

        return wrapper

    def result(self, code: int) -> dict:
        wall = self.last_end - self.first_sample_end if self.first_sample_end is not None else 0.0
        steps = self.last_step - self.first_sample_step
        streaming = {name: self.totals[name] - self.marks.get(name, 0.0) for name in TIMED}
        cpu = self.last_cpu - self.first_sample_cpu
        return {
            "exit_code": code,
            "steps_total": self.steps_total,
            "samples": self.samples,
            "streaming_steps": steps,
            "streaming_seconds": wall,
            "steps_per_s": steps / wall if wall > 0 else float("nan"),
            # CPU time of the whole sampler process (ZeroMQ's I/O thread included) over the phase:
            # cpu_share < 1 means the process waited (for its core, held by someone else, or I/O)
            "cpu_seconds": cpu,
            "cpu_share": cpu / wall if wall > 0 else float("nan"),
            "steps_per_cpu_s": steps / cpu if cpu > 0 else float("nan"),
            "seconds_in": streaming,
            "share": {name: (v / wall if wall > 0 else float("nan")) for name, v in streaming.items()},
        }


def install(rec: Recorder) -> None:
    import gped.roles.sampler as role
    from gped.core.chain import TeacherChain
    from gped.transport import Channel

    TeacherChain.advance = rec.timed("advance", TeacherChain.advance)
    role.flat_parameters = rec.timed("snapshot", role.flat_parameters)
    role.evaluate_logits = rec.timed("targets_eval", role.evaluate_logits)
    role.Params = rec.timed("build_message", role.Params)
    role.Targets = rec.timed("build_message", role.Targets)
    role.save_checkpoint = rec.timed("checkpoint", role.save_checkpoint)

    send = Channel.send
    publish = rec.timed("publish", send)

    def channel_send(self, msg, prefix=None):
        if prefix and prefix[0] in (role.TOPIC_PARAMS, role.TOPIC_TARGETS):
            return publish(self, msg, prefix)
        return send(self, msg, prefix)

    Channel.send = channel_send

    step = role.SamplerRole.step

    def timed_step(self):
        sample = step(self)
        end = time.perf_counter()
        cpu = time.process_time()
        rec.steps_total += 1
        rec.last_end, rec.last_step, rec.last_cpu = end, self.chain.step, cpu
        if sample:
            rec.samples += 1
            if rec.first_sample_end is None:
                rec.first_sample_end, rec.first_sample_step, rec.first_sample_cpu = end, self.chain.step, cpu
                rec.marks = dict(rec.totals)
        return sample

    role.SamplerRole.step = timed_step


def main(argv: list[str]) -> None:
    config, out, device = argv
    from gped.config import load_config
    import gped.roles.sampler as role

    rec = Recorder()
    install(rec)
    code = role.run(load_config(config), device=device)
    Path(out).write_text(json.dumps(rec.result(code), indent=2) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])

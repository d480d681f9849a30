"""Where the time goes: cProfile of the sampler and a student, and the sequential loop's breakdown.

All in this process, on one core, with gped's own role classes:

* **sampler** — :class:`gped.roles.sampler.SamplerRole` stepping its chain and publishing through a
  real :class:`gped.transport.Channel` on a bound PUB socket (encode and ``send_multipart`` run;
  with nobody subscribed ZeroMQ discards the bytes);
* **student** — :class:`gped.roles.student.StudentRole` fed the messages that sampler published,
  each decoded from its encoded frames first (targets mode: ``on_targets``; params mode:
  ``on_params``);
* **reference** — :class:`gped.reference.ReferenceRun` with a timer on each part of Algorithm 1
  (chain step, ensemble evaluation, targets evaluation, student updates): the part the sampler keeps
  on its critical path in a distributed run bounds the speed-up ``gped run`` can reach.

Profiles are summarised as the cumulative time of named functions (nested rows are indented and
included in the row above) and the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import QUICKSTART, free_port_pair, make_config, table, write_json


@dataclass(frozen=True)
class ProfileSettings:
    sampler_steps: int = 400
    reference_steps: int = 400
    base: str = str(QUICKSTART)
    overrides: tuple[str, ...] = ()
    top: int = 8


PRESETS = {
    "tiny": ProfileSettings(sampler_steps=40, reference_steps=40, top=5,
                            overrides=("data.source=\"synthetic\"", "teacher.k1=0.25", "teacher.k2=0.25")),
    "quick": ProfileSettings(sampler_steps=300, reference_steps=300),
    "full": ProfileSettings(sampler_steps=2000, reference_steps=2000, top=12),
}

#: (label, file suffix, function name or substring of a built-in's name); "  " nests under the row above
SAMPLER_ROWS = [
    ("chain step (TeacherChain.advance)", "gped/core/chain.py", "advance"),
    ("  autograd backward", "~", "run_backward"),
    ("  linear layers (forward)", "~", "torch._C._nn.linear"),
    ("  SGLD update (sampler.step)", "samplers/sgld.py", "step"),
    ("    Gaussian noise (torch.randn)", "~", "torch.randn"),
    ("snapshot (flat_parameters)", "gped/core/models.py", "flat_parameters"),
    ("distillation batch (DistillStream.next)", "gped/core/chain.py", "next"),
    ("distillation inputs (distill_inputs)", "gped/core/data.py", "distill_inputs"),
    ("targets evaluation (evaluate_logits)", "gped/core/chain.py", "evaluate_logits"),
    ("staging (HostStager.stage; device→host on CUDA)", "gped/staging.py", "stage"),
    ("message build + validation", "gped/wire/messages.py", "__post_init__"),
    ("  finite check (all_finite)", "gped/wire/messages.py", "all_finite"),
    ("publish (Channel.send)", "gped/transport.py", "send"),
    ("  encode", "gped/wire/codec.py", "encode"),
    ("  send_multipart", "zmq/sugar/socket.py", "send_multipart"),
]

STUDENT_ROWS = [
    ("decode + validation", "gped/wire/codec.py", "decode"),
    ("  finite check (all_finite)", "gped/wire/messages.py", "all_finite"),
    ("load snapshot (load_flat_parameters)", "gped/core/models.py", "load_flat_parameters"),
    ("distillation inputs (distill_inputs)", "gped/core/data.py", "distill_inputs"),
    ("teacher evaluation (evaluate_logits)", "gped/core/chain.py", "evaluate_logits"),
    ("targets: statistic + U_o update", "gped/core/distill.py", "targets"),
    ("  U_o update (OnlineAverage.update)", "gped/core/estimators.py", "update"),
    ("student step (Distiller.train_step)", "gped/core/distill.py", "train_step"),
    ("  autograd backward", "~", "run_backward"),
    ("  Adam (optimizer.step)", "torch/optim/adam.py", "step"),
]


def _lookup(stats: pstats.Stats, suffix: str, name: str) -> float:
    total = 0.0
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if suffix == "~":
            if filename == "~" and name in func:
                total += ct
        elif filename.endswith(suffix) and func == name:
            total += ct
    return total


def summarise(prof: cProfile.Profile, rows: list[tuple[str, str, str]], wall: float, units: int, unit: str, top: int) -> dict[str, Any]:
    stats = pstats.Stats(prof)
    out = []
    for label, suffix, name in rows:
        seconds = _lookup(stats, suffix, name)
        if seconds:
            out.append({"part": label, "ms_per_" + unit: seconds / units * 1e3, "share": seconds / wall})
    own = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    tops = [{"function": _name(key), "own_ms_per_" + unit: v[2] / units * 1e3, "share": v[2] / wall} for key, v in own]
    return {"wall_s": wall, unit + "s": units, "ms_per_" + unit: wall / units * 1e3, "parts": out, "top": tops}


def _name(key: tuple[str, int, str]) -> str:
    filename, line, func = key
    if filename == "~":
        return func
    short = "/".join(Path(filename).parts[-2:])
    return f"{short}:{line}({func})"


def profile_sampler(cfg, data, steps: int, top: int, device: str = "cpu") -> tuple[dict[str, Any], list]:
    import torch
    import zmq

    from gped.roles.sampler import SamplerRole
    from gped.transport import Channel, make_socket

    ctx = zmq.Context()
    pub = make_socket(ctx, zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{free_port_pair()}")
    channel = Channel(pub, "sampler")
    sent: list = []

    def publish(topic, msg):
        sent.append(msg)
        return channel.send(msg, [topic])

    role = SamplerRole(cfg, data, torch.device(device), publish)
    for _ in range(20):  # warm-up
        role.step()
    sent.clear()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        role.step()
    prof.disable()
    wall = time.perf_counter() - start
    pub.close(linger=0)
    ctx.term()
    return summarise(prof, SAMPLER_ROWS, wall, steps, "step", top), sent


def profile_student(cfg, data, messages: list, kind: str, top: int, device: str = "cpu") -> dict[str, Any]:
    import torch

    from gped.roles.student import StudentRole
    from gped.wire import Params, Targets, decode, encode

    wanted = Targets if kind == "targets" else Params
    frames = [[bytes(f) for f in encode(m)] for m in messages if isinstance(m, wanted)]
    role = StudentRole(cfg, cfg.students[0], data, torch.device(device), lambda msg: True)
    handle = role.on_targets if kind == "targets" else role.on_params
    handle(decode(frames[0]))  # warm-up
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for f in frames[1:]:
        handle(decode(f))
    prof.disable()
    wall = time.perf_counter() - start
    return summarise(prof, STUDENT_ROWS, wall, max(1, len(frames) - 1), "sample", top)


def reference_breakdown(cfg, data, steps: int, device: str = "cpu") -> dict[str, Any]:
    """Time each part of the sequential loop; the sampler-side parts bound what ``gped run`` gains."""
    import gped.reference as ref
    from gped.reference import ReferenceRun

    run = ReferenceRun(cfg, device, data=data)
    spent = {"chain step": 0.0, "ensemble evaluation (test set)": 0.0, "targets evaluation": 0.0, "student updates": 0.0}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    original_eval = ref.evaluate_logits

    def evaluate(model, x, *args, **kwargs):
        key = "ensemble evaluation (test set)" if x is run.test_x or x is getattr(run, "ood_x", None) else "targets evaluation"
        return timed(key, original_eval)(model, x, *args, **kwargs)

    run.chain.advance = timed("chain step", run.chain.advance)
    for distiller in run.distillers.values():
        distiller.observe = timed("student updates", distiller.observe)
    ref.evaluate_logits = evaluate
    try:
        for _ in range(20):
            run.step()
        for key in spent:
            spent[key] = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            run.step()
        wall = time.perf_counter() - start
    finally:
        ref.evaluate_logits = original_eval
    parts = [{"part": k, "ms_per_step": v / steps * 1e3, "share": v / wall} for k, v in spent.items()]
    parts.append({"part": "other (batches, noise, bookkeeping)", "ms_per_step": (wall - sum(spent.values())) / steps * 1e3,
                  "share": 1 - sum(spent.values()) / wall})
    critical = spent["chain step"] + (spent["targets evaluation"] if cfg.sampler.mode == "targets" else 0.0)
    return {"wall_s": wall, "steps": steps, "ms_per_step": wall / steps * 1e3, "parts": parts,
            # what is left on the sampler's path when students and ensemble run elsewhere
            "sampler_path_share": critical / wall, "speedup_ceiling": wall / critical if critical else None}


def run(settings: ProfileSettings, work: Path, device: str = "cpu") -> dict[str, Any]:
    import torch

    from gped.runtime import load_data

    torch.set_num_threads(1)
    base = ["sampler.burn_in=0", *settings.overrides]
    out: dict[str, Any] = {"settings": asdict(settings), "device": device}
    for mode in ("targets", "params"):
        cfg, _ = make_config(work / f"profile-{mode}", base=Path(settings.base), overrides=[f'sampler.mode="{mode}"', *base],
                             prepared=work / "data")
        data = load_data(cfg)
        sampler, messages = profile_sampler(cfg, data, settings.sampler_steps, settings.top, device)
        out[f"sampler_{mode}"] = sampler
        out[f"student_{mode}"] = profile_student(cfg, data, messages, mode, settings.top, device)
        out[f"reference_{mode}"] = reference_breakdown(cfg, data, settings.reference_steps, device)
    return out


def render(result: dict[str, Any]) -> str:
    parts = []
    for mode in ("targets", "params"):
        s, st, r = result[f"sampler_{mode}"], result[f"student_{mode}"], result[f"reference_{mode}"]
        parts.append(table(s["parts"], ["part", "ms_per_step", "share"],
                           f"profile ({mode} mode, {result.get('device', 'cpu')}): sampler, {s['ms_per_step']:.3g} ms per step"))
        parts.append(table(st["parts"], ["part", "ms_per_sample", "share"],
                           f"profile ({mode} mode): student, {st['ms_per_sample']:.3g} ms per sample"))
        parts.append(table(r["parts"], ["part", "ms_per_step", "share"],
                           f"profile ({mode} mode): sequential reference loop, {r['ms_per_step']:.3g} ms per step; sampler-side share "
                           f"{r['sampler_path_share']:.2f}, speed-up ceiling for gped run {r['speedup_ceiling']:.2f}x"))
    s = result["sampler_targets"]
    parts.append(table(s["top"], ["function", "own_ms_per_step", "share"], "profile: sampler (targets mode), top functions by own time"))
    st = result["student_targets"]
    parts.append(table(st["top"], ["function", "own_ms_per_sample", "share"], "profile: student (targets mode), top functions by own time"))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="cProfile of the sampler and a student; the reference loop's breakdown.")
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("bench-work/profile"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(PRESETS[args.preset], args.work, args.device)
    print(render(result))
    if args.out:
        write_json(args.out, {"profile": result})


if __name__ == "__main__":
    main()

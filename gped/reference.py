"""The sequential reference loop: the paper's Algorithm 1 in one process.

It runs the same parts the distributed roles run (teacher chain, distillation stream, distillers,
ensemble accumulator, scores) in one loop, so it is both the correctness oracle for the distributed
run (same seeds → same chain, same targets) and its speed baseline.

    for t = 1 … T:
        θ ← SGLD step on a minibatch                                  (TeacherChain.advance)
        if t > B and t mod H = 0:                                       (a posterior sample)
            ensemble ← ensemble + teacher outputs on the test set
            targets mode: one batch (indices, noise seed) from the sampler's stream, teacher logits
                          on it, and every student takes one step on it
            params mode:  every student draws its own batches from its own stream,
                          steps_per_sample of them, and evaluates the teacher itself
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .config import RunConfig, save_config
from .core.chain import DistillStream, TeacherChain, evaluate_logits
from .core.data import distill_inputs
from .core.distill import Distiller, EnsembleAccumulator
from .core.evaluate import ensemble_scores, student_scores, summary_table
from .checkpoint import save_checkpoint
from .log import Progress
from .roles.common import checkpoint_path, checkpoint_state
from .runtime import TARGETS_STREAM_OFFSET, build_teacher_for, load_data, pick_device

log = logging.getLogger("gped.reference")


class ReferenceRun:
    """State of one sequential run; :meth:`step` advances the chain by one SGLD step."""

    def __init__(self, cfg: RunConfig, device: torch.device | str = "cpu", data=None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.data = data if data is not None else load_data(cfg)
        d = self.data
        self.train_x = torch.from_numpy(d.train_x).to(self.device)
        self.test_x = torch.from_numpy(d.test_x)
        self.test_y = d.test_y
        self.chain = TeacherChain(
            build_teacher_for(cfg, d), torch.from_numpy(d.labelled_x), torch.from_numpy(d.labelled_y), cfg.sampler, self.device
        )
        n_distill = len(d.train_x)
        targets = cfg.sampler.distill_batch if cfg.sampler.mode == "targets" else None
        self.distillers = {s.name: Distiller(s, d.input_shape, d.num_classes, n_distill, self.device, targets) for s in cfg.students}
        self.targets_stream = DistillStream(n_distill, cfg.sampler.distill_batch, cfg.sampler.seed + TARGETS_STREAM_OFFSET)
        self.student_streams = {s.name: DistillStream(n_distill, s.batch_size, s.seed) for s in cfg.students}
        self.ensemble = EnsembleAccumulator(len(self.test_x), d.num_classes)
        self.ood_x = torch.from_numpy(d.ood_x) if d.ood_x is not None else None
        self.ood_ensemble = EnsembleAccumulator(len(self.ood_x), d.num_classes) if self.ood_x is not None else None
        self.samples = 0
        self.last_losses: dict[str, dict[str, float]] = {}

    def batch(self, stream: DistillStream):
        indices, noise_seed = stream.next()
        inputs = distill_inputs(self.train_x, indices.to(self.device), noise_seed, self.cfg.data.distill_noise)
        return indices, noise_seed, inputs

    def step(self) -> bool:
        """One chain step; on a posterior sample, update the ensemble and every student. Returns is_sample."""
        self.chain.advance()
        if not self.chain.is_sample():
            return False
        teacher = self.chain.model
        self.ensemble.add(evaluate_logits(teacher, self.test_x))
        if self.ood_ensemble is not None:
            self.ood_ensemble.add(evaluate_logits(teacher, self.ood_x))
        sample = self.samples
        if self.cfg.sampler.mode == "targets":
            indices, _, inputs = self.batch(self.targets_stream)
            logits = evaluate_logits(teacher, inputs)
            for name, distiller in self.distillers.items():
                if sample % distiller.cfg.sample_every == 0:
                    self.last_losses[name] = distiller.observe(inputs, indices, logits)
        else:
            for name, distiller in self.distillers.items():
                if sample % distiller.cfg.sample_every:
                    continue
                for _ in range(distiller.cfg.steps_per_sample):
                    indices, _, inputs = self.batch(self.student_streams[name])
                    self.last_losses[name] = distiller.observe(inputs, indices, evaluate_logits(teacher, inputs))
        self.samples += 1
        return True

    def scores(self) -> dict[str, dict[str, float]]:
        rows = {"teacher ensemble": ensemble_scores(self.ensemble, self.test_y)}
        for name, distiller in self.distillers.items():
            preds = {k: v.numpy() for k, v in distiller.predict(self.test_x).items()}
            rows[name] = student_scores(preds, self.ensemble, self.test_y)
        return rows


def write_records(metrics_log, run: ReferenceRun, final: bool) -> dict[str, dict[str, float]]:
    """One metrics.jsonl line per model, in the coordinator's schema (so reports read either run)."""
    rows = run.scores()
    now = time.time()
    for name, scores in rows.items():
        record = {"time": now, "student": name, "sample": run.samples - 1, "step": run.chain.step,
                  "ensemble_samples": run.ensemble.count, "final": final, "scores": scores,
                  "student_metrics": {f"loss.{k}": v for k, v in run.last_losses.get(name, {}).items()}}
        metrics_log.write(json.dumps(record) + "\n")
    metrics_log.flush()
    return rows


def save_run_checkpoints(run: ReferenceRun, run_dir: Path) -> None:
    """The final state in the roles' checkpoint layout, so ``gped.load_student`` and reports work."""
    fingerprint = run.data.fingerprint
    save_checkpoint(checkpoint_path(run.cfg, "sampler", "sampler"),
                    checkpoint_state(run.cfg, fingerprint, {"chain": run.chain.state_dict(), "samples_sent": run.samples}))
    for name, distiller in run.distillers.items():
        save_checkpoint(checkpoint_path(run.cfg, "student", name),
                        checkpoint_state(run.cfg, fingerprint, {"distiller": distiller.state_dict(), "samples": run.samples}))
    state = {"ensemble": run.ensemble.state_dict(), "last_sample": run.samples - 1, "ensemble_missed": 0}
    if run.ood_ensemble is not None:
        state["ood_ensemble"] = run.ood_ensemble.state_dict()
    save_checkpoint(checkpoint_path(run.cfg, "coordinator", "coordinator"), checkpoint_state(run.cfg, fingerprint, state))


def run_reference(cfg: RunConfig, device: str = "auto", progress_s: float = 5.0) -> dict[str, dict[str, float]]:
    """Run Algorithm 1 to ``cfg.sampler.steps``; write config, metrics.jsonl and summary to the run dir."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    run = ReferenceRun(cfg, pick_device(device))
    log.info(
        "reference run: %d steps, burn-in %d, thin %d, %d students, N=%d labelled, N'=%d distillation, device %s",
        cfg.sampler.steps, cfg.sampler.burn_in, cfg.sampler.thin, len(cfg.students), run.data.num_train, run.data.num_distill, run.device,
    )
    progress = Progress(log, progress_s, unit="step")
    start = time.monotonic()
    with open(run_dir / "metrics.jsonl", "w") as metrics_log:
        for _ in range(cfg.sampler.steps):
            if run.step() and run.samples % cfg.coordinator.eval_every == 0:
                write_records(metrics_log, run, final=False)
            losses = {f"{n}.{k}": v for n, l in run.last_losses.items() for k, v in l.items()}
            progress.update(run.chain.step, samples=run.samples, **losses)
        rows = write_records(metrics_log, run, final=True)
    elapsed = time.monotonic() - start
    save_run_checkpoints(run, run_dir)
    summary = {"steps": run.chain.step, "samples": run.samples, "wall_s": elapsed, "scores": rows,
               "students": {name: {"samples": run.samples, "missed": 0, "updates": d.updates} for name, d in run.distillers.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.md").write_text(summary_table(rows) + "\n")
    log.info("done: %d steps, %d samples in %.1f s", run.chain.step, run.samples, elapsed)
    return rows

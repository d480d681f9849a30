"""Commands that start the roles of a distributed run: one each, or all of them (``gped run``)."""

from __future__ import annotations

import click

from .cli import _fail_cleanly, _load, config_argument, overrides_option, run_dir_option


def register(main: click.Group) -> None:
    @main.command()
    @config_argument
    @overrides_option
    @run_dir_option
    @click.option("--resume", is_flag=True, help="Continue from the run directory's checkpoint.")
    @_fail_cleanly
    def coordinator(config, overrides, run_dir, resume):
        """Start the coordinator: handshake, ensemble, evaluation, checkpoints, summary."""
        from .roles import coordinator as role

        role.main(_load(config, overrides, run_dir), resume)

    @main.command()
    @config_argument
    @overrides_option
    @run_dir_option
    @click.option("--device", default=None, help="Override sampler.device (auto, cpu, cuda, cuda:N).")
    @click.option("--resume", is_flag=True, help="Continue the chain from its checkpoint.")
    @_fail_cleanly
    def sampler(config, overrides, run_dir, device, resume):
        """Start the sampler: the teacher's SGLD chain, streaming posterior samples."""
        from .roles import sampler as role

        role.main(_load(config, overrides, run_dir), resume, device)

    @main.command()
    @config_argument
    @overrides_option
    @run_dir_option
    @click.option("--name", required=True, help="Which [[students]] entry of the config to run.")
    @click.option("--device", default=None, help="Override the student's device.")
    @click.option("--resume", is_flag=True, help="Continue from this student's checkpoint.")
    @_fail_cleanly
    def student(config, overrides, run_dir, name, device, resume):
        """Start one student: distil its expectations from the sample stream."""
        from .roles import student as role

        role.main(_load(config, overrides, run_dir), name, resume, device)

    @main.command()
    @click.argument("folder", type=click.Path(file_okay=False))
    @_fail_cleanly
    def keys(folder):
        """Make CURVE key pairs for authenticated runs across hosts (set coordinator.keys=FOLDER)."""
        from .transport import make_keys

        for path in make_keys(folder):
            click.echo(path)
        click.echo(f"copy {folder} to every host of the run (keep the *_secret files private)")

    @main.command()
    @config_argument
    @overrides_option
    @run_dir_option
    @click.option("--resume", "resume_dir", default=None, type=click.Path(file_okay=False), help="Resume the run in this directory.")
    @click.option("--timeout", default=0.0, type=float, help="Stop the run after this many seconds (0: no limit).")
    @click.option("--pin/--no-pin", default=True, show_default=True,
                  help="Give the sampler `threads` cores of its own and the other roles the rest (Linux).")
    @_fail_cleanly
    def run(config, overrides, run_dir, resume_dir, timeout, pin):
        """Launch coordinator, sampler and students as local processes and wait for them."""
        from pathlib import Path

        from .launcher import launch

        if resume_dir:
            config = config or str(Path(resume_dir) / "config.json")
            run_dir = run_dir or resume_dir
        code = launch(_load(config, overrides, run_dir), resume=bool(resume_dir), timeout_s=timeout, pin=pin)
        raise SystemExit(code)

    @main.command()
    @click.argument("run_dir", type=click.Path())
    @click.option("--out", default=None, type=click.Path(), help="Folder for report.md and the figures (default: RUN_DIR/report).")
    @_fail_cleanly
    def report(run_dir, out):
        """Write report.md and PNG plots (learning curves, entropy scatter, reliability, OOD ROC) for a run."""
        from .log import setup_logging
        from .report import write_report

        setup_logging("report")
        result = write_report(run_dir, out)
        click.echo(f"wrote {result.markdown} with {len(result.figures)} figure(s): {', '.join(p.name for p in result.figures.values())}")
        for note in result.notes:
            click.echo(f"note: {note}")

    # --- gped search (gped/search.py) ---
    @main.command()
    @config_argument
    @overrides_option
    @click.option("--run-dir", default=None, help="Run directory (default: the config's run_dir + '-search').")
    @click.option("--k1", required=True, metavar="LIST", help="Comma-separated K1 width multipliers, e.g. 0.25,0.5,1.")
    @click.option("--k2", required=True, metavar="LIST", help="Comma-separated K2 width multipliers.")
    @click.option("--lasso", default="", metavar="LIST", help="Comma-separated group-lasso strengths λ (none: grid only).")
    @click.option("--finetune-steps", default=200, show_default=True, type=click.IntRange(min=0), help="Fine-tuning steps after pruning.")
    @click.option("--tolerance", default=0.01, show_default=True, type=float, help="Choose the cheapest speed-front student within this NLL of the best.")
    @click.option("--equal-budget/--no-equal-budget", default=True, show_default=True,
                  help="Grid students keep learning while the pruned ones fine-tune (same steps for all).")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (latency is always timed on the CPU).")
    @_fail_cleanly
    def search(config, overrides, run_dir, k1, k2, lasso, finetune_steps, tolerance, equal_budget, device):
        """Student architecture search: K1×K2 grid and group-lasso pruning on one chain, Pareto fronts."""
        from pathlib import Path

        from .log import setup_logging
        from .runtime import set_threads
        from .search import SearchSpec, parse_values, run_search

        setup_logging("search")
        cfg = _load(config, overrides, run_dir)
        if not run_dir:
            cfg.run_dir = cfg.run_dir.rstrip("/") + "-search"
        spec = SearchSpec(parse_values(k1, "k1"), parse_values(k2, "k2"), parse_values(lasso, "lasso"), finetune_steps,
                          tolerance, equal_budget=equal_budget)
        set_threads(cfg.threads)
        result = run_search(cfg, spec.validate(), device=device)
        click.echo((Path(result["run_dir"]) / "search.md").read_text())

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
    @_fail_cleanly
    def run(config, overrides, run_dir, resume_dir, timeout):
        """Launch coordinator, sampler and students as local processes and wait for them."""
        from pathlib import Path

        from .launcher import launch

        if resume_dir:
            config = config or str(Path(resume_dir) / "config.json")
            run_dir = run_dir or resume_dir
        code = launch(_load(config, overrides, run_dir), resume=bool(resume_dir), timeout_s=timeout)
        raise SystemExit(code)

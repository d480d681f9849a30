"""The ``gped`` command: a thin click layer that parses, loads the config, and calls the library.

Every command takes an optional CONFIG (TOML; the built-in defaults when omitted) and any number of
``--set key=value`` overrides. Bad input ends with one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__
from .errors import GpedError


def _fail_cleanly(func):
    """Turn a GpedError into one clear line and exit 2; Ctrl-C into exit 130 without a traceback.

    A file-system error on a path the user chose (``--out`` is a file, a run directory that
    cannot be created, no permission) is bad input too: one line naming the path, exit 2.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except GpedError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


config_argument = click.argument("config", required=False, type=click.Path(dir_okay=False))
overrides_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value, e.g. --set sampler.step_size=1e-5 (repeatable)."
)
run_dir_option = click.option("--run-dir", default=None, help="Run directory (default: the config's run_dir).")


def _load(config, overrides, run_dir=None):
    from .config import load_config

    extra = list(overrides)
    if run_dir:
        extra.append(f"run_dir={json.dumps(str(run_dir))}")  # a JSON string is a valid TOML basic string
    return load_config(config, extra)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gped")
def main() -> None:
    """gped: distil Bayesian posterior expectations (GPED) into small student networks, online."""


@main.group()
def data() -> None:
    """Prepare and inspect persisted data sets."""


@data.command("prepare")
@config_argument
@overrides_option
@click.option("--out", default=None, help="Folder for the prepared data set (default: data.prepared or <run_dir>/data).")
@_fail_cleanly
def data_prepare(config, overrides, out) -> None:
    """Load, subset, occlude and persist a data set once (with a fingerprint) for every later run."""
    from .core.data import prepare
    from .log import setup_logging
    from .runtime import prepared_dir

    setup_logging("data")
    cfg = _load(config, overrides)
    path = out or prepared_dir(cfg)
    prepared = prepare(cfg.data, path)
    click.echo(
        f"prepared {cfg.data.source} at {path}: {prepared.num_train} labelled / {prepared.num_distill} distillation / "
        f"{len(prepared.test_x)} test examples, input {prepared.input_shape}, {prepared.num_classes} classes, "
        f"fingerprint {prepared.fingerprint}"
    )


@main.command()
@config_argument
@overrides_option
@run_dir_option
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@_fail_cleanly
def reference(config, overrides, run_dir, device) -> None:
    """Run the paper's Algorithm 1 sequentially in one process (the correctness and speed oracle)."""
    from .core.evaluate import summary_table
    from .log import setup_logging
    from .reference import run_reference
    from .runtime import set_threads

    setup_logging("reference")
    cfg = _load(config, overrides, run_dir)
    set_threads(cfg.threads)
    rows = run_reference(cfg, device=device)
    click.echo(summary_table(rows))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--sgd-epochs", default=30, show_default=True, type=click.IntRange(min=1), help="Epochs for the plain SGD baseline network.")
@click.option("--draws", default=500, show_default=True, type=click.IntRange(min=1), help="Random test subsets for the nDCG ranking score.")
@_fail_cleanly
def evaluate(run_dir, sgd_epochs, draws) -> None:
    """OOD detection (AUROC) and uncertainty ranking (nDCG@20) for the ensemble, students and an SGD net."""
    from .evaluation import check_run_dir, evaluate_run, evaluation_table
    from .log import setup_logging

    setup_logging("evaluate")
    check_run_dir(run_dir)
    result = evaluate_run(run_dir, sgd_epochs=sgd_epochs, draws=draws)
    click.echo(evaluation_table(result["models"]))


@main.command()
@config_argument
@overrides_option
@click.option("--grid", "grid", multiple=True, required=True, metavar="KEY=V1,V2", help="A swept key and its values (repeatable: the product is run).")
@click.option("--out", required=True, help="Folder for the sweep: one run directory per grid point, results.md/json.")
@click.option("--mode", type=click.Choice(["reference", "run"]), default="reference", show_default=True,
              help="reference: one process per point; run: the distributed system per point.")
@click.option("--device", default="cpu", show_default=True, help="Device for reference runs.")
@_fail_cleanly
def sweep(config, overrides, grid, out, mode, device) -> None:
    """Run a grid of experiments (e.g. masks x estimators) and collect one results table."""
    from .log import setup_logging
    from .sweep import results_table, run_sweep

    setup_logging("sweep")
    rows = run_sweep(config, list(overrides), list(grid), out, mode, device)
    from .sweep import parse_grid

    click.echo(results_table(rows, list(parse_grid(list(grid)))))


def _register_role_commands() -> None:
    """Role commands live in :mod:`gped.cli_roles` so this module stays a table of contents."""
    try:
        from . import cli_roles
    except ImportError:  # pragma: no cover - roles not installed
        return
    cli_roles.register(main)


_register_role_commands()


def entry() -> None:
    """The console command: run the command, flush, and exit without the interpreter's teardown.

    Tearing down an interpreter that loaded torch takes about half a second; a run of four or five
    processes ending together on a small machine pays that several times over. Every command has
    written and closed what it writes (files, checkpoints, sockets) by the time it returns, so
    flushing the standard streams and logging is all that is left to do.
    """
    import logging
    import os
    import traceback

    try:
        main(standalone_mode=True)
        code: int = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - a bug: show it, as the interpreter would
        traceback.print_exc()
        code = 1
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said
        pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()

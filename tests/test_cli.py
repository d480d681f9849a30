"""The ``gped`` command line: help, and bad input → one ``error:`` line, exit status 2, no traceback.

Most cases run in-process through click's CliRunner (fast); a few run ``python -m gped`` as a real
subprocess to confirm the exit status and stderr a user actually sees.  Log level is WARNING so that
stderr holds nothing but the error line.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gped.cli import main

QUIET = {"GPED_LOG_LEVEL": "WARNING"}
ROLE_COMMANDS = ("data", "reference", "run", "sampler", "student", "coordinator", "sweep", "search")
#: commands that act on a folder, not a config: no --set
FOLDER_COMMANDS = ("evaluate", "report", "keys")


@pytest.fixture(autouse=True)
def _restore_root_logger():
    """Commands call setup_logging, which replaces the root logger's handlers with one bound to
    CliRunner's (soon closed) stderr; put pytest's handlers back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def runner() -> CliRunner:
    """stdout and stderr apart (click < 8.2 needs asking; later versions always do it)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(*args: str):
    return runner().invoke(main, list(args), env=QUIET)


def assert_clean_error(result, *fragments: str) -> str:
    """Exit 2 by a deliberate sys.exit (not an escaped exception), stderr exactly one ``error:`` line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exc_info)
    assert isinstance(result.exception, SystemExit), result.exc_info
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def prepare_args(tmp_path: Path, *sets: str, config: str | None = None) -> list[str]:
    args = ["data", "prepare"] + ([config] if config else [])
    for item in sets:
        args += ["--set", item]
    return args + ["--out", str(tmp_path / "prepared")]


# ---------------------------------------------------------------------------------------------
# help


def test_help_lists_every_command():
    result = runner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    commands = result.output.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert set(ROLE_COMMANDS + FOLDER_COMMANDS) <= listed, listed


@pytest.mark.parametrize("command", [c.split() for c in ROLE_COMMANDS + FOLDER_COMMANDS + ("data prepare",)], ids=str)
def test_each_command_has_help(command):
    result = runner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:")
    if command != ["data"] and command[0] not in FOLDER_COMMANDS:
        assert "--set" in result.output


def test_version():
    result = runner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("gped")


# ---------------------------------------------------------------------------------------------
# bad overrides and values (config validation; nothing is loaded)

BAD_SETTINGS = [
    # unknown names
    ('data.source="nope"', "unknown data source 'nope'"),
    ('data.ood_source="nope"', "unknown OOD data source 'nope'"),
    ('teacher.arch="resnet9000"', "unknown teacher architecture 'resnet9000'"),
    ('students.0.model.arch="nope"', "architecture 'nope'"),
    ('sampler.name="hmc9"', "unknown sampler 'hmc9'"),
    ('students.0.expectations=["predictive", "vibes"]', "unknown expectation 'vibes'"),
    ("students.0.expectations=[]", "distils no expectation"),
    ('students.0.estimator="median"', "unknown estimator 'median'"),
    ('sampler.mode="both"', "sampler.mode must be 'targets' or 'params'"),
    # impossible numbers
    ("sampler.step_size=-1e-5", "sampler.step_size must be positive"),
    ("sampler.step_size=0", "sampler.step_size must be positive"),
    ("sampler.step_size=nan", "must be a finite number"),
    ("sampler.step_size=inf", "must be a finite number"),
    ("students.0.lr=-0.001", "lr must be positive"),
    ("sampler.prior_precision=-1", "prior_precision must be >= 0"),
    ("sampler.burn_in=-1", "burn_in must be >= 0"),
    ("sampler.thin=0", "sampler.thin must be positive"),
    ("sampler.steps=-5", "sampler.steps must be positive"),
    ("data.mask=-1", "data.mask must be >= 0"),
    ("data.labelled=0", "data.labelled must be positive"),
    ("teacher.k1=0", "width multipliers must be positive"),
    ("teacher.dropout=1.0", "dropout must be in [0, 1)"),
    ("threads=0", "threads must be positive"),
    ("coordinator.port=0", "coordinator.port must be in"),
    # negative and zero batch sizes
    ("sampler.batch_size=0", "sampler.batch_size must be positive"),
    ("sampler.batch_size=-100", "sampler.batch_size must be positive"),
    ("sampler.distill_batch=-1", "sampler.distill_batch must be positive"),
    ("students.0.batch_size=0", "steps_per_sample and sample_every must be positive"),
    ("students.0.steps_per_sample=-2", "steps_per_sample and sample_every must be positive"),
    # unknown keys
    ("bogus=1", "unknown key(s) in config: bogus"),
    ("sampler.stepsize=1e-5", "unknown key(s) in config.sampler: stepsize"),
    ("students.0.learning_rate=1e-3", "unknown key(s) in config.students[0]: learning_rate"),
    # wrong types
    ('sampler.batch_size="big"', "config.sampler.batch_size must be an integer, got 'big'"),
    ("sampler.steps=1.5", "config.sampler.steps must be an integer"),
    ("sampler.step_size=true", "config.sampler.step_size must be a number"),
    ("sampler.step_size=fast", "config.sampler.step_size must be a number, got 'fast'"),
    ("data.download=1", "config.data.download must be true or false"),
    ("data.source=3", "config.data.source must be a string"),
    ("students.0.expectations=\"predictive\"", "config.students[0].expectations must be a list"),
    ("sampler=1", "config.sampler must be a table"),
    ("students=1", "config.students must be a list"),
    ("students=[1]", "config.students[0] must be a table"),
    # malformed overrides
    ("sampler.step_size", "must look like key=value"),
    ("=1", "has an empty key part"),
    ("sampler..step_size=1", "has an empty key part"),
    ("students.3.lr=1e-3", "no list entry '3'"),
    ("students.first.lr=1e-3", "no list entry 'first'"),
    ("students.0=1", "cannot replace a whole list entry"),
    ("sampler.step_size.x=1", "config.sampler.step_size must be a number"),
]


@pytest.mark.parametrize("setting,message", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_setting_is_one_clear_line(tmp_path, setting, message):
    result = invoke(*prepare_args(tmp_path, setting))
    assert_clean_error(result, message)
    assert not (tmp_path / "prepared").exists()


def test_duplicate_student_names(tmp_path):
    config = tmp_path / "dup.toml"
    config.write_text('[[students]]\nname = "a"\n[[students]]\nname = "a"\n')
    assert_clean_error(invoke(*prepare_args(tmp_path, config=str(config))), "student names must be unique")


def test_override_into_a_value(tmp_path):
    """An override that descends through a value someone already set (file or earlier --set)."""
    config = tmp_path / "odd.toml"
    config.write_text('name = "odd"\nstudents = "many"\n')
    assert_clean_error(invoke(*prepare_args(tmp_path, "students.0.lr=1e-3", config=str(config))), "students is a value, not a table")
    assert_clean_error(invoke(*prepare_args(tmp_path, "name.first=1", config=str(config))), "name is a value, not a table")
    result = invoke(*prepare_args(tmp_path, "sampler.step_size=1e-5", "sampler.step_size.x=1"))
    assert_clean_error(result, "sampler.step_size is a value, not a table")


# ---------------------------------------------------------------------------------------------
# config files


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.toml", None, "config file not found"),
        ("broken.toml", b"[sampler\nstep_size = 1e-5\n", "cannot parse config"),
        ("noval.toml", b"name =\n", "cannot parse config"),
        ("binary.toml", b"\xff\xfe\x00garbage", "cannot parse config"),
        ("broken.json", b'{"name": ', "cannot parse config"),
        ("list.json", b"[1, 2]", "must hold a table of settings"),
        ("unknown.toml", b"[sampler]\nstepsize = 1e-5\n", "unknown key(s) in config.sampler: stepsize"),
        ("types.toml", b'[sampler]\nstep_size = "small"\n', "config.sampler.step_size must be a number"),
        ("negative.toml", b"[sampler]\nstep_size = -4e-6\n", "sampler.step_size must be positive"),
    ],
    ids=["missing", "broken-toml", "no-value", "not-utf8", "broken-json", "json-list", "unknown-key", "wrong-type", "negative-step"],
)
def test_bad_config_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    line = assert_clean_error(invoke(*prepare_args(tmp_path, config=str(path))), message)
    if "config" in message and "config." not in message:  # errors about the file itself name it
        assert name in line


def test_quickstart_config_is_valid(tmp_path):
    """The shipped config parses and validates (prepare would then succeed; checked elsewhere)."""
    from gped.config import load_config

    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "configs" / "quickstart.toml")
    assert cfg.data.source == "digits" and len(cfg.students) >= 1


# ---------------------------------------------------------------------------------------------
# .npy folders


def write_npy_folder(folder: Path, n_train: int = 40, n_test: int = 20, shape=(1, 8, 8)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(folder / "train_x.npy", rng.random((n_train, *shape), dtype=np.float32))
    np.save(folder / "train_y.npy", np.arange(n_train) % 4)
    np.save(folder / "test_x.npy", rng.random((n_test, *shape), dtype=np.float32))
    np.save(folder / "test_y.npy", np.arange(n_test) % 4)
    return folder


def _truncate(path: Path, keep: int | None = None) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2 if keep is None else keep])


def _replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _disguised_npz(path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, a=np.zeros(3))


NPY_CORRUPTIONS = {
    # name: (corrupt(folder), message fragment)
    "truncated": (lambda d: _truncate(d / "train_x.npy"), "cannot read"),
    "truncated-header": (lambda d: _truncate(d / "test_x.npy", keep=20), "cannot read"),
    "empty-file": (lambda d: _truncate(d / "test_y.npy", keep=0), "cannot read"),
    "not-npy": (lambda d: (d / "train_x.npy").write_bytes(b"these bytes are not an array"), "train_x.npy"),
    "pickled-objects": (
        lambda d: np.save(d / "train_y.npy", np.array([{"label": 1}] * 40, dtype=object), allow_pickle=True),
        "pickled object array",
    ),
    "npz-named-npy": (lambda d: _disguised_npz(d / "train_x.npy"), "not a single .npy array"),
    "missing-file": (lambda d: (d / "test_y.npy").unlink(), "missing file"),
    "directory-not-file": (lambda d: _replace_with_directory(d / "train_x.npy"), "train_x.npy"),
    "label-count": (lambda d: np.save(d / "train_y.npy", np.arange(39) % 4), "differ in length (40 vs 39)"),
    "image-shapes": (
        lambda d: np.save(d / "test_x.npy", np.zeros((20, 1, 7, 7), np.float32)),
        "train and test images differ in shape",
    ),
    "flat-images": (lambda d: np.save(d / "train_x.npy", np.zeros((40, 64), np.float32)), "images must be [N, H, W] or [N, C, H, W]"),
    "channels-last": (
        lambda d: (np.save(d / "train_x.npy", np.zeros((40, 8, 8, 1), np.float32)), np.save(d / "test_x.npy", np.zeros((20, 8, 8, 1), np.float32))),
        "channels-last",
    ),
    "nan-images": (lambda d: np.save(d / "test_x.npy", np.full((20, 1, 8, 8), np.nan, np.float32)), "NaN or infinite"),
    "string-images": (lambda d: np.save(d / "train_x.npy", np.full((40, 1, 8, 8), "a")), "images must be uint8"),
    "fractional-labels": (lambda d: np.save(d / "train_y.npy", np.linspace(0, 1, 40)), "labels must be integer class indices"),
    "negative-labels": (lambda d: np.save(d / "test_y.npy", -np.ones(20, np.int64)), "labels must be >= 0"),
    "2d-labels": (lambda d: np.save(d / "train_y.npy", np.zeros((40, 2), np.int64)), "labels must be one-dimensional"),
    "empty-split": (
        lambda d: (np.save(d / "test_x.npy", np.zeros((0, 1, 8, 8), np.float32)), np.save(d / "test_y.npy", np.zeros(0, np.int64))),
        "the test split is empty",
    ),
}


def npy_sets(folder: Path, *extra: str) -> list[str]:
    return ['data.source="npy"', f'data.root="{folder}"', *extra]


def test_good_npy_folder_prepares(tmp_path):
    """The positive control for the corruption cases below."""
    folder = write_npy_folder(tmp_path / "npy")
    result = invoke(*prepare_args(tmp_path, *npy_sets(folder, "data.mask=3")))
    assert result.exit_code == 0, (result.output, result.exc_info)
    assert "40 labelled / 40 distillation / 20 test examples" in result.stdout
    assert (tmp_path / "prepared" / "meta.json").is_file()


@pytest.mark.parametrize("case", list(NPY_CORRUPTIONS))
def test_corrupt_npy_folder(tmp_path, case):
    corrupt, message = NPY_CORRUPTIONS[case]
    folder = write_npy_folder(tmp_path / "npy")
    corrupt(folder)
    assert_clean_error(invoke(*prepare_args(tmp_path, *npy_sets(folder))), message)
    assert not (tmp_path / "prepared" / "meta.json").exists()


def test_npy_folder_problems(tmp_path):
    assert_clean_error(invoke(*prepare_args(tmp_path, 'data.source="npy"')), "needs a folder: set data.root")
    assert_clean_error(invoke(*prepare_args(tmp_path, *npy_sets(tmp_path / "nowhere"))), "does not exist")


def test_impossible_mask_size(tmp_path):
    small = write_npy_folder(tmp_path / "small", shape=(1, 2, 2))
    assert_clean_error(invoke(*prepare_args(tmp_path, *npy_sets(small, "data.mask=3"))), "impossible mask size 3", "2×2")
    assert_clean_error(invoke(*prepare_args(tmp_path, "data.mask=9")), "impossible mask size 9", "digits", "8×8")


def test_labelled_subset_larger_than_the_data(tmp_path):
    assert_clean_error(invoke(*prepare_args(tmp_path, 'data.source="synthetic"', "data.labelled=100000")), "data.labelled=100000")


# ---------------------------------------------------------------------------------------------
# prepared folders


def test_damaged_prepared_folder(tmp_path):
    out = tmp_path / "prepared"
    synthetic = 'data.source="synthetic"'
    assert invoke(*prepare_args(tmp_path, synthetic)).exit_code == 0
    meta = (out / "meta.json").read_text()
    # the same folder with other settings is refused, not overwritten
    assert_clean_error(invoke(*prepare_args(tmp_path, synthetic, "data.mask=2")), "other settings", "mask")
    # edited labels no longer match the fingerprint
    labels = np.load(out / "train_y.npy")
    labels[0] = (labels[0] + 1) % 4
    np.save(out / "train_y.npy", labels)
    assert_clean_error(invoke(*prepare_args(tmp_path, synthetic)), "fingerprint")
    # a truncated array is found when the folder is reused
    _truncate(out / "test_x.npy", keep=(out / "test_x.npy").stat().st_size - 100)
    assert_clean_error(invoke(*prepare_args(tmp_path, synthetic)), "damaged", "test_x.npy")
    # the reference loop reuses prepared data and says the same
    sets = [synthetic, f'data.prepared="{out}"', "sampler.steps=3"]
    result = invoke("reference", *[a for s in sets for a in ("--set", s)], "--run-dir", str(tmp_path / "run"))
    assert_clean_error(result, "damaged", "test_x.npy")
    # unreadable meta.json
    (out / "meta.json").write_text(meta[: len(meta) // 2])
    assert_clean_error(invoke(*prepare_args(tmp_path, synthetic)), "meta.json is unreadable")


def test_output_paths_that_are_files(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    result = runner().invoke(main, ["data", "prepare", "--set", 'data.source="synthetic"', "--out", str(afile)], env=QUIET)
    assert_clean_error(result, str(afile))
    result = invoke("reference", "--set", 'data.source="synthetic"', "--set", "sampler.steps=3", "--run-dir", str(afile / "run"))
    assert_clean_error(result, str(afile))


# ---------------------------------------------------------------------------------------------
# the other commands: bad input is refused before any data, socket or process is touched


def test_reference_bad_device(tmp_path):
    base = ["reference", "--set", 'data.source="synthetic"', "--set", "sampler.steps=3", "--run-dir", str(tmp_path / "run")]
    assert_clean_error(invoke(*base, "--device", "tpu9"), "unknown device 'tpu9'")
    if not torch.cuda.is_available():
        assert_clean_error(invoke(*base, "--device", "cuda"), "CUDA is not available")


def test_role_commands_reject_bad_config(tmp_path):
    run_dir = str(tmp_path / "run")
    assert_clean_error(invoke("student", "--name", "nobody", "--run-dir", run_dir), "no student named 'nobody'", "have student")
    assert_clean_error(invoke("sampler", "--set", "sampler.step_size=-1", "--run-dir", run_dir), "sampler.step_size must be positive")
    assert_clean_error(invoke("coordinator", "--set", "coordinator.port=70000", "--run-dir", run_dir), "coordinator.port")
    assert_clean_error(invoke("run", "--set", 'sampler.name="nuts"', "--run-dir", run_dir), "unknown sampler 'nuts'")
    assert_clean_error(invoke("run", "--resume", str(tmp_path / "no-such-run")), "config file not found", "config.json")
    assert not Path(run_dir).exists()


@pytest.mark.parametrize(
    "args",
    [["student"], ["data", "prepare", "--bogus"], ["no-such-command"], ["run", "--timeout", "soon"]],
    ids=["missing-name", "unknown-option", "unknown-command", "bad-option-type"],
)
def test_usage_errors_exit_2_without_traceback(args):
    """click's own usage errors (usage line, hint, ``Error: ...``) also exit 2 with no traceback."""
    result = invoke(*args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exc_info
    assert "Error:" in result.stderr and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# a good command, end to end in-process


def test_reference_command_tiny_run(tmp_path):
    run_dir = tmp_path / "run"
    sets = ['data.source="synthetic"', "sampler.steps=120", "sampler.burn_in=20", "sampler.thin=5", "coordinator.eval_every=5"]
    result = invoke("reference", *[a for s in sets for a in ("--set", s)], "--run-dir", str(run_dir), "--device", "cpu")
    assert result.exit_code == 0, (result.output, result.exc_info)
    assert "| teacher ensemble |" in result.stdout and "| student |" in result.stdout
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.md"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "summary.json").read_text())["samples"] == 20


# ---------------------------------------------------------------------------------------------
# real processes


def gped(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **QUIET}
    return subprocess.run([sys.executable, "-m", "gped", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_real_process_bad_config_and_npy(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sampler]\nstep_size = -4e-6\n")
    proc = gped("data", "prepare", str(bad), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: sampler.step_size must be positive, got -4e-06"]
    assert proc.stdout == ""

    folder = write_npy_folder(tmp_path / "npy")
    np.save(folder / "train_y.npy", np.array([object()] * 40, dtype=object), allow_pickle=True)
    proc = gped("reference", *[a for s in npy_sets(folder) for a in ("--set", s)], "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pickled object array" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_real_process_unknown_student_with_logging_on(tmp_path):
    """With the default INFO logging, the error is still the only ``error:`` line, and the last."""
    env = {k: v for k, v in os.environ.items() if k != "GPED_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-m", "gped", "student", "--name", "ghost", "--run-dir", str(tmp_path / "run")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert [l for l in lines if l.startswith("error:")] == [lines[-1]]
    assert "no student named 'ghost'" in lines[-1] and "Traceback" not in proc.stderr

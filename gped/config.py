"""Run configuration as dataclasses, read from TOML with command-line overrides.

A config file has one table per part::

    name = "quickstart"
    [data]      # DataConfig
    [teacher]   # ModelConfig of the teacher network
    [sampler]   # SamplerConfig: the SGLD chain
    [[students]]  # one StudentConfig per student process
    [coordinator] # CoordinatorConfig: evaluation, checkpoints, addresses

Overrides are ``dotted.key=value`` strings whose value is parsed as TOML (so ``1e-5``,
``true``, ``"text"`` and ``[1, 2]`` work; a bare word is taken as a string).  Student
entries are addressed by index: ``students.0.lr=1e-3``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from .errors import ConfigError

DATA_SOURCES = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "idx", "npy", "synthetic")


@dataclass
class DataConfig:
    """Where the data comes from and how it is prepared (DESIGN §2, data manipulations)."""

    source: str = "digits"
    #: folder the source reads from (torchvision root, IDX folder or ``.npy`` folder)
    root: str | None = None
    #: allow torchvision to download when the files are not on disk
    download: bool = False
    #: size N of the labelled training subset (stratified, seeded); None keeps every example
    labelled: int | None = None
    #: side m of the zeroed square, fixed per image; 0 disables occlusion
    mask: int = 0
    seed: int = 0
    #: standard deviation of the Gaussian noise added to distillation inputs D'
    distill_noise: float = 1e-3
    #: keep only these classes (relabelled 0..k-1); the others can serve as OOD (``ood_source = "heldout"``)
    classes: list[int] | None = None
    #: optional out-of-distribution source (same names as ``source``, or ``heldout``: the test
    #: images of the classes left out by ``classes``) and its root
    ood_source: str | None = None
    ood_root: str | None = None
    #: where the prepared, persisted data set lives; None means <run_dir>/data
    prepared: str | None = None

    def validate(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"unknown data source {self.source!r}; choose one of {', '.join(DATA_SOURCES)}")
        if self.ood_source is not None and self.ood_source not in DATA_SOURCES + ("heldout",):
            raise ConfigError(f"unknown OOD data source {self.ood_source!r}; choose one of {', '.join(DATA_SOURCES + ('heldout',))}")
        if self.classes is not None:
            if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes) or min(self.classes) < 0:
                raise ConfigError(f"data.classes must list at least 2 distinct non-negative class ids, got {self.classes}")
        if self.ood_source == "heldout" and self.classes is None:
            raise ConfigError('data.ood_source = "heldout" needs data.classes (the classes to keep in distribution)')
        if self.mask < 0:
            raise ConfigError(f"data.mask must be >= 0, got {self.mask}")
        if self.labelled is not None and self.labelled <= 0:
            raise ConfigError(f"data.labelled must be positive, got {self.labelled}")
        if self.distill_noise < 0:
            raise ConfigError(f"data.distill_noise must be >= 0, got {self.distill_noise}")


@dataclass
class ModelConfig:
    """A network: architecture name plus width multipliers (K1 scales convs / first FC, K2 the rest)."""

    arch: str = "mlp"
    k1: float = 1.0
    k2: float = 1.0
    dropout: float = 0.0

    def validate(self, what: str = "model") -> None:
        from .core.models import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"unknown {what} architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.k1 <= 0 or self.k2 <= 0:
            raise ConfigError(f"{what} width multipliers must be positive, got k1={self.k1}, k2={self.k2}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{what} dropout must be in [0, 1), got {self.dropout}")


@dataclass
class SamplerConfig:
    """The teacher's chain (DESIGN §2, algorithm step 1) and how its samples are emitted."""

    name: str = "sgld"
    step_size: float = 4e-6
    prior_precision: float = 10.0
    temperature: float = 1.0
    batch_size: int = 100
    burn_in: int = 1000
    thin: int = 100
    steps: int = 1_000_000
    seed: int = 0
    #: extra options for samplers other than SGLD (e.g. SGHMC's friction)
    friction: float = 0.1
    #: ``targets``: the sampler evaluates the teacher on a distillation batch and sends outputs;
    #: ``params``: it sends the teacher's parameters and students evaluate it themselves
    mode: str = "targets"
    #: distillation batch size M' for targets mode
    distill_batch: int = 100
    device: str = "auto"

    def validate(self) -> None:
        from .core.samplers import SAMPLERS

        if self.name not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
        if not self.step_size > 0:
            raise ConfigError(f"sampler.step_size must be positive, got {self.step_size}")
        if self.prior_precision < 0:
            raise ConfigError(f"sampler.prior_precision must be >= 0, got {self.prior_precision}")
        if self.temperature < 0:
            raise ConfigError(f"sampler.temperature must be >= 0, got {self.temperature}")
        for key in ("batch_size", "thin", "steps", "distill_batch"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"sampler.{key} must be positive, got {getattr(self, key)}")
        if self.burn_in < 0:
            raise ConfigError(f"sampler.burn_in must be >= 0, got {self.burn_in}")
        if not 0 < self.friction <= 1:
            raise ConfigError(f"sampler.friction must be in (0, 1], got {self.friction}")
        if self.mode not in ("targets", "params"):
            raise ConfigError(f"sampler.mode must be 'targets' or 'params', got {self.mode!r}")


@dataclass
class StudentConfig:
    """One student network and how it learns (DESIGN §2, algorithm step 2)."""

    name: str = "student"
    expectations: list[str] = field(default_factory=lambda: ["predictive"])
    #: ``online`` (U_o, running per-example averages) or ``single`` (U_s, current sample only)
    estimator: str = "online"
    model: ModelConfig = field(default_factory=ModelConfig)
    lr: float = 1e-3
    #: halve the learning rate every this many epochs over D' (0 = never)
    lr_halve_epochs: float = 200.0
    batch_size: int = 100
    #: student Adam steps per received posterior sample (params mode can afford more than one)
    steps_per_sample: int = 1
    #: use only every k-th posterior sample (the paper thins by 100 for the predictive and by 10 for
    #: the entropy: one chain thinned by 10 feeds both with sample_every = 10 and 1)
    sample_every: int = 1
    #: params mode: when behind, jump to the newest snapshot (False: process every one, in order)
    skip_stale: bool = True
    seed: int = 0
    device: str = "auto"
    #: group-lasso strength λ (DESIGN §2, architecture search): the loss becomes mean ℓ + λ·R(φ) with
    #: R(φ) = Σ over hidden units / conv channels of the body of ‖incoming weights‖₂ (heads excluded);
    #: 0 disables it.  λ is relative to the *mean* loss over a batch; the paper's λ, set against the
    #: sum (N′/M′)·Σℓ over D′, corresponds to λ_paper / N′.
    group_lasso: float = 0.0

    def validate(self) -> None:
        from .core.estimators import ESTIMATORS
        from .core.expectations import EXPECTATIONS

        if not self.expectations:
            raise ConfigError(f"student {self.name!r} distils no expectation")
        for name in self.expectations:
            if name not in EXPECTATIONS:
                raise ConfigError(
                    f"student {self.name!r}: unknown expectation {name!r}; choose from {', '.join(EXPECTATIONS)}"
                )
        from .core.expectations import get_expectation

        for name in self.expectations:
            if get_expectation(name).single_sample_only and self.estimator != "single":
                raise ConfigError(
                    f"student {self.name!r}: expectation {name!r} fits each posterior sample itself; "
                    f"use estimator = \"single\" (U_s), not {self.estimator!r}"
                )
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"student {self.name!r}: unknown estimator {self.estimator!r}; choose from {', '.join(ESTIMATORS)}")
        self.model.validate(f"student {self.name!r}")
        if not self.lr > 0:
            raise ConfigError(f"student {self.name!r}: lr must be positive, got {self.lr}")
        if self.batch_size <= 0 or self.steps_per_sample <= 0 or self.sample_every <= 0:
            raise ConfigError(f"student {self.name!r}: batch_size, steps_per_sample and sample_every must be positive")
        if self.lr_halve_epochs < 0:
            raise ConfigError(f"student {self.name!r}: lr_halve_epochs must be >= 0")
        if not (math.isfinite(self.group_lasso) and self.group_lasso >= 0):
            raise ConfigError(f"student {self.name!r}: group_lasso must be a finite number >= 0, got {self.group_lasso}")


@dataclass
class CoordinatorConfig:
    """Evaluation, checkpoints and the addresses every role meets at."""

    #: the coordinator's address as the other roles reach it
    host: str = "127.0.0.1"
    #: the sampler's address as students reach it (None: same as ``host``)
    sampler_host: str | None = None
    #: interface to bind on (None: the advertised address); e.g. 0.0.0.0 across hosts
    bind: str | None = None
    #: first port; the run uses ``port`` (control), ``port + 1`` (samples), ``port + 2`` (reports)
    port: int = 5755
    #: evaluate students every this many posterior samples
    eval_every: int = 20
    #: checkpoint every role every this many posterior samples
    checkpoint_every: int = 50
    heartbeat_s: float = 1.0
    #: a role that hears nothing from its peer for this long says so (and keeps waiting)
    peer_timeout_s: float = 10.0
    #: give up and stop cleanly after waiting this long for a missing peer (0 = wait forever)
    give_up_s: float = 300.0
    #: how long the coordinator waits for every configured student before letting the sampler start
    wait_for_students_s: float = 120.0
    #: bind to a non-loopback address even without CURVE keys
    allow_insecure: bool = False
    #: folder with CURVE keys made by ``gped keys`` (enables authentication)
    keys: str | None = None

    def validate(self) -> None:
        if not 0 < self.port < 65534:
            raise ConfigError(f"coordinator.port must be in 1..65533, got {self.port}")
        for key in ("eval_every", "checkpoint_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"coordinator.{key} must be positive, got {getattr(self, key)}")
        if self.heartbeat_s <= 0 or self.peer_timeout_s <= 0 or self.give_up_s < 0:
            raise ConfigError("coordinator heartbeat_s and peer_timeout_s must be positive, give_up_s >= 0")


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/run"
    threads: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    students: list[StudentConfig] = field(default_factory=lambda: [StudentConfig()])
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)

    def validate(self) -> "RunConfig":
        if self.threads <= 0:
            raise ConfigError(f"threads must be positive, got {self.threads}")
        self.data.validate()
        self.teacher.validate("teacher")
        self.sampler.validate()
        self.coordinator.validate()
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ConfigError(f"student names must be unique, got {names}")
        taken = sorted({"sampler", "coordinator"} & set(names))
        if taken:
            raise ConfigError(f"student name {taken[0]!r} is the name of a role; pick another")
        for student in self.students:
            student.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def chain_hash(self) -> str:
        """Hash of everything that defines the chain and its samples (what every role must agree on).

        Host-local choices (folders, devices, threads) are left out: the data itself is checked by
        its fingerprint, so two hosts reading the same data from different folders agree.
        """
        return _hash({"data": _portable(self.data), "teacher": dataclasses.asdict(self.teacher), "sampler": _portable(self.sampler)})

    def config_hash(self) -> str:
        """Hash of the whole experiment, host-local choices left out (see :meth:`chain_hash`)."""
        raw = self.to_dict()
        raw["data"] = _portable(self.data)
        raw["sampler"] = _portable(self.sampler)
        raw["students"] = [_portable(s) for s in self.students]
        for key in ("run_dir", "threads"):
            raw.pop(key)
        coordinator = raw["coordinator"]
        for key in COORDINATOR_LOCAL_FIELDS:
            coordinator.pop(key)
        return _hash(raw)

    def student(self, name: str) -> StudentConfig:
        for student in self.students:
            if student.name == name:
                return student
        raise ConfigError(f"no student named {name!r} in the config; have {', '.join(s.name for s in self.students)}")


#: fields that may differ between hosts of one run, or between a run and its resumption (a longer
#: budget, other evaluation or checkpoint intervals, other timeouts), without changing what is computed
HOST_LOCAL_FIELDS = {"root", "ood_root", "prepared", "download", "device", "steps"}
COORDINATOR_LOCAL_FIELDS = ("keys", "allow_insecure", "host", "sampler_host", "bind", "eval_every", "checkpoint_every",
                            "heartbeat_s", "peer_timeout_s", "give_up_s", "wait_for_students_s")


def _portable(part: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(part).items() if k not in HOST_LOCAL_FIELDS}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# building dataclasses from plain dicts, with clear errors


def from_dict(cls: type, raw: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types with a clear message."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {key: _coerce(hints[key], value, f"{where}.{key}") for key, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _parse_override_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a raw config dict (in place, also returned)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. sampler.step_size=1e-5)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, ".".join(parts[: depth + 1]))
            else:
                if part == "students" and part not in node:
                    node[part] = [dataclasses.asdict(StudentConfig())]
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is a value, not a table")
        last = parts[-1]
        value = _parse_override_value(text.strip())
        if isinstance(node, list):
            raise ConfigError(f"override {item!r}: cannot replace a whole list entry; set its fields")
        node[last] = value
    return raw


def _list_item(node: list, part: str, where: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key {where!r}: no list entry {part!r} (have {len(node)})")
    return node[int(part)]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (or a resolved ``config.json``, or the defaults when ``path`` is None),
    apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text()
            raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"cannot parse config {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must hold a table of settings")
    apply_overrides(raw, list(overrides or []))
    return from_dict(RunConfig, raw).validate()


def config_from_json(text: str) -> RunConfig:
    """Rebuild a resolved config saved as JSON (the run directory's ``config.json``)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"resolved config is not valid JSON: {exc}") from None
    return from_dict(RunConfig, raw).validate()


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")

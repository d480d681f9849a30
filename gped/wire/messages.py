"""The message types of the gped wire protocol: one frozen dataclass per message.

Every message carries the same four header fields (``sender``, ``seq``, ``step``, ``sample``) and
declares, as ordinary dataclass fields,

* its *scalar* fields -- ``str``, ``int``, ``float``, ``bool`` or a flat ``dict[str, ...]`` -- built with
  :func:`scalar` (bounds, choices, length limits), which travel in the msgpack header, and
* its *array* fields -- numpy arrays built with :func:`array` (allowed dtypes, ndim, finiteness,
  non-negativity), which travel as raw buffers, one frame each, in declaration order.

Cross-field constraints ("``logits`` has one row per index") live in a message's ``_cross_check``.
The :func:`message` decorator turns a class into a frozen, keyword-only dataclass, derives its
:class:`MessageSpec` from the annotations and registers it in :data:`MESSAGE_TYPES` under its class
name, so adding a message type is one decorated class.

Construction validates everything (``__post_init__``) and raises :class:`ProtocolError` on any
violation; the decoder builds messages through the same constructor, so *a decoded message is
exactly a message that could have been constructed* and there is one validation path, not two.
Messages are "frozen-ish": fields cannot be rebound, but arrays and dicts are not deep-frozen.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

#: Version of the wire format; a receiver rejects any other (ProtocolError kind ``"version"``).
PROTOCOL_VERSION = 1

#: Every ``ProtocolError.kind``: a short, machine-readable reason a message was refused.
REJECT_KINDS: frozenset[str] = frozenset(
    {
        "frames",  # wrong number of frames, or a frame that is not a contiguous buffer
        "header",  # header is not a msgpack map, or has missing/extra keys or bad structure
        "version",  # protocol version differs from PROTOCOL_VERSION
        "type",  # unknown message type
        "field",  # a scalar or array field has the wrong Python type (bool is not int)
        "value",  # a value breaks a constraint (range, choice, sign, row sums, unsafe name)
        "dtype",  # array dtype not on the wire whitelist or not allowed for that field
        "shape",  # bad ndim/dimensions, buffer length mismatch, or inconsistent shapes
        "size",  # message, header, string or dict larger than its limit
        "nonfinite",  # NaN or inf where finite values are required
        "internal",  # a bug in the decoder itself (never expected; see codec.decode)
    }
)

#: Message field names the header uses for itself; no message may declare them.
RESERVED_KEYS = frozenset({"v", "t", "arrays"})
#: The per-message header fields every message carries, in header order.
HEADER_FIELDS = ("sender", "seq", "step", "sample")

MAX_NAME_LEN = 128
MAX_HASH_LEN = 128
MAX_TEXT_LEN = 4096
MAX_PATH_LEN = 4096
MAX_DICT_ITEMS = 256
MAX_KEY_LEN = 128
INT64_MIN, INT64_MAX_EXCL = -(2**63), 2**63
UINT64_MAX_EXCL = 2**64

ROLES = ("sampler", "student", "coordinator")

_META_KEY = "gped.wire"
_UNSAFE_NAME_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")


class ProtocolError(ValueError):
    """A message that cannot be encoded or was refused on decode.

    ``kind`` is one of :data:`REJECT_KINDS` (for counting); ``reason`` is a short human line;
    ``sender`` is the claimed sender when the header got far enough to name one.
    """

    def __init__(self, kind: str, reason: str, *, sender: str | None = None) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason
        self.sender = sender


def show(value: Any, limit: int = 60) -> str:
    """``repr`` of an untrusted value, cut short so that it is safe to put in one log line."""
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not escape; only local objects get here
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_safe_name(text: str, max_len: int = MAX_NAME_LEN) -> bool:
    """Whether ``text`` can be used as one path component: 1..max_len characters, no ``/``,
    ``\\``, control characters or leading dot (so never ``.`` or ``..``)."""
    return (
        0 < len(text) <= max_len
        and not text.startswith(".")
        and _UNSAFE_NAME_CHARS.search(text) is None
    )


# --------------------------------------------------------------------------------------------------
# field declarations


@dataclass(frozen=True)
class ScalarRules:
    """Constraints on one scalar field, given to :func:`scalar`."""

    ge: int | None = None  #: ints: smallest allowed value
    lt: int | None = None  #: ints: first value not allowed
    choices: tuple[str, ...] | None = None  #: strs: the only values allowed
    max_len: int = MAX_NAME_LEN  #: strs (and str values in dicts): longest allowed
    safe_name: bool = False  #: strs: must pass :func:`is_safe_name` (usable in file paths)
    max_items: int = MAX_DICT_ITEMS  #: dicts: most entries allowed


def scalar(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """Declare a scalar message field; ``rules`` are :class:`ScalarRules` keywords."""
    return field(default=default, default_factory=default_factory, metadata={_META_KEY: ScalarRules(**rules)})


@dataclass(frozen=True)
class ArraySpec:
    """What one array field accepts; ``dtypes`` are native-order numpy dtypes."""

    name: str
    dtypes: tuple[np.dtype, ...]
    ndim: int
    finite: bool = False
    nonneg: bool = False

    def allows(self, dtype: np.dtype) -> bool:
        """Whether ``dtype`` (any byte order) is one of the allowed numeric types."""
        return dtype.newbyteorder("=") in self.dtypes

    def validate(self, value: Any) -> None:
        """Raise :class:`ProtocolError` unless ``value`` is an acceptable array for this field."""
        if not isinstance(value, np.ndarray):
            raise ProtocolError("field", f"{self.name} must be a numpy array, got {type(value).__name__}")
        if not self.allows(value.dtype):
            allowed = ", ".join(str(d) for d in self.dtypes)
            raise ProtocolError("dtype", f"{self.name} has dtype {value.dtype}, allowed: {allowed}")
        if value.ndim != self.ndim:
            raise ProtocolError("shape", f"{self.name} must be {self.ndim}-D, got shape {value.shape}")
        if self.finite and not all_finite(value):
            raise ProtocolError("nonfinite", f"{self.name} contains NaN or inf")
        if self.nonneg and value.size and value.min() < 0:
            raise ProtocolError("value", f"{self.name} contains negative values")


def array(*dtypes: Any, ndim: int, finite: bool = False, nonneg: bool = False) -> Any:
    """Declare a (required) array message field accepting ``dtypes`` with ``ndim`` dimensions."""
    allowed = tuple(np.dtype(d).newbyteorder("=") for d in dtypes)
    return field(metadata={_META_KEY: ArraySpec("", allowed, ndim, finite, nonneg)})


def all_finite(values: np.ndarray) -> bool:
    """Whether a float array has no NaN or inf (integer arrays always do).

    Fast path: NaN and inf propagate into the dot product x·x (one BLAS pass, no temporary, ~5×
    faster than a float64 sum on a parameter snapshot), so a finite result proves every element
    finite; an infinite one may be a mere overflow of large finite values, so only then is every
    element checked.
    """
    if values.dtype.kind != "f" or values.size == 0:
        return True
    with np.errstate(all="ignore"):
        flat = values.reshape(-1) if values.flags.c_contiguous else values.ravel()
        if math.isfinite(float(np.dot(flat, flat))):
            return True
        return bool(np.isfinite(values).all())


# --------------------------------------------------------------------------------------------------
# scalar validation


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ProtocolError("field", f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError("field", f"{name} must be a float, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise ProtocolError("value", f"{name} is too large for a float") from None


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ProtocolError("field", f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _as_str(name: str, value: Any, max_len: int) -> str:
    if type(value) is not str:
        raise ProtocolError("field", f"{name} must be a str, got {type(value).__name__}")
    if len(value) > max_len:
        raise ProtocolError("size", f"{name} is {len(value)} characters, limit {max_len}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("value", f"{name} is not valid UTF-8 text") from None
    return value


_CONVERTERS = {int: "int", float: "float", bool: "bool", str: "str"}


@dataclass(frozen=True)
class ScalarSpec:
    """How one scalar field is checked: its ``kind`` (int/float/bool/str/dict), the value kinds
    of a dict, and its :class:`ScalarRules`."""

    name: str
    kind: str
    rules: ScalarRules
    value_kinds: tuple[str, ...] = ()

    @classmethod
    def from_hint(cls, name: str, hint: Any, rules: ScalarRules) -> "ScalarSpec":
        """Build the spec from a field's type annotation."""
        if hint in _CONVERTERS:
            return cls(name, _CONVERTERS[hint], rules)
        if typing.get_origin(hint) is dict:
            key_type, value_type = typing.get_args(hint)
            options = typing.get_args(value_type) if isinstance(value_type, types.UnionType) else (value_type,)
            if key_type is str and options and all(t in (int, float, str) for t in options):
                return cls(name, "dict", rules, tuple(_CONVERTERS[t] for t in options))
        raise TypeError(f"message field {name!r}: unsupported scalar annotation {hint!r}")

    def validate(self, value: Any) -> Any:
        """Return ``value`` normalised to plain Python types, or raise :class:`ProtocolError`."""
        if self.kind == "dict":
            return self._validate_dict(value)
        return self._validate_one(self.name, self.kind, value)

    def _validate_one(self, name: str, kind: str, value: Any) -> Any:
        rules = self.rules
        if kind == "int":
            number = _as_int(name, value)
            lo = INT64_MIN if rules.ge is None else rules.ge
            hi = INT64_MAX_EXCL if rules.lt is None else rules.lt
            if not lo <= number < hi:
                raise ProtocolError("value", f"{name}={number} is outside [{lo}, {hi})")
            return number
        if kind == "float":
            return _as_float(name, value)
        if kind == "bool":
            return _as_bool(name, value)
        text = _as_str(name, value, rules.max_len)
        if rules.choices is not None and text not in rules.choices:
            raise ProtocolError("value", f"{name}={show(text)} is not one of {', '.join(rules.choices)}")
        if rules.safe_name and not is_safe_name(text, rules.max_len):
            raise ProtocolError("value", f"{name}={show(text)} is not a safe name (no '/', '\\\\', control chars, leading '.')")
        return text

    def _validate_dict(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ProtocolError("field", f"{self.name} must be a dict, got {type(value).__name__}")
        if len(value) > self.rules.max_items:
            raise ProtocolError("size", f"{self.name} has {len(value)} entries, limit {self.rules.max_items}")
        return {self._dict_key(key): self._dict_value(key, item) for key, item in value.items()}

    def _dict_key(self, key: Any) -> str:
        if type(key) is not str:
            raise ProtocolError("field", f"{self.name} keys must be str, got {type(key).__name__}")
        if not 0 < len(key) <= MAX_KEY_LEN:
            raise ProtocolError("size", f"{self.name} key of length {len(key)} outside 1..{MAX_KEY_LEN}")
        return _as_str(f"{self.name} key", key, MAX_KEY_LEN)

    def _dict_value(self, key: str, item: Any) -> Any:
        where = f"{self.name}[{show(key, 40)}]"
        for kind in self.value_kinds:
            try:
                return self._validate_one(where, kind, item)
            except ProtocolError as exc:
                if exc.kind != "field":  # right type, bad value: report that, don't try others
                    raise
        raise ProtocolError("field", f"{where} must be {' or '.join(self.value_kinds)}, got {type(item).__name__}")


# --------------------------------------------------------------------------------------------------
# messages and their registry


@dataclass(frozen=True)
class MessageSpec:
    """Everything the codec needs to know about one message type."""

    name: str
    cls: type
    header: tuple[ScalarSpec, ...]
    scalars: tuple[ScalarSpec, ...]
    arrays: tuple[ArraySpec, ...]

    @property
    def wire_keys(self) -> frozenset[str]:
        """The exact set of keys of this type's msgpack header."""
        return RESERVED_KEYS | {s.name for s in self.header + self.scalars}

    def scalar(self, name: str) -> ScalarSpec:
        """The spec of a header or scalar field by name."""
        for spec in self.header + self.scalars:
            if spec.name == name:
                return spec
        raise KeyError(name)


#: Message type name (as sent in the header's ``t``) -> message class.
MESSAGE_TYPES: dict[str, type["Message"]] = {}


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Message:
    """Base of every message: the header fields and whole-message validation.

    ``sender`` names the sending process; ``seq`` is the sender's own message counter (from 0 per
    process; see :class:`~gped.wire.codec.SeqTracker`); ``step`` is the chain step the message
    refers to; ``sample`` is the posterior sample id, or -1 when the message is about no sample.
    """

    SPEC: ClassVar[MessageSpec]

    sender: str = scalar("", max_len=MAX_NAME_LEN)
    seq: int = scalar(0, ge=0, lt=UINT64_MAX_EXCL)
    step: int = scalar(0, ge=0)
    sample: int = scalar(-1, ge=-1)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, *, arrays: bool = True) -> None:
        """Check (and normalise to plain Python types) every field; raise :class:`ProtocolError`.

        ``arrays=False`` checks only the scalar fields (cheap; no pass over array contents).
        """
        spec = spec_of(self)
        for scalar_spec in spec.header + spec.scalars:
            object.__setattr__(self, scalar_spec.name, scalar_spec.validate(getattr(self, scalar_spec.name)))
        if arrays:
            for array_spec in spec.arrays:
                array_spec.validate(getattr(self, array_spec.name))
            self._cross_check()

    def _cross_check(self) -> None:
        """Constraints between fields; run after every field passed its own checks."""

    @property
    def type_name(self) -> str:
        """The name this message travels under (the header's ``t``)."""
        return spec_of(self).name

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        spec = spec_of(self)
        for scalar_spec in spec.header + spec.scalars:
            if getattr(self, scalar_spec.name) != getattr(other, scalar_spec.name):
                return False
        return all(_arrays_equal(getattr(self, a.name), getattr(other, a.name)) for a in spec.arrays)

    def __repr__(self) -> str:
        spec = spec_of(self)
        parts = [f"{s.name}={getattr(self, s.name)!r}" for s in spec.header + spec.scalars]
        parts += [f"{a.name}=<{_describe_array(getattr(self, a.name))}>" for a in spec.arrays]
        return f"{spec.name}({', '.join(parts)})"


def _arrays_equal(left: np.ndarray, right: np.ndarray) -> bool:
    return left.dtype == right.dtype and left.shape == right.shape and bool(np.array_equal(left, right))


def _describe_array(value: Any) -> str:
    if not isinstance(value, np.ndarray):
        return type(value).__name__
    return f"{value.dtype}[{'x'.join(map(str, value.shape))}]"


def spec_of(msg: Any) -> MessageSpec:
    """The :class:`MessageSpec` of a registered message instance or class (TypeError otherwise)."""
    cls = msg if isinstance(msg, type) else type(msg)
    spec = cls.__dict__.get("SPEC")
    if not isinstance(spec, MessageSpec):
        raise TypeError(f"{cls.__name__} is not a registered gped wire message")
    return spec


def message(cls: type) -> type:
    """Class decorator: make ``cls`` a frozen keyword-only dataclass and register it."""
    cls = dataclass(frozen=True, kw_only=True, eq=False, repr=False)(cls)
    name = cls.__name__
    if name in MESSAGE_TYPES:
        raise TypeError(f"message type {name!r} is already registered")
    hints = typing.get_type_hints(cls)
    header: list[ScalarSpec] = []
    scalars: list[ScalarSpec] = []
    arrays: list[ArraySpec] = []
    for fld in dataclasses.fields(cls):
        if fld.name in RESERVED_KEYS:
            raise TypeError(f"message {name}: field name {fld.name!r} is reserved for the header")
        meta = fld.metadata.get(_META_KEY)
        if isinstance(meta, ArraySpec):
            arrays.append(dataclasses.replace(meta, name=fld.name))
            continue
        if not isinstance(meta, ScalarRules):
            raise TypeError(f"message {name}: field {fld.name!r} must be declared with scalar() or array()")
        target = header if fld.name in HEADER_FIELDS else scalars
        target.append(ScalarSpec.from_hint(fld.name, hints[fld.name], meta))
    cls.SPEC = MessageSpec(name, cls, tuple(header), tuple(scalars), tuple(arrays))
    MESSAGE_TYPES[name] = cls
    return cls


# --------------------------------------------------------------------------------------------------
# the message types


@message
class Hello(Message):
    """First message of every role to the coordinator: who it is and what it agrees to.

    The coordinator compares ``protocol``, ``config_hash``, ``chain_hash`` and
    ``data_fingerprint`` with its own before anything streams, and answers with :class:`Welcome`.
    ``resume_step`` is the chain step the role's checkpoint holds (0 for a fresh start).
    """

    role: str = scalar(choices=ROLES)
    name: str = scalar(safe_name=True)
    pid: int = scalar(ge=0)
    protocol: int = scalar(PROTOCOL_VERSION, ge=0)
    config_hash: str = scalar(max_len=MAX_HASH_LEN)
    chain_hash: str = scalar(max_len=MAX_HASH_LEN)
    data_fingerprint: str = scalar(max_len=MAX_HASH_LEN)
    mode: str = scalar(max_len=MAX_NAME_LEN)
    resume_step: int = scalar(0, ge=0)


@message
class Welcome(Message):
    """The coordinator's answer to :class:`Hello`: accepted or not (and why), where the run lives,
    and the chain step at which the run stops."""

    accepted: bool = scalar()
    reason: str = scalar("", max_len=MAX_TEXT_LEN)
    run_dir: str = scalar("", max_len=MAX_PATH_LEN)
    stop_step: int = scalar(0, ge=0)


@message
class Heartbeat(Message):
    """Liveness plus a small flat status (counters, rates, losses) for the progress line."""

    role: str = scalar(choices=ROLES)
    name: str = scalar(safe_name=True)
    status: dict[str, int | float | str] = scalar(default_factory=dict, max_items=64, max_len=256)


@message
class Params(Message):
    """A posterior sample as the teacher's flattened parameters (params mode).

    ``numel`` is the element count the sender meant to send; -1 at construction means "fill it in".
    """

    numel: int = scalar(-1, ge=-1)
    params: np.ndarray = array(np.float32, np.float64, ndim=1, finite=True)

    def _cross_check(self) -> None:
        size = int(self.params.size)
        if self.numel == -1:
            object.__setattr__(self, "numel", size)
        elif self.numel != size:
            raise ProtocolError("shape", f"numel={self.numel} but params has {size} elements")


@message
class Targets(Message):
    """A posterior sample as teacher outputs on a distillation batch (targets mode).

    ``indices`` are positions in the shared, fingerprinted distillation set D'; the student
    rebuilds the perturbed inputs from them and ``noise_seed``, so no inputs travel.  ``logits``
    row i is the teacher's output for ``indices[i]``.
    """

    noise_seed: int = scalar(ge=0, lt=2**63)
    indices: np.ndarray = array(np.int64, ndim=1, nonneg=True)
    logits: np.ndarray = array(np.float32, np.float64, ndim=2, finite=True)

    def _cross_check(self) -> None:
        rows, classes = self.logits.shape
        if rows != self.indices.shape[0]:
            raise ProtocolError("shape", f"logits has {rows} rows for {self.indices.shape[0]} indices")
        if classes < 1:
            raise ProtocolError("shape", "logits has no classes")


#: tolerance on the row sums of :class:`Report` ``probs``
PROB_SUM_TOL = 1e-3


@message
class Report(Message):
    """A student's evaluation on the test set: its predictive ``probs`` [N_test, C] (rows sum to 1;
    shape [0, C] when it does not distil the predictive) and, when it distils the expected entropy,
    ``entropy`` [N_test] (else shape [0])."""

    student: str = scalar(safe_name=True)
    metrics: dict[str, float] = scalar(default_factory=dict)
    probs: np.ndarray = array(np.float32, ndim=2, finite=True, nonneg=True)
    entropy: np.ndarray = array(np.float32, ndim=1, finite=True)

    def _cross_check(self) -> None:
        rows = self.probs.shape[0]
        if rows and self.entropy.shape[0] not in (0, rows):
            raise ProtocolError("shape", f"entropy has {self.entropy.shape[0]} entries for {rows} probs rows")
        if rows:
            sums = self.probs.sum(axis=1, dtype=np.float64)
            if float(np.max(np.abs(sums - 1.0))) > PROB_SUM_TOL:
                raise ProtocolError("value", f"probs rows must sum to 1 within {PROB_SUM_TOL}")


@message
class CheckpointRequest(Message):
    """The coordinator asks a role to checkpoint; the header's ``sample`` is the cut (the last
    posterior sample the checkpoint must include)."""

    tag: str = scalar(safe_name=True)


@message
class CheckpointDone(Message):
    """A role's answer to :class:`CheckpointRequest`: where it wrote, and whether it worked."""

    tag: str = scalar(safe_name=True)
    path: str = scalar(max_len=MAX_PATH_LEN)
    ok: bool = scalar()


@message
class Start(Message):
    """The coordinator's go: every role has said hello and been welcomed, so the chain may run."""


@message
class Stop(Message):
    """Stop cleanly (broadcast by the coordinator; sent by a role that gives up)."""

    reason: str = scalar("", max_len=MAX_TEXT_LEN)

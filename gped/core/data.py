"""Data: sources, the persisted prepared data set, and regenerable distillation inputs.

DESIGN §2 ("Data manipulations", D′) and §4 ("Data").  Three layers:

1. **Sources** (:func:`load_source`) turn a name (``digits``, ``mnist``, ``fashion-mnist``,
   ``kmnist``, ``cifar10``, ``idx``, ``npy``, ``synthetic``) into :class:`RawData`: float32 images
   ``[N, C, H, W]`` in ``[0, 1]`` and int64 labels, for a train and a test split.  Nothing here
   downloads unless asked (``download=True``); a missing data set is a :class:`DataError` that lists
   the offline alternatives.

2. **Preparation** (:func:`prepare`, :func:`load_prepared`).  The occlusion of GPED zeroes a random
   m×m square of every image, *fixed per image*, so the data set is built once, persisted, and reused
   by every experiment and every role (the research code's README insists on this).  The prepared
   folder holds

   - ``train_x.npy`` — all training inputs, occluded: the distillation set D′ (unlabelled, N′ rows);
   - ``train_y.npy`` — their labels;
   - ``labelled.npy`` — sorted int64 indices of the labelled subset D (N rows, stratified, seeded);
   - ``test_x.npy``, ``test_y.npy`` — the test split, occluded the same way;
   - ``ood_x.npy`` (optional) — an out-of-distribution test split, occluded the same way;
   - ``meta.json`` — settings, shapes, class count, achieved masking rate and a ``fingerprint``
     (sha256 of the array bytes and the content-defining settings) that every role compares in the
     handshake.

3. **Distillation inputs** (:func:`distill_inputs`).  D′ inputs carry small Gaussian noise,
   x̃ = x + σ·ε with ε ~ N(0, I) (the research code: σ = 0.001).  ε is drawn from a CPU
   ``torch.Generator`` seeded per batch, so a message carrying only ``(indices, seed)`` lets a
   receiver holding the same prepared data rebuild bit-identical inputs (DESIGN §3, "Wire").
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..config import DATA_SOURCES, DataConfig
from ..errors import DataError

__all__ = [
    "RawData",
    "PreparedData",
    "load_source",
    "default_torchvision_root",
    "read_idx",
    "make_synthetic",
    "stratified_subset",
    "occlusion_masks",
    "apply_occlusion",
    "mask_rate",
    "preparation_settings",
    "compute_fingerprint",
    "prepare",
    "load_prepared",
    "distill_inputs",
    "distill_batch_indices",
    "DEBIAN_FASHION_MNIST",
]

logger = logging.getLogger(__name__)

#: bump when the prepared layout or the preparation algorithm changes (invalidates old folders)
PREPARED_FORMAT = 1
#: seed of the fixed train/test split of scikit-learn's digits (the same on every machine)
DIGITS_SPLIT_SEED = 20200
DIGITS_TEST_FRACTION = 0.25
#: seed of the synthetic data set
SYNTHETIC_SEED = 5
#: where Debian's ``dataset-fashion-mnist`` package installs its IDX files
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Independent random streams derived from the preparation seed: changing the labelled subset size
# must not move any image's occlusion square, and train/test/OOD squares are drawn independently.
_STREAM_LABELLED = 0
_STREAM_CODES = {"train": 1, "test": 2, "ood": 3}

_TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "cifar10": "CIFAR10"}
_ARRAY_NAMES = ("train_x", "train_y", "labelled", "test_x", "test_y", "ood_x")
_ARRAY_DTYPES = {
    "train_x": np.dtype("<f4"),
    "train_y": np.dtype("<i8"),
    "labelled": np.dtype("<i8"),
    "test_x": np.dtype("<f4"),
    "test_y": np.dtype("<i8"),
    "ood_x": np.dtype("<f4"),
}
#: settings that say *where* data was read from, not what it is: they decide whether a folder may be
#: reused but stay out of the fingerprint, so hosts reading the same data from different paths agree
_LOCATION_SETTINGS = ("root", "ood_root")


# ---------------------------------------------------------------------------------------------
# raw data and sources


@dataclass
class RawData:
    """A data set as loaded from its source: float32 images ``[N, C, H, W]`` in [0, 1], int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_x.shape[1:])  # type: ignore[return-value]


def default_torchvision_root() -> Path:
    """Default torchvision root: ``~/.cache/gped/torchvision``."""
    return Path("~/.cache/gped/torchvision").expanduser()


def load_source(name: str, root: str | os.PathLike | None = None, download: bool = False) -> RawData:
    """Load data source ``name`` (one of :data:`gped.config.DATA_SOURCES`) into :class:`RawData`.

    ``root`` is the torchvision root (default :func:`default_torchvision_root`), the IDX folder, or
    the ``.npy`` folder; ``digits`` and ``synthetic`` ignore it.  Only the torchvision sources can
    download, and only when ``download`` is true.
    """
    if name not in DATA_SOURCES:
        raise DataError(f"unknown data source {name!r}; choose one of {', '.join(DATA_SOURCES)}")
    if name == "digits":
        raw = _load_digits()
    elif name == "synthetic":
        raw = make_synthetic()
    elif name in _TORCHVISION_CLASSES:
        raw = _load_torchvision(name, Path(root).expanduser() if root else default_torchvision_root(), download)
    elif name == "idx":
        raw = _load_idx_folder(_require_root(name, root))
    else:
        raw = _load_npy_folder(_require_root(name, root))
    logger.info(
        "loaded %s: %d train / %d test, input %s, %d classes",
        raw.name, len(raw.train_x), len(raw.test_x), raw.input_shape, raw.num_classes,
    )
    return raw


def _require_root(name: str, root: str | os.PathLike | None) -> Path:
    if root is None:
        raise DataError(f"data source {name!r} needs a folder: set data.root")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data source {name!r}: folder {path} does not exist")
    return path


def _load_digits() -> RawData:
    """scikit-learn's bundled 8×8 digits (1,797 images, values 0..16 → /16), fixed stratified split.

    The split is our own seeded stratified draw (:func:`stratified_subset`, 25 % test, seed
    :data:`DIGITS_SPLIT_SEED`), so it does not depend on scikit-learn's splitting code.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    n_test = int(round(DIGITS_TEST_FRACTION * len(y)))
    test_idx = stratified_subset(y, n_test, np.random.default_rng(DIGITS_SPLIT_SEED))
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    return RawData(x[~is_test], y[~is_test], x[is_test], y[is_test], 10, "digits")


def make_synthetic(n_train: int = 400, n_test: int = 200, seed: int = SYNTHETIC_SEED) -> RawData:
    """A small, learnable, deterministic data set: 4 classes of 1×8×8 Gaussian blobs.

    Class k has prototype p_k(r, c) = exp(−((r − r_k)² + (c − c_k)²) / (2·1.5²)) centred in one
    quadrant; an example is clip(p_k + 0.15·ε, 0, 1), ε ~ N(0, I).  Labels are balanced.
    """
    rng = np.random.default_rng(seed)
    centres = [(2.0, 2.0), (2.0, 5.0), (5.0, 2.0), (5.0, 5.0)]
    rows, cols = np.mgrid[0:8, 0:8].astype(np.float64)
    protos = np.stack([np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * 1.5**2)) for r, c in centres])

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % len(centres)).astype(np.int64)
        x = np.clip(protos[y] + 0.15 * rng.standard_normal((n, 8, 8)), 0.0, 1.0)
        return x[:, None].astype(np.float32), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return RawData(train_x, train_y, test_x, test_y, len(centres), "synthetic")


def _torchvision_data_path(name: str, root: Path) -> Path:
    """The folder torchvision reads for ``name`` under ``root`` (for error messages)."""
    if name == "cifar10":
        return root / "cifar-10-batches-py"
    return root / _TORCHVISION_CLASSES[name] / "raw"


def _offline_help(name: str) -> str:
    hint = ""
    if name == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir():
        hint = f" (Fashion-MNIST IDX files are installed at {DEBIAN_FASHION_MNIST}: use source='idx' with that root)"
    return (
        "offline options: set data.download=true on a machine with network access, "
        f"use source='idx' with a folder of IDX files{hint}, "
        "use source='npy' with a folder holding train_x.npy/train_y.npy/test_x.npy/test_y.npy, "
        "or the bundled offline default source='digits'"
    )


def _load_torchvision(name: str, root: Path, download: bool) -> RawData:
    """MNIST / FashionMNIST / KMNIST / CIFAR10 through torchvision, converted to [N, C, H, W] floats."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION_CLASSES[name])
    where = _torchvision_data_path(name, root)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=download)
        except Exception as exc:  # torchvision raises RuntimeError, URLError, tarfile errors, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            what = "could not be downloaded" if download else "not found (download=False)"
            raise DataError(f"{name}: data {what} at {where} ({first}); {_offline_help(name)}") from None
        splits.append(_from_torchvision(ds, name))
    (train_x, train_y), (test_x, test_y) = splits
    return RawData(train_x, train_y, test_x, test_y, 10, name)


def _from_torchvision(ds: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    targets = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else np.asarray(ds.targets)
    if name == "cifar10":
        data = data.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    else:
        data = data[:, None]
    return _images_to_float(data, name), targets.astype(np.int64)


def _images_to_float(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 images → float32 / 255; float images → float32 (checked finite, warned if outside [0, 1])."""
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    if np.issubdtype(x.dtype, np.floating):
        out = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"{where}: images contain NaN or infinite values")
        if out.size and (out.min() < 0.0 or out.max() > 1.0):
            logger.warning("%s: float images span [%g, %g], not [0, 1]; occlusion still sets pixels to 0", where, out.min(), out.max())
        return out
    raise DataError(f"{where}: images must be uint8 (0..255) or float (0..1), got dtype {x.dtype}")


def _labels_to_int64(y: np.ndarray, where: str) -> np.ndarray:
    """Labels as a 1-D int64 array of non-negative class indices (integer-valued floats accepted)."""
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be one-dimensional, got shape {tuple(y.shape)}")
    if np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_:
        out = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        out = y.astype(np.int64)
    else:
        raise DataError(f"{where}: labels must be integer class indices, got dtype {y.dtype}")
    if out.size and out.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {out.min()}")
    return out


def _images_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """Accept [N, H, W] (adds the channel axis) or [N, C, H, W]."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
            raise DataError(
                f"{where}: images of shape {tuple(x.shape)} look channels-last; save them as [N, C, H, W]"
            )
        return x
    raise DataError(f"{where}: images must be [N, H, W] or [N, C, H, W], got shape {tuple(x.shape)}")


def _assemble(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, name: str) -> RawData:
    """Validate and convert the four arrays of a file-based source (IDX or npy)."""
    train_x = _images_to_float(_images_nchw(train_x, f"{name} train images"), f"{name} train images")
    test_x = _images_to_float(_images_nchw(test_x, f"{name} test images"), f"{name} test images")
    train_y = _labels_to_int64(train_y, f"{name} train labels")
    test_y = _labels_to_int64(test_y, f"{name} test labels")
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if len(x) != len(y):
            raise DataError(f"{name}: {split} images and labels differ in length ({len(x)} vs {len(y)})")
        if len(x) == 0:
            raise DataError(f"{name}: the {split} split is empty")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{name}: train and test images differ in shape ({tuple(train_x.shape[1:])} vs {tuple(test_x.shape[1:])})"
        )
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return RawData(train_x, train_y, test_x, test_y, num_classes, name)


# ---------------------------------------------------------------------------------------------
# IDX files

#: IDX type codes (third magic byte) → big-endian numpy dtypes
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_STEMS = {
    "train_x": ("train-images", 3),
    "train_y": ("train-labels", 1),
    "test_x": ("t10k-images", 3),
    "test_y": ("t10k-labels", 1),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (gzipped or not; detected by the gzip magic bytes, not the name).

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions d, then d big-endian uint32 sizes and
    the data, big-endian, C order.  The file must be exactly 4 + 4d + itemsize·∏sizes bytes long.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
        if blob[:2] == b"\x1f\x8b":
            blob = gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] not in _IDX_DTYPES or blob[3] == 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {blob[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[blob[2]], blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"IDX file {path} is truncated (header needs {header} bytes, file has {len(blob)})")
    dims = struct.unpack(f">{ndim}I", blob[4:header])
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(blob) != expected:
        state = "truncated" if len(blob) < expected else "longer than its header says"
        raise DataError(f"IDX file {path} is {state}: dims {dims} need {expected} bytes, file has {len(blob)}")
    return np.frombuffer(blob, dtype=dtype, count=count, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx_file(folder: Path, stem: str, rank: int) -> Path:
    """``train-images-idx3-ubyte`` and the ``train-images.idx3-ubyte`` spelling, with or without ``.gz``."""
    names = [f"{stem}-idx{rank}-ubyte", f"{stem}.idx{rank}-ubyte"]
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"IDX folder {folder}: missing {names[0]} (or {names[0]}.gz)")


def _load_idx_folder(folder: Path) -> RawData:
    arrays = {key: read_idx(_find_idx_file(folder, stem, rank)) for key, (stem, rank) in _IDX_STEMS.items()}
    return _assemble(arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"], f"idx:{folder}")


# ---------------------------------------------------------------------------------------------
# .npy folders


def _load_npy(path: Path) -> np.ndarray:
    """``np.load(allow_pickle=False)`` with every failure turned into a one-line :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path} holds a pickled object array; gped never unpickles data files") from None
        raise DataError(f"cannot read {path}: {exc}") from None
    except (OSError, EOFError, SyntaxError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path} is not a single .npy array")
    return arr


def _load_npy_folder(folder: Path) -> RawData:
    arrays = {key: _load_npy(folder / f"{key}.npy") for key in ("train_x", "train_y", "test_x", "test_y")}
    return _assemble(arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"], f"npy:{folder}")


# ---------------------------------------------------------------------------------------------
# subsets and occlusion


def _rng(seed: int, stream: int) -> np.random.Generator:
    """An independent numpy stream per (seed, purpose): SeedSequence([seed, stream])."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), stream]))


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices of a class-stratified random subset of size ``n``.

    Class c with n_c of the T examples gets ⌊n·n_c/T⌋ picks; the n − Σ⌊·⌋ left over go to the
    classes with the largest fractional parts (largest-remainder rounding), so every class count is
    within one of n·n_c/T.  Within a class the picks are uniform without replacement.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if not 0 <= n <= total:
        raise DataError(f"cannot draw a subset of {n} examples from {total}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / total
    take = np.floor(quota).astype(np.int64)
    left = n - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:left]] += 1
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def mask_rate(m: int, h: int, w: int) -> float:
    """Fraction of an h×w image covered by an m×m occlusion square: m² / (h·w).

    On 28×28 images m ∈ {0, 5, 10, 15, 20, 25} gives {0, .03, .13, .29, .51, .80} (DESIGN §2).
    """
    return (m * m) / (h * w)


def occlusion_masks(n: int, m: int, h: int, w: int, seed: int, stream: str) -> np.ndarray:
    """Boolean masks ``[n, h, w]``, True on one m×m square per image.

    Image i's top-left corner (r_i, c_i) is uniform on {0..h−m} × {0..w−m}, drawn from the stream
    (seed, ``stream`` ∈ {train, test, ood}); it depends only on the seed, the split and i, so the
    square is fixed per image and unaffected by the labelled subset size.
    """
    if m < 0:
        raise DataError(f"mask size must be >= 0, got {m}")
    if m > min(h, w):
        raise DataError(f"impossible mask size {m}: images are only {h}×{w}")
    masks = np.zeros((n, h, w), dtype=bool)
    if m == 0 or n == 0:
        return masks
    rng = _rng(seed, _STREAM_CODES[stream])
    r = rng.integers(0, h - m + 1, size=n)
    c = rng.integers(0, w - m + 1, size=n)
    in_rows = (np.arange(h)[None, :] >= r[:, None]) & (np.arange(h)[None, :] < r[:, None] + m)
    in_cols = (np.arange(w)[None, :] >= c[:, None]) & (np.arange(w)[None, :] < c[:, None] + m)
    return in_rows[:, :, None] & in_cols[:, None, :]


def apply_occlusion(x: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """A copy of images ``x`` [N, C, H, W] with the masked pixels set to 0 in every channel."""
    out = np.array(x, dtype=np.float32, copy=True)
    np.copyto(out, np.float32(0.0), where=masks[:, None, :, :])
    return out


# ---------------------------------------------------------------------------------------------
# prepared data set


@dataclass
class PreparedData:
    """The persisted data set every role shares (see the module docstring for the files)."""

    train_x: np.ndarray
    train_y: np.ndarray
    labelled: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    ood_x: np.ndarray | None
    num_classes: int
    input_shape: tuple[int, int, int]
    fingerprint: str
    meta: dict[str, Any] = field(repr=False)
    path: Path

    @property
    def labelled_x(self) -> np.ndarray:
        """Inputs of the labelled training subset D (what the teacher's chain sees); a new array each call."""
        return self.train_x[self.labelled]

    @property
    def labelled_y(self) -> np.ndarray:
        return self.train_y[self.labelled]

    @property
    def num_train(self) -> int:
        """N, the size of the labelled subset (the N in the SGLD likelihood scaling N/M)."""
        return int(len(self.labelled))

    @property
    def num_distill(self) -> int:
        """N′, the size of the distillation set D′ (every training input)."""
        return int(len(self.train_x))


def _normalise_root(source: str | None, root: str | None) -> str | None:
    """The root as it decides what is read: None where the source ignores it, else an absolute path."""
    if source is None or source in ("digits", "synthetic"):
        return None
    if root is None:
        return str(default_torchvision_root()) if source in _TORCHVISION_CLASSES else None
    return str(Path(root).expanduser().absolute())


def preparation_settings(cfg: DataConfig) -> dict[str, Any]:
    """The settings that define a prepared folder (compared on reuse; ``distill_noise`` is not one)."""
    return {
        "format": PREPARED_FORMAT,
        "source": cfg.source,
        "root": _normalise_root(cfg.source, cfg.root),
        "labelled": cfg.labelled,
        "mask": cfg.mask,
        "seed": cfg.seed,
        "classes": cfg.classes,
        "ood_source": cfg.ood_source,
        "ood_root": _normalise_root(cfg.ood_source, cfg.ood_root),
    }


def compute_fingerprint(arrays: dict[str, np.ndarray | None], settings: dict[str, Any]) -> str:
    """First 16 hex digits of sha256(settings ‖ for each array: name, dtype, shape, bytes).

    Location settings (``root``, ``ood_root``) are left out: two hosts that read the same data from
    different folders must agree, and the array bytes already pin the content.
    """
    h = hashlib.sha256()
    content = {k: v for k, v in settings.items() if k not in _LOCATION_SETTINGS}
    h.update(json.dumps(content, sort_keys=True).encode())
    for name in _ARRAY_NAMES:
        arr = arrays.get(name)
        if arr is None:
            continue
        arr = np.ascontiguousarray(arr)
        h.update(f"|{name}|{arr.dtype.str}|{list(arr.shape)}|".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then ``os.replace`` onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_npy(path: Path, arr: np.ndarray) -> None:
    _atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """meta.json of a prepared folder, None when there is none (a folder never prepared, or half-written)."""
    path = folder / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"prepared data {folder}: meta.json is unreadable ({exc}); delete the folder to rebuild") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict):
        raise DataError(f"prepared data {folder}: meta.json lacks its settings; delete the folder to rebuild")
    return meta


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def prepare(cfg: DataConfig, out_dir: str | os.PathLike) -> PreparedData:
    """Build the prepared data set for ``cfg`` in ``out_dir`` once; reuse it when it is already there.

    Steps: load the source; draw the stratified labelled subset of size N = ``cfg.labelled``
    (seeded by ``cfg.seed``; None keeps all); zero a fixed random m×m square (m = ``cfg.mask``) of
    every train and test image (and of the OOD test split, whose input shape must match); write the
    arrays atomically and ``meta.json`` last, so a folder with a meta.json is complete.

    A folder already prepared with the same settings is validated and returned without rewriting;
    one prepared with other settings is a :class:`DataError` (pick another folder).
    """
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        return _prepare_locked(cfg, out)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``folder/.prepare.lock``: roles started together prepare once.

    Without it two processes would both build the (deterministic, hence identical) arrays; the
    lock only saves the duplicate work.  Where ``fcntl`` is missing it is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / ".prepare.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _prepare_locked(cfg: DataConfig, out: Path) -> PreparedData:
    settings = preparation_settings(cfg)
    existing = _read_meta(out)
    if existing is not None:
        if existing["settings"] == settings:
            logger.info("reusing prepared data in %s (fingerprint %s)", out, existing.get("fingerprint"))
            return load_prepared(out)
        raise DataError(
            f"{out} already holds data prepared with other settings ({_settings_diff(existing['settings'], settings)}); "
            "pick another folder (data.prepared) or delete this one"
        )
    arrays, stats = _build_arrays(cfg)
    fingerprint = compute_fingerprint(arrays, settings)
    meta = _make_meta(arrays, settings, stats, fingerprint)
    for name, arr in arrays.items():
        if arr is not None:
            _save_npy(out / f"{name}.npy", arr)
    stale = out / "ood_x.npy"
    if arrays["ood_x"] is None and stale.exists():
        stale.unlink()  # left by an earlier, unfinished preparation
    _atomic_write(out / "meta.json", lambda fh: fh.write((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()))
    logger.info(
        "prepared %s in %s: N=%d labelled of N'=%d, mask %d (rate %.3f), fingerprint %s",
        cfg.source, out, meta["num_train"], meta["num_distill"], cfg.mask, meta["mask_rate"], fingerprint,
    )
    return _prepared_from(arrays, meta, out)


def _build_arrays(cfg: DataConfig) -> tuple[dict[str, np.ndarray | None], dict[str, Any]]:
    """Load, subset and occlude; returns the arrays to persist and occlusion statistics."""
    raw = load_source(cfg.source, cfg.root, cfg.download)
    raw, heldout_x = select_classes(raw, cfg.classes)
    _, h, w = raw.input_shape
    if cfg.mask > min(h, w):
        raise DataError(f"impossible mask size {cfg.mask}: {raw.name} images are only {h}×{w}")
    n_avail = len(raw.train_y)
    n = n_avail if cfg.labelled is None else cfg.labelled
    if n > n_avail:
        raise DataError(f"data.labelled={n} but {raw.name} has only {n_avail} training examples")
    labelled = stratified_subset(raw.train_y, n, _rng(cfg.seed, _STREAM_LABELLED))
    missing = sorted(set(range(raw.num_classes)) - set(np.unique(raw.train_y[labelled]).tolist()))
    if missing:
        logger.warning("labelled subset of %d has no example of class(es) %s", n, missing)

    train_masks = occlusion_masks(n_avail, cfg.mask, h, w, cfg.seed, "train")
    train_x = apply_occlusion(raw.train_x, train_masks)
    test_x = apply_occlusion(raw.test_x, occlusion_masks(len(raw.test_x), cfg.mask, h, w, cfg.seed, "test"))
    if cfg.ood_source == "heldout":
        ood_x = apply_occlusion(heldout_x, occlusion_masks(len(heldout_x), cfg.mask, h, w, cfg.seed, "ood"))
    else:
        ood_x = _ood_inputs(cfg, raw.input_shape) if cfg.ood_source is not None else None

    ink = raw.train_x != 0
    stats = {
        "mask_rate": float(train_masks.mean()) if train_masks.size else 0.0,
        "mask_rate_nominal": mask_rate(cfg.mask, h, w),
        "ink_removed": float((ink & train_masks[:, None]).sum() / max(int(ink.sum()), 1)),
        "num_classes": raw.num_classes,
        "source_name": raw.name,
    }
    arrays = {
        "train_x": train_x.astype(_ARRAY_DTYPES["train_x"], copy=False),
        "train_y": raw.train_y.astype(_ARRAY_DTYPES["train_y"], copy=False),
        "labelled": labelled.astype(_ARRAY_DTYPES["labelled"], copy=False),
        "test_x": test_x.astype(_ARRAY_DTYPES["test_x"], copy=False),
        "test_y": raw.test_y.astype(_ARRAY_DTYPES["test_y"], copy=False),
        "ood_x": None if ood_x is None else ood_x.astype(_ARRAY_DTYPES["ood_x"], copy=False),
    }
    return arrays, stats


def select_classes(raw: RawData, classes: list[int] | None) -> tuple[RawData, np.ndarray]:
    """Keep only ``classes`` (relabelled 0..k-1 in the given order); also return the test inputs of
    the other classes — a real out-of-distribution set that needs no second data set."""
    if classes is None:
        return raw, raw.test_x[:0]
    unknown = [c for c in classes if c >= raw.num_classes]
    if unknown:
        raise DataError(f"data.classes {unknown} do not exist in {raw.name} ({raw.num_classes} classes)")
    lookup = np.full(raw.num_classes, -1, dtype=np.int64)
    lookup[np.asarray(classes)] = np.arange(len(classes))
    keep_train, keep_test = lookup[raw.train_y] >= 0, lookup[raw.test_y] >= 0
    kept = RawData(
        train_x=raw.train_x[keep_train], train_y=lookup[raw.train_y[keep_train]],
        test_x=raw.test_x[keep_test], test_y=lookup[raw.test_y[keep_test]],
        num_classes=len(classes), name=f"{raw.name}[classes {','.join(map(str, classes))}]",
    )
    return kept, raw.test_x[~keep_test]


def _ood_inputs(cfg: DataConfig, input_shape: tuple[int, int, int]) -> np.ndarray:
    """The OOD source's test inputs, occluded like the in-distribution data (its own stream)."""
    ood = load_source(cfg.ood_source, cfg.ood_root, cfg.download)  # type: ignore[arg-type]
    if ood.input_shape != input_shape:
        raise DataError(
            f"OOD source {cfg.ood_source!r} has input shape {ood.input_shape} but {cfg.source!r} has {input_shape}"
        )
    _, h, w = input_shape
    return apply_occlusion(ood.test_x, occlusion_masks(len(ood.test_x), cfg.mask, h, w, cfg.seed, "ood"))


def _make_meta(arrays: dict[str, np.ndarray | None], settings: dict[str, Any], stats: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    train_y, labelled = arrays["train_y"], arrays["labelled"]
    assert train_y is not None and labelled is not None and arrays["train_x"] is not None
    counts = np.bincount(train_y[labelled], minlength=stats["num_classes"]).tolist()
    return {
        "settings": settings,
        "arrays": {
            name: {"dtype": arr.dtype.str, "shape": list(arr.shape)} for name, arr in arrays.items() if arr is not None
        },
        "num_classes": stats["num_classes"],
        "input_shape": list(arrays["train_x"].shape[1:]),
        "num_train": int(len(labelled)),
        "num_distill": int(len(arrays["train_x"])),
        "labelled_class_counts": counts,
        "mask_rate": stats["mask_rate"],
        "mask_rate_nominal": stats["mask_rate_nominal"],
        "ink_removed": stats["ink_removed"],
        "source_name": stats["source_name"],
        "fingerprint": fingerprint,
    }


def _prepared_from(arrays: dict[str, np.ndarray | None], meta: dict[str, Any], path: Path) -> PreparedData:
    return PreparedData(
        train_x=arrays["train_x"],  # type: ignore[arg-type]
        train_y=arrays["train_y"],  # type: ignore[arg-type]
        labelled=arrays["labelled"],  # type: ignore[arg-type]
        test_x=arrays["test_x"],  # type: ignore[arg-type]
        test_y=arrays["test_y"],  # type: ignore[arg-type]
        ood_x=arrays.get("ood_x"),
        num_classes=int(meta["num_classes"]),
        input_shape=tuple(int(d) for d in meta["input_shape"]),  # type: ignore[arg-type]
        fingerprint=str(meta["fingerprint"]),
        meta=meta,
        path=path,
    )


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Load and verify a prepared folder.

    Checks: meta.json present and complete; every array it lists present and loadable with
    ``allow_pickle=False``; dtypes and shapes as recorded; labels in [0, num_classes); labelled
    indices sorted, unique and in range; and the fingerprint recomputed from the bytes equal to the
    recorded one (any corrupted byte is caught here).
    """
    folder = Path(path)
    meta = _read_meta(folder)
    if meta is None:
        raise DataError(f"{folder} holds no prepared data (no meta.json); run data preparation first")
    required = ("arrays", "num_classes", "input_shape", "fingerprint")
    if any(key not in meta for key in required) or not isinstance(meta["arrays"], dict):
        raise DataError(f"prepared data {folder}: meta.json is incomplete (needs {', '.join(required)})")
    arrays: dict[str, np.ndarray | None] = {"ood_x": None}
    for name in _ARRAY_NAMES:
        spec = meta["arrays"].get(name)
        if spec is None:
            if name != "ood_x":
                raise DataError(f"prepared data {folder}: meta.json does not list {name}.npy")
            continue
        try:
            arr = _load_npy(folder / f"{name}.npy")
        except DataError as exc:
            raise DataError(f"prepared data {folder} is damaged: {exc}; delete the folder and prepare it again") from None
        if arr.dtype.str != _ARRAY_DTYPES[name].str or arr.dtype.str != spec.get("dtype") or list(arr.shape) != spec.get("shape"):
            raise DataError(
                f"prepared data {folder}: {name}.npy is {arr.dtype.str}{list(arr.shape)}, "
                f"meta.json says {spec.get('dtype')}{spec.get('shape')}"
            )
        arrays[name] = arr
    _check_consistency(arrays, meta, folder)
    found = compute_fingerprint(arrays, meta["settings"])
    if found != meta["fingerprint"]:
        raise DataError(
            f"prepared data {folder} is corrupt: fingerprint {found} != recorded {meta['fingerprint']}; "
            "delete the folder and prepare it again"
        )
    return _prepared_from(arrays, meta, folder)


def _check_consistency(arrays: dict[str, np.ndarray | None], meta: dict[str, Any], folder: Path) -> None:
    train_x, train_y, labelled = arrays["train_x"], arrays["train_y"], arrays["labelled"]
    test_x, test_y, ood_x = arrays["test_x"], arrays["test_y"], arrays["ood_x"]
    assert train_x is not None and train_y is not None and labelled is not None
    assert test_x is not None and test_y is not None
    shape = tuple(meta["input_shape"])
    k = int(meta["num_classes"])
    problems = []
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        problems.append("images and labels differ in length")
    if any(a is not None and tuple(a.shape[1:]) != shape for a in (train_x, test_x, ood_x)):
        problems.append(f"an input array is not of shape {shape}")
    if (train_y.size and not 0 <= train_y.min() <= train_y.max() < k) or (test_y.size and not 0 <= test_y.min() <= test_y.max() < k):
        problems.append(f"labels outside 0..{k - 1}")
    if labelled.size and (labelled[0] < 0 or labelled[-1] >= len(train_x) or np.any(np.diff(labelled) <= 0)):
        problems.append("labelled indices are not sorted, unique and within the training set")
    if problems:
        raise DataError(f"prepared data {folder} is inconsistent: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------
# distillation inputs


def distill_inputs(train_x: torch.Tensor, indices: torch.Tensor, seed: int, sigma: float) -> torch.Tensor:
    """Distillation batch x̃_j = x_{i_j} + σ·ε_j, ε ~ N(0, I), rebuilt exactly from (indices, seed).

    ε is drawn in float32 on the CPU from ``torch.Generator().manual_seed(seed)`` with shape
    ``[len(indices), *input_shape]`` and only then moved to ``train_x``'s device and dtype, so the
    noise is the same bits whatever device the receiver computes on.
    """
    if indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be a 1-D integer tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
    n = train_x.shape[0]
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise IndexError(f"distillation indices must lie in [0, {n}), got [{int(indices.min())}, {int(indices.max())}]")
    batch = train_x[indices.to(device=train_x.device, dtype=torch.int64)]
    if sigma == 0:
        return batch.clone()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((indices.numel(), *train_x.shape[1:]), generator=gen, dtype=torch.float32)
    return batch + sigma * noise.to(device=train_x.device, dtype=train_x.dtype)


def distill_batch_indices(n_distill: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` distinct indices drawn uniformly from 0..n_distill−1 (without replacement)."""
    if not 0 < batch_size <= n_distill:
        raise ValueError(f"batch_size must be in 1..{n_distill}, got {batch_size}")
    return torch.randperm(n_distill, generator=generator)[:batch_size]

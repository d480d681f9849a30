"""Tests for gped.core.data: sources, preparation (subset, occlusion, persistence), distillation inputs."""

from __future__ import annotations

import gzip
import json
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gped.config import DataConfig
from gped.core import data as D
from gped.errors import DataError

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# helpers


def write_npy_folder(folder: Path, train_x, train_y, test_x, test_y) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train_x", train_x), ("train_y", train_y), ("test_x", test_x), ("test_y", test_y)):
        np.save(folder / f"{name}.npy", arr)
    return folder


def ones_folder(tmp_path: Path, n_train=40, n_test=20, shape=(3, 12, 12)) -> Path:
    """A constant-ones data set: every zero after preparation comes from the occlusion square."""
    y_train = np.arange(n_train) % 4
    y_test = np.arange(n_test) % 4
    return write_npy_folder(
        tmp_path / "ones", np.ones((n_train, *shape), np.float32), y_train, np.ones((n_test, *shape), np.float32), y_test
    )


def write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    blob = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    blob += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve or connect fails immediately (and is recorded)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


# ---------------------------------------------------------------------------------------------
# sources


def test_digits_source():
    raw = D.load_source("digits")
    assert raw.num_classes == 10
    assert raw.train_x.shape[1:] == (1, 8, 8) and raw.test_x.shape[1:] == (1, 8, 8)
    assert raw.train_x.dtype == np.float32 and raw.train_y.dtype == np.int64
    assert len(raw.train_x) + len(raw.test_x) == 1797
    assert len(raw.test_x) == round(0.25 * 1797)
    assert 0.0 <= raw.train_x.min() and raw.train_x.max() <= 1.0
    # the split is fixed and stratified
    again = D.load_source("digits")
    np.testing.assert_array_equal(raw.test_y, again.test_y)
    share = np.bincount(raw.test_y, minlength=10) / (np.bincount(raw.test_y, minlength=10) + np.bincount(raw.train_y, minlength=10))
    assert np.all(np.abs(share - 0.25) < 0.02)


def test_synthetic_source_is_deterministic_and_balanced():
    a, b = D.load_source("synthetic"), D.load_source("synthetic")
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert a.train_x.shape == (400, 1, 8, 8) and a.test_x.shape == (200, 1, 8, 8)
    assert a.num_classes == 4 and np.all(np.bincount(a.train_y) == 100)
    # learnable: nearest class mean classifies the test split well
    means = np.stack([a.train_x[a.train_y == k].reshape(-1, 64).mean(0) for k in range(4)])
    pred = np.argmin(((a.test_x.reshape(-1, 1, 64) - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == a.test_y).mean() > 0.9


def test_unknown_source_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="unknown data source"):
        D.load_source("imagenet")
    with pytest.raises(DataError, match="data.root"):
        D.load_source("npy")
    with pytest.raises(DataError, match="does not exist"):
        D.load_source("idx", tmp_path / "nowhere")


def test_npy_source_accepts_nhw_uint8_and_nchw_float(tmp_path):
    rng = np.random.default_rng(0)
    folder = write_npy_folder(
        tmp_path / "a",
        rng.integers(0, 256, (10, 6, 6), dtype=np.uint8),
        np.arange(10) % 3,
        rng.integers(0, 256, (5, 6, 6), dtype=np.uint8),
        np.array([0, 1, 2, 3, 0]),
    )
    raw = D.load_source("npy", folder)
    assert raw.train_x.shape == (10, 1, 6, 6) and raw.train_x.dtype == np.float32
    assert raw.train_x.max() <= 1.0 and raw.num_classes == 4
    x = rng.random((10, 2, 6, 6)).astype(np.float64)
    folder = write_npy_folder(tmp_path / "b", x, np.arange(10.0) % 2, x[:4], np.zeros(4, np.int32))
    raw = D.load_source("npy", folder)
    assert raw.train_x.shape == (10, 2, 6, 6) and raw.train_y.dtype == np.int64


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing", "missing file"),
        ("lengths", "differ in length"),
        ("pickled", "pickled object array"),
        ("float_labels", "integer class indices"),
        ("shapes", "differ in shape"),
        ("truncated", "cannot read"),
        ("channels_last", "channels-last"),
        ("nan", "NaN"),
    ],
)
def test_npy_source_errors(tmp_path, case, pattern):
    x = np.zeros((6, 1, 4, 4), np.float32)
    y = np.arange(6) % 2
    folder = write_npy_folder(tmp_path / case, x, y, x, y)
    if case == "missing":
        (folder / "test_y.npy").unlink()
    elif case == "lengths":
        np.save(folder / "train_y.npy", y[:5])
    elif case == "pickled":
        np.save(folder / "train_y.npy", np.array([{"a": 1}] * 6, dtype=object), allow_pickle=True)
    elif case == "float_labels":
        np.save(folder / "train_y.npy", y + 0.5)
    elif case == "shapes":
        np.save(folder / "test_x.npy", np.zeros((6, 1, 5, 5), np.float32))
    elif case == "truncated":
        blob = (folder / "train_x.npy").read_bytes()
        (folder / "train_x.npy").write_bytes(blob[: len(blob) - 10])
    elif case == "channels_last":
        np.save(folder / "train_x.npy", np.zeros((6, 4, 4, 3), np.float32))
    elif case == "nan":
        np.save(folder / "train_x.npy", np.full((6, 1, 4, 4), np.nan, np.float32))
    with pytest.raises(DataError, match=pattern):
        D.load_source("npy", folder)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_round_trip(tmp_path, compress):
    rng = np.random.default_rng(1)
    train_x = rng.integers(0, 256, (12, 5, 7), dtype=np.uint8)
    train_y = (np.arange(12) % 3).astype(np.uint8)
    test_x = rng.integers(0, 256, (4, 5, 7), dtype=np.uint8)
    test_y = np.array([0, 1, 2, 2], np.uint8)
    for name, arr in (
        ("train-images-idx3-ubyte", train_x),
        ("train-labels-idx1-ubyte", train_y),
        ("t10k-images-idx3-ubyte", test_x),
        ("t10k-labels-idx1-ubyte", test_y),
    ):
        write_idx(tmp_path / name, arr, compress)
    raw = D.load_source("idx", tmp_path)
    assert raw.train_x.shape == (12, 1, 5, 7) and raw.test_x.shape == (4, 1, 5, 7)
    np.testing.assert_allclose(raw.train_x[:, 0] * 255, train_x, atol=1e-4)
    np.testing.assert_array_equal(raw.test_y, test_y)
    assert raw.num_classes == 3


def test_read_idx_non_uint8_and_errors(tmp_path):
    arr = np.arange(-3, 9, dtype=np.int32).reshape(3, 4)
    write_idx(tmp_path / "ok", arr, compress=False)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "ok"), arr)

    blob = (tmp_path / "ok").read_bytes()
    (tmp_path / "short").write_bytes(blob[:-1])
    with pytest.raises(DataError, match="truncated"):
        D.read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(blob + b"\0")
    with pytest.raises(DataError, match="longer"):
        D.read_idx(tmp_path / "long")
    (tmp_path / "magic").write_bytes(b"\x01" + blob[1:])
    with pytest.raises(DataError, match="magic"):
        D.read_idx(tmp_path / "magic")
    (tmp_path / "badgz").write_bytes(gzip.compress(blob)[:-12])
    with pytest.raises(DataError, match="cannot read IDX"):
        D.read_idx(tmp_path / "badgz")


def test_idx_folder_missing_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 3, 3), np.uint8), compress=False)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        D.load_source("idx", tmp_path)


@pytest.mark.skipif(
    not D.DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{D.DEBIAN_FASHION_MNIST} not installed (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist_idx():
    raw = D.load_source("idx", D.DEBIAN_FASHION_MNIST)
    assert raw.train_x.shape == (60000, 1, 28, 28) and raw.test_x.shape == (10000, 1, 28, 28)
    assert raw.num_classes == 10 and np.all(np.bincount(raw.train_y) == 6000)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_missing_files_is_offline_data_error(tmp_path, no_network, name):
    with pytest.raises(DataError) as info:
        D.load_source(name, tmp_path / "tv", download=False)
    message = str(info.value)
    assert str(tmp_path / "tv") in message and "download=true" in message and "digits" in message
    assert "\n" not in message
    assert no_network == []


def test_torchvision_failed_download_is_data_error(tmp_path, no_network):
    with pytest.raises(DataError, match="could not be downloaded"):
        D.load_source("kmnist", tmp_path / "tv", download=True)


# ---------------------------------------------------------------------------------------------
# subsets, occlusion, preparation


def test_mask_rate_matches_design():
    rates = [round(D.mask_rate(m, 28, 28), 2) for m in (0, 5, 10, 15, 20, 25)]
    assert rates == [0.0, 0.03, 0.13, 0.29, 0.51, 0.80]


def test_stratified_labelled_subset(tmp_path):
    prepared = D.prepare(DataConfig(source="digits", labelled=300, seed=3), tmp_path / "p")
    assert prepared.num_train == 300 and prepared.labelled_x.shape == (300, 1, 8, 8)
    assert prepared.num_distill == len(prepared.train_x) > 300
    assert np.all(np.diff(prepared.labelled) > 0) and prepared.labelled.dtype == np.int64
    expected = 300 * np.bincount(prepared.train_y, minlength=10) / prepared.num_distill
    counts = np.bincount(prepared.labelled_y, minlength=10)
    assert np.all(np.abs(counts - expected) < 1.0)
    assert prepared.meta["labelled_class_counts"] == counts.tolist()
    other = D.prepare(DataConfig(source="digits", labelled=300, seed=4), tmp_path / "q")
    assert not np.array_equal(prepared.labelled, other.labelled)
    with pytest.raises(DataError, match="only"):
        D.prepare(DataConfig(source="digits", labelled=5000), tmp_path / "r")


def test_occlusion_zeroes_one_square_per_image(tmp_path):
    folder = ones_folder(tmp_path)
    m = 5
    prepared = D.prepare(DataConfig(source="npy", root=str(folder), mask=m, seed=7), tmp_path / "p")
    for x in (prepared.train_x, prepared.test_x):
        zero = x == 0
        assert np.all(zero == zero[:, :1])  # the same square in every channel
        for img in zero[:, 0]:
            rows, cols = np.nonzero(img)
            assert len(rows) == m * m
            assert rows.max() - rows.min() == m - 1 and cols.max() - cols.min() == m - 1
    assert prepared.meta["mask_rate"] == pytest.approx(D.mask_rate(m, 12, 12))
    assert prepared.meta["ink_removed"] == pytest.approx(D.mask_rate(m, 12, 12))

    same = D.prepare(DataConfig(source="npy", root=str(folder), mask=m, seed=7), tmp_path / "p2")
    np.testing.assert_array_equal(prepared.train_x, same.train_x)
    other = D.prepare(DataConfig(source="npy", root=str(folder), mask=m, seed=8), tmp_path / "p3")
    assert not np.array_equal(prepared.train_x, other.train_x)
    # the square of an image does not depend on the labelled subset size
    subset = D.prepare(DataConfig(source="npy", root=str(folder), mask=m, seed=7, labelled=8), tmp_path / "p4")
    np.testing.assert_array_equal(prepared.train_x, subset.train_x)


def test_occlusion_masks_cover_all_positions():
    masks = D.occlusion_masks(2000, 3, 5, 5, seed=0, stream="train")
    corners = {tuple(np.argwhere(mask)[0]) for mask in masks}
    assert corners == {(r, c) for r in range(3) for c in range(3)}
    assert np.all(D.occlusion_masks(3, 5, 5, 5, seed=0, stream="test"))  # m = H: the whole image
    assert not np.any(D.occlusion_masks(3, 0, 5, 5, seed=0, stream="test"))


def test_impossible_mask_size(tmp_path):
    with pytest.raises(DataError, match="impossible mask size"):
        D.prepare(DataConfig(source="digits", mask=9), tmp_path / "p")
    assert not (tmp_path / "p" / "meta.json").exists()


def test_prepare_is_idempotent_and_fingerprinted(tmp_path):
    cfg = DataConfig(source="synthetic", mask=3, seed=1, labelled=100)
    first = D.prepare(cfg, tmp_path / "p")
    files = sorted(f for f in (tmp_path / "p").iterdir() if not f.name.startswith("."))
    assert [f.name for f in files] == ["labelled.npy", "meta.json", "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    second = D.prepare(cfg, tmp_path / "p")
    assert {f.name: f.stat().st_mtime_ns for f in files} == stamps
    assert second.fingerprint == first.fingerprint and len(first.fingerprint) == 16
    np.testing.assert_array_equal(second.train_x, first.train_x)
    loaded = D.load_prepared(tmp_path / "p")
    assert loaded.fingerprint == first.fingerprint and loaded.input_shape == (1, 8, 8) and loaded.num_classes == 4
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["fingerprint"] == first.fingerprint and meta["settings"]["mask"] == 3
    # the same preparation elsewhere gives the same fingerprint; another setting changes it
    assert D.prepare(cfg, tmp_path / "q").fingerprint == first.fingerprint
    changed = D.prepare(DataConfig(source="synthetic", mask=3, seed=1, labelled=120), tmp_path / "r")
    assert changed.fingerprint != first.fingerprint
    with pytest.raises(DataError, match="other settings.*labelled: 100 -> 120"):
        D.prepare(DataConfig(source="synthetic", mask=3, seed=1, labelled=120), tmp_path / "p")


def test_fingerprint_ignores_where_the_data_was_read(tmp_path):
    folder = ones_folder(tmp_path)
    copy = write_npy_folder(tmp_path / "copy", *(np.load(folder / f"{n}.npy") for n in ("train_x", "train_y", "test_x", "test_y")))
    a = D.prepare(DataConfig(source="npy", root=str(folder), mask=2), tmp_path / "a")
    b = D.prepare(DataConfig(source="npy", root=str(copy), mask=2), tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    with pytest.raises(DataError, match="other settings"):
        D.prepare(DataConfig(source="npy", root=str(copy), mask=2), tmp_path / "a")


@pytest.mark.parametrize("name, where", [("train_x.npy", -1), ("train_x.npy", 200), ("labelled.npy", -3), ("test_y.npy", 20)])
def test_corrupted_byte_is_detected(tmp_path, name, where):
    D.prepare(DataConfig(source="synthetic", mask=2), tmp_path / "p")
    path = tmp_path / "p" / name
    blob = bytearray(path.read_bytes())
    blob[where] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError):
        D.load_prepared(tmp_path / "p")


def test_load_prepared_missing_pieces(tmp_path):
    with pytest.raises(DataError, match="no meta.json"):
        D.load_prepared(tmp_path)
    D.prepare(DataConfig(source="synthetic"), tmp_path / "p")
    (tmp_path / "p" / "test_x.npy").unlink()
    with pytest.raises(DataError, match="missing file"):
        D.load_prepared(tmp_path / "p")
    (tmp_path / "p" / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json"):
        D.load_prepared(tmp_path / "p")


def test_ood_split(tmp_path):
    prepared = D.prepare(DataConfig(source="synthetic", mask=2, ood_source="digits"), tmp_path / "p")
    assert prepared.ood_x is not None and prepared.ood_x.shape == (round(0.25 * 1797), 1, 8, 8)
    assert np.all((prepared.ood_x == 0).reshape(len(prepared.ood_x), -1).sum(1) >= 4)
    assert D.load_prepared(tmp_path / "p").ood_x is not None

    wrong = write_npy_folder(tmp_path / "wrong", *(np.zeros((4, 1, 10, 10), np.float32), np.zeros(4, int)) * 2)
    with pytest.raises(DataError, match="OOD source 'npy' has input shape"):
        D.prepare(DataConfig(source="synthetic", ood_source="npy", ood_root=str(wrong)), tmp_path / "q")


# ---------------------------------------------------------------------------------------------
# distillation inputs


def test_distill_inputs_regenerable_with_sigma_noise():
    train_x = torch.rand(500, 1, 8, 8)
    idx = torch.tensor([3, 1, 400, 3])
    a = D.distill_inputs(train_x, idx, seed=11, sigma=1e-3)
    b = D.distill_inputs(train_x, idx.clone(), seed=11, sigma=1e-3)
    assert torch.equal(a, b) and a.shape == (4, 1, 8, 8)
    assert not torch.equal(a, D.distill_inputs(train_x, idx, seed=12, sigma=1e-3))
    assert torch.equal(D.distill_inputs(train_x, idx, seed=11, sigma=0.0), train_x[idx])

    big = torch.arange(400)
    noise = D.distill_inputs(train_x, big, seed=5, sigma=0.1) - train_x[big]
    assert noise.std().item() == pytest.approx(0.1, rel=0.02)
    assert abs(noise.mean().item()) < 0.005
    with pytest.raises(IndexError):
        D.distill_inputs(train_x, torch.tensor([500]), seed=0, sigma=0.1)


def test_distill_batch_indices():
    gen = torch.Generator().manual_seed(0)
    idx = D.distill_batch_indices(50, 20, gen)
    assert idx.dtype == torch.int64 and len(idx) == 20 and len(set(idx.tolist())) == 20
    assert 0 <= idx.min() and idx.max() < 50
    counts = torch.zeros(50)
    for _ in range(500):
        counts[D.distill_batch_indices(50, 10, gen)] += 1
    assert counts.min() > 60 and counts.max() < 140  # uniform: 100 expected per index
    assert torch.equal(
        D.distill_batch_indices(50, 10, torch.Generator().manual_seed(3)),
        D.distill_batch_indices(50, 10, torch.Generator().manual_seed(3)),
    )
    with pytest.raises(ValueError):
        D.distill_batch_indices(5, 6, gen)


def test_concurrent_prepare_builds_once(tmp_path, caplog):
    import logging
    import threading

    cfg = DataConfig(source="synthetic", mask=2)
    results = []
    caplog.set_level(logging.INFO, logger="gped.core.data")
    threads = [threading.Thread(target=lambda: results.append(D.prepare(cfg, tmp_path / "p"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 2 and results[0].fingerprint == results[1].fingerprint
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("prepared ") for m in messages) == 1
    assert sum(m.startswith("reusing ") for m in messages) == 1

"""jaxseg.data.store: the tensorstore case store."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxseg.data import store
from jaxseg.data.store import (
    list_cases,
    open_case,
    read_dataset_meta,
    read_patch,
    write_case,
    write_dataset_meta,
)


def _case(shape=(12, 10, 9), c=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((*shape, c)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[2:7, 3:8, 1:5] = 1
    label[8:11, 1:4, 5:9] = 3  # class 2 absent
    label[5, 5, 5] = 4
    return image, label


def _padded_ref(arr: np.ndarray, start, size) -> np.ndarray:
    """Reference: zero-pad the full array generously, then slice with numpy."""
    pad = max(max(abs(s) for s in start), max(size)) + max(arr.shape)
    widths = [(pad, pad)] * 3 + [(0, 0)] * (arr.ndim - 3)
    big = np.pad(arr, widths)
    return big[tuple(slice(s + pad, s + pad + n) for s, n in zip(start, size))]


def test_write_open_roundtrip(tmp_path):
    image, label = _case()
    write_case(tmp_path, "case_a", image, label, {"age": 40.5, "spacing": np.array([1.0, 1.0, 2.0])})
    assert list_cases(tmp_path) == ["case_a"]
    assert sorted(os.listdir(tmp_path)) == ["case_a"]  # no temp dir left behind
    assert sorted(os.listdir(tmp_path / "case_a")) == ["fg.npz", "image.zarr", "label.zarr", "meta.json"]
    c = open_case(tmp_path, "case_a")
    assert c.case_id == "case_a" and c.shape == (12, 10, 9) and c.n_channels == 2
    assert c.image.shape == (12, 10, 9, 2) and c.label.shape == (12, 10, 9)
    np.testing.assert_array_equal(c.image.read().result(), image)
    np.testing.assert_array_equal(c.label.read().result(), label)
    assert c.image.dtype.numpy_dtype == np.float32 and c.label.dtype.numpy_dtype == np.uint8
    m = c.meta
    assert m["age"] == 40.5 and m["spacing"] == [1.0, 1.0, 2.0]
    assert m["shape"] == [12, 10, 9] and m["n_channels"] == 2 and m["dtype"] == "float32"
    assert m["classes_present"] == [1, 3, 4]
    assert sorted(c.fg) == [1, 3, 4]
    # on-disk format: zarr v2, chunks (32,32,32,C), blosc/zstd
    zimg = json.loads((tmp_path / "case_a" / "image.zarr" / ".zarray").read_text())
    zlab = json.loads((tmp_path / "case_a" / "label.zarr" / ".zarray").read_text())
    assert zimg["chunks"] == [32, 32, 32, 2] and zlab["chunks"] == [32, 32, 32]
    assert zimg["dtype"] == "<f4" and zlab["dtype"] == "|u1"
    assert zimg["compressor"]["id"] == "blosc" and zimg["compressor"]["cname"] == "zstd"
    assert zlab["compressor"]["cname"] == "zstd"


def test_fg_coordinates_belong_to_their_class(tmp_path):
    image, label = _case()
    write_case(tmp_path, "c", image, label, {})
    c = open_case(tmp_path, "c")
    for cls, coords in c.fg.items():
        assert coords.dtype == np.int32 and coords.ndim == 2 and coords.shape[1] == 3
        assert len(coords) == int((label == cls).sum())  # fewer than 10000: all of them
        assert np.all(label[tuple(coords.T)] == cls)
        assert len(np.unique(coords, axis=0)) == len(coords)
    # subsampling: capped, without replacement, inside the class, deterministic
    big = np.zeros((16, 16, 16), np.uint8)
    big[:, :, :10] = 1
    a = store._fg_locations(big, max_samples=300)
    b = store._fg_locations(big, max_samples=300)
    assert a[1].shape == (300, 3)
    np.testing.assert_array_equal(a[1], b[1])
    assert np.all(big[tuple(a[1].T)] == 1)
    assert len(np.unique(a[1], axis=0)) == 300
    assert store.FG_MAX_SAMPLES == 10000


def _starts(shape, size, rng, n):
    out = [(0, 0, 0), tuple(-s + 1 for s in size), tuple(d - 1 for d in shape),
           tuple(-2 for _ in shape), (-3, 4, shape[2] - 2)]
    for _ in range(n):
        out.append(tuple(int(rng.integers(-s - 2, d + 2)) for d, s in zip(shape, size)))
    return out


class _Recorder:
    """Wraps an opened tensorstore and records the index expressions read through it."""

    def __init__(self, inner):
        self.inner = inner
        self.requests = []

    def __getitem__(self, idx):
        self.requests.append(idx)
        return self.inner[idx]

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_read_patch_matches_numpy_and_reads_only_in_bounds(tmp_path):
    image, label = _case()
    write_case(tmp_path, "c", image, label, {})
    c = open_case(tmp_path, "c")
    c.image, c.label = _Recorder(c.image), _Recorder(c.label)
    rng = np.random.default_rng(0)
    for size in [(4, 5, 6), (16, 16, 16), (1, 1, 1), (12, 10, 9)]:
        for start in _starts(c.shape, size, rng, 25):
            c.image.requests.clear()
            c.label.requests.clear()
            img, lab = read_patch(c, start, size)
            assert img.shape == (*size, 2) and img.dtype == np.float32
            assert lab.shape == tuple(size) and lab.dtype == np.uint8
            np.testing.assert_array_equal(img, _padded_ref(image, start, size))
            np.testing.assert_array_equal(lab, _padded_ref(label, start, size))
            lo = [max(s, 0) for s in start]
            hi = [min(s + n, d) for s, n, d in zip(start, size, c.shape)]
            if all(h > l for l, h in zip(lo, hi)):
                expected = tuple(slice(l, h) for l, h in zip(lo, hi))
                assert c.image.requests == [expected] and c.label.requests == [expected]
            else:  # entirely outside: nothing is read
                assert c.image.requests == [] and c.label.requests == []
                assert not img.any() and not lab.any()


def test_unlabelled_case(tmp_path):
    image, _ = _case(c=1)
    write_case(tmp_path, "u", image, None, {"split": "test"})
    assert not (tmp_path / "u" / "label.zarr").exists()
    c = open_case(tmp_path, "u")
    assert c.label is None and c.fg == {} and c.meta["classes_present"] == [] and not c.meta["has_label"]
    img, lab = read_patch(c, (-2, 0, 3), (5, 5, 5))
    assert lab is None
    np.testing.assert_array_equal(img, _padded_ref(image, (-2, 0, 3), (5, 5, 5)))


def test_write_is_atomic_on_crash(tmp_path, monkeypatch):
    image, label = _case()

    def boom(src, dst):
        raise OSError("simulated crash at the final rename")

    monkeypatch.setattr(store.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_case(tmp_path, "c", image, label, {})
    monkeypatch.undo()
    assert list_cases(tmp_path) == []
    assert os.listdir(tmp_path) == []  # neither the case nor its temp dir


def test_crash_while_writing_arrays_leaves_nothing(tmp_path, monkeypatch):
    image, label = _case()
    calls = {"n": 0}
    real = store._fg_locations

    def failing(*a, **k):
        calls["n"] += 1
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(store, "_fg_locations", failing)
    with pytest.raises(RuntimeError):
        write_case(tmp_path, "c", image, label, {})
    assert calls["n"] == 1 and os.listdir(tmp_path) == []
    monkeypatch.setattr(store, "_fg_locations", real)
    write_case(tmp_path, "c", image, label, {})
    assert list_cases(tmp_path) == ["c"]


def test_list_cases_ignores_temp_and_incomplete_and_overwrite(tmp_path):
    image, label = _case()
    write_case(tmp_path, "b", image, label, {"v": 1})
    write_case(tmp_path, "a", image, label, {"v": 1})
    (tmp_path / ".tmp-c-99999999").mkdir()  # a killed writer's leftovers
    (tmp_path / "half").mkdir()  # no meta.json: not a case
    write_dataset_meta(tmp_path, {"labels": {"background": 0}})
    assert list_cases(tmp_path) == ["a", "b"]
    assert list_cases(tmp_path / "nope") == []
    # overwrite an existing case
    write_case(tmp_path, "a", image[..., :1] * 0 + 7, label, {"v": 2})
    c = open_case(tmp_path, "a")
    assert c.meta["v"] == 2 and c.n_channels == 1
    assert float(c.image.read().result().max()) == 7.0
    # stale temp dirs of dead processes are removed, live ones kept
    (tmp_path / f".tmp-d-{os.getpid() + 10**7}").mkdir()
    live = tmp_path / f".tmp-e-{os.getppid()}"
    live.mkdir()
    removed = store.remove_stale_temp(tmp_path)
    assert sorted(removed) == sorted([".tmp-c-99999999", f".tmp-d-{os.getpid() + 10**7}"])
    assert live.exists()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == [live.name]


def test_open_missing_case_and_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_case(tmp_path, "nope")
    image, label = _case()
    with pytest.raises(ValueError, match="label shape"):
        write_case(tmp_path, "x", image, label[:-1], {})
    with pytest.raises(ValueError, match="invalid case id"):
        write_case(tmp_path, "../x", image, label, {})
    with pytest.raises(ValueError, match=r"\(X, Y, Z, C\)"):
        write_case(tmp_path, "x", image[..., 0], label, {})
    assert os.listdir(tmp_path) == []


def test_dataset_meta_roundtrip(tmp_path):
    meta = {"labels": {"background": 0, "wm": 1}, "channel_names": ["T1", "T2"],
            "spacing": [1.0, 1.0, 1.0], "n_cases": 3, "source": "/x"}
    write_dataset_meta(tmp_path / "root", meta)
    assert read_dataset_meta(tmp_path / "root") == meta
    assert os.listdir(tmp_path / "root") == ["dataset.json"]

"""Where a patch starts in a case (nnU-Net's rule, with foreground oversampling) and how it is cut."""

from __future__ import annotations

import collections
import threading
from typing import Callable, Mapping

import numpy as np



OVERSAMPLE_MODES = ("random", "last")


def _triple(x, name: str) -> tuple[int, int, int]:
    if np.isscalar(x):
        x = (x, x, x)
    t = tuple(int(v) for v in x)
    if len(t) != 3:
        raise ValueError(f"{name} must be an int or 3 ints, got {x!r}")
    return t


def _fit_range(shape, patch_size) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net v2 ``get_bbox`` bounds: starts ``lo <= s <= hi`` keep the patch inside the volume,
    or centre it (padding) on axes where the volume is smaller than the patch."""
    shape = np.asarray(shape, np.int64)
    patch = np.asarray(patch_size, np.int64)
    need = np.maximum(patch - shape, 0)
    lo = -(need // 2)
    hi = shape + need // 2 + need % 2 - patch
    return lo, hi


def patch_start(rng: np.random.Generator, shape, patch_size, fg: Mapping[int, np.ndarray] | None,
                force_fg: bool) -> tuple[np.ndarray, bool]:
    """Start (int64 (3,)) of a patch in a volume of ``shape``, and whether it was forced.

    ``force_fg`` and foreground present: a random class among those with voxels in ``fg``, a
    random voxel of it; the patch is centred there (start = voxel - patch // 2) and clipped to
    the fitting range, so the voxel is always inside the patch. Otherwise uniform over the
    fitting range (nnU-Net's ``get_bbox``).
    """
    lo, hi = _fit_range(shape, patch_size)
    classes = sorted(c for c, v in (fg or {}).items() if len(v) > 0)
    if force_fg and classes:
        c = classes[int(rng.integers(len(classes)))]
        voxels = fg[c]
        v = np.asarray(voxels[int(rng.integers(len(voxels)))], np.int64)
        start = np.clip(v - np.asarray(patch_size, np.int64) // 2, lo, hi)
        return start, True
    return np.asarray([rng.integers(l, h + 1) for l, h in zip(lo, hi)], np.int64), False


def _crop(arr: np.ndarray, start, size) -> np.ndarray:
    """``arr[start:start+size]`` on the first 3 axes, zero outside."""
    out = np.zeros(tuple(size) + arr.shape[3:], arr.dtype)
    lo = [max(s, 0) for s in start]
    hi = [min(s + n, d) for s, n, d in zip(start, size, arr.shape)]
    if all(h > l for l, h in zip(lo, hi)):
        out[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = \
            arr[tuple(slice(l, h) for l, h in zip(lo, hi))]
    return out


class _MaskCache:
    """LRU cache of full per-case masks from ``mask_fn(case_id, shape)``."""

    def __init__(self, fn: Callable, size: int):
        self.fn, self.size = fn, max(int(size), 1)
        self._d: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, case_id: str, shape) -> np.ndarray:
        with self._lock:
            m = self._d.get(case_id)
            if m is not None:
                self._d.move_to_end(case_id)
                return m
        m = np.asarray(self.fn(case_id, tuple(int(s) for s in shape)))
        if m.shape != tuple(shape):
            raise ValueError(f"mask_fn({case_id!r}) returned shape {m.shape}, the case is {tuple(shape)}")
        m = (m != 0).astype(np.uint8)
        with self._lock:
            self._d[case_id] = m
            self._d.move_to_end(case_id)
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return m

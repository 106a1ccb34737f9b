"""Host-side training data pipeline: which cases, which patches, read with threads (SPEC 1, 2).

Data flow (DESIGN.md): case store (tensorstore) -> :class:`CaseSource` (random access over the
prepared cases) -> :class:`CaseSampler` (draws the case indices of each GLOBAL batch, in the
training process) -> patch reader (nnU-Net patch centres, a region larger than the patch, read
with ``store.read_patch``) -> :class:`PatchBatchIterator` (threads, prefetch, process shard,
checkpointable state) -> numpy batch -> device (augmentation and the train step are jitted).

Public API
    ``CaseSource(root, split=None, require_label=True, case_ids=None)``
        grain ``RandomAccessDataSource``: ``len(src)``, ``src[i]`` -> ``store.StoredCase``
        (opened lazily, cached), ``src.case_ids``, ``src.metas``, ``src.shapes``.
    ``CaseSampler(n_cases, mode="uniform" | "weighted" | "hardness", seed=0, beta=100, floor=1e-4)``
        ``draw(batch_size, step=None)``, ``update(cases, losses)``, ``set_table(table)``,
        ``set_probs(p)``, ``probabilities()``, ``stale_losses(cases)``,
        ``state_dict()`` / ``load_state_dict(d)`` (JSON-ready).
    ``patch_start(rng, shape, patch_size, fg, force_fg)`` (nnU-Net's bbox rule; pure function)
    ``PatchBatchIterator(source, sampler, batch_size=..., patch_size=..., margin=0, ...)``
        a ``grain.DatasetIterator``: ``next(it)`` -> batch dict, ``get_state()`` /
        ``set_state()`` (JSON-ready; also orbax-checkpointable through grain's ``save``/``load``),
        ``last_global_case_index`` (the whole global batch, for ``sampler.update``).

Batch (the process's slice of the global batch, ``b = batch_size // process_count``, static
shapes; region ``R = patch_size + 2 * margin`` per axis)::

    image       (b, Rx, Ry, Rz, C) float32   zero outside the volume
    label       (b, Rx, Ry, Rz)    int32     zero outside the volume (and for unlabelled cases)
    mask        (b, Rx, Ry, Rz)    float32   label availability: ones everywhere without a
                                             ``mask_fn`` (padding counts as background, as in
                                             nnU-Net); with a ``mask_fn`` its crop at the same
                                             region, zero outside the volume; zero for unlabelled
                                             cases
    case_index  (b,)               int32     index into ``source`` (and the sampler's table)
    origin      (b, 3)             int32     voxel of the full volume at ``image[i, 0, 0, 0]``
                                             (may be negative); the patch proper starts at
                                             ``origin + margin`` (the centre crop the on-device
                                             augmentation takes, ``augment(..., out_shape=patch)``)
    fg_forced   (b,)               bool      this patch was centred on a foreground voxel

No strings in the batch (it goes to the device as is); ``source.case_ids[case_index]`` names them.

Randomness is counter based, never a shared sequential stream: the case draw of global step
``t`` uses ``SeedSequence((sampler.seed, 0, t))``, the patch of global batch slot ``g`` at step
``t`` uses ``SeedSequence((iterator.seed, 1, t, g))``. Hence the same seed gives the same batches
whatever the number of threads, the prefetch depth or the number of processes (the slices of P
processes concatenate to the single-process batch), and the iterator state is just
``(step, seed, sampler table)``.

Foreground oversampling (SPEC 1, nnU-Net): ``oversample="last"`` (the default) is nnU-Net v2's
rule, the last ones of each GLOBAL batch are forced: slot ``g`` is forced iff
``g >= round(B * (1 - p))`` (with B = 2 and p = 0.33 that forces one patch in two, which is what
nnU-Net actually trains with). With ``oversample="random"`` each sample is forced, independently,
with probability ``foreground_oversampling`` (33 % of the patches on average for any batch size
and process count). A forced patch is centred on a random voxel (from ``case.fg``) of a random
foreground class present in the case, then shifted to fit like nnU-Net's ``get_bbox``; otherwise
the patch start is uniform over the positions where the patch fits in the volume (centred with
padding on an axis where the volume is smaller than the patch). Cases without foreground fall
back to uniform.

Prefetch versus live weights (SPEC 2: "sample in the process that owns the table")
    * A static sampler (``mode="uniform"``): the draw of step t is a pure function of
      ``(seed, t)``, so the whole stream is a grain ``MapDataset`` indexed by element number
      (``MapDataset.range -> map(read one patch) -> to_iter_dataset(ReadOptions(num_threads,
      prefetch_buffer_size)) -> batch``): grain threads read ``prefetch`` batches ahead, and
      drawing ahead is correct because nothing can change the draw.
    * A dynamic sampler (``"weighted"``, ``"hardness"``): the draw of step t + 1 must see the
      ``update``/``set_probs`` made after step t. grain's thread prefetch submits element reads
      for indices ahead of the consumer, which would fix the cases of batch t + 1 before the loss
      of step t is known (the reference code's bug, with forked workers). So the iterator draws
      at ``next()`` time in the calling process (draw-ahead depth 0) and only the reading of the
      ``b`` patches of that batch is threaded. Cost: the read of batch t + 1 cannot overlap step
      t on the device (it starts when the loop asks for it, after the update). That is inherent
      to "react on the very next draw"; everything else (augmentation) is on the device.

Multi-process: every process draws the same GLOBAL batch (same seed, same table, same step) and
reads only its slice ``[process_index * b, (process_index + 1) * b)``. For the hardness sampler
every process must call ``update`` with the same GLOBAL per-sample losses (e.g. the
all-gathered loss vector of the step, in global slot order, with
``iterator.last_global_case_index``), so the tables and therefore the draws stay identical.

Label budgeting: pass ``mask_fn(case_id, shape) -> (X, Y, Z) array`` (1 = labelled), e.g.
``lambda cid, shape: jaxseg.data.budget.slice_mask(shape, axis="random", fraction=1/3, seed=0,
case_id=cid)``; the full mask of a case is cached (LRU) and cropped at the patch region.
"""

from __future__ import annotations

import collections
import json
import math
import operator
import threading
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import grain
import numpy as np

from jaxseg.data import store
from jaxseg.losses.dro import sampling_probs

__all__ = [
    "CaseSource",
    "CaseSampler",
    "PatchBatchIterator",
    "patch_start",
    "SAMPLER_MODES",
    "OVERSAMPLE_MODES",
]

SAMPLER_MODES = ("uniform", "weighted", "hardness")
OVERSAMPLE_MODES = ("random", "last")

_TAG_DRAW = 0
_TAG_PATCH = 1
_TAG_INIT = 2
# grain MapDataset length of the "infinite" static stream (elements, not batches)
_STREAM_LEN = 2 ** 62


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def _triple(x, name: str) -> tuple[int, int, int]:
    if np.isscalar(x):
        x = (x, x, x)
    t = tuple(int(v) for v in x)
    if len(t) != 3:
        raise ValueError(f"{name} must be an int or 3 ints, got {x!r}")
    return t


# ------------------------------------------------------------------------------------------
# Source
# ------------------------------------------------------------------------------------------

class CaseSource:
    """Random access over the prepared cases of a store (grain ``RandomAccessDataSource``).

    ``split``: keep cases whose ``meta["split"]`` is this string (or in this collection);
    ``None`` keeps all. ``require_label``: keep only cases with a label (training).
    ``case_ids``: an explicit subset (e.g. a fold), in this order; default: all complete cases,
    sorted. ``context``: an optional ``tensorstore.Context`` shared by all cases (e.g. with a
    ``cache_pool``). ``src[i]`` opens case i on first use and caches it (its arrays are read
    lazily; its ``fg`` coordinates, at most 10000 x 3 int32 per class, stay in memory).
    """

    def __init__(self, root, *, split: str | Sequence[str] | None = None,
                 require_label: bool = True, case_ids: Sequence[str] | None = None,
                 context: Any = None):
        self.root = Path(root)
        ids = list(store.list_cases(self.root)) if case_ids is None else [str(c) for c in case_ids]
        splits = None if split is None else ({split} if isinstance(split, str) else set(split))
        keep, metas = [], []
        for cid in ids:
            path = self.root / cid / "meta.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: case {cid!r} is not a complete case of the store {self.root}")
            with open(path) as f:
                meta = json.load(f)
            if splits is not None and meta.get("split") not in splits:
                continue
            if require_label and not meta.get("has_label", False):
                continue
            keep.append(cid)
            metas.append(meta)
        if not keep:
            raise ValueError(f"{self.root}: no case left (of {len(ids)}) with split={split!r}, "
                             f"require_label={require_label}")
        channels = {int(m["n_channels"]) for m in metas}
        if len(channels) != 1:
            raise ValueError(f"{self.root}: cases have different channel counts {sorted(channels)}")
        self._ids = keep
        self._metas = metas
        self._index = {c: i for i, c in enumerate(keep)}
        self.n_channels = channels.pop()
        self._context = context
        self._cases: dict[int, store.StoredCase] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, record_key) -> store.StoredCase:
        i = operator.index(record_key)
        if i < 0:
            i += len(self._ids)
        if not 0 <= i < len(self._ids):
            raise IndexError(f"case index {record_key} out of range for {len(self._ids)} cases")
        case = self._cases.get(i)
        if case is None:
            with self._lock:
                case = self._cases.get(i)
                if case is None:
                    case = store.open_case(self.root, self._ids[i], context=self._context)
                    self._cases[i] = case
        return case

    @property
    def case_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def metas(self) -> list[dict]:
        return list(self._metas)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return [tuple(int(s) for s in m["shape"]) for m in self._metas]

    def index_of(self, case_id: str) -> int:
        return self._index[case_id]

    def __repr__(self) -> str:
        return f"CaseSource({str(self.root)!r}, n={len(self)}, channels={self.n_channels})"


# ------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------

class CaseSampler:
    """Draws the case indices of each global batch, in the process that owns its state.

    Modes (a plain enum):
      * ``"uniform"``: uniform with replacement (nnU-Net); static (the draw of a step depends
        only on the seed and the step).
      * ``"weighted"``: by probabilities handed in with ``set_probs`` (may change every step).
      * ``"hardness"``: hardness weighted sampling (SPEC 2): a table of one stale loss per case,
        initialised to ``init_loss`` plus ``N(0, init_noise)`` (from the seed) to break ties
        (Fidon et al.'s reference: 2.0 and std 0.002);
        ``update`` writes new per-sample losses (momentum 0), ``set_table`` replaces the table;
        ``p = sampling_probs(table, beta, floor)`` (softmax, floored at ``floor / n``,
        renormalised).

    Non-uniform modes draw WITHOUT replacement within a batch (``replace=False``, the default
    for them), so ``batch_size <= n_cases``. Every draw reads the current table/probabilities:
    a change reacts on the very next draw.

    ``draw(batch_size, step)`` is a pure function of ``(seed, step, probabilities)``; with
    ``step=None`` an internal counter is used and advanced (both are in ``state_dict``).
    """

    def __init__(self, n_cases: int, *, mode: str = "uniform", seed: int = 0, beta: float = 100.0,
                 floor: float = 1e-4, init_loss: float = 2.0, init_noise: float = 0.002,
                 probs: Optional[Sequence[float]] = None, replace: Optional[bool] = None,
                 case_ids: Optional[Sequence[str]] = None):
        if mode not in SAMPLER_MODES:
            raise ValueError(f"sampler mode must be one of {SAMPLER_MODES}, got {mode!r}")
        n = int(n_cases)
        if n < 1:
            raise ValueError(f"n_cases must be >= 1, got {n_cases}")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if case_ids is not None and len(case_ids) != n:
            raise ValueError(f"{len(case_ids)} case_ids for {n} cases")
        self.mode = mode
        self.n_cases = n
        self.seed = int(seed)
        self.beta = float(beta)
        self.floor = float(floor)
        self.replace = (mode == "uniform") if replace is None else bool(replace)
        self.case_ids = None if case_ids is None else [str(c) for c in case_ids]
        self._ids = None if case_ids is None else {c: i for i, c in enumerate(self.case_ids)}
        self._lock = threading.Lock()
        self._draws = 0
        self.n_nonfinite = 0  # non-finite losses passed to update (ignored)
        self._table = (float(init_loss) + float(init_noise)
                       * _rng(self.seed, _TAG_INIT).standard_normal(n)).astype(np.float64)
        self._probs: Optional[np.ndarray] = None
        if probs is not None:
            self.set_probs(probs)
        elif mode == "weighted":
            self._probs = np.full(n, 1.0 / n)

    # -- state that changes during training ------------------------------------------------
    @property
    def is_static(self) -> bool:
        """True when nothing can change the draws (they may then be made ahead of time)."""
        return self.mode == "uniform"

    @property
    def table(self) -> np.ndarray:
        with self._lock:
            return self._table.copy()

    def _indices(self, cases) -> np.ndarray:
        if isinstance(cases, np.ndarray):
            cases = cases.reshape(-1).tolist()
        elif isinstance(cases, (str, int, np.integer, np.str_)):
            cases = [cases]
        out = []
        for c in cases:
            if isinstance(c, (str, np.str_)):
                if self._ids is None:
                    raise ValueError("case ids given but the sampler has no case_ids")
                out.append(self._ids[str(c)])
            else:
                out.append(int(c))
        idx = np.asarray(out, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_cases):
            raise IndexError(f"case index out of range [0, {self.n_cases}): {idx.tolist()}")
        return idx

    def update(self, cases, losses) -> None:
        """Write per-sample losses into the table: ``table[cases[i]] = losses[i]``.

        ``cases``: case indices (or ids, with ``case_ids``). Non-finite losses are ignored (the
        stale entry stays; counted in ``n_nonfinite``). With repeated cases the last one wins.
        """
        idx = self._indices(cases)
        vals = np.asarray(losses, dtype=np.float64).reshape(-1)
        if vals.shape != idx.shape:
            raise ValueError(f"update: {idx.size} cases but {vals.size} losses")
        with self._lock:
            for i, v in zip(idx.tolist(), vals.tolist()):
                if math.isfinite(v):
                    self._table[i] = v
                else:
                    self.n_nonfinite += 1

    def stale_losses(self, cases) -> np.ndarray:
        """The table entries of ``cases`` (for ``dro.importance_weights``, before ``update``)."""
        idx = self._indices(cases)
        with self._lock:
            return self._table[idx].copy()

    def set_table(self, table) -> None:
        """Replace the loss table (the hardness sampler "handed the table" each step)."""
        t = np.asarray(table, dtype=np.float64).reshape(-1)
        if t.shape != (self.n_cases,) or not np.all(np.isfinite(t)):
            raise ValueError(f"set_table: need {self.n_cases} finite losses, got shape {t.shape}")
        with self._lock:
            self._table = t.copy()

    def set_probs(self, probs) -> None:
        """Set the sampling probabilities of the ``"weighted"`` mode (normalised here)."""
        if self.mode != "weighted":
            raise ValueError(f"set_probs needs mode='weighted', this sampler is {self.mode!r}")
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        if p.shape != (self.n_cases,) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError(f"set_probs: need {self.n_cases} finite non-negative weights, not all 0")
        with self._lock:
            self._probs = p / p.sum()

    def probabilities(self) -> np.ndarray:
        """The distribution the next draw uses (float64, sums to 1)."""
        with self._lock:
            return self._probabilities()

    def _probabilities(self) -> np.ndarray:
        if self.mode == "uniform":
            return np.full(self.n_cases, 1.0 / self.n_cases)
        if self.mode == "weighted":
            return self._probs.copy()
        return sampling_probs(self._table, self.beta, self.floor)

    # -- drawing -----------------------------------------------------------------------------
    def draw(self, batch_size: int, step: Optional[int] = None) -> np.ndarray:
        """Case indices (int64, ``(batch_size,)``) of the global batch of ``step``."""
        b = int(batch_size)
        if b < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        with self._lock:
            if step is None:
                step = self._draws
                self._draws += 1
            p = None if self.mode == "uniform" else self._probabilities()
        rng = _rng(self.seed, _TAG_DRAW, int(step))
        if self.replace:
            if p is None:
                return rng.integers(0, self.n_cases, size=b, dtype=np.int64)
            return rng.choice(self.n_cases, size=b, replace=True, p=p).astype(np.int64)
        n_pos = self.n_cases if p is None else int(np.count_nonzero(p))
        if b > n_pos:
            raise ValueError(f"cannot draw {b} cases without replacement from {n_pos} "
                             f"(with non-zero probability); use a smaller batch or replace=True")
        return rng.choice(self.n_cases, size=b, replace=False, p=p).astype(np.int64)

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-ready state: the table, probabilities, seed and draw counter."""
        with self._lock:
            return {
                "mode": self.mode,
                "n_cases": self.n_cases,
                "seed": self.seed,
                "draws": int(self._draws),
                "table": [float(v) for v in self._table],
                "probs": None if self._probs is None else [float(v) for v in self._probs],
                "beta": self.beta,
                "floor": self.floor,
                "replace": self.replace,
                "n_nonfinite": int(self.n_nonfinite),
            }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore ``state_dict()`` output (mode and number of cases must match). ``beta`` and
        ``floor`` stay as configured (hyperparameters); the rest is restored exactly."""
        if state["mode"] != self.mode or int(state["n_cases"]) != self.n_cases:
            raise ValueError(f"sampler state is for mode={state['mode']!r}, n={state['n_cases']}; "
                             f"this sampler is mode={self.mode!r}, n={self.n_cases}")
        table = np.asarray(state["table"], dtype=np.float64)
        if table.shape != (self.n_cases,):
            raise ValueError(f"sampler state table has shape {table.shape}, need ({self.n_cases},)")
        with self._lock:
            self.seed = int(state["seed"])
            self._draws = int(state["draws"])
            self._table = table.copy()
            self._probs = None if state.get("probs") is None else np.asarray(state["probs"], np.float64)
            self.replace = bool(state.get("replace", self.replace))
            self.n_nonfinite = int(state.get("n_nonfinite", 0))


# ------------------------------------------------------------------------------------------
# Patch geometry and reading
# ------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------
# Iterator
# ------------------------------------------------------------------------------------------

class PatchBatchIterator(grain.DatasetIterator):
    """Batches of patches for one process (see the module docstring for the batch layout).

    ``batch_size``: GLOBAL batch size B (must be divisible by ``process_count``; this process
    reads ``b = B / P`` patches). ``patch_size``: int or 3 ints. ``margin``: int or 3 ints, the
    region read is ``patch_size + 2 * margin`` (room for rotation/scaling on the device).
    ``foreground_oversampling``: p in [0, 1]; ``oversample``: "last" | "random" (module doc).
    ``threads``: reader threads (static sampler: grain's pool, 0 = read synchronously; live: a
    pool when > 1, else the calling thread). ``prefetch``: batches read ahead, static sampler only
    (grain ``prefetch_buffer_size = max(prefetch, 1) * b`` when ``threads > 0``); a dynamic
    sampler is drawn at ``next()`` and reads nothing ahead (module doc).
    ``seed``: patch positions (the case draws use the sampler's seed). ``mask_fn``: optional
    ``(case_id, shape) -> mask`` (label budgeting); ``mask_cache``: masks kept (LRU).
    ``process_index`` / ``process_count``: default ``jax.process_index()`` /
    ``jax.process_count()``. ``start_step``: the first global step.
    ``live``: force drawing at ``next()`` (default: only for dynamic samplers; a uniform
    sampler gives the same batches either way).
    """

    def __init__(self, source: CaseSource, sampler: CaseSampler, *, batch_size: int,
                 patch_size, margin=0, foreground_oversampling: float = 0.33,
                 oversample: str = "last", threads: int = 2, prefetch: int = 2, seed: int = 0,
                 mask_fn: Optional[Callable] = None, mask_cache: int = 64,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 start_step: int = 0, live: Optional[bool] = None):
        super().__init__()
        self._pool: Optional[futures.ThreadPoolExecutor] = None
        self._grain_it = None
        self._last_global: Optional[np.ndarray] = None
        if len(source) != sampler.n_cases:
            raise ValueError(f"sampler has {sampler.n_cases} cases, the source {len(source)}")
        if oversample not in OVERSAMPLE_MODES:
            raise ValueError(f"oversample must be one of {OVERSAMPLE_MODES}, got {oversample!r}")
        if not 0.0 <= float(foreground_oversampling) <= 1.0:
            raise ValueError(f"foreground_oversampling must be in [0, 1], got {foreground_oversampling}")
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        B, P, pi = int(batch_size), int(process_count), int(process_index)
        if B < 1 or P < 1:
            raise ValueError(f"batch_size and process_count must be >= 1, got {B}, {P}")
        if B % P:
            raise ValueError(f"global batch size {B} is not divisible by the number of processes {P}: "
                             f"every process must read the same number of patches")
        if not 0 <= pi < P:
            raise ValueError(f"process_index {pi} not in [0, {P})")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
        self.source, self.sampler = source, sampler
        self.batch_size, self.process_count, self.process_index = B, P, pi
        self.local_batch_size = B // P
        self.patch_size = _triple(patch_size, "patch_size")
        self.margin = _triple(margin, "margin")
        if min(self.patch_size) < 1 or min(self.margin) < 0:
            raise ValueError(f"patch_size must be >= 1 and margin >= 0, got {self.patch_size}, {self.margin}")
        self.region_size = tuple(p + 2 * m for p, m in zip(self.patch_size, self.margin))
        self.foreground_oversampling = float(foreground_oversampling)
        self.oversample = oversample
        self.threads, self.prefetch = max(int(threads), 0), max(int(prefetch), 0)
        self.seed = int(seed)
        self._masks = None if mask_fn is None else _MaskCache(mask_fn, mask_cache)
        self.live = (not sampler.is_static) if live is None else bool(live)
        if not self.live and not sampler.is_static:
            raise ValueError(f"a {sampler.mode!r} sampler changes between steps: it must be drawn "
                             f"live (live=True)")
        self._step = int(start_step)
        if not self.live:
            self._build_static(self._step)

    # -- one sample ----------------------------------------------------------------------------
    def _forced(self, rng: np.random.Generator, slot: int) -> bool:
        u = rng.random()  # always drawn: the stream does not depend on the convention
        p = self.foreground_oversampling
        if self.oversample == "random":
            return bool(u < p)
        return slot >= round(self.batch_size * (1.0 - p))  # nnU-Net v2 get_do_oversample

    def read_sample(self, step: int, slot: int, case_index: int) -> dict:
        """The patch of global batch slot ``slot`` at global ``step`` from case ``case_index``."""
        rng = _rng(self.seed, _TAG_PATCH, step, slot)
        case = self.source[int(case_index)]
        force = self._forced(rng, slot)
        start, forced = patch_start(rng, case.shape, self.patch_size,
                                    case.fg if case.label is not None else None, force)
        origin = start - np.asarray(self.margin, np.int64)
        image, label = store.read_patch(case, origin, self.region_size)
        if label is None:
            label = np.zeros(self.region_size, np.int32)
            mask = np.zeros(self.region_size, np.float32)
        else:
            label = label.astype(np.int32)
            if self._masks is None:
                mask = np.ones(self.region_size, np.float32)
            else:
                full = self._masks.get(case.case_id, case.shape)
                mask = _crop(full, origin, self.region_size).astype(np.float32)
        return {
            "image": image,
            "label": label,
            "mask": mask,
            "case_index": np.int32(case_index),
            "origin": origin.astype(np.int32),
            "fg_forced": np.bool_(forced),
        }

    def _slots(self) -> range:
        b = self.local_batch_size
        return range(self.process_index * b, (self.process_index + 1) * b)

    # -- static sampler: a grain pipeline ------------------------------------------------------
    def _element(self, e: int) -> dict:
        step, j = divmod(int(e), self.local_batch_size)
        slot = self.process_index * self.local_batch_size + j
        case_index = self.sampler.draw(self.batch_size, step)[slot]
        return self.read_sample(step, slot, case_index)

    def _build_static(self, step: int) -> None:
        if self._grain_it is not None:
            self._grain_it.close()
        b = self.local_batch_size
        if self.threads > 0:
            opts = grain.ReadOptions(num_threads=self.threads,
                                     prefetch_buffer_size=max(self.prefetch, 1) * b)
        else:
            opts = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        ds = (grain.MapDataset.range(step * b, _STREAM_LEN)
              .map(self._element)
              .to_iter_dataset(opts)
              .batch(b))
        self._grain_it = iter(ds)

    # -- dynamic sampler: draw now, read with threads ------------------------------------------
    def _next_live(self, step: int) -> dict:
        # Not a grain pipeline on purpose: grain's prefetch decides which elements to read before
        # the consumer asks, so the cases of batch t + 1 would be fixed before the table update
        # of step t. Here the draw happens now, in this process; only the reads are threaded.
        cases = self.sampler.draw(self.batch_size, step)
        self._last_global = cases
        jobs = [(step, g, int(cases[g])) for g in self._slots()]
        if self.threads > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = futures.ThreadPoolExecutor(self.threads, thread_name_prefix="jaxseg-patch")
            samples = list(self._pool.map(lambda a: self.read_sample(*a), jobs))
        else:
            samples = [self.read_sample(*a) for a in jobs]
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}

    # -- grain iterator protocol ---------------------------------------------------------------
    def __next__(self) -> dict:
        self._assert_not_closed()
        if self.live:
            batch = self._next_live(self._step)
        else:
            batch = next(self._grain_it)
            self._last_global = self.sampler.draw(self.batch_size, self._step)  # pure: no RNG state
        self._step += 1
        return batch

    @property
    def last_global_case_index(self) -> Optional[np.ndarray]:
        """Case indices (B,) of the whole GLOBAL batch last returned (all processes), in global
        slot order: what every process passes to ``sampler.update`` with the global losses."""
        return None if self._last_global is None else self._last_global.copy()

    @property
    def step(self) -> int:
        """The global step of the next batch."""
        return self._step

    def get_state(self) -> dict:
        """JSON-ready: next step, patch seed, global batch size and the sampler state."""
        return {"step": int(self._step), "seed": int(self.seed), "batch_size": int(self.batch_size),
                "sampler": self.sampler.state_dict()}

    def set_state(self, state: Mapping) -> None:
        """Restore ``get_state()`` output: the following batches are exactly those that followed
        it (for any thread count, prefetch or process count with the same global batch size)."""
        if int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"state is for global batch size {state['batch_size']}, "
                             f"this iterator has {self.batch_size}")
        self.sampler.load_state_dict(state["sampler"])
        self.seed = int(state["seed"])
        self._step = int(state["step"])
        if not self.live:
            self._build_static(self._step)

    def start_prefetch(self) -> None:
        if self._grain_it is not None:
            self._grain_it.start_prefetch()

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        if self._grain_it is not None:
            self._grain_it.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        super().close()

    def __enter__(self) -> "PatchBatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __str__(self) -> str:
        return (f"PatchBatchIterator(B={self.batch_size}, process {self.process_index}/"
                f"{self.process_count}, patch={self.patch_size}, margin={self.margin}, "
                f"sampler={self.sampler.mode}, live={self.live}, threads={self.threads}, "
                f"prefetch={self.prefetch if not self.live else 0})")

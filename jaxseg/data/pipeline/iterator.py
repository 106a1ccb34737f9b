"""Batches of patches for one process: threads, prefetch, process shard, checkpointable state."""

from __future__ import annotations

from concurrent import futures
from typing import Callable, Mapping, Optional

import grain
import numpy as np

from jaxseg.data import store

from jaxseg.data.pipeline.patches import OVERSAMPLE_MODES, _crop, _MaskCache, _triple, patch_start
from jaxseg.data.pipeline.sampler import _STREAM_LEN, _TAG_PATCH, CaseSampler, _rng
from jaxseg.data.pipeline.source import CaseSource



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

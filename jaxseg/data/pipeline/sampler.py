"""Which cases each global batch draws: uniform, given probabilities, or hardness weighted (DRO).

Randomness is counter based: a draw is a pure function of (seed, tag, step), see the package docstring.
"""

from __future__ import annotations

import math
import threading
from typing import Mapping, Optional, Sequence

import numpy as np

from jaxseg.losses.dro import sampling_probs


SAMPLER_MODES = ("uniform", "weighted", "hardness")

_TAG_DRAW = 0
_TAG_PATCH = 1
_TAG_INIT = 2
# grain MapDataset length of the "infinite" static stream (elements, not batches)
_STREAM_LEN = 2 ** 62


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class CaseSampler:
    """Draws the case indices of each global batch, in the process that owns its state.

    Modes (a plain enum):
      * ``"uniform"``: uniform with replacement (nnU-Net); static (the draw of a step depends
        only on the seed and the step).
      * ``"weighted"``: by probabilities handed in with ``set_probs`` (may change every step).
      * ``"hardness"``: hardness weighted sampling (Fidon et al. 2021, nnU-Net-DRO): a table of one stale loss per case,
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

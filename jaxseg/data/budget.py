"""Label budgeting (Richter & Fetit, the dHCP neonatal paper): which 2D slices of a case count as labelled.

Host-side numpy. A case keeps a fraction of its slices along one axis (sagittal = array axis 0,
coronal = 1, axial = 2, or "random": one of the three per case), drawn without replacement from
the middle of the axis, fixed per case for the whole training: the random generator is derived
from ``(seed, sha256(case_id))`` with hashlib, never Python's salted ``hash()``, so the same
slices come back in every process, run and resume. The resulting uint8 mask is the
label-availability mask that ``jaxseg.data.augment`` transforms together with the label and the
losses use as voxel weights (the rest is ignored, never filled with zeros).

Definitions (precise):
- Border exclusion: with ``b = floor(exclude_border * n)`` the eligible slice indices are
  ``b <= i < n - b`` (default 5 %: the outer 5 % on each side are never labelled).
- Slice count: ``k = max(1, round_half_up(fraction * n))`` with ``fraction_of="axis"`` (the
  default: the paper's "33 % of the slices per brain", which makes the "full" and "dispersed"
  sets of ``equal_budget_sets`` hold the same number of labelled slices), or
  ``k = max(1, round_half_up(fraction * n_eligible))`` with ``fraction_of="eligible"``; either
  way at most ``n_eligible``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from fractions import Fraction
from typing import Mapping, Optional, Sequence

import numpy as np

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
AXIS_NAMES = {v: k for k, v in AXES.items()}
AXIS_CHOICES = ("sagittal", "coronal", "axial", "random")


def _case_rng(seed: int, case_id: str, purpose: str) -> np.random.Generator:
    """A generator fixed by (seed, case_id, purpose), stable across processes and platforms."""
    digest = hashlib.sha256(f"{int(seed)}\x00{case_id}\x00{purpose}".encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 32, 4)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def eligible_range(n: int, exclude_border: float = 0.05) -> tuple[int, int]:
    """``(lo, hi)``: slices ``lo <= i < hi`` may be labelled, ``lo = floor(exclude_border * n)``,
    ``hi = n - lo``. Exact arithmetic (0.05 * 60 is 3, not 3.0000000000000004)."""
    if not 0.0 <= exclude_border < 0.5:
        raise ValueError(f"exclude_border must be in [0, 0.5), got {exclude_border}")
    b = math.floor(Fraction(str(exclude_border)) * n)
    return b, n - b


def n_labelled_slices(n: int, fraction: float = 1 / 3, exclude_border: float = 0.05,
                      fraction_of: str = "axis") -> int:
    """How many slices of an axis of length n are labelled (see the module docstring)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    lo, hi = eligible_range(n, exclude_border)
    n_eligible = hi - lo
    if n_eligible < 1:
        raise ValueError(f"no eligible slice on an axis of length {n}")
    if fraction_of == "axis":
        k = _round_half_up(fraction * n)
    elif fraction_of == "eligible":
        k = _round_half_up(fraction * n_eligible)
    else:
        raise ValueError(f"fraction_of must be 'axis' or 'eligible', got {fraction_of!r}")
    return min(max(1, k), n_eligible)


def resolve_axis(axis: str, seed: int, case_id: str) -> int:
    """Array axis of a case: fixed for sagittal/coronal/axial, drawn per case for random."""
    if axis == "random":
        return int(_case_rng(seed, case_id, "axis").integers(3))
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXIS_CHOICES}, got {axis!r}")
    return AXES[axis]


@dataclasses.dataclass(frozen=True)
class SliceBudget:
    """Which slices of one case are labelled: enough to rebuild the mask and to save in a run
    directory (``to_dict`` is JSON-ready)."""

    case_id: str
    shape: tuple[int, int, int]
    axis: int                    # array axis (0 sagittal, 1 coronal, 2 axial)
    indices: tuple[int, ...]     # sorted slice indices along ``axis``
    fraction: float
    exclude_border: float
    seed: int
    strategy: str                # the requested axis: sagittal / coronal / axial / random

    @property
    def axis_name(self) -> str:
        return AXIS_NAMES[self.axis]

    @property
    def n_slices(self) -> int:
        return len(self.indices)

    @property
    def n_voxels(self) -> int:
        return self.n_slices * math.prod(self.shape) // self.shape[self.axis]

    def mask(self) -> np.ndarray:
        m = np.zeros(self.shape, np.uint8)
        index = [slice(None)] * 3
        index[self.axis] = np.asarray(self.indices, dtype=np.int64)
        m[tuple(index)] = 1
        return m

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["indices"] = list(self.indices)
        d["axis_name"] = self.axis_name
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "SliceBudget":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["shape"] = tuple(int(v) for v in kw["shape"])
        kw["indices"] = tuple(int(v) for v in kw["indices"])
        return cls(**kw)


def slice_budget(shape: Sequence[int], axis: str = "random", fraction: float = 1 / 3,
                 exclude_border: float = 0.05, seed: int = 0, case_id: str = "",
                 fraction_of: str = "axis") -> SliceBudget:
    """The labelled slices of one case, fixed by (seed, case_id)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"slice_budget: shape must be (X, Y, Z), got {shape}")
    a = resolve_axis(axis, seed, case_id)
    n = shape[a]
    lo, hi = eligible_range(n, exclude_border)
    k = n_labelled_slices(n, fraction, exclude_border, fraction_of)
    rng = _case_rng(seed, case_id, "slices")
    chosen = lo + rng.choice(hi - lo, size=k, replace=False)
    return SliceBudget(case_id=str(case_id), shape=shape, axis=a,
                       indices=tuple(sorted(int(i) for i in chosen)), fraction=float(fraction),
                       exclude_border=float(exclude_border), seed=int(seed), strategy=axis)


def slice_mask(shape: Sequence[int], axis: str = "random", fraction: float = 1 / 3,
               exclude_border: float = 0.05, seed: int = 0, case_id: str = "",
               fraction_of: str = "axis", return_budget: bool = False):
    """uint8 (X, Y, Z) mask, 1 on the labelled slices; with ``return_budget`` also the
    ``SliceBudget`` record (axis and indices) to save next to the run."""
    budget = slice_budget(shape, axis, fraction, exclude_border, seed, case_id, fraction_of)
    return (budget.mask(), budget) if return_budget else budget.mask()


@dataclasses.dataclass(frozen=True)
class BudgetSets:
    """The two training sets of the paper's equal-budget comparison."""

    full: tuple[str, ...]          # fully labelled cases
    dispersed: tuple[str, ...]     # cases with a slice mask each
    fraction: float
    seed: int
    axis: str
    exclude_border: float
    fraction_of: str

    def budgets(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, SliceBudget]:
        """The slice budget of every dispersed case (same as calling ``slice_budget``)."""
        return {c: slice_budget(shapes[c], self.axis, self.fraction, self.exclude_border,
                                self.seed, c, self.fraction_of) for c in self.dispersed}

    def labelled_slices(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """Labelled 2D slices of each set. A full case counts all its slices along the axis its
        budget would use (its resolved axis for "random")."""
        full = sum(int(shapes[c][resolve_axis(self.axis, self.seed, c)]) for c in self.full)
        dispersed = sum(b.n_slices for b in self.budgets(shapes).values())
        return {"full": full, "dispersed": dispersed}

    def labelled_voxels(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        full = sum(math.prod(shapes[c]) for c in self.full)
        dispersed = sum(b.n_voxels for b in self.budgets(shapes).values())
        return {"full": full, "dispersed": dispersed}

    def to_dict(self, shapes: Optional[Mapping[str, Sequence[int]]] = None) -> dict:
        d = dataclasses.asdict(self)
        d["full"], d["dispersed"] = list(self.full), list(self.dispersed)
        if shapes is not None:
            d["budgets"] = {c: b.to_dict() for c, b in self.budgets(shapes).items()}
            d["labelled_slices"] = self.labelled_slices(shapes)
        return d


def equal_budget_sets(case_ids: Sequence[str], n_full: int, fraction: float = 1 / 3,
                      seed: int = 0, axis: str = "random", exclude_border: float = 0.05,
                      fraction_of: str = "axis") -> BudgetSets:
    """"full" = ``n_full`` fully labelled cases; "dispersed" = ``round(n_full / fraction)`` cases
    (3x at 1/3) with a slice mask each: the same number of labelled slices (exactly so for equal
    shapes with ``fraction_of="axis"``, up to per-case rounding).

    Deterministic: the sorted case ids are shuffled by a generator derived from ``seed``; the
    dispersed set is the first ``n_dispersed`` of that order and the full set its first
    ``n_full`` (nested, so the comparison only changes the label dispersion, not which anatomy
    is seen). Raises ValueError when there are not enough cases.
    """
    ids = [str(c) for c in case_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("equal_budget_sets: duplicate case ids")
    if n_full < 1:
        raise ValueError(f"equal_budget_sets: n_full must be >= 1, got {n_full}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"equal_budget_sets: fraction must be in (0, 1], got {fraction}")
    resolve_axis(axis, seed, "")  # validates the name
    n_dispersed = _round_half_up(n_full / fraction)
    if n_dispersed > len(ids):
        raise ValueError(f"equal_budget_sets: the dispersed set needs {n_dispersed} cases "
                         f"(n_full={n_full} / fraction={fraction:g}), only {len(ids)} given")
    order = _case_rng(seed, "\x00equal_budget_sets", "order").permutation(len(ids))
    shuffled = [sorted(ids)[i] for i in order]
    return BudgetSets(full=tuple(shuffled[:n_full]), dispersed=tuple(shuffled[:n_dispersed]),
                      fraction=float(fraction), seed=int(seed), axis=axis,
                      exclude_border=float(exclude_border), fraction_of=fraction_of)

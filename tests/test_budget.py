"""Label budgeting: slice masks and the equal-budget training sets (Richter & Fetit)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from jaxseg.data.budget import (AXES, SliceBudget, eligible_range, equal_budget_sets,
                                n_labelled_slices, slice_budget, slice_mask)

SHAPE = (40, 60, 50)


@pytest.mark.parametrize("axis", ["sagittal", "coronal", "axial"])
def test_count_axis_and_borders(axis):
    a = AXES[axis]
    mask, budget = slice_mask(SHAPE, axis, fraction=1 / 3, seed=3, case_id="sub-01",
                              return_budget=True)
    assert mask.dtype == np.uint8 and mask.shape == SHAPE
    n = SHAPE[a]
    k = n_labelled_slices(n, 1 / 3)
    assert k == math.floor(n / 3 + 0.5)
    assert budget.axis == a and budget.axis_name == axis and budget.n_slices == k
    other = tuple(i for i in range(3) if i != a)
    # Each slice along the axis is entirely labelled or entirely unlabelled.
    per_slice = mask.sum(axis=other)
    slice_size = math.prod(SHAPE) // n
    assert set(np.unique(per_slice)) <= {0, slice_size}
    chosen = np.flatnonzero(per_slice)
    assert len(chosen) == k and tuple(chosen) == budget.indices
    lo, hi = eligible_range(n, 0.05)
    assert lo == math.floor(0.05 * n) and hi == n - lo
    assert chosen.min() >= lo and chosen.max() < hi
    np.testing.assert_array_equal(budget.mask(), mask)


def test_border_definition_is_exact():
    # 0.05 * 60 = 3.0000000000000004 in floating point: still 3 excluded slices per side.
    assert eligible_range(60, 0.05) == (3, 57)
    assert eligible_range(20, 0.05) == (1, 19)
    assert eligible_range(19, 0.05) == (0, 19)
    # A tiny axis still gets one labelled slice.
    assert n_labelled_slices(2, 1 / 3) == 1
    # fraction of the eligible slices instead of the whole axis
    assert n_labelled_slices(60, 1 / 3, fraction_of="eligible") == 18
    assert n_labelled_slices(60, 1 / 3, fraction_of="axis") == 20


def test_no_border_slice_ever_chosen():
    for i in range(50):
        b = slice_budget((20, 20, 20), "random", 0.5, 0.05, seed=1, case_id=f"c{i}")
        assert min(b.indices) >= 1 and max(b.indices) <= 18  # floor(0.05 * 20) = 1
        assert len(set(b.indices)) == len(b.indices) == 10


def test_deterministic_per_case_and_different_across_cases():
    a = slice_budget(SHAPE, "axial", seed=7, case_id="sub-A")
    assert a == slice_budget(SHAPE, "axial", seed=7, case_id="sub-A")
    assert a.indices != slice_budget(SHAPE, "axial", seed=7, case_id="sub-B").indices
    assert a.indices != slice_budget(SHAPE, "axial", seed=8, case_id="sub-A").indices


def test_stable_across_processes():
    # hashlib, not the salted hash(): a fresh interpreter with another PYTHONHASHSEED agrees.
    code = ("from jaxseg.data.budget import slice_budget; "
            "print(list(slice_budget((40, 60, 50), 'random', seed=7, case_id='sub-A').indices))")
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert json.loads(out) == list(slice_budget(SHAPE, "random", seed=7, case_id="sub-A").indices)


def test_random_axis_spreads_over_three_axes():
    axes = [slice_budget(SHAPE, "random", seed=0, case_id=f"case_{i:03d}").axis
            for i in range(300)]
    counts = np.bincount(axes, minlength=3)
    assert (counts > 60).all(), counts  # about 100 each


def test_record_round_trip():
    b = slice_budget(SHAPE, "random", seed=2, case_id="x")
    d = json.loads(json.dumps(b.to_dict()))
    assert SliceBudget.from_dict(d) == b
    assert d["axis_name"] in AXES


def test_bad_arguments():
    with pytest.raises(ValueError):
        slice_mask(SHAPE, "oblique")
    with pytest.raises(ValueError):
        slice_mask(SHAPE, "axial", fraction=0.0)
    with pytest.raises(ValueError):
        slice_mask((4, 4), "axial")


def test_equal_budget_sets():
    ids = [f"sub-{i:03d}" for i in range(40)]
    sets = equal_budget_sets(ids, n_full=10, fraction=1 / 3, seed=5)
    assert len(sets.full) == 10 and len(sets.dispersed) == 30  # 3x the cases
    assert set(sets.full) <= set(sets.dispersed) <= set(ids)
    assert sets == equal_budget_sets(list(reversed(ids)), n_full=10, fraction=1 / 3, seed=5)
    assert sets.dispersed != equal_budget_sets(ids, 10, 1 / 3, seed=6).dispersed

    # Equal labelled slices for equal shapes, whatever the axis strategy.
    for shape in [(48, 48, 48), (30, 30, 30)]:
        shapes = {c: shape for c in ids}
        for axis in ["random", "sagittal", "axial"]:
            s = equal_budget_sets(ids, 10, 1 / 3, seed=5, axis=axis)
            n = s.labelled_slices(shapes)
            assert n["full"] == 10 * shape[0]
            assert abs(n["full"] - n["dispersed"]) <= len(s.dispersed) * 0.5, n
            v = s.labelled_voxels(shapes)
            assert abs(v["full"] - v["dispersed"]) <= 0.05 * v["full"]
    # Unequal shapes: equal within per-case rounding of the expected budget.
    rng = np.random.default_rng(0)
    shapes = {c: tuple(int(v) for v in rng.integers(40, 60, 3)) for c in ids}
    n = sets.labelled_slices(shapes)
    assert abs(n["full"] - n["dispersed"]) / n["full"] < 0.25
    d = json.loads(json.dumps(sets.to_dict(shapes)))
    assert set(d["budgets"]) == set(sets.dispersed)


def test_equal_budget_sets_errors():
    ids = [f"c{i}" for i in range(20)]
    with pytest.raises(ValueError, match="needs 30 cases"):
        equal_budget_sets(ids, n_full=10)
    with pytest.raises(ValueError):
        equal_budget_sets(["a", "a", "b"], n_full=1)
    assert len(equal_budget_sets(ids, n_full=5, fraction=0.3).dispersed) == 17  # round(16.67)

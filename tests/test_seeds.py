"""Statistics over training seeds (jaxseg.evaluation.seeds) against independent computations."""

import math

import numpy as np
import pytest
from scipy import stats

from jaxseg.evaluation import seeds as S


def test_mean_sd_and_formatting():
    assert S.mean_sd([0.7, 0.8, 0.9]) == (pytest.approx(0.8), pytest.approx(0.1))
    assert S.mean_sd([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in S.mean_sd([]))
    assert S.mean_sd([0.5, float("nan"), 0.7]) == (pytest.approx(0.6), pytest.approx(np.std([0.5, 0.7], ddof=1)))
    assert S.fmt_mean_sd([0.7, 0.8, 0.9]) == "0.800 ± 0.100"
    assert S.fmt_mean_sd([0.5]) == "0.500" and S.fmt_mean_sd([float("nan")]) == "nan"


def test_spread_rule():
    # |diff| > SD_A + SD_B: intervals that do not overlap
    c = S.compare_seeds([0.80, 0.81, 0.82], [0.84, 0.85, 0.86])
    assert c["diff"] == pytest.approx(0.04) and c["exceeds"] is True and S.fmt_diff(c) == "+0.040*"
    c = S.compare_seeds([0.80, 0.83, 0.86], [0.84, 0.85, 0.86])
    assert c["diff"] == pytest.approx(0.02) and c["exceeds"] is False and S.fmt_diff(c) == "+0.020"
    assert S.compare_seeds([0.5], [0.4])["exceeds"] is True  # one seed each: any difference (no spread known)
    assert S.compare_seeds([float("nan")], [0.4])["exceeds"] is False


def test_paired_over_cases_matches_scipy_and_counts_each_case_once():
    rng = np.random.default_rng(0)
    cases = [f"c{i}" for i in range(15)]
    seeds_a = [{c: float(v) for c, v in zip(cases, rng.uniform(0.6, 0.9, 15))} for _ in range(3)]
    seeds_b = [{c: r[c] + 0.02 + float(rng.normal(0, 0.02)) for c in cases} for r in seeds_a]
    a, b = S.case_means(seeds_a), S.case_means(seeds_b)
    assert a["c3"] == pytest.approx(np.mean([r["c3"] for r in seeds_a]))
    x, y = np.array([a[c] for c in cases]), np.array([b[c] for c in cases])
    assert S.paired_over_cases(a, b) == pytest.approx(stats.ttest_rel(x, y).pvalue)
    assert S.paired_over_cases(a, b, "wilcoxon") == pytest.approx(stats.wilcoxon(x, y).pvalue)
    d = x - y  # the paired t by hand: 15 cases, 14 degrees of freedom (not 45 cases)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(15))
    assert S.paired_over_cases(a, b) == pytest.approx(2 * stats.t.sf(abs(t), 14))
    assert math.isnan(S.paired_over_cases(a, a))
    with pytest.raises(ValueError, match="same cases"):
        S.case_means([{"c0": 0.5}, {"c1": 0.5}])
    with pytest.raises(ValueError, match="unknown test"):
        S.paired_over_cases(a, b, "mann-whitney")


def test_bonferroni_pairs():
    samples = {k: {f"c{i}": v + 0.01 * i * j for i in range(8)} for j, (k, v) in enumerate({"a": 0.5, "b": 0.6, "c": 0.7}.items())}
    got = S.pairwise_paired(samples)
    assert list(got) == [("a", "b"), ("a", "c"), ("b", "c")]
    for (x, y), p in got.items():
        assert p == pytest.approx(min(1.0, 3 * S.paired_over_cases(samples[x], samples[y])))

"""Statistics over training seeds, shared by every multi-seed table (the demo report, the neonatal studies,
the DLB ablation).

A result is a claim only when it holds over seeds: each setting is trained once per seed, each run gives
one number (a mean over test cases), and two settings differ *beyond the seed spread* when their mean ±
SD intervals do not overlap, ``|mean_B - mean_A| > SD_A + SD_B`` (sample SDs, ddof 1; 0 with one seed).

`paired_over_cases` is the test over cases: each case's score averaged over the seeds first, so a case
counts once (pooling seeds x cases would count each case once per seed and overstate significance).
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample SD) of the finite `values`; SD 0 with one value, (nan, nan) with none."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def seed_columns(runs: Sequence[Mapping], metrics: Sequence[str]) -> dict:
    """One setting's runs (one mapping per seed) -> for each metric ``m``: ``m`` = the per-seed values,
    ``m_mean`` and ``m_sd`` (`mean_sd`)."""
    out = {}
    for m in metrics:
        out[m] = [r[m] for r in runs]
        out[f"{m}_mean"], out[f"{m}_sd"] = mean_sd(out[m])
    return out


def fmt_mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """``"0.812 ± 0.004"`` (``"0.812"`` for one value, ``"nan"`` for none)."""
    m, sd = mean_sd(values)
    if math.isnan(m):
        return "nan"
    n = sum(1 for x in values if x is not None and np.isfinite(x))
    return f"{m:.{digits}f}" if n < 2 else f"{m:.{digits}f} ± {sd:.{digits}f}"


def exceeds_spread(diff: float, sd_a: float, sd_b: float) -> bool:
    """True when a difference of means is larger than the sum of the two seed SDs."""
    return bool(np.isfinite(diff) and abs(diff) > (sd_a if np.isfinite(sd_a) else 0.0) + (sd_b if np.isfinite(sd_b) else 0.0))


def compare_seeds(a: Sequence[float], b: Sequence[float]) -> dict:
    """B - A over seeds: ``{"diff", "exceeds", "mean_a", "sd_a", "mean_b", "sd_b"}`` (`a`, `b`: one
    number per seed)."""
    ma, sa = mean_sd(a)
    mb, sb = mean_sd(b)
    diff = mb - ma
    return {"diff": diff, "exceeds": exceeds_spread(diff, sa, sb), "mean_a": ma, "sd_a": sa, "mean_b": mb, "sd_b": sb}


def fmt_diff(cmp: Mapping) -> str:
    """``"+0.021*"``: B - A, starred when it exceeds the seed spread."""
    d = cmp["diff"]
    return "nan" if not np.isfinite(d) else f"{d:+.3f}" + ("*" if cmp["exceeds"] else "")


def fmt_p(p: float | None, digits: int = 4) -> str:
    """A p-value: `digits` decimals, or two significant digits below 1e-3."""
    if p is None or math.isnan(p):
        return "nan"
    return f"{p:.{digits}f}" if p >= 1e-3 or p == 0 else f"{p:.1e}"


def case_means(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each case's score averaged over runs (seeds): `runs` = [{case: score}, ...] over the same cases."""
    cases = sorted(set().union(*[set(r) for r in runs])) if runs else []
    for r in runs:
        if set(r) != set(cases):
            raise ValueError("every seed's run must score the same cases")
    with np.errstate(all="ignore"):
        return {c: float(np.nanmean([r[c] for r in runs])) for c in cases}


def paired_over_cases(a: Mapping[str, float], b: Mapping[str, float], test: str = "t") -> float:
    """Two-sided p-value of a paired test over the cases `a` and `b` share (each a case -> score map,
    e.g. `case_means`): ``t`` (paired t-test) or ``wilcoxon`` (signed-rank). nan when fewer than 2
    finite pairs or no difference at all."""
    from scipy import stats

    cases = sorted(c for c in set(a) & set(b) if np.isfinite(a[c]) and np.isfinite(b[c]))
    x = np.asarray([a[c] for c in cases], float)
    y = np.asarray([b[c] for c in cases], float)
    if len(cases) < 2 or np.all(x == y):
        return math.nan
    if test == "t":
        return float(stats.ttest_rel(x, y).pvalue)
    if test == "wilcoxon":
        return float(stats.wilcoxon(x, y).pvalue)
    raise ValueError(f"unknown test {test!r} (t or wilcoxon)")


def bonferroni(pvalues: Mapping, n: int | None = None) -> dict:
    """Each p-value times the number of comparisons (`n`, default: how many there are), capped at 1."""
    n = len(pvalues) if n is None else n
    return {k: (math.nan if math.isnan(p) else min(1.0, p * n)) for k, p in pvalues.items()}


def pairwise_paired(samples: Mapping[str, Mapping[str, float]], test: str = "t") -> dict[tuple[str, str], float]:
    """Bonferroni-corrected `paired_over_cases` p-values of every pair of `samples`' keys."""
    return bonferroni({(x, y): paired_over_cases(samples[x], samples[y], test)
                       for x, y in itertools.combinations(samples, 2)})

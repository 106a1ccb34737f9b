"""Stratified summaries, method comparisons and the evaluation report.

Input is the per-case rows of :func:`jaxseg.evaluation.evaluate.evaluate_folder` (or read back
with :func:`~jaxseg.evaluation.evaluate.read_case_csv`): dicts with ``case``, ``method``,
``stratum`` and metric columns ``<metric>_<structure>`` (``dice_WM``).

* :func:`stratified_table`: per stratum (and ``"all"``) and structure, ``n, mean, std, p50, p25,
  p10, p5`` via :func:`jaxseg.evaluation.metrics.summarize` (NaN-aware, linear percentiles).
* :func:`compare_methods`: the same for two methods side by side plus ``B - A`` per statistic:
  the layout of Table 2 of Fidon et al., "Distributionally robust segmentation of abnormal fetal
  brain 3D MRI" (ERM = nnU-Net, DRO = nnU-Net-DRO; low Dice percentiles = worst cases).
* :func:`write_report`: ``report.md`` + ``report.html`` + ``plots/*.png`` in a work folder.

Images in the report: ``report.md`` links the PNGs relatively (``plots/x.png``), which every
markdown viewer resolves and keeps the file small and diff-able; ``report.html`` embeds the same
PNGs as base64 ``data:`` URIs so the HTML is one self-contained file (inline CSS, no external
references) that survives being copied off a cluster, attached to an e-mail or uploaded as a CI
artifact on its own. The PNGs stay in ``plots/`` for reuse in papers and slides.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxseg.fileio import write_text_atomic
from jaxseg.evaluation import metrics as M
from jaxseg.evaluation import plots as P
from jaxseg.evaluation.seeds import compare_seeds

__all__ = [
    "stratified_table",
    "compare_methods",
    "higher_is_better",
    "write_report",
    "ALL",
]

ALL = "all"
DEFAULT_PERCENTILES = (50, 25, 10, 5)
_HIGHER = ("dice", "iou", "ppv", "tpr", "ltpr", "isbi")
_LOWER = ("hd95", "hd", "msd", "assd", "lfpr")


# --------------------------------------------------------------------------- tables


def higher_is_better(metric_prefix: str) -> bool | None:
    """True for overlap metrics (Dice, IoU, PPV, TPR, LTPR), False for distances and LFPR,
    None when unknown (volumes): then nothing is highlighted."""
    if metric_prefix in _HIGHER:
        return True
    if metric_prefix in _LOWER:
        return False
    return None


def _stat_names(percentiles: Sequence[float]) -> list[str]:
    return ["n", "mean", "std"] + [f"p{q:g}" for q in percentiles]


def _summary(values: list[float], percentiles: Sequence[float]) -> dict[str, float]:
    s = M.summarize(values)
    extra = [q for q in percentiles if f"p{q:g}" not in s]
    if extra:
        v = np.sort(np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64))
        for q in extra:
            # metrics' own (inf-safe, numpy-linear) percentile, for percentiles summarize lacks
            s[f"p{q:g}"] = M._percentile(v, q) if v.size else math.nan
    return {k: s[k] for k in _stat_names(percentiles)}


def _infer_structures(rows: Sequence[Mapping[str, Any]], metric_prefix: str) -> list[str]:
    out: list[str] = []
    head = f"{metric_prefix}_"
    for r in rows:
        for k in r:
            if k.startswith(head) and k[len(head):] not in out:
                out.append(k[len(head):])
    if not out:
        raise ValueError(f"no '{head}<structure>' columns in the rows")
    return out


def _strata(rows: Sequence[Mapping[str, Any]], strata: Sequence[str] | None) -> list[str]:
    if strata is None:
        strata = sorted({str(r["stratum"]) for r in rows if r.get("stratum") not in (None, "")})
    return [s for s in strata if s != ALL] + [ALL]


def _value(row: Mapping[str, Any], key: str) -> float:
    v = row.get(key)
    return math.nan if v is None or v == "" else float(v)


def stratified_table(
    rows: Sequence[Mapping[str, Any]],
    metric_prefix: str = "dice",
    structures: Sequence[str] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    *,
    method: str | None = None,
    strata: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{stratum, structure, n, mean, std, p50, p25, p10, p5}``, strata first (sorted, or
    in the order given by ``strata``), then ``"all"`` (every row, including rows without a
    stratum). ``structures`` default: every ``<metric_prefix>_*`` column. ``n`` counts the
    non-NaN values used. With rows of several methods, ``method`` must pick one (pooling the
    methods' cases would be meaningless)."""
    if method is not None:
        rows = [r for r in rows if r.get("method") == method]
    else:
        found = {r.get("method") for r in rows}
        if len(found) > 1:
            raise ValueError(f"rows hold several methods {sorted(map(str, found))}; pass method=")
    structures = list(structures) if structures is not None else _infer_structures(rows, metric_prefix)
    out = []
    for stratum in _strata(rows, strata):
        sel = rows if stratum == ALL else [r for r in rows if r.get("stratum") == stratum]
        for s in structures:
            values = [_value(r, f"{metric_prefix}_{s}") for r in sel]
            out.append({"stratum": stratum, "structure": s, **_summary(values, percentiles)})
    return out


def compare_methods(
    rows: Sequence[Mapping[str, Any]],
    methods: Sequence[str] = ("ERM", "DRO"),
    metric_prefix: str = "dice",
    structures: Sequence[str] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    *,
    strata: Sequence[str] | None = None,
    require_same_cases: bool = True,
) -> list[dict[str, Any]]:
    """Method A vs method B (``methods = (A, B)``) per stratum and structure.

    Each row: ``stratum``, ``structure``, then for each statistic ``st`` in ``n, mean, std,
    p50, ...``: ``"<A>_<st>"``, ``"<B>_<st>"`` and, except for ``n``, ``"diff_<st>"`` = B - A.
    With ``require_same_cases`` (default) both methods must have been evaluated on the same case
    ids, else ValueError: a percentile difference over different cases is not a comparison.
    """
    if len(methods) != 2 or methods[0] == methods[1]:
        raise ValueError(f"methods must be two different names, got {methods!r}")
    a, b = methods
    by = {m: [r for r in rows if r.get("method") == m] for m in methods}
    for m, sel in by.items():
        if not sel:
            have = sorted({str(r.get("method")) for r in rows})
            raise ValueError(f"no rows for method {m!r} (rows have methods {have})")
    if require_same_cases:
        ca, cb = ({r.get("case") for r in by[m]} for m in methods)
        if ca != cb:
            raise ValueError(
                f"methods were evaluated on different cases: only {a}: {sorted(map(str, ca - cb))}; "
                f"only {b}: {sorted(map(str, cb - ca))} (pass require_same_cases=False to allow)"
            )
    structures = list(structures) if structures is not None else _infer_structures(rows, metric_prefix)
    strata = _strata(rows, strata)
    ta, tb = (stratified_table(by[m], metric_prefix, structures, percentiles, strata=strata)
              for m in methods)
    out = []
    for ra, rb in zip(ta, tb):
        row: dict[str, Any] = {"stratum": ra["stratum"], "structure": ra["structure"]}
        for st in _stat_names(percentiles):
            row[f"{a}_{st}"] = ra[st]
            row[f"{b}_{st}"] = rb[st]
            if st != "n":
                row[f"diff_{st}"] = rb[st] - ra[st]
        out.append(row)
    return out


def compare_over_seeds(
    rows: Sequence[Mapping[str, Any]],
    methods: Sequence[str] = ("ERM", "DRO"),
    metric_prefix: str = "dice",
    structures: Sequence[str] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    *,
    strata: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """:func:`compare_methods` once per training seed (the rows' ``seed`` column), then over seeds.

    Each statistic ``st`` (mean, std, percentiles) is computed over cases for each seed; a row then has
    ``<A>_<st>`` and ``<B>_<st>`` = the mean over seeds, ``<A>_<st>_sd`` and ``<B>_<st>_sd`` = their sample
    SD over seeds (ddof 1; 0 with one seed), ``diff_<st>`` = B - A of the means, and ``exceeds_<st>`` =
    True when ``|diff|`` is larger than the sum of the two SDs (the mean ± SD intervals do not overlap:
    the difference exceeds the seed spread). ``n`` is the number of cases per seed, ``seeds`` the count.
    """
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    per_seed = [compare_methods([r for r in rows if r.get("seed") == sd], methods, metric_prefix, structures,
                                percentiles, strata=strata, require_same_cases=True) for sd in seeds]
    a, b = methods
    out = []
    for i, first in enumerate(per_seed[0]):
        row: dict[str, Any] = {"stratum": first["stratum"], "structure": first["structure"], "seeds": len(seeds),
                               "n": first[f"{a}_n"]}
        for st in _stat_names(percentiles)[1:]:
            c = compare_seeds([t[i][f"{a}_{st}"] for t in per_seed], [t[i][f"{b}_{st}"] for t in per_seed])
            for m, key in ((a, "a"), (b, "b")):
                row[f"{m}_{st}"], row[f"{m}_{st}_sd"] = c[f"mean_{key}"], c[f"sd_{key}"]
            row[f"diff_{st}"], row[f"exceeds_{st}"] = c["diff"], c["exceeds"]
        out.append(row)
    return out


# --------------------------------------------------------------------------- formatting


def _fmt(v: Any, decimals: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{decimals}f}"


def _fmt_diff(v: float) -> str:
    s = _fmt(v)
    return s if s in ("nan", "inf", "-inf") or s.startswith("-") else f"+{s}"


def _better(stat: str, va: float, vb: float, higher: bool | None) -> tuple[bool, bool]:
    """Which side to bold. Values equal at display precision (or within float noise, e.g.
    0.66249999 vs 0.66250001) are a tie and both are bold, as in the paper's table. Mean and
    percentiles follow the metric's direction; std is better when lower."""
    if stat == "n" or higher is None:
        return False, False
    va, vb = float(va), float(vb)
    if math.isnan(va) or math.isnan(vb):
        return False, False
    if _fmt(va) == _fmt(vb) or math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-12):
        return True, True
    up = False if stat == "std" else higher
    a_wins = va > vb if up else va < vb
    return a_wins, not a_wins


class _Table:
    def __init__(self, header: list[str], align_left: int = 1):
        self.header, self.rows, self.bold, self.align_left = header, [], [], align_left

    def add(self, cells: list[str], bold: list[bool] | None = None) -> None:
        self.rows.append(cells)
        self.bold.append(bold or [False] * len(cells))


def _stat_table(table: list[dict[str, Any]], percentiles: Sequence[float]) -> _Table:
    stats = _stat_names(percentiles)
    t = _Table(["Stratum", "Structure"] + [s.capitalize() if s in ("mean", "std") else s for s in stats], 2)
    for r in table:
        t.add([r["stratum"], r["structure"]] + [_fmt(r[s]) for s in stats])
    return t


def _comparison_table(cmp: list[dict[str, Any]], methods: Sequence[str], percentiles, higher) -> _Table:
    a, b = methods
    stats = _stat_names(percentiles)
    t = _Table(["Stratum", "Structure", "Method"] + [s.capitalize() if s in ("mean", "std") else s for s in stats], 3)
    for r in cmp:
        flags = [_better(st, r[f"{a}_{st}"], r[f"{b}_{st}"], higher) for st in stats]
        t.add([r["stratum"], r["structure"], a] + [_fmt(r[f"{a}_{st}"]) for st in stats],
              [False] * 3 + [f[0] for f in flags])
        t.add(["", "", b] + [_fmt(r[f"{b}_{st}"]) for st in stats],
              [False] * 3 + [f[1] for f in flags])
        t.add(["", "", f"Δ {b} − {a}", ""] + [_fmt_diff(r[f"diff_{st}"]) for st in stats[1:]])
    return t


def _seed_table(cmp: list[dict[str, Any]], methods: Sequence[str], percentiles, higher) -> _Table:
    a, b = methods
    stats = _stat_names(percentiles)[1:]
    t = _Table(["Stratum", "Structure", "Method", "n"] + [s.capitalize() if s in ("mean", "std") else s
                                                          for s in stats], 3)
    for r in cmp:
        flags = [_better(st, r[f"{a}_{st}"], r[f"{b}_{st}"], higher) for st in stats]
        for j, m in enumerate((a, b)):
            t.add([r["stratum"] if j == 0 else "", r["structure"] if j == 0 else "", m, _fmt(r["n"])]
                  + [f"{_fmt(r[f'{m}_{st}'])} ± {_fmt(r[f'{m}_{st}_sd'])}" for st in stats],
                  [False] * 4 + [f[j] for f in flags])
        t.add(["", "", f"Δ {b} − {a}", ""] + [_fmt_diff(r[f"diff_{st}"]) + (" *" if r[f"exceeds_{st}"] else "")
                                               for st in stats])
    return t


def _md_table(t: _Table) -> str:
    def cell(text: str, bold: bool) -> str:
        text = str(text).replace("|", "\\|")
        return f"**{text}**" if bold and text else text

    lines = ["| " + " | ".join(t.header) + " |",
             "|" + "|".join(":---" if i < t.align_left else "---:" for i in range(len(t.header))) + "|"]
    for cells, bold in zip(t.rows, t.bold):
        lines.append("| " + " | ".join(cell(c, f) for c, f in zip(cells, bold)) + " |")
    return "\n".join(lines)


def _html_table(t: _Table) -> str:
    def td(i: int, text: str, bold: bool, tag: str = "td") -> str:
        cls = ' class="l"' if i < t.align_left else ""
        body = html.escape(str(text))
        return f"<{tag}{cls}>{'<b>' + body + '</b>' if bold and body else body}</{tag}>"

    out = ["<table>", "<thead><tr>" + "".join(td(i, h, False, "th") for i, h in enumerate(t.header)) + "</tr></thead>", "<tbody>"]
    for cells, bold in zip(t.rows, t.bold):
        delta = any(str(c).startswith("Δ") for c in cells)
        tr = '<tr class="delta">' if delta else "<tr>"
        out.append(tr + "".join(td(i, c, f) for i, (c, f) in enumerate(zip(cells, bold))) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<b>\1</b>"),
    (re.compile(r"(?<![*\w])\*([^*]+)\*(?![*\w])"), r"<i>\1</i>"),
    (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>'),
]


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    for pat, rep in _INLINE:
        text = pat.sub(rep, text)
    return text


def _markdown_to_html(md: str) -> str:
    """A small markdown subset for ``extra_sections``: headings, paragraphs, ``-``/``*``/``1.``
    lists, fenced code, pipe tables, inline code/bold/italic/links. Anything else is kept as
    (escaped) paragraph text, so nothing is lost."""
    out: list[str] = []
    lines = md.strip("\n").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if not s:
            i += 1
        elif s.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
        elif m := re.match(r"(#{1,6})\s+(.*)", s):
            level = min(6, len(m.group(1)) + 2)  # nested under the section's own <h2>
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif s.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in block if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            rows = [f"<tr>{''.join(f'<th>{_inline(c)}</th>' for c in body[0])}</tr>"] if body else []
            rows += [f"<tr>{''.join(f'<td>{_inline(c)}</td>' for c in r)}</tr>" for r in body[1:]]
            out.append("<table>" + "".join(rows) + "</table>")
        elif re.match(r"([-*+]|\d+\.)\s+", s):
            tag = "ol" if s[0].isdigit() else "ul"
            items = []
            while i < len(lines) and (m := re.match(r"\s*([-*+]|\d+\.)\s+(.*)", lines[i])):
                items.append(f"<li>{_inline(m.group(2))}</li>")
                i += 1
            out.append(f"<{tag}>{''.join(items)}</{tag}>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(
                r"\s*(```|#{1,6}\s|\||[-*+]\s|\d+\.\s)", lines[i]
            ):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .55em;text-align:right;font-variant-numeric:tabular-nums}
th{background:#f0f0f0}td.l,th.l{text-align:left}tr.delta td{color:#555;font-style:italic;border-bottom:2px solid #999}
tbody tr:nth-child(odd):not(.delta){background:#fafafa}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;font-size:.9em}
code,pre{background:#f4f4f4}pre{padding:.6em;overflow:auto}.note{color:#555}
""".strip()


# --------------------------------------------------------------------------- report


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _write_text(path: Path, text: str) -> Path:
    return write_text_atomic(path, text)


def _worst_cases(rows, method, structures, metric_prefix, higher, k=3) -> _Table:
    t = _Table(["Structure"] + [f"#{i + 1}" for i in range(k)], 1 + k)
    for s in structures:
        vals = [(_value(r, f"{metric_prefix}_{s}"), r) for r in rows if r.get("method") == method]
        vals = [(v, r) for v, r in vals if not math.isnan(v)]
        vals.sort(key=lambda x: x[0], reverse=not higher)
        cells = [f"{r.get('case')} ({r.get('stratum') or '-'}): {_fmt(v)}" for v, r in vals[:k]]
        t.add([s] + cells + [""] * (k - len(cells)))
    return t


def write_report(
    workdir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    methods: Sequence[str] | None = None,
    structures: Sequence[str] | None = None,
    title: str = "Segmentation evaluation",
    metric_prefix: str = "dice",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    strata: Sequence[str] | None = None,
    training_curves: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    overlays: Sequence[str | os.PathLike] | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``workdir/report.md``, ``workdir/report.html`` and ``workdir/plots/*.png``.

    Sections: cases per stratum; for two or more methods the comparison of ``methods[0]`` with
    each other method (Table 2 layout: per stratum and structure a row per method and a
    ``Δ`` row, the better value of each statistic in bold); each method's stratified table; the
    distribution plots (one per stratum and ``all``); the worst cases per structure; the training
    curves (``training_curves``: method -> list of ``{"step", "loss", ...}``); the ``overlays``
    (existing PNGs, e.g. from :func:`~jaxseg.evaluation.plots.worst_case_overlays`, copied into
    ``plots/``); then ``extra_sections`` (title -> markdown) verbatim.

    Long on purpose: the report's sections in reading order, each a few lines appending blocks to
    one list that the markdown and HTML writers render; the tables and plots are helpers.

    ``methods`` default: the rows' methods in first-seen order. Numbers have 3 decimals.
    For a lower-is-better metric (``hd95``) the worst-case tail is the *high* percentiles: pass
    ``percentiles=(50, 75, 90, 95)``.
    Returns ``{"markdown": Path, "html": Path, "plots": [Path, ...]}``.
    """
    workdir = Path(workdir)
    plot_dir = workdir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError("no rows to report")
    if methods is None:
        methods = list(dict.fromkeys(r.get("method") for r in rows))
    methods = list(methods)
    structures = list(structures) if structures is not None else _infer_structures(rows, metric_prefix)
    strata_list = _strata(rows, strata)
    higher = higher_is_better(metric_prefix)
    n_seeds = len({r.get("seed") for r in rows})
    blocks: list[tuple] = []  # ("h2", text) | ("p", md) | ("table", _Table) | ("img", Path, caption) | ("md", text)
    plots: list[Path] = []

    # -- cases per stratum
    blocks.append(("h2", "Cases"))
    counts = _Table(["Method"] + strata_list, 1)
    for m in methods:
        sel = [r for r in rows if r.get("method") == m]
        # distinct cases (with several seeds each case has one row per seed)
        counts.add([str(m)] + [str(len({r.get("case") for r in sel if s == ALL or r.get("stratum") == s}))
                               for s in strata_list])
    blocks.append(("table", counts))
    if n_seeds > 1:
        blocks.append(("p", f"Each case was predicted by each of {n_seeds} training seeds."))
    missing = getattr(rows, "missing", None)
    if missing:
        blocks.append(("p", f"Cases without a prediction (not evaluated): {', '.join(map(str, missing))}."))

    # -- comparison(s): with several training seeds, each statistic as mean ± SD over seeds
    if len(methods) >= 2:
        for other in methods[1:]:
            pair = (methods[0], other)
            if n_seeds > 1:
                blocks.append(("h2", f"{pair[1]} vs {pair[0]} over {n_seeds} training seeds: {metric_prefix}"))
                blocks.append(("p", "Each statistic is computed over the cases for each seed, then given as mean ± "
                                    "SD over the seeds (bold: the better mean); Δ is the difference of the means, "
                                    "marked * when it exceeds the seed spread (|Δ| > SD of one method + SD of "
                                    "the other). pX is the X-th percentile over cases; n = cases per seed."))
                blocks.append(("table", _seed_table(compare_over_seeds(rows, pair, metric_prefix, structures,
                                                                       percentiles, strata=strata_list),
                                                    pair, percentiles, higher)))
                continue
            cmp = compare_methods(rows, pair, metric_prefix, structures, percentiles,
                                  strata=strata_list, require_same_cases=False)
            blocks.append(("h2", f"{pair[1]} vs {pair[0]}: {metric_prefix}"))
            note = ("Best value per statistic in bold (std: lower is better; ties at 3 decimals "
                    "bold both); Δ rows are " + f"{pair[1]} − {pair[0]}.") if higher is not None else \
                f"Δ rows are {pair[1]} − {pair[0]}."
            blocks.append(("p", f"{note} pX is the X-th percentile over cases "
                                "(n = values used, NaN dropped)."))
            blocks.append(("table", _comparison_table(cmp, pair, percentiles, higher)))

    # -- per-method tables (with several seeds: every seed's cases pooled)
    for m in methods:
        blocks.append(("h2", f"{m}: {metric_prefix} per stratum"))
        tab = stratified_table(rows, metric_prefix, structures, percentiles, method=m, strata=strata_list)
        blocks.append(("table", _stat_table(tab, percentiles)))

    # -- distributions
    blocks.append(("h2", f"{metric_prefix} distributions"))
    for i, s in enumerate(strata_list):
        p = P.metric_distribution(rows, plot_dir / f"{metric_prefix}_{i:02d}_{_slug(s)}.png",
                                  structures=structures, methods=methods, stratum=s,
                                  metric_prefix=metric_prefix)
        plots.append(p)
        blocks.append(("img", p, f"{metric_prefix} per structure, stratum {s}"))

    # -- worst cases
    if higher is not None:
        blocks.append(("h2", "Worst cases"))
        for m in methods:
            blocks.append(("p", f"**{m}**: lowest {metric_prefix}" if higher else f"**{m}**: highest {metric_prefix}"))
            blocks.append(("table", _worst_cases(rows, m, structures, metric_prefix, higher)))

    # -- training curves
    if training_curves:
        blocks.append(("h2", "Training curves"))
        # training loss and validation Dice rows; the DRO diagnostics have their own panel below
        p = P.training_curves({m: [r for r in recs if "loss" in r or "val_dice" in r]
                               for m, recs in training_curves.items()}, plot_dir / "training_curves.png")
        plots.append(p)
        blocks.append(("img", p, "Training curves per method"))
        p = P.keyed_curves(training_curves, "val_dice_class", plot_dir / "val_dice_class.png",
                           ylabel="validation Dice", ylim=(0.0, 1.0))
        if p is not None:
            plots.append(p)
            blocks.append(("img", p, "Validation Dice per class over training steps"))
        p = P.keyed_curves(training_curves, "patch_class_share", plot_dir / "patch_class_share.png",
                           ylabel="share of patch voxels")
        if p is not None:
            plots.append(p)
            blocks.append(("img", p, "What the patches contained: share of the trained voxels per class"))
        p = P.sampling_shares(training_curves, plot_dir / "sampling_shares.png")
        if p is not None:
            plots.append(p)
            blocks.append(("img", p, "What each method trained on: drawn share per stratum (solid), hardness "
                                     "sampler's probability mass per stratum (dashed), its ESS (dotted)"))

    # -- overlays
    if overlays:
        blocks.append(("h2", "Qualitative results"))
        for i, src in enumerate(overlays):
            src = Path(src)
            if not src.is_file():
                raise FileNotFoundError(f"{src}: overlay image not found")
            dst = plot_dir / f"overlay_{i:02d}_{_slug(src.name)}"
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
            plots.append(dst)
            blocks.append(("img", dst, src.stem))

    for name, body in (extra_sections or {}).items():
        blocks.append(("h2", str(name)))
        blocks.append(("md", str(body)))

    md = _render_md(title, blocks, workdir)
    page = _render_html(title, blocks)
    return {
        "markdown": _write_text(workdir / "report.md", md),
        "html": _write_text(workdir / "report.html", page),
        "plots": plots,
    }


def _render_md(title: str, blocks: list[tuple], workdir: Path) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if b[0] == "h2":
            out += [f"## {b[1]}", ""]
        elif b[0] in ("p", "md"):
            out += [b[1].strip("\n"), ""]
        elif b[0] == "table":
            out += [_md_table(b[1]), ""]
        elif b[0] == "img":
            rel = Path(os.path.relpath(b[1], workdir)).as_posix()
            out += [f"![{b[2]}]({rel})", ""]
    return "\n".join(out)


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml", ".webp": "image/webp"}


def _render_html(title: str, blocks: list[tuple]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if b[0] == "h2":
            body.append(f"<h2>{html.escape(b[1])}</h2>")
        elif b[0] == "p":
            body.append(f"<p class=\"note\">{_inline(b[1])}</p>")
        elif b[0] == "md":
            body.append(_markdown_to_html(b[1]))
        elif b[0] == "table":
            body.append(_html_table(b[1]))
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            mime = _MIME.get(Path(b[1]).suffix.lower(), "image/png")
            body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:{mime};base64,{data}">'
                        f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")

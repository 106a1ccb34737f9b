"""Evaluation plots (matplotlib, Agg). Every function writes one PNG and returns its path.

Figures are built with :class:`matplotlib.figure.Figure` on an explicit
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, never through ``pyplot``: no global
backend switch (importing this module does not change the caller's backend), no figure registry
to leak memory, and safe in worker threads and headless jobs. Files are written atomically.

* :func:`metric_distribution`: one stratum, box plot + jittered points per structure, the
  methods side by side (the per-stratum Dice distributions behind the paper's Table 2).
* :func:`training_curves`: loss (and any other logged value) vs step, one line per method.
* :func:`sampling_shares`: what each method trained on: the share of drawn samples per stratum over
  steps, and for hardness sampling the sampler's probability mass per stratum and its ESS.
* :func:`worst_case_overlays`: three orthogonal slices through the largest error component,
  reference and prediction contours over the image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage

from jaxseg.fileio import atomic_path

__all__ = ["metric_distribution", "training_curves", "sampling_shares", "worst_case_overlays",
           "largest_error_point"]

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
REF_COLOR, PRED_COLOR, ERR_COLOR = "#00c000", "#ff2020", "#ffd000"


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a figure as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return path


def _values(rows, method, stratum, key) -> np.ndarray:
    v = [
        r.get(key)
        for r in rows
        if r.get("method") == method and (stratum in (None, "all") or r.get("stratum") == stratum)
    ]
    a = np.asarray([x for x in v if x is not None], dtype=np.float64)
    return a[np.isfinite(a)]  # NaN: undefined; inf (a missed structure's HD) cannot be drawn


def metric_distribution(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    structures: Sequence[str],
    methods: Sequence[str],
    stratum: str | None = None,
    metric_prefix: str = "dice",
    title: str | None = None,
) -> Path:
    """Box plot with jittered points of ``<metric_prefix>_<structure>`` per structure, one box
    per method side by side, for the rows of ``stratum`` (None or ``"all"``: every row).
    NaN and infinite values are left out (the box shows the finite values only)."""
    # at least 1.1 inch per structure: one method's narrow figure overlapped the structure names
    fig = Figure(figsize=(max(4.0, 1.0 + 1.1 * len(structures), 1.0 + 0.7 * len(structures) * len(methods)), 3.6))
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # fixed jitter: the same rows give the same picture
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        color = COLORS[j % len(COLORS)]
        for i, s in enumerate(structures):
            v = _values(rows, method, stratum, f"{metric_prefix}_{s}")
            x = i - 0.4 + width * (j + 0.5)
            if v.size:
                bp = ax.boxplot([v], positions=[x], widths=width * 0.8, showfliers=False,
                                patch_artist=True, manage_ticks=False)
                for patch in bp["boxes"]:
                    patch.set(facecolor=color, alpha=0.25, edgecolor=color)
                for part in ("whiskers", "caps", "medians"):
                    for line in bp[part]:
                        line.set(color=color)
                ax.scatter(x + rng.uniform(-width * 0.3, width * 0.3, v.size), v, s=9,
                           color=color, alpha=0.8, linewidths=0)
        ax.plot([], [], color=color, lw=6, alpha=0.5, label=method)  # legend handle
    ax.set_xticks(range(len(structures)), list(structures), rotation=20, ha="right")
    ax.set_xlim(-0.6, len(structures) - 0.4)
    ax.set_ylabel(metric_prefix)
    if metric_prefix in ("dice", "iou"):
        ax.set_ylim(-0.02, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or f"{metric_prefix} - {stratum or 'all'}")
    if methods:  # outside the axes: inside, it hid the boxes of low-scoring structures
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    return save_figure(fig, path)


def _flat(curves: Mapping[str, Sequence[Mapping[str, Any]]], key: str) -> bool:
    """A value that never changes in any method (e.g. skipped_steps 0): a panel that says nothing."""
    vals = [float(r[key]) for recs in curves.values() for r in recs
            if isinstance(r.get(key), (int, float, np.number)) and math.isfinite(float(r[key]))]
    return len(vals) == 0 or max(vals) - min(vals) <= 1e-12


def curve_keys(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The panels `training_curves` draws by default: every numeric key but ``step`` and ``epoch`` (the x
    axis already) whose value changes somewhere, ``loss`` first."""
    found: list[str] = []
    for records in curves.values():
        for rec in records:
            for k, v in rec.items():
                if k not in ("step", "epoch") and k not in found and isinstance(v, (int, float, np.number)):
                    found.append(k)
    keys = sorted(found, key=lambda k: (k != "loss", found.index(k)))
    return [k for k in keys if k == "loss" or not _flat(curves, k)]


def training_curves(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    keys: Sequence[str] | None = None,
    logy: bool = False,
) -> Path:
    """One panel per logged value (default: every numeric key but ``step`` that changes, ``loss`` first),
    value vs ``step``, one line per method. Records without a ``step`` use their index."""
    keys = list(curve_keys(curves) if keys is None else keys) or ["loss"]
    fig = Figure(figsize=(5.0 * min(len(keys), 3), 3.4 * math.ceil(len(keys) / 3)))
    for n, key in enumerate(keys):
        ax = fig.add_subplot(math.ceil(len(keys) / 3), min(len(keys), 3), n + 1)
        for j, (method, records) in enumerate(curves.items()):
            pts = [(rec.get("step", i), rec[key]) for i, rec in enumerate(records)
                   if rec.get(key) is not None]
            if pts:
                x, y = zip(*pts)
                # markers for sparse values (a validation every few epochs): a lone point has no line
                ax.plot(x, y, color=COLORS[j % len(COLORS)], lw=1.2, label=method,
                        marker="o" if len(x) < 10 else None, ms=4)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def sampling_shares(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path | None:
    """Per method: the share of drawn samples per stratum vs step (``drawn_stratum`` records, solid) and,
    where logged, the hardness sampler's probability mass per stratum (``dro_p_stratum``, dashed) with
    its effective sample size (``dro_ess``, right axis). None when nothing of the kind was logged."""
    methods = [m for m, recs in curves.items() if any("drawn_stratum" in r or "dro_p_stratum" in r for r in recs)]
    if not methods:
        return None
    strata = sorted({s for m in methods for r in curves[m] for key in ("drawn_stratum", "dro_p_stratum")
                     for s in (r.get(key) or {})})
    fig = Figure(figsize=(5.5 * len(methods), 3.6))
    for j, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), j + 1)
        recs = curves[method]
        for k, stratum in enumerate(strata):
            color = COLORS[k % len(COLORS)]
            for key, style in (("drawn_stratum", "-"), ("dro_p_stratum", "--")):
                pts = [(r["step"], r[key].get(stratum, 0.0)) for r in recs if r.get(key)]
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, style, color=color, lw=1.2, label=stratum if style == "-" else None)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("share of samples (solid: drawn; dashed: sampler p)")
        ax.set_title(method)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
        ess = [(r["step"], r["dro_ess"]) for r in recs if r.get("dro_ess") is not None]
        if ess:
            ax2 = ax.twinx()
            x, y = zip(*ess)
            ax2.plot(x, y, ":", color="black", lw=1.2)
            ax2.set_ylabel("ESS of the sampler (dotted)")
            ax2.set_ylim(bottom=0)
    return save_figure(fig, path)


def keyed_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], key: str, path: str | os.PathLike, *,
                 ylabel: str | None = None, ylim: tuple[float, float] | None = None) -> Path | None:
    """One panel per entry of a dict-valued record ``key`` (e.g. ``val_dice_class``: class -> Dice), the
    entry vs ``step``, one line per method (markers: such values are often sparse). None when no record
    has ``key``."""
    names = list(dict.fromkeys(n for recs in curves.values() for r in recs for n in (r.get(key) or {})))
    if not names:
        return None
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.9 * rows))
    for n, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, n + 1)
        for k, (method, recs) in enumerate(curves.items()):
            pts = [(r["step"], r[key][name]) for r in recs if name in (r.get(key) or {}) and "step" in r]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "-o", color=COLORS[k % len(COLORS)], lw=1.2, ms=3, label=method)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("step")
        if ylabel and n % cols == 0:
            ax.set_ylabel(ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if n == 0:
            ax.legend(fontsize="small")
    return save_figure(fig, path)


def largest_error_point(label_ref: np.ndarray, label_pred: np.ndarray) -> tuple[int, int, int]:
    """A voxel of the largest 26-connected component of ``pred != ref`` (the component voxel
    closest to its centroid, so the point is on the error even for a curved component). Without
    any error: the centre of the reference foreground, else of the volume."""
    err = np.asarray(label_ref) != np.asarray(label_pred)
    if err.any():
        comps, n = ndimage.label(err, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(comps.ravel())[1:]
        mask = comps == (int(np.argmax(sizes)) + 1)
    else:
        mask = np.asarray(label_ref) > 0
        if not mask.any():
            return tuple(s // 2 for s in err.shape)  # type: ignore[return-value]
    pts = np.argwhere(mask)
    c = pts.mean(axis=0)
    return tuple(int(v) for v in pts[np.argmin(((pts - c) ** 2).sum(axis=1))])  # type: ignore


def _contours(ax, lab2d: np.ndarray, color: str, style: str) -> None:
    for v in np.unique(lab2d):
        if v == 0:
            continue
        m = (lab2d == v).astype(np.float32)
        if 0 < m.sum() < m.size:
            # no origin=: contour then puts samples at integer coordinates, the pixel centres
            # of imshow's default extent (origin="lower" would shift them by half a pixel)
            ax.contour(m.T, levels=[0.5], colors=[color], linewidths=0.9, linestyles=style)


def worst_case_overlays(
    image: np.ndarray,
    label_ref: np.ndarray,
    label_pred: np.ndarray,
    path: str | os.PathLike,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    point: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Three orthogonal slices through ``point`` (default :func:`largest_error_point`): the image
    in grey, reference contours (green, solid), prediction contours (red, dashed) and the error
    voxels ``pred != ref`` (yellow, translucent). Slices are shown in array-axis order with
    ``spacing`` (mm per array axis) setting the aspect ratio."""
    image, ref, pred = (np.asarray(a) for a in (image, label_ref, label_pred))
    if not (image.shape == ref.shape == pred.shape) or image.ndim != 3:
        raise ValueError(f"need three 3D arrays of one shape, got {image.shape}, {ref.shape}, {pred.shape}")
    point = tuple(int(v) for v in (largest_error_point(ref, pred) if point is None else point))
    lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    fig = Figure(figsize=(12.0, 4.4))
    axes_names = ("i", "j", "k")
    for a in range(3):
        ax = fig.add_subplot(1, 3, a + 1)
        sl = [slice(None)] * 3
        sl[a] = point[a]
        sl = tuple(sl)
        rest = [d for d in range(3) if d != a]
        ax.imshow(image[sl].T, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower",
                  aspect=float(spacing[rest[1]]) / float(spacing[rest[0]]), interpolation="nearest")
        err = (ref[sl] != pred[sl]).T
        overlay = np.zeros(err.shape + (4,), np.float32)
        overlay[err] = (1.0, 0.82, 0.0, 0.45)
        ax.imshow(overlay, origin="lower", aspect=float(spacing[rest[1]]) / float(spacing[rest[0]]),
                  interpolation="nearest")
        _contours(ax, ref[sl], REF_COLOR, "solid")
        _contours(ax, pred[sl], PRED_COLOR, "dashed")
        ax.set_title(f"{axes_names[a]} = {point[a]}  ({int(err.sum())} error voxels)", fontsize=9)
        ax.set_xlabel(axes_names[rest[0]])
        ax.set_ylabel(axes_names[rest[1]])
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=REF_COLOR, label="reference"),
               Line2D([], [], color=PRED_COLOR, ls="--", label="prediction"),
               Line2D([], [], color=ERR_COLOR, lw=6, alpha=0.6, label="error (pred != ref)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)

"""A picture of a written cohort: one subject per stratum (and site), its channels and labels."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from jaxseg.data.synth.subject import STRATA
from jaxseg.data.synth.template import (
    BRAIN_CENTRE_MM,
    LESION_LABELS,
    _atomic_write_bytes,
)

_COLOURS = ["#000000", "#1f77b4", "#2ca02c", "#ffd92f", "#9467bd", "#ff7f0e", "#d62728", "#8c564b"]
_LESION_COLOUR = "#ff1a1a"


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def preview_png(out_dir: str | Path, path: str | Path | None = None, *, _rows=None,
                _meta=None) -> Path:
    """Draw a written cohort: one row per stratum and one per site (a representative subject
    each), showing each channel's mid-axial slice and the label overlay on axial, coronal and
    sagittal slices, with a legend. Writes ``path`` (default ``out_dir/preview.png``) atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    out = Path(out_dir)
    path = Path(path) if path is not None else out / "preview.png"
    if _meta is None:
        _meta = json.loads((out / "dataset.json").read_text())
    if _rows is None:
        with open(out / "metadata.csv", newline="") as fh:
            _rows = list(csv.DictReader(fh))
    channels = [_meta["channel_names"][k] for k in sorted(_meta["channel_names"], key=int)]
    labels = _meta["labels"]
    lesion = set(labels) == set(LESION_LABELS)

    picks = _representatives(_rows)
    n_cols = len(channels) + 3
    fig = Figure(figsize=(2.4 * n_cols, 2.4 * len(picks) + 0.8), dpi=90)
    FigureCanvasAgg(fig)
    axs = fig.subplots(len(picks), n_cols, squeeze=False)
    if lesion:
        rgb = np.array([[0, 0, 0], [1, 0.1, 0.1]], float)
    else:
        from matplotlib.colors import to_rgb

        rgb = np.array([to_rgb(c) for c in _COLOURS])
    for row, (title, r) in enumerate(picks):
        _draw_subject(axs[row], out, title, r, channels, lesion, rgb)
    handles = ([Patch(color=_LESION_COLOUR, label="lesion")] if lesion else
               [Patch(color=_COLOURS[v], label=n) for n, v in labels.items() if v > 0])
    top = 1 - 0.6 / fig.get_figheight()
    fig.suptitle(f"{_meta.get('name', out.name)} ({out.name}): {len(_rows)} cases", fontsize=10,
                 y=1 - 0.08 / fig.get_figheight(), va="top")
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 7), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1 - 0.35 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 0, 1, top))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _atomic_write_bytes(path, buf.getvalue())
    return path


def _representatives(rows: list[dict]) -> list[tuple[str, dict]]:
    """(row title, metadata row): the first case of each stratum; the first control of each site."""
    picks: list[tuple[str, dict]] = []
    for s in STRATA:
        r = next((r for r in rows if r["stratum"] == s), None)
        if r is not None:
            picks.append((f"stratum: {s}", r))
    shown = {r["case"] for _, r in picks}
    for site in sorted({r["site"] for r in rows}):
        cand = [r for r in rows if r["site"] == site]
        cand.sort(key=lambda r: (r["stratum"] != "control", r["case"] in shown))
        picks.append((f"site: {site}", cand[0]))
    return picks


def _draw_subject(axs, out: Path, title: str, r: dict, channels: list[str], lesion: bool, rgb: np.ndarray) -> None:
    """One row of the preview: each channel's axial slice, then the labels over the base channel on
    axial, coronal and sagittal slices."""
    split = r.get("split", "train")
    img_dir = out / ("imagesTs" if split == "test" else "imagesTr")
    lab_dir = out / ("labelsTs" if split == "test" else "labelsTr")
    imgs = [_load(img_dir / f"{r['case']}_{c:04d}.nii.gz")[0] for c in range(len(channels))]
    lab, aff = _load(lab_dir / f"{r['case']}.nii.gz")
    lab = lab.astype(np.int64)
    base = imgs[-1] if lesion else imgs[0]
    # slices: through the brain centre, or through the most lesion voxels
    ijk = np.rint(np.linalg.solve(aff, np.r_[BRAIN_CENTRE_MM + [8.0, 0.0, 0.0], 1.0])[:3])
    ijk = np.clip(ijk.astype(int), 0, np.array(lab.shape) - 1)
    if lesion and lab.any():
        ijk = np.array([int(np.argmax((lab > 0).sum(axis=tuple(b for b in range(3) if b != a))))
                        for a in range(3)])
    # crop every view to the head: the labelled voxels, or where the image is bright
    fg = lab > 0 if not lesion else base > 0.2 * np.percentile(base, 99.5)
    nz = np.nonzero(fg) if fg.any() else [np.array([0, n - 1]) for n in lab.shape]
    box = [slice(max(int(a.min()) - 2, 0), int(a.max()) + 3) for a in nz]
    views = {
        "axial": lambda a: a[box[0], box[1], ijk[2]].T,
        "coronal": lambda a: a[box[0], ijk[1], box[2]].T,
        "sagittal": lambda a: a[ijk[0], box[1], box[2]].T,
    }

    def window(a):
        v = a[a > np.percentile(a, 50)] if a.size else a
        lo, hi = (np.percentile(v, [1, 99.5]) if v.size else (0.0, 1.0))
        return lo, hi if hi > lo else lo + 1

    for c, ch in enumerate(channels):
        lo, hi = window(imgs[c])
        ax = axs[c]
        ax.imshow(views["axial"](imgs[c]), origin="lower", cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"{ch} axial", fontsize=8)
    lo, hi = window(base)
    for k, v in enumerate(("axial", "coronal", "sagittal")):
        ax = axs[len(channels) + k]
        ax.imshow(views[v](base), origin="lower", cmap="gray", vmin=lo, vmax=hi)
        lv = views[v](lab)
        over = np.zeros(lv.shape + (4,))
        over[..., :3] = rgb[np.clip(lv, 0, len(rgb) - 1)]
        over[..., 3] = np.where(lv > 0, 0.85 if lesion else 0.45, 0.0)
        ax.imshow(over, origin="lower", interpolation="nearest")
        ax.set_title(f"labels {v}", fontsize=8)
    for ax in axs:
        ax.set_xticks([])
        ax.set_yticks([])
    extra = f", {r.get('n_lesions')} lesions" if lesion else ""
    axs[0].set_ylabel(f"{title}\n{r['case']} ({r['stratum']}, {r['site']},\n"
                           f"{float(r['age']):.1f} {r.get('age_unit', '')}{extra})",
                           fontsize=8)

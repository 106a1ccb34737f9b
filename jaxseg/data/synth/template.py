"""The label template: an 8-class label map derived from the MNI ICBM152 2009 (no download).

:func:`template_label_map` derives an 8-class label map (:data:`LABELS`: background, CSF,
cortical GM, WM, ventricles, cerebellum, deep GM, brainstem) from nilearn's bundled MNI152 2009
T1 and grey/white-matter probability maps (no download), by region rules on MNI coordinates
(brain = GM + WM > 0.3, closed and filled; tissue = GM + WM >= 0.5; CSF = brain and not
tissue; the regions by MNI position and depth in the brain), with these refinements: the GM/WM
boundary uses a lightly smoothed probability difference, and WM within 4 mm of the brain mask's
outer surface becomes cortex (the averaged template blurs the convexity's cortex into WM);
ventricles and deep GM use ellipsoidal regions instead of boxes, tiny components are dropped and
the masks are smoothed; the cerebellum is separated from the occipital / temporal lobes by a
marker watershed on the T1 (the tentorium is dark), not by a plane; the brainstem is a tilted
elliptic cylinder following the pons and medulla. :func:`load_template` computes it once per
resolution and caches it under ``$JAXSEG_CACHE`` (default ``~/.cache/jaxseg``), written
atomically.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from jaxseg.fileio import atomic_path

LABELS: dict[str, int] = {
    "background": 0,
    "csf": 1,
    "cortical_gm": 2,
    "white_matter": 3,
    "ventricles": 4,
    "cerebellum": 5,
    "deep_gm": 6,
    "brainstem": 7,
}
LESION_LABELS: dict[str, int] = {"background": 0, "lesion": 1}

BG, CSF, CGM, WM, VENT, CEREB, DGM, STEM = range(8)
N_LABELS = len(LABELS)

# Field of view of every subject, MNI mm (voxel centres of the first / last voxel lie inside);
# the template brain spans x -72..72, y -106..74, z -72..82; the margin takes the deformations.
FOV_MM: tuple[tuple[float, float], ...] = ((-84.0, 84.0), (-120.0, 88.0), (-72.0, 94.0))
# Centre for scaling / rotating a subject (about the centre of the template brain), MNI mm.
BRAIN_CENTRE_MM = np.array([0.0, -18.0, 10.0])

_TEMPLATE_VERSION = 2  # bump when the template rules change (invalidates the cache)



def cache_dir() -> Path:
    """Where derived template files are cached: ``$JAXSEG_CACHE`` or ``~/.cache/jaxseg``."""
    env = os.environ.get("JAXSEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxseg"


def _ellipsoid(X, Y, Z, centre, radii):
    return (((X - centre[0]) / radii[0]) ** 2 + ((Y - centre[1]) / radii[1]) ** 2
            + ((Z - centre[2]) / radii[2]) ** 2)


def _drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def _smooth_mask(mask: np.ndarray, sigma_vox: float) -> np.ndarray:
    return ndi.gaussian_filter(mask.astype(np.float32), sigma_vox) > 0.5


def template_label_map(resolution: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Derive the 8-class label map (:data:`LABELS`) from nilearn's MNI152 2009, ``resolution`` mm.

    Returns ``(labels uint8 (X, Y, Z), affine 4x4)`` (RAS, MNI mm). No caching: see
    :func:`load_template`. Takes ~6 s at 1 mm, ~3 s at 2 mm.
    """
    from nilearn import datasets as nds

    t1_img = nds.load_mni152_template(resolution=resolution)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(nds.load_mni152_gm_template(resolution=resolution).dataobj, dtype=np.float32)
    wm = np.asarray(nds.load_mni152_wm_template(resolution=resolution).dataobj, dtype=np.float32)
    if t1.max() > 1.5:  # older nilearn versions ship 0..255
        t1 = t1 / t1.max()
    if gm.max() > 1.5:
        gm, wm = gm / 255.0, wm / 255.0
    shape = t1.shape
    vs = float(abs(affine[0, 0]))
    X, Y, Z = (affine[i, i] * np.arange(shape[i], dtype=np.float32) + affine[i, 3]
               for i in range(3))
    X, Y, Z = X[:, None, None], Y[None, :, None], Z[None, None, :]

    # brain, tissue, CSF, cortical GM / WM (smoothed GM/WM boundary)
    p_tissue = gm + wm
    brain = ndi.binary_closing(p_tissue > 0.3, iterations=max(1, round(3 / vs)))
    brain = ndi.binary_fill_holes(brain)
    tissue = (p_tissue >= 0.5) & brain
    dist = ndi.distance_transform_edt(brain, sampling=vs)
    gm_dom = ndi.gaussian_filter(gm - wm, 0.7 / vs) > 0
    lab = np.zeros(shape, np.uint8)
    lab[brain] = CSF
    lab[tissue & gm_dom] = CGM
    lab[tissue & ~gm_dom] = WM
    # the averaged template blurs the convexity's cortex into WM: keep a cortical rim (~3 mm)
    # under the outer brain surface (cerebellum and brainstem are relabelled below anyway)
    lab[(lab == WM) & (dist < 4.0)] = CGM

    # ventricles: deep CSF in a central ellipsoid (lateral + third ventricle, occipital horns)
    vent = (lab == CSF) & (dist > 10) & (_ellipsoid(X, Y, Z, (0, -14, 12), (32, 52, 24)) < 1)
    vent = _drop_small(vent, 200 / vs**3)
    vent = _smooth_mask(vent, 1.0 / vs) & (lab == CSF)
    lab[vent] = VENT

    # deep GM: GM-dominant deep tissue in a central ellipsoid (caudate, putamen, thalamus)
    dgm = tissue & gm_dom & (dist > 16) & (_ellipsoid(X, Y, Z, (0, -6, 6), (30, 30, 16)) < 1)
    dgm = _drop_small(_smooth_mask(dgm, 1.2 / vs) & tissue, 100 / vs**3)
    lab[dgm] = DGM

    # cerebellum: marker watershed on the T1 (the tentorium and the fourth ventricle are dark)
    cost = np.clip(255 * (1 - ndi.gaussian_filter(t1, 0.5 / vs)), 0, 255).astype(np.uint8)
    markers = np.zeros(shape, np.int16)
    markers[~brain] = 1
    markers[(Z > 5) & tissue] = 2  # cerebrum
    for c in [(48, -25, -25), (-48, -25, -25), (20, -95, 5), (-20, -95, 5)]:  # temporal, occipital
        markers[(_ellipsoid(X, Y, Z, c, (8, 8, 8)) < 1) & tissue] = 2
    for c in [(25, -65, -40), (-25, -65, -40), (0, -60, -25)]:  # hemispheres, vermis
        markers[(_ellipsoid(X, Y, Z, c, (12, 10, 8)) < 1) & tissue] = 3
    markers[(_ellipsoid(X, Y, Z, (0, -30, -45), (6, 6, 12)) < 1) & tissue] = 4  # pons / medulla
    markers[(_ellipsoid(X, Y, Z, (0, -25, -20), (5, 5, 5)) < 1) & tissue] = 4
    ws = ndi.watershed_ift(cost, markers)
    cereb = (ws == 3) & tissue
    lab[cereb] = CEREB

    # brainstem: tissue in a tilted elliptic cylinder (midbrain -> pons -> medulla), below z = -8
    yc = -25 + 0.34 * (Z + 10)
    rx = np.interp(Z, [-80, -50, -40, 0], [9, 10, 16, 16])
    ry = np.interp(Z, [-80, -50, -40, 0], [8, 9, 13, 13])
    stem = tissue & ~cereb & ((X / rx) ** 2 + ((Y - yc) / ry) ** 2 < 1) & (Z < -8)
    stem = _smooth_mask(stem, 1.0 / vs) & tissue & ~cereb
    lab[stem] = STEM
    return lab, affine


@dataclass(eq=False)
class Template:
    """A label map in MNI space (RAS, mm) from which subjects are drawn."""

    labels: np.ndarray  # uint8 (X, Y, Z)
    affine: np.ndarray  # 4x4, voxel -> MNI mm (diagonal)
    _vent_field: tuple | None = field(default=None, repr=False)
    _cereb_box: tuple | None = field(default=None, repr=False)

    @property
    def resolution(self) -> float:
        return float(abs(self.affine[0, 0]))

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3]

    def volumes_ml(self) -> dict[str, float]:
        counts = np.bincount(self.labels.ravel(), minlength=N_LABELS)
        return {name: float(counts[v]) * self.resolution**3 / 1000 for name, v in LABELS.items()}

    def centroid_mm(self, label: int) -> np.ndarray:
        idx = np.argwhere(self.labels == label)
        return idx.mean(0) * self.resolution + self.origin

    def lookup(self, q: np.ndarray) -> np.ndarray:
        """Nearest-neighbour label at MNI points ``q`` (3, ...); 0 outside the template."""
        shape = self.labels.shape
        out_of = np.zeros(q.shape[1:], bool)
        idx = []
        for a in range(3):
            i = np.rint((q[a] - self.origin[a]) / self.affine[a, a]).astype(np.intp)
            out_of |= (i < 0) | (i >= shape[a])
            idx.append(np.clip(i, 0, shape[a] - 1))
        lab = self.labels[idx[0], idx[1], idx[2]]
        lab[out_of] = 0
        return lab

    def cerebellum_box(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(centroid, low corner, high corner) of the cerebellum, MNI mm."""
        if self._cereb_box is None:
            idx = np.argwhere(self.labels == CEREB)
            mm = idx * self.resolution + self.origin
            self._cereb_box = (mm.mean(0), mm.min(0), mm.max(0))
        return self._cereb_box

    def vent_field(self):
        """The field that inflates the ventricles: gradient of the smoothed ventricle mask.

        Returned as ``(grad (3, X, Y, Z) float32 in template-voxel units of a >= 2 mm grid,
        origin, step)``; the gradient is scaled so its largest norm is 1 (mm per unit time).
        """
        if self._vent_field is None:
            step = max(1, round(2.0 / self.resolution))
            vent = (self.labels == VENT).astype(np.float32)
            if step > 1:
                s = [n // step * step for n in vent.shape]
                vent = vent[: s[0], : s[1], : s[2]].reshape(
                    s[0] // step, step, s[1] // step, step, s[2] // step, step).mean((1, 3, 5))
            h = self.resolution * step
            smooth = ndi.gaussian_filter(vent, 5.0 / h)
            grad = np.stack(np.gradient(smooth, h)).astype(np.float32)
            grad /= max(float(np.sqrt((grad**2).sum(0)).max()), 1e-6)
            origin = self.origin + (step - 1) * self.resolution / 2.0
            self._vent_field = (grad, origin, h)
        return self._vent_field


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def load_template(resolution: int = 1, *, cache: str | Path | None = None,
                  refresh: bool = False) -> Template:
    """The template label map at ``resolution`` mm (1 or 2), computed once and cached.

    The cache file is ``<cache>/mni152_labels_v<version>_<res>mm.npz`` (``cache`` defaults to
    :func:`cache_dir`), written atomically; ``refresh=True`` recomputes it.
    """
    resolution = int(resolution)
    if resolution not in (1, 2):
        raise ValueError(f"template resolution must be 1 or 2 mm, got {resolution}")
    folder = Path(cache).expanduser() if cache is not None else cache_dir()
    path = folder / f"mni152_labels_v{_TEMPLATE_VERSION}_{resolution}mm.npz"
    if path.is_file() and not refresh:
        try:
            with np.load(path) as z:
                return Template(z["labels"].astype(np.uint8), z["affine"].astype(np.float64))
        except Exception:  # a corrupt cache file is recomputed, never trusted
            pass
    labels, affine = template_label_map(resolution)
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=labels, affine=affine)
    try:
        _atomic_write_bytes(path, buf.getvalue())
    except OSError:  # a read-only cache is not fatal
        pass
    return Template(labels, affine)

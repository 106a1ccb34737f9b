"""The embedded default dataset: synthetic brain MRI cohorts drawn from the MNI ICBM152 2009.

No real cohort can ship, so the project makes its own from a real anatomy (numpy / scipy only,
no JAX; deterministic from a seed).

Template
--------
:func:`template_label_map` derives an 8-class label map (:data:`LABELS`: background, CSF,
cortical GM, WM, ventricles, cerebellum, deep GM, brainstem) from nilearn's bundled MNI152 2009
T1 and grey/white-matter probability maps (no download), by region rules on MNI coordinates
(``/work/shared/DESIGN.md``, "The embedded default data"), with these changes: the GM/WM
boundary uses a lightly smoothed probability difference, and WM within 4 mm of the brain mask's
outer surface becomes cortex (the averaged template blurs the convexity's cortex into WM);
ventricles and deep GM use ellipsoidal regions instead of boxes, tiny components are dropped and
the masks are smoothed; the cerebellum is separated from the occipital / temporal lobes by a
marker watershed on the T1 (the tentorium is dark), not by a plane; the brainstem is a tilted
elliptic cylinder following the pons and medulla. :func:`load_template` computes it once per
resolution and caches it under ``$JAXSEG_CACHE`` (default ``~/.cache/jaxseg``), written
atomically.

Subjects
--------
:func:`make_subject` draws one subject at the output spacing (all resampling is done at the output
resolution, from the cached 1 mm label map): a random affine (small rotation, per-axis scale,
translation), a smooth random displacement field (a few mm), a global scale by age (younger =
smaller), an age-dependent ventricle enlargement, and per stratum:

* ``"control"``;
* ``"ventriculomegaly"``: ventricles inflated 2-4x by the flow of a smooth field pointing into
  them (a diffeomorphism: the surrounding WM and deep GM are pushed outward, not overwritten);
* ``"cerebellar_hypoplasia"``: the cerebellum shrunk (anisotropically, 60-90% per axis), often
  displaced downward / backward (Chiari-like), sometimes missing (15%); the freed posterior fossa
  becomes CSF.

Appearance is SynthSeg-like: per site (:func:`make_site`) random per-label means and stds on top
of a sequence's base contrast, a PSF (in-plane resolution and a thick-slice axis per site),
a smooth multiplicative bias field, Rician noise and a scanner gain. The grey/white contrast
depends on age in weeks (myelination): on the T1-like channel WM is darker than cortical GM at
26 weeks and brighter at 45 weeks (the reverse on T2), crossing at about 36 weeks. With
``lesions=True`` MS-like lesions (3-30 per subject, ellipsoids and blobs of 2 mm to ~1 cm, 60%
periventricular, inside WM) are hyperintense on FLAIR/T2 and hypointense on T1.

Skull stripping: the target datasets (FeTA, dHCP, MNI-registered MSSEG) come brain-extracted with
an exact zero background, and the nnU-Net-style preprocessing crops to the nonzero bounding box
and z-scores over nonzero voxels. So by default (``skull_strip=True``) every channel is set to
exactly 0 outside :func:`brain_mask` (the tissue map's non-background labels dilated by one
voxel), after noise, bias and gain, leaving the voxels inside untouched; any voxel inside that
came out exactly 0 is raised to :data:`MIN_BRAIN_INTENSITY`, so "nonzero" is exactly the brain
mask. ``skull_strip=False`` keeps the Rician-noise background of an unprocessed scan.

Cohorts
-------
:func:`write_cohort` writes an nnU-Net v2 raw dataset (``imagesTr``, ``labelsTr``, ``imagesTs``,
``labelsTs``, ``dataset.json``, ``metadata.csv`` and ``preview.png``; see its docstring), in
parallel over subjects, each subject seeded from ``(seed, index)``. :func:`preview_png` draws a
picture of a written cohort.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from jaxseg.fileio import atomic_path, write_bytes_atomic

__all__ = [
    "LABELS",
    "LESION_LABELS",
    "STRATA",
    "CHANNELS",
    "FOV_MM",
    "DEFAULT_STRATA",
    "METADATA_COLUMNS",
    "Template",
    "Site",
    "template_label_map",
    "load_template",
    "cache_dir",
    "output_grid",
    "brain_mask",
    "MIN_BRAIN_INTENSITY",
    "make_site",
    "make_subject",
    "write_cohort",
    "preview_png",
]

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
STRATA: tuple[str, ...] = ("control", "ventriculomegaly", "cerebellar_hypoplasia")
CHANNELS: tuple[str, ...] = ("T1", "T2", "FLAIR")  # the sequences a subject can have
DEFAULT_STRATA: dict[str, float] = {
    "control": 0.8, "ventriculomegaly": 0.1, "cerebellar_hypoplasia": 0.1}

BG, CSF, CGM, WM, VENT, CEREB, DGM, STEM = range(8)
N_LABELS = len(LABELS)

# Field of view of every subject, MNI mm (voxel centres of the first / last voxel lie inside);
# the template brain spans x -72..72, y -106..74, z -72..82; the margin takes the deformations.
FOV_MM: tuple[tuple[float, float], ...] = ((-84.0, 84.0), (-120.0, 88.0), (-72.0, 94.0))
# Centre for scaling / rotating a subject (about the centre of the template brain), MNI mm.
BRAIN_CENTRE_MM = np.array([0.0, -18.0, 10.0])

_TEMPLATE_VERSION = 2  # bump when the template rules change (invalidates the cache)

# Base contrast per sequence and label (bg, CSF, cGM, WM, vent, cereb, dGM, stem), on a 0..1 scale,
# for an unmyelinated (young, ~26 weeks) and a myelinated (adult-like) brain; a subject's table is
# the blend by its myelination, plus site and subject offsets.
_CONTRAST_YOUNG = {
    "T1": [0.0, 0.12, 0.56, 0.32, 0.10, 0.47, 0.60, 0.50],
    "T2": [0.0, 0.95, 0.42, 0.72, 0.97, 0.55, 0.45, 0.50],
    "FLAIR": [0.0, 0.10, 0.50, 0.62, 0.07, 0.50, 0.52, 0.52],
}
_CONTRAST_ADULT = {
    "T1": [0.0, 0.15, 0.50, 0.80, 0.13, 0.60, 0.63, 0.70],
    "T2": [0.0, 0.92, 0.55, 0.32, 0.95, 0.50, 0.45, 0.38],
    "FLAIR": [0.0, 0.10, 0.60, 0.45, 0.07, 0.52, 0.55, 0.50],
}
# Skull stripping: the value given to a voxel inside the brain mask whose intensity came out exactly
# 0 (or below), so that nonzero == brain mask. In scanner units (gain >= 200, noise sigma >= 2):
# invisible, and still a normal number in float16, so a half-precision cast keeps it nonzero.
MIN_BRAIN_INTENSITY = 1e-3
# Lesion intensity relative to the subject's WM mean: (low, high) of a per-lesion uniform factor.
_LESION_FACTOR = {"T1": (0.45, 0.75), "T2": (1.6, 2.3), "FLAIR": (1.6, 2.1)}


# =========================================================================== template


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

    # brain, tissue, CSF, cortical GM / WM (the DESIGN.md rules, smoother GM/WM boundary)
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
        write_bytes_atomic(path, buf.getvalue())
    except OSError:  # a read-only cache is not fatal
        pass
    return Template(labels, affine)


# =========================================================================== sites and subjects


@dataclass(eq=False)
class Site:
    """Acquisition parameters of one site (scanner / protocol)."""

    index: int
    thick_axis: int  # array axis of the thick slices: 2 axial, 1 coronal, 0 sagittal
    slice_thickness: float  # mm, FWHM of the PSF along thick_axis
    inplane_res: float  # mm, FWHM of the PSF in-plane
    noise: float  # Rician noise sigma, relative to a 0..1 intensity scale
    bias: float  # std of the log bias field
    gain: float  # scanner units per intensity unit
    offsets: dict  # channel -> (8,) per-label mean offsets
    stds: dict  # channel -> (8,) per-label within-label std

    @property
    def name(self) -> str:
        return f"site{self.index}"


def make_site(index: int, seed: int = 0) -> Site:
    """Site ``index`` of the cohort with seed ``seed`` (deterministic). Thick-slice axes cycle
    axial, coronal, sagittal over sites 0, 1, 2, ..."""
    rng = np.random.default_rng([int(seed), 0x517E, int(index)])
    thick_axis = (2, 1, 0)[index % 3]
    thickness = float(rng.uniform(2.0, 4.5))
    inplane = float(rng.uniform(0.8, 1.3))
    noise = float(rng.uniform(0.01, 0.035))
    bias = float(rng.uniform(0.06, 0.22))
    gain = float(np.round(rng.uniform(200.0, 2000.0), 1))
    offsets, stds = {}, {}
    for ch in CHANNELS:  # always drawn for every channel, so channel choice changes nothing else
        off = np.clip(rng.normal(0.0, 0.04, N_LABELS), -0.06, 0.06)
        std = rng.uniform(0.015, 0.05, N_LABELS)
        off[BG], std[BG] = 0.0, 0.0
        offsets[ch], stds[ch] = off, std
    return Site(index, thick_axis, thickness, inplane, noise, bias, gain, offsets, stds)


def output_grid(spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine of the output grid at ``spacing`` mm covering :data:`FOV_MM`."""
    spacing = float(spacing)
    if not spacing > 0:
        raise ValueError(f"spacing must be > 0, got {spacing}")
    shape = tuple(int(np.floor((hi - lo) / spacing + 1e-6)) + 1 for lo, hi in FOV_MM)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [lo for lo, _ in FOV_MM]
    return shape, affine


def _age_effects(age: float, unit: str) -> tuple[float, float, float]:
    """(linear brain scale, myelination 0..1, ventricle volume factor) for an age."""
    if unit == "weeks":  # post-menstrual age
        f = float(np.clip((age - 26.0) / (45.0 - 26.0), 0.0, 1.0))
        scale = (0.3 + 0.7 * f) ** (1.0 / 3.0)  # brain volume ~ linear in age: 0.3x at 26 w
        myelin = 1.0 / (1.0 + np.exp(-(age - 36.0) / 2.5))
        vent = 1.0 + 0.6 * (1.0 - f)  # relatively larger ventricles when young
        return scale, float(myelin), vent
    if unit == "years":  # adult: full size and contrast, mild atrophy after 30
        return 1.0, 1.0, 1.0 + 0.02 * max(age - 30.0, 0.0)
    raise ValueError(f"age_unit must be 'weeks' or 'years', got {unit!r}")


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _upsample_linear(a: np.ndarray, factor: int, shape: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation of ``a`` (..., cx, cy, cz), sampled every ``factor``
    output voxels, to ``shape`` (the last three axes)."""
    if factor == 1:
        return a[..., : shape[0], : shape[1], : shape[2]]
    out = a
    for k, n in enumerate(shape):
        axis = a.ndim - 3 + k
        t = np.arange(n, dtype=np.float32) / factor
        i0 = np.minimum(np.floor(t).astype(np.intp), out.shape[axis] - 2)
        w = (t - i0).astype(np.float32)
        bshape = [1] * out.ndim
        bshape[axis] = n
        w = w.reshape(bshape)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i0 + 1, axis=axis) * w
    return out


def _smooth_noise(rng: np.random.Generator, coarse: Sequence[int], points: np.ndarray,
                  n: int = 1) -> np.ndarray:
    """``n`` smooth random fields: N(0, 1) on a ``coarse`` grid, cubic-interpolated at ``points``
    (3, ...) given in coarse-grid index units."""
    out = []
    for _ in range(n):
        g = rng.standard_normal(tuple(coarse))
        out.append(ndi.map_coordinates(g, points, order=3, mode="nearest", prefilter=True))
    return np.stack(out).astype(np.float32)


def _seed_streams(rng_or_seed, n: int) -> list[np.random.Generator]:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed.spawn(n)
    if isinstance(rng_or_seed, np.random.SeedSequence):
        return [np.random.default_rng(s) for s in rng_or_seed.spawn(n)]
    return np.random.default_rng(rng_or_seed).spawn(n)


def _psf_sigma(site: Site, spacing: float) -> list[float]:
    sig = []
    for a in range(3):
        res = site.slice_thickness if a == site.thick_axis else site.inplane_res
        s_mm = np.sqrt(max(res**2 - spacing**2, 0.0)) / 2.355
        sig.append(float(np.sqrt((s_mm / spacing) ** 2 + 0.35**2)))
    return sig


def brain_mask(tissue: np.ndarray) -> np.ndarray:
    """The skull-stripping mask of an 8-class tissue map: every non-background label, dilated
    by one voxel (6-connected). Returns bool, same shape.

    Why dilated: the outermost label is already (extra-cerebral) CSF, and the PSF spreads its
    signal about a voxel outward; a real brain-extraction mask (BET, the FeTA / dHCP masks) is
    similarly a little generous and keeps that partial-volume edge. It also means the image's
    nonzero region is not literally ``label > 0``, so a network cannot read the background class
    straight off ``image == 0`` and has to find the brain edge from intensities.
    """
    return ndi.binary_dilation(np.asarray(tissue) > 0)


def _skull_strip(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """In place: 0 outside ``mask``; inside, values <= 0 become :data:`MIN_BRAIN_INTENSITY`
    (everything else inside is left exactly as it was)."""
    img[~mask] = 0.0
    low = mask & (img <= 0)
    if low.any():
        img[low] = np.float32(MIN_BRAIN_INTENSITY)
    return img


def _rasterise_lesions(rng, label, spacing, n_lesions, radius_mm=(1.0, 5.0)):
    """MS-like lesions inside WM. Returns (mask uint8, per-lesion id int16 map, n drawn)."""
    shape = label.shape
    wm = label == WM
    lesion_id = np.zeros(shape, np.int16)
    if not wm.any():
        return lesion_id.astype(np.uint8), lesion_id, 0
    # distances (mm) to the ventricles and to cortical GM, on the brain's bounding box
    bb = tuple(slice(max(int(i.min()) - 4, 0), int(i.max()) + 5) for i in np.nonzero(label > 0))
    lb = label[bb]
    d_vent = ndi.distance_transform_edt(lb != VENT, sampling=spacing)
    d_gm = ndi.distance_transform_edt(lb != CGM, sampling=spacing)
    g_vent = np.stack(np.gradient(d_vent))
    wmb = wm[bb]
    near = max(6.0, 1.5 * spacing)
    pools = {
        "periventricular": np.argwhere(wmb & (d_vent <= near)),
        "juxtacortical": np.argwhere(wmb & (d_gm <= spacing + 1.0) & (d_vent > near)),
        "deep": np.argwhere(wmb & (d_vent > near) & (d_gm > spacing + 1.0)),
    }
    kinds = ["periventricular", "deep", "juxtacortical"]
    probs = np.array([0.6, 0.3, 0.1])
    origin = np.array([s.start for s in bb])
    n_drawn = 0
    for k in range(n_lesions):
        kind = kinds[rng.choice(3, p=probs)]
        pool = pools[kind]
        if len(pool) == 0:
            pool = np.argwhere(wmb)
        c = pool[rng.integers(len(pool))]
        r = float(np.exp(rng.uniform(np.log(radius_mm[0]), np.log(radius_mm[1]))))  # equivalent radius, mm
        aspect = float(rng.uniform(1.0, 1.8))
        radii = np.array([r * aspect, r / np.sqrt(aspect), r / np.sqrt(aspect)])
        if kind == "periventricular":  # long axis across the ventricle wall (Dawson's fingers)
            g = g_vent[:, c[0], c[1], c[2]]
            u = g / np.linalg.norm(g) if np.linalg.norm(g) > 1e-6 else rng.standard_normal(3)
            u = u / np.linalg.norm(u)
            v = np.cross(u, rng.standard_normal(3))
            v /= max(np.linalg.norm(v), 1e-9)
            R = np.stack([u, v, np.cross(u, v)])  # rows: lesion axes
        else:
            q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
            R = q.T
        # a blob: the main ellipsoid plus 0-2 smaller satellites overlapping it
        n_sat = int(rng.integers(0, 3))
        sats = [(np.zeros(3), radii)]
        for _ in range(n_sat):
            sats.append((rng.normal(0, 0.6, 3) * radii, radii * rng.uniform(0.4, 0.8)))
        ext = int(np.ceil(2.2 * radii.max() / spacing)) + 1
        cc = c + origin
        lo = np.maximum(cc - ext, 0)
        hi = np.minimum(cc + ext + 1, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        P = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"))
        D = (P - cc.reshape(3, 1, 1, 1)).astype(np.float32) * spacing
        L = np.einsum("ij,j...->i...", R, D)
        inside = np.zeros(P.shape[1:], bool)
        for off, rad in sats:
            inside |= ((((L - off.reshape(3, 1, 1, 1)) / rad.reshape(3, 1, 1, 1)) ** 2).sum(0) < 1)
        inside[tuple(cc - lo)] = True  # every lesion keeps at least its centre voxel
        inside &= wm[sl]
        region = lesion_id[sl]
        region[inside & (region == 0)] = k + 1
        n_drawn += 1
    return (lesion_id > 0).astype(np.uint8), lesion_id, n_drawn


def make_subject(rng_or_seed, template: Template, *, stratum: str = "control", age: float = 40.0,
                 site: int | Site = 0, spacing: float = 2.0, lesions: bool = False,
                 channels: Sequence[str] | None = None, age_unit: str = "weeks",
                 site_seed: int = 0, skull_strip: bool = True,
                 lesion_radius_mm: tuple[float, float] = (1.0, 5.0)) -> dict[str, Any]:
    """Draw one synthetic subject on the :func:`output_grid` at ``spacing`` mm.

    ``rng_or_seed``: a ``np.random.Generator``, a ``SeedSequence``, an int or a sequence of ints
    (e.g. ``(seed, index)``). The subject's random streams (anatomy, abnormality, appearance,
    noise, lesions) are independent children of it, so changing ``stratum``, ``age`` or
    ``channels`` changes only what they control: the same seed with another stratum is the same
    subject with that abnormality. ``site`` is a :class:`Site` or an index (then
    ``make_site(site, site_seed)``). ``age`` is in ``age_unit`` ("weeks" post-menstrual:
    26..45 drives brain size, myelination and ventricle size; "years": adult contrast and size).
    ``channels`` defaults to ``("T1",)``, or ``("T1", "FLAIR")`` with ``lesions=True``.
    ``skull_strip`` (default True): every channel is exactly 0 outside :func:`brain_mask` of the
    tissue map and strictly positive inside (exact zeros there become
    :data:`MIN_BRAIN_INTENSITY`), applied last, so the voxels inside are the same as with
    ``skull_strip=False`` (a Rician-noise background) and the random streams are not touched.

    Returns a dict: ``images`` {channel: float32 (X, Y, Z)}, ``label`` uint8 (the 8-class
    :data:`LABELS` map, or the binary lesion map when ``lesions``), ``tissue`` uint8 (always the
    8-class map), ``lesion`` (uint8 0/1 or None), ``brain_mask`` (bool, :func:`brain_mask` of
    the tissue map, whether or not it was applied), ``affine`` (4x4 RAS, mm) and ``metadata``.
    """
    if stratum not in STRATA:
        raise ValueError(f"unknown stratum {stratum!r}; expected one of {STRATA}")
    if channels is None:
        channels = ("T1", "FLAIR") if lesions else ("T1",)
    channels = tuple(channels)
    for ch in channels:
        if ch not in CHANNELS:
            raise ValueError(f"unknown channel {ch!r}; expected some of {CHANNELS}")
    if not isinstance(site, Site):
        site = make_site(int(site), site_seed)
    r_anat, r_abn, r_app, r_noise, r_les = _seed_streams(rng_or_seed, 5)
    spacing = float(spacing)
    shape, affine = output_grid(spacing)
    scale, myelin, vent_factor = _age_effects(float(age), age_unit)

    # ---------------- anatomy: output voxel -> template MNI point, on a control grid
    f = max(1, int(round(4.0 / spacing)))  # control points every ~4 mm
    cshape = tuple((n - 1 + f - 1) // f + 1 + 1 for n in shape)
    axes = [affine[a, 3] + spacing * f * np.arange(cshape[a], dtype=np.float64) for a in range(3)]
    P = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, cx, cy, cz) subject mm
    angles = np.clip(r_anat.normal(0.0, np.deg2rad(3.0), 3), -np.deg2rad(8), np.deg2rad(8))
    axis_scale = np.exp(np.clip(r_anat.normal(0.0, 0.03, 3), -0.07, 0.07))
    shift = np.clip(r_anat.normal(0.0, 3.0, 3), -6.0, 6.0)
    M = _rotation(angles) @ np.diag(scale * axis_scale)  # template -> subject
    c = BRAIN_CENTRE_MM
    Q = np.einsum("ij,j...->i...", np.linalg.inv(M), P - (c + shift).reshape(3, 1, 1, 1))
    Q += c.reshape(3, 1, 1, 1)
    # smooth random displacement: N(0, 2.5 mm) per component on a ~32 mm grid, cubic
    ext = np.array([hi - lo for lo, hi in FOV_MM])
    coarse = tuple(int(np.ceil(e / 32.0)) + 2 for e in ext)
    pts = (P - np.array([lo for lo, _ in FOV_MM]).reshape(3, 1, 1, 1)) / 32.0 + 0.5
    Q += 2.5 * _smooth_noise(r_anat, coarse, pts, 3)

    # abnormal anatomy: always draw every parameter (the streams stay aligned across strata)
    vm_ratio = float(r_abn.uniform(2.0, 4.0))
    cb_scale = r_abn.uniform(0.6, 0.9, 3)
    cb_shift = np.array([0.0, r_abn.uniform(-4.0, 0.0), r_abn.uniform(-6.0, -1.0)])
    cb_displaced = bool(r_abn.random() < 0.5)
    cb_missing = bool(r_abn.random() < 0.15)

    target = vent_factor * (vm_ratio if stratum == "ventriculomegaly" else 1.0)
    if target > 1.0 + 1e-6:
        Q = _inflate_ventricles(Q.astype(np.float32), template, target)
    Q = _upsample_linear(Q.astype(np.float32), f, shape)
    label = template.lookup(Q)

    cerebellum = "normal"
    if stratum == "cerebellar_hypoplasia":
        cerebellum = _hypoplasia(label, Q, template, cb_scale,
                                 cb_shift if cb_displaced else np.zeros(3), cb_missing)
    del Q

    # ---------------- lesions
    lesion = None
    lesion_id = None
    n_les = 0
    if lesions:
        lesion, lesion_id, n_les = _rasterise_lesions(r_les, label, spacing,
                                                     int(r_les.integers(3, 31)), lesion_radius_mm)

    # ---------------- appearance
    images = {}
    mask = brain_mask(label)
    sig = _psf_sigma(site, spacing)
    bias_pts = np.stack(np.meshgrid(*[np.linspace(0.5, 4.5, n, dtype=np.float32) for n in cshape],
                                    indexing="ij"))
    # per-channel subject draws happen for every known channel, in a fixed order
    jitter = {ch: np.clip(r_app.normal(0.0, 0.02, N_LABELS), -0.03, 0.03) for ch in CHANNELS}
    gamma = {ch: float(np.exp(np.clip(r_app.normal(0.0, 0.08), -0.2, 0.2))) for ch in CHANNELS}
    les_fac = {ch: r_app.uniform(*_LESION_FACTOR[ch], 64) for ch in CHANNELS}
    for ch in CHANNELS:
        # keep the noise stream aligned whatever the channel selection: one child per channel
        r_ch = r_noise.spawn(1)[0]
        if ch not in channels:
            continue
        young, adult = np.array(_CONTRAST_YOUNG[ch]), np.array(_CONTRAST_ADULT[ch])
        means = (1 - myelin) * young + myelin * adult + site.offsets[ch] + jitter[ch]
        means[BG] = 0.0
        means = np.maximum(means, 0.02 * (np.arange(N_LABELS) > 0))
        stds = site.stds[ch]
        img = means.astype(np.float32)[label]
        img += stds.astype(np.float32)[label] * r_ch.standard_normal(shape, dtype=np.float32)
        if lesion_id is not None and n_les:
            wm_mean = means[WM]
            fac = np.concatenate([[1.0], les_fac[ch]]).astype(np.float32)
            lid = np.minimum(lesion_id, 64)
            m = lesion_id > 0
            img[m] = (wm_mean * fac[lid[m]]
                      + stds[WM] * r_ch.standard_normal(int(m.sum()), dtype=np.float32))
        img = ndi.gaussian_filter(img, sig, mode="constant")
        logb = site.bias * _smooth_noise(r_ch, (5, 5, 5), bias_pts, 1)[0]
        img *= _upsample_linear(np.exp(logb)[None].astype(np.float32), f, shape)[0]
        np.maximum(img, 0, out=img)
        img **= gamma[ch]
        n1 = r_ch.standard_normal(shape, dtype=np.float32)
        n2 = r_ch.standard_normal(shape, dtype=np.float32)
        img = np.sqrt((img + site.noise * n1) ** 2 + (site.noise * n2) ** 2)
        img *= np.float32(site.gain)
        img = img.astype(np.float32, copy=False)
        if skull_strip:  # last, after noise / bias / gain: the brain voxels are unchanged
            _skull_strip(img, mask)
        images[ch] = img

    counts = np.bincount(label.ravel(), minlength=N_LABELS)
    vox_ml = spacing**3 / 1000.0
    meta = {
        "stratum": stratum,
        "age": float(age),
        "age_unit": age_unit,
        "site": site.name,
        "spacing": spacing,
        "brain_scale": float(scale),
        "myelination": float(myelin),
        "ventricle_target_ratio": float(target),
        "cerebellum": cerebellum,
        "volumes_ml": {name: float(counts[v] * vox_ml) for name, v in LABELS.items()},
        "n_lesions": int(n_les),
        "lesion_ml": float(lesion.sum() * vox_ml) if lesion is not None else 0.0,
        "skull_strip": bool(skull_strip),
    }
    return {
        "images": images,
        "label": lesion if lesions else label,
        "tissue": label,
        "lesion": lesion,
        "brain_mask": mask,
        "affine": affine,
        "metadata": meta,
    }


# Flow time (mm of travel at the field's top speed) -> ventricle volume ratio, measured on the
# 1 mm template at 2 mm output (3 subjects, spread < 3%); inverted by interpolation.
_VENT_FLOW_T = (0.0, 2.0, 4.0, 6.0, 8.0, 11.0, 14.0, 18.0, 22.0, 27.0, 33.0, 40.0)
_VENT_FLOW_RATIO = (1.0, 1.38, 1.82, 2.28, 2.74, 3.37, 3.92, 4.54, 5.01, 5.47, 5.85, 6.13)
_VENT_FLOW_STEP = 0.5


def _inflate_ventricles(Q: np.ndarray, template: Template, ratio: float) -> np.ndarray:
    """Move template sample points along the ventricle field (backward flow): the ventricles
    grow by about ``ratio`` in volume and push the surrounding tissue outward."""
    grad, origin, h = template.vent_field()
    total = float(np.interp(ratio, _VENT_FLOW_RATIO, _VENT_FLOW_T))
    n = max(1, int(np.ceil(total / _VENT_FLOW_STEP)))
    dt = total / n
    Q = Q.copy()
    org = origin.reshape(3, 1, 1, 1).astype(np.float32)
    for _ in range(n):
        idx = (Q - org) / np.float32(h)
        for a in range(3):
            v = ndi.map_coordinates(grad[a], idx, order=1, mode="constant", cval=0.0)
            Q[a] += np.float32(dt) * v
    return Q


def _hypoplasia(label, Q, template, cb_scale, cb_shift, missing) -> str:
    """Shrink / displace / remove the cerebellum in place; freed space becomes CSF."""
    was = label == CEREB
    if missing:
        label[was] = CSF
        return "missing"
    c, lo, hi = template.cerebellum_box()
    lo, hi = lo - 12.0, hi + 12.0
    box = np.ones(label.shape, bool)
    for a in range(3):
        box &= (Q[a] >= lo[a]) & (Q[a] <= hi[a])
    cand = box & ((label == CEREB) | (label == CSF) | (label == BG))
    q = Q[:, cand]
    q2 = c[:, None] + (q - c[:, None] - cb_shift[:, None]) / cb_scale[:, None]
    new = template.lookup(q2) == CEREB
    old = label[cand]
    out = old.copy()
    out[(old == CEREB) & ~new] = CSF
    out[new] = CEREB
    label[cand] = out
    return "displaced" if np.any(cb_shift != 0) else "small"


# =========================================================================== cohorts


def _largest_remainder(props: np.ndarray, n: int) -> np.ndarray:
    raw = props / props.sum() * n
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path, tmp_dir: Path) -> None:
    """Write ``arr`` to ``path`` atomically (``tmp_dir`` is unused: kept for the callers)."""
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if arr.dtype == np.uint8:
        img.header.set_data_dtype(np.uint8)
    # same basename as the final file, so the gzip header (and the bytes) are the same
    with atomic_path(path, same_name=True) as tmp:
        nib.save(img, tmp)


def _subject_job(args: dict) -> dict:
    """Make one subject and write its files; runs in a worker process."""
    template = _WORKER_TEMPLATE if args.get("template") is None else args["template"]
    rng = np.random.default_rng([args["seed"], args["index"]])
    subj = make_subject(rng, template, stratum=args["stratum"], age=args["age"],
                        site=args["site"], spacing=args["spacing"], lesions=args["lesions"],
                        channels=args["channels"], age_unit=args["age_unit"],
                        skull_strip=args.get("skull_strip", True),
                        lesion_radius_mm=args.get("lesion_radius_mm", (1.0, 5.0)))
    out, tmp = Path(args["out_dir"]), Path(args["tmp_dir"])
    img_dir = out / ("imagesTs" if args["split"] == "test" else "imagesTr")
    lab_dir = out / ("labelsTs" if args["split"] == "test" else "labelsTr")
    case = args["case"]
    for c, ch in enumerate(args["channels"]):
        _save_nifti(subj["images"][ch], subj["affine"], img_dir / f"{case}_{c:04d}.nii.gz", tmp)
    _save_nifti(subj["label"].astype(np.uint8), subj["affine"], lab_dir / f"{case}.nii.gz", tmp)
    return {"case": case, "metadata": subj["metadata"]}


_WORKER_TEMPLATE: Template | None = None


def _init_worker(labels: np.ndarray, affine: np.ndarray) -> None:
    global _WORKER_TEMPLATE
    _WORKER_TEMPLATE = Template(labels, affine)


METADATA_COLUMNS = ("case", "stratum", "age", "site", "split", "age_unit", "brain_scale",
                    "cerebellum", "ventricles_ml", "cerebellum_ml", "brain_ml", "n_lesions",
                    "lesion_ml")


def write_cohort(out_dir: str | Path, n_subjects: int, *, seed: int = 0, spacing: float = 2.0,
                 flavour: str = "tissue", strata: Mapping[str, float] | None = None,
                 sites: int = 3, age_range: tuple[float, float] | None = None,
                 n_test: int | None = None, channels: Sequence[str] | None = None,
                 workers: int = 2, progress: bool = True, preview: bool = True,
                 overwrite: bool = False, template: Template | None = None,
                 name: str | None = None, skull_strip: bool = True,
                 lesion_radius_mm: tuple[float, float] = (1.0, 5.0)) -> dict[str, Any]:
    """Write a synthetic cohort as an nnU-Net v2 raw dataset in ``out_dir``.

    * ``flavour="tissue"``: labels = :data:`LABELS` (8 classes); channels ``("T1",)`` by default,
      ``channels=("T1", "T2")`` for two; ages in weeks PMA, default ``age_range`` (26, 45).
    * ``flavour="lesion"``: labels = :data:`LESION_LABELS` (binary); channels ``("T1", "FLAIR")``;
      adult anatomy, ages in years, default ``age_range`` (20, 60); default strata all control.
    * ``strata``: name -> proportion (default 80% control, 10% ventriculomegaly, 10% cerebellar
      hypoplasia); counts are allocated exactly (largest remainder) and shuffled.
    * ``sites``: number of sites, balanced; ``n_test``: held-out cases (default 20%, stratified
      by stratum) written to ``imagesTs`` / ``labelsTs``.
    * ``skull_strip`` (default True): brain-extracted images, exactly 0 outside
      :func:`brain_mask` and nonzero inside (see :func:`make_subject`), like the real datasets;
      False keeps the noisy background. Recorded in ``dataset.json`` (``synth.skull_strip`` and
      the description).

    Files: ``imagesTr/synth_0001_0000.nii.gz`` (4-digit channel suffix),
    ``labelsTr/synth_0001.nii.gz`` (uint8), ``imagesTs/``, ``labelsTs/``, ``dataset.json``,
    ``metadata.csv`` (columns :data:`METADATA_COLUMNS`) and, with ``preview``, ``preview.png``.
    Each file is written to a temporary name (under ``out_dir/.tmp``) and renamed, ``dataset.json``
    last, so an interrupted run leaves whole files and no ``dataset.json``. Subject ``i`` is drawn
    from ``default_rng([seed, i])`` whatever the number of ``workers`` (a "spawn" process pool
    when > 1), so the files are byte-identical for a seed. The template defaults to
    ``load_template(1)`` (``load_template(2)`` for spacings >= 3 mm). An existing non-empty
    ``out_dir`` is an error unless ``overwrite`` (which removes the previous cohort's files).

    Returns a summary dict: ``out_dir``, ``cases`` (the metadata rows), ``dataset_json``,
    ``preview`` (path or None), ``seconds``.
    """
    t0 = time.perf_counter()
    if flavour not in ("tissue", "lesion"):
        raise ValueError(f"flavour must be 'tissue' or 'lesion', got {flavour!r}")
    n_subjects = int(n_subjects)
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    lesions = flavour == "lesion"
    if channels is None:
        channels = ("T1", "FLAIR") if lesions else ("T1",)
    channels = tuple(channels)
    for ch in channels:
        if ch not in CHANNELS:
            raise ValueError(f"unknown channel {ch!r}; expected some of {CHANNELS}")
    if len(set(channels)) != len(channels):
        raise ValueError(f"repeated channel in {channels}")
    age_unit = "years" if lesions else "weeks"
    if age_range is None:
        age_range = (20.0, 60.0) if lesions else (26.0, 45.0)
    a_lo, a_hi = float(age_range[0]), float(age_range[1])
    if not a_lo <= a_hi:
        raise ValueError(f"age_range must be (low, high), got {age_range}")
    if strata is None:
        strata = {"control": 1.0} if lesions else DEFAULT_STRATA
    for s, p in strata.items():
        if s not in STRATA:
            raise ValueError(f"unknown stratum {s!r}; expected some of {STRATA}")
        if not (p >= 0):
            raise ValueError(f"stratum proportion for {s!r} must be >= 0, got {p}")
    names = list(strata)
    props = np.array([float(strata[s]) for s in names])
    if props.sum() <= 0:
        raise ValueError("stratum proportions sum to 0")
    sites = int(sites)
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if n_test is None:
        n_test = int(round(0.2 * n_subjects)) if n_subjects >= 5 else 0
    n_test = int(n_test)
    lo, hi = (float(v) for v in lesion_radius_mm)
    if not 0 < lo <= hi:
        raise ValueError(f"lesion_radius_mm must be (low, high) with 0 < low <= high, got {lesion_radius_mm}")
    if not 0 <= n_test < n_subjects:
        raise ValueError(f"n_test must be in [0, n_subjects), got {n_test}")

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out}: exists and is not empty (pass overwrite=True to replace it)")
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", ".tmp"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for fn in ("dataset.json", "metadata.csv", "preview.png"):
            (out / fn).unlink(missing_ok=True)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if n_test else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    tmp_dir = out / ".tmp"
    tmp_dir.mkdir(exist_ok=True)

    # cohort-level assignments (one stream, independent of the subjects' own streams)
    rc = np.random.default_rng([int(seed), 0xC0407])
    counts = _largest_remainder(props, n_subjects)
    stratum_of = np.repeat(np.arange(len(names)), counts)
    rc.shuffle(stratum_of)
    site_of = np.arange(n_subjects) % sites
    rc.shuffle(site_of)
    ages = np.round(rc.uniform(a_lo, a_hi, n_subjects), 2)
    # test split: stratified by stratum (largest remainder), random within stratum
    is_test = np.zeros(n_subjects, bool)
    if n_test:
        per = _largest_remainder(counts.astype(float) + 1e-9, n_test)
        per = np.minimum(per, counts)
        short = n_test - per.sum()
        for k in np.argsort(-counts, kind="stable"):  # top up from the largest strata
            add = min(short, counts[k] - per[k])
            per[k] += add
            short -= add
        for k in range(len(names)):
            members = np.flatnonzero(stratum_of == k)
            is_test[rc.permutation(members)[: per[k]]] = True

    site_objs = [make_site(s, int(seed)) for s in range(sites)]
    if template is None:
        template = load_template(1 if spacing < 3 else 2)
    jobs = []
    for i in range(n_subjects):
        jobs.append({
            "seed": int(seed), "index": i, "case": f"synth_{i + 1:04d}",
            "stratum": names[stratum_of[i]], "age": float(ages[i]), "age_unit": age_unit,
            "site": site_objs[site_of[i]], "spacing": float(spacing), "lesions": lesions,
            "lesion_radius_mm": tuple(float(v) for v in lesion_radius_mm),
            "channels": channels, "split": "test" if is_test[i] else "train",
            "skull_strip": bool(skull_strip),
            "out_dir": str(out), "tmp_dir": str(tmp_dir), "template": None,
        })

    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    bar = tqdm(total=n_subjects, desc=f"synth {flavour} {spacing:g}mm", unit="case",
               disable=not progress)
    try:
        if workers > 1 and n_subjects > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = mp.get_context("spawn")  # never fork a process that may hold JAX threads
            with ProcessPoolExecutor(max_workers=min(workers, n_subjects), mp_context=ctx,
                                     initializer=_init_worker,
                                     initargs=(template.labels, template.affine)) as pool:
                futs = [pool.submit(_subject_job, j) for j in jobs]
                try:
                    for fut in as_completed(futs):
                        r = fut.result()
                        results[r["case"]] = r
                        bar.update(1)
                except BaseException:
                    for fu in futs:
                        fu.cancel()
                    raise
        else:
            for j in jobs:
                r = _subject_job({**j, "template": template})
                results[r["case"]] = r
                bar.update(1)
    finally:
        bar.close()

    rows = []
    for j in jobs:
        m = results[j["case"]]["metadata"]
        v = m["volumes_ml"]
        rows.append({
            "case": j["case"], "stratum": m["stratum"], "age": f"{m['age']:.2f}",
            "site": m["site"], "split": j["split"], "age_unit": m["age_unit"],
            "brain_scale": f"{m['brain_scale']:.4f}", "cerebellum": m["cerebellum"],
            "ventricles_ml": f"{v['ventricles']:.2f}", "cerebellum_ml": f"{v['cerebellum']:.2f}",
            "brain_ml": f"{sum(x for k, x in v.items() if k != 'background'):.2f}",
            "n_lesions": m["n_lesions"], "lesion_ml": f"{m['lesion_ml']:.3f}",
        })
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(METADATA_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_bytes_atomic(out / "metadata.csv", buf.getvalue().encode())

    n_train = int((~is_test).sum())
    ds = {
        "name": name or f"synth_{flavour}",
        "description": (
            f"jaxseg synthetic {flavour} cohort drawn from the MNI ICBM152 2009 template "
            f"(jaxseg.data.synth): {n_subjects} subjects, seed {seed}, {spacing:g} mm, "
            f"{sites} sites, strata {dict(zip(names, counts.tolist()))}, ages "
            f"{a_lo:g}-{a_hi:g} {age_unit}. "
            + ("Skull-stripped: images are exactly 0 outside the brain mask (tissue labels > 0 "
               "dilated by one voxel) and nonzero inside."
               if skull_strip else "Not skull-stripped: Rician noise in the background.")),
        "channel_names": {str(c): ch for c, ch in enumerate(channels)},
        "labels": dict(LESION_LABELS if lesions else LABELS),
        "numTraining": n_train,
        "numTest": n_subjects - n_train,
        "file_ending": ".nii.gz",
        "reference": "synthetic; anatomy from the MNI ICBM152 2009c template bundled with nilearn",
        "licence": "derived from MNI ICBM152 2009 (see nilearn's licence notes)",
        "synth": {"seed": int(seed), "spacing": float(spacing), "flavour": flavour,
                  "strata": {k: float(v) for k, v in strata.items()}, "sites": sites,
                  "age_range": [a_lo, a_hi], "age_unit": age_unit, "channels": list(channels),
                  "skull_strip": bool(skull_strip),
                  "brain_mask": ("tissue labels > 0, dilated by 1 voxel (6-connected)"
                                 if skull_strip else None),
                  "template_version": _TEMPLATE_VERSION,
                  "template_resolution_mm": template.resolution},
    }
    preview_path = None
    if preview:  # a failed picture must not cost the data: warn and carry on
        try:
            preview_path = preview_png(out, out / "preview.png", _rows=rows, _meta=ds)
        except Exception as e:  # noqa: BLE001
            import warnings

            warnings.warn(f"{out / 'preview.png'}: preview failed: {type(e).__name__}: {e}")
    write_bytes_atomic(out / "dataset.json", (json.dumps(ds, indent=2) + "\n").encode())
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"out_dir": out, "cases": rows, "dataset_json": out / "dataset.json",
            "preview": preview_path, "seconds": time.perf_counter() - t0}


# =========================================================================== preview

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

    # representative subjects: the first case of each stratum; the first control of each site
    picks: list[tuple[str, dict]] = []
    for s in STRATA:
        r = next((r for r in _rows if r["stratum"] == s), None)
        if r is not None:
            picks.append((f"stratum: {s}", r))
    shown = {r["case"] for _, r in picks}
    for site in sorted({r["site"] for r in _rows}):
        cand = [r for r in _rows if r["site"] == site]
        cand.sort(key=lambda r: (r["stratum"] != "control", r["case"] in shown))
        picks.append((f"site: {site}", cand[0]))

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
            ax = axs[row, c]
            ax.imshow(views["axial"](imgs[c]), origin="lower", cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(f"{ch} axial", fontsize=8)
        lo, hi = window(base)
        for k, v in enumerate(("axial", "coronal", "sagittal")):
            ax = axs[row, len(channels) + k]
            ax.imshow(views[v](base), origin="lower", cmap="gray", vmin=lo, vmax=hi)
            lv = views[v](lab)
            over = np.zeros(lv.shape + (4,))
            over[..., :3] = rgb[np.clip(lv, 0, len(rgb) - 1)]
            over[..., 3] = np.where(lv > 0, 0.85 if lesion else 0.45, 0.0)
            ax.imshow(over, origin="lower", interpolation="nearest")
            ax.set_title(f"labels {v}", fontsize=8)
        for ax in axs[row]:
            ax.set_xticks([])
            ax.set_yticks([])
        extra = f", {r.get('n_lesions')} lesions" if lesion else ""
        axs[row, 0].set_ylabel(f"{title}\n{r['case']} ({r['stratum']}, {r['site']},\n"
                               f"{float(r['age']):.1f} {r.get('age_unit', '')}{extra})",
                               fontsize=8)
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
    write_bytes_atomic(path, buf.getvalue())
    return path

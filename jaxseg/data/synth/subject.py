"""One synthetic subject: a site's acquisition and the subject's anatomy and appearance.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from jaxseg.data.synth.template import (
    BG,
    BRAIN_CENTRE_MM,
    CEREB,
    CGM,
    CSF,
    FOV_MM,
    LABELS,
    N_LABELS,
    VENT,
    WM,
    Template,
)

STRATA: tuple[str, ...] = ("control", "ventriculomegaly", "cerebellar_hypoplasia")
CHANNELS: tuple[str, ...] = ("T1", "T2", "FLAIR")  # the sequences a subject can have
DEFAULT_STRATA: dict[str, float] = {
    "control": 0.8, "ventriculomegaly": 0.1, "cerebellar_hypoplasia": 0.1}


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
    f = max(1, int(round(4.0 / spacing)))  # control points every ~4 mm
    cshape = tuple((n - 1 + f - 1) // f + 1 + 1 for n in shape)
    label, cerebellum, target = _draw_anatomy(r_anat, r_abn, template, stratum, shape, affine, spacing, f,
                                              cshape, scale, vent_factor)

    lesion, lesion_id, n_les = None, None, 0
    if lesions:
        lesion, lesion_id, n_les = _rasterise_lesions(r_les, label, spacing,
                                                     int(r_les.integers(3, 31)), lesion_radius_mm)

    mask = brain_mask(label)
    images = _draw_images(r_app, r_noise, label, lesion_id if n_les else None, site, channels, spacing, f, cshape,
                          myelin, mask if skull_strip else None)

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


def _draw_anatomy(r_anat, r_abn, template: Template, stratum: str, shape, affine, spacing: float, f: int,
                  cshape, scale: float, vent_factor: float) -> tuple[np.ndarray, str, float]:
    """The subject's label map on the output grid: output voxel -> template MNI point (random affine,
    smooth displacement, age scaling) on a control grid every ``f`` voxels, then the stratum's
    abnormality. Returns (label, cerebellum state, ventricle target ratio)."""
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
    return label, cerebellum, target


def _draw_images(r_app, r_noise, label: np.ndarray, lesion_id: np.ndarray | None, site: Site,
                 channels: tuple[str, ...], spacing: float, f: int, cshape, myelin: float,
                 strip_mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """The subject's channels (SynthSeg-like): per-label means of the site and the subject, noise,
    lesion intensities, PSF blur, bias field, gamma, Rician noise, gain; with ``strip_mask`` exactly
    0 outside it. Every known channel's draws happen, in a fixed order, so the streams stay aligned
    whatever the channel selection."""
    shape = label.shape
    sig = _psf_sigma(site, spacing)
    bias_pts = np.stack(np.meshgrid(*[np.linspace(0.5, 4.5, n, dtype=np.float32) for n in cshape],
                                    indexing="ij"))
    jitter = {ch: np.clip(r_app.normal(0.0, 0.02, N_LABELS), -0.03, 0.03) for ch in CHANNELS}
    gamma = {ch: float(np.exp(np.clip(r_app.normal(0.0, 0.08), -0.2, 0.2))) for ch in CHANNELS}
    les_fac = {ch: r_app.uniform(*_LESION_FACTOR[ch], 64) for ch in CHANNELS}
    images = {}
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
        if lesion_id is not None:
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
        if strip_mask is not None:  # last, after noise / bias / gain: the brain voxels are unchanged
            _skull_strip(img, strip_mask)
        images[ch] = img
    return images


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

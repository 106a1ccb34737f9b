"""NIfTI input/output with clear errors, atomic writes and explicit reorientation.

Every problem with an input file is raised as :class:`DataError` (a ``ValueError``) whose
message starts with the file's path and says what is wrong, e.g.::

    DataError: /data/imagesTr/case_0000.nii.gz: cannot read voxel data (truncated or corrupt file): ...

Orientation is never ignored: :func:`to_canonical` reorders/flips the voxel axes so that they
run (closest to) Right, Anterior, Superior, and returns a small JSON-serialisable ``undo`` record;
:func:`from_canonical` uses it to put an array (e.g. a prediction) back into the file's own
voxel order, so that it can be written with the file's original affine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from jaxseg.fileio import atomic_path

__all__ = [
    "DataError",
    "load_nifti",
    "load_header",
    "save_nifti",
    "to_canonical",
    "from_canonical",
    "canonical_spacing",
    "voxel_spacing",
    "check_spacing",
    "SPACING_MIN_MM",
    "SPACING_MAX_MM",
]

# Plausible voxel sizes for brain MRI (and most medical images); outside, the header is wrong
# (e.g. units in micrometres, or a corrupt pixdim) and resampling with it would be garbage.
SPACING_MIN_MM = 1e-3
SPACING_MAX_MM = 100.0


class DataError(ValueError):
    """Bad input data. The message names the file (or manifest row) and the problem."""


def _nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    return "".join(path.suffixes)


def _open(path: Path) -> nib.spatialimages.SpatialImage:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # ImageFileError, BadGzipFile, EOFError, HeaderDataError, ...
        raise DataError(
            f"{path}: not a readable NIfTI file (cannot read header; truncated, corrupt or "
            f"another format): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: not a NIfTI file (nibabel read it as {type(img).__name__})")
    return img


def _squeeze_to_3d(path: Path, shape: tuple[int, ...], expect_3d: bool) -> tuple[int, ...]:
    if len(shape) < 3:
        raise DataError(f"{path}: {len(shape)}D image of shape {shape}; a 3D volume was expected")
    if not expect_3d:
        return _check_nonempty(path, shape)
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise DataError(
            f"{path}: {len(shape)}D image of shape {shape} where a 3D volume was expected "
            f"(a trailing singleton 4th dimension is allowed; split multi-channel 4D files into "
            f"one file per channel)"
        )
    return _check_nonempty(path, shape[:3])


def _check_nonempty(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    if any(s == 0 for s in shape):
        raise DataError(f"{path}: empty image: shape {shape} has a zero-length axis")
    return shape


def check_spacing(path: Any, affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel sizes of ``affine`` (array axis order); :class:`DataError` naming ``path`` when one
    is outside ``[SPACING_MIN_MM, SPACING_MAX_MM]``."""
    sp = voxel_spacing(affine)
    if not all(SPACING_MIN_MM <= v <= SPACING_MAX_MM for v in sp):
        raise DataError(
            f"{path}: implausible voxel size {tuple(float(f'{v:.4g}') for v in sp)} mm (allowed "
            f"{SPACING_MIN_MM:g}..{SPACING_MAX_MM:g} mm per axis); fix the header's pixdim / affine")
    return sp


def load_header(path: str | os.PathLike, *, expect_3d: bool = True):
    """Read only the header: returns ``(shape, affine, header)`` without touching voxel data."""
    path = Path(path)
    img = _open(path)
    shape = _squeeze_to_3d(path, tuple(int(s) for s in img.shape), expect_3d)
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(path, affine)
    return shape, affine, img.header


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: affine is not a finite 4x4 matrix: {affine.tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: affine is singular (zero voxel size?): {affine.tolist()}")


def load_nifti(path: str | os.PathLike, *, expect_3d: bool = True) -> tuple[np.ndarray, np.ndarray, Any]:
    """Load a NIfTI file; returns ``(array, affine, header)``.

    ``array`` is the scaled voxel data (``img.dataobj``: integer files without scaling keep their
    integer dtype, scaled files become float). With ``expect_3d`` (default) the result is 3D;
    trailing singleton dimensions (``(X, Y, Z, 1)``) are dropped, anything else 4D raises.

    Raises :class:`DataError` naming the file for: missing file, not a NIfTI / unreadable header,
    unreadable or truncated voxel data (e.g. a cut-off ``.nii.gz``), 4D where 3D was expected,
    a non-finite or singular affine, and NaN/Inf voxels.
    """
    path = Path(path)
    img = _open(path)
    shape = _squeeze_to_3d(path, tuple(int(s) for s in img.shape), expect_3d)
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(path, affine)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, OSError ("Expected N bytes"), ValueError
        raise DataError(
            f"{path}: cannot read voxel data (truncated or corrupt file): {type(exc).__name__}: {exc}"
        ) from exc
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise DataError(f"{path}: unsupported voxel data type {data.dtype} (expected integer or float)")
    data = data.reshape(shape)
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        n_bad = int(bad.sum())
        if n_bad:
            n_nan = int(np.isnan(data).sum())
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(
                f"{path}: {n_bad} non-finite voxel(s) ({n_nan} NaN, {n_bad - n_nan} Inf), "
                f"first at voxel {first}"
            )
    return data, affine, img.header


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: Any = None,
    *,
    dtype: Any = None,
) -> Path:
    """Write ``array`` with ``affine`` to ``path`` atomically.

    The image is written to a temporary name in the same directory (with the same ``.nii`` /
    ``.nii.gz`` suffix, so the compression matches) and then moved over ``path`` with
    ``os.replace``: readers see either the old file or the complete new one, never a partial file.
    ``header`` (optional) is used as a template (e.g. to keep qform/sform codes and units);
    ``dtype`` sets the on-disk data type (default: the array's).
    """
    path = Path(path)
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype == np.int64:
        # NIfTI readers often reject int64; labels fit comfortably in int32.
        if array.size == 0 or (array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max):
            array = array.astype(np.int32)
    affine = np.asarray(affine, dtype=np.float64)
    qcode = scode = 1  # "scanner" space unless the template says otherwise
    if header is not None:
        header = header.copy()
        qcode = int(header["qform_code"]) or 1
        scode = int(header["sform_code"]) or 1
    img = nib.Nifti1Image(array, affine, header=header)
    img.set_data_dtype(array.dtype)
    # A template's scaling would rescale our values on read; store them as they are.
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    with atomic_path(path, suffix=_nifti_suffix(path) or ".nii.gz") as tmp:
        nib.save(img, str(tmp))
    return path


# --------------------------------------------------------------------------- orientation

_RAS = nio.axcodes2ornt(("R", "A", "S"))


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) along the array axes: the column norms of the affine's 3x3 part."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))


def canonical_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes (mm) along the axes of the RAS-reoriented array (no data needed)."""
    spacing = voxel_spacing(affine)
    ornt = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise DataError(f"affine has no clear orientation: {np.asarray(affine).tolist()}")
    out = [0.0, 0.0, 0.0]
    for i, (ax, _flip) in enumerate(ornt):
        out[int(ax)] = spacing[i]
    return tuple(out)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reorient so that the first three array axes run (closest to) Right, Anterior, Superior.

    Returns ``(array_ras, affine_ras, undo)``. Only axis permutations and flips are applied (no
    interpolation); for oblique affines nibabel's :func:`io_orientation` picks the closest axes
    and ``affine_ras`` stays oblique (it maps the reoriented voxels to the same world points).
    Extra trailing axes (channels) are carried along. ``undo = {"ornt": [[axis, flip], ...],
    "shape": [X, Y, Z]}`` is JSON-serialisable: ``ornt`` is the transform that was applied,
    ``shape`` the original spatial shape; :func:`from_canonical` inverts it exactly.
    """
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim < 3:
        raise DataError(f"to_canonical needs at least 3 dimensions, got shape {array.shape}")
    ornt = nio.io_orientation(affine)
    if np.isnan(ornt).any():
        raise DataError(f"affine has no clear orientation (degenerate axes): {affine.tolist()}")
    transform = nio.ornt_transform(ornt, _RAS)
    out = nio.apply_orientation(array, transform)
    affine_ras = affine @ nio.inv_ornt_aff(transform, array.shape[:3])
    undo = {
        "ornt": [[int(a), int(f)] for a, f in transform],
        "shape": [int(s) for s in array.shape[:3]],
    }
    return np.ascontiguousarray(out), affine_ras, undo


def _inverse_ornt(transform: np.ndarray) -> np.ndarray:
    """Inverse of an orientation transform: input axis i -> output axis j with flip f
    becomes input axis j -> output axis i with flip f."""
    inv = np.zeros_like(transform)
    for i, (j, f) in enumerate(transform):
        inv[int(j)] = (i, f)
    return inv


def from_canonical(array_ras: np.ndarray, undo: dict) -> np.ndarray:
    """Undo :func:`to_canonical`: return ``array_ras`` in the original voxel order.

    ``array_ras`` must have the canonical spatial shape (extra trailing axes are allowed). The
    result can be written with the original affine and overlays the original image exactly.
    """
    array_ras = np.asarray(array_ras)
    transform = np.asarray(undo["ornt"], dtype=np.float64)
    shape = tuple(int(s) for s in undo["shape"])
    expected = tuple(shape[int(np.where(transform[:, 0] == j)[0][0])] for j in range(3))
    if tuple(array_ras.shape[:3]) != expected:
        raise DataError(
            f"from_canonical: array has spatial shape {tuple(array_ras.shape[:3])}, the canonical "
            f"shape recorded in undo is {expected}"
        )
    out = nio.apply_orientation(array_ras, _inverse_ornt(transform))
    assert tuple(out.shape[:3]) == shape, (out.shape, shape)
    return np.ascontiguousarray(out)

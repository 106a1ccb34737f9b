"""jaxseg.data.prepare: checks, reorientation, crop, z-score, resampling, resume, bad inputs and
restore_geometry back to the input grid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxseg.data import prepare as prep
from jaxseg.data import store
from jaxseg.data.io import DataError, load_nifti, save_nifti
from jaxseg.data.prepare import prepare, restore_geometry
from jaxseg.data.store import list_cases, open_case, read_dataset_meta

SHAPE = (10, 9, 8)
LABELS = {"background": 0, "wm": 1, "gm": 2}


def _rot(ax_deg: float, az_deg: float) -> np.ndarray:
    a, b = np.deg2rad(ax_deg), np.deg2rad(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def _affine(kind: str, spacing=(1.0, 1.2, 1.5)) -> np.ndarray:
    aff = np.eye(4)
    flips = {"RAS": (1, 1, 1), "LAS": (-1, 1, 1), "LPS": (-1, -1, 1), "oblique": (-1, 1, -1)}
    if kind == "PSL":  # permuted axes: i -> -y, j -> +z, k -> -x
        aff[:3, :3] = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]]) @ np.diag(spacing)
    else:
        aff[:3, :3] = np.diag(np.multiply(flips[kind], spacing))
        if kind == "oblique":
            aff[:3, :3] = _rot(12, -20) @ aff[:3, :3]
    aff[:3, 3] = [-7.0, 11.0, 3.5]
    return aff


def _case_arrays(seed: int, shape=SHAPE, n_ch=2):
    """Nonzero 'head' in a box away from the border, a label inside it."""
    rng = np.random.default_rng(seed)
    chans = []
    for c in range(n_ch):
        v = np.zeros(shape, np.float32)
        v[2:-1, 1:-2, 2:-2] = rng.uniform(10, 100 * (c + 1), size=(shape[0] - 3, shape[1] - 3, shape[2] - 4))
        chans.append(v)
    lab = np.zeros(shape, np.uint8)
    lab[3:6, 2:5, 3:5] = 1
    lab[6:8, 4:6, 3:6] = 2
    return chans, lab


def _write(path: Path, arr, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return path


def _make_v2(root: Path, cases: dict[str, str], n_ch=2, spacing=None, metadata: str | None = None) -> Path:
    """cases: case_id -> orientation kind. Returns the dataset folder."""
    ds = root / "Dataset009_Prep"
    for i, (cid, kind) in enumerate(sorted(cases.items())):
        aff = _affine(kind, spacing or (1.0, 1.2, 1.5))
        chans, lab = _case_arrays(i, n_ch=n_ch)
        for c, v in enumerate(chans):
            _write(ds / "imagesTr" / f"{cid}_{c:04d}.nii.gz", v, aff)
        _write(ds / "labelsTr" / f"{cid}.nii.gz", lab, aff)
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): f"ch{c}" for c in range(n_ch)},
        "labels": LABELS, "numTraining": len(cases), "file_ending": ".nii.gz"}))
    if metadata:
        (ds / "metadata.csv").write_text(metadata)
    return ds


def _stored(root, cid):
    c = open_case(root, cid)
    return c, c.image.read().result(), c.label.read().result()


# --------------------------------------------------------------------------- geometry


def test_prepare_orientations_restore_exactly(tmp_path):
    kinds = {"c_ras": "RAS", "c_las": "LAS", "c_lps": "LPS", "c_obl": "oblique", "c_psl": "PSL"}
    ds = _make_v2(tmp_path, kinds, metadata="case,stratum,age,site\nc_las,control,38.5,s1\n")
    out = tmp_path / "store"
    rep = prepare(ds, out, num_workers=1, progress=False)
    assert rep["prepared"] == sorted(kinds) and rep["rejected"] == [] and rep["skipped_existing"] == []
    assert list_cases(out) == sorted(kinds)
    dmeta = read_dataset_meta(out)
    assert dmeta["labels"] == LABELS and dmeta["channel_names"] == ["ch0", "ch1"] and dmeta["n_cases"] == 5
    for cid in sorted(kinds):
        c, img, lab = _stored(out, cid)
        m = c.meta
        orig_lab, orig_aff, _ = load_nifti(ds / "labelsTr" / f"{cid}.nii.gz")
        orig_img, _, _ = load_nifti(ds / "imagesTr" / f"{cid}_0001.nii.gz")
        np.testing.assert_allclose(m["original_affine"], orig_aff)
        assert m["original_shape"] == list(SHAPE)
        assert nib.aff2axcodes(np.array(m["canonical_affine"])) == ("R", "A", "S")
        # the label goes back exactly
        back = restore_geometry(lab, m)
        assert back.shape == SHAPE and back.dtype == np.uint8
        np.testing.assert_array_equal(back, orig_lab)
        # and the image too (undo the z-score inside the mask)
        i1 = img[..., 1]
        mask = i1 != 0
        un = np.where(mask, i1 * m["normalization"]["std"][1] + m["normalization"]["mean"][1], 0)
        np.testing.assert_allclose(restore_geometry(un.astype(np.float32), m), orig_img, rtol=1e-4, atol=1e-3)
        # a prediction written with the original affine overlays the input
        pred_path = save_nifti(tmp_path / "pred" / f"{cid}.nii.gz", back, np.array(m["original_affine"]))
        p2, a2, _ = load_nifti(pred_path)
        np.testing.assert_array_equal(p2, orig_lab)
        np.testing.assert_allclose(a2, orig_aff, atol=1e-5)
        # stored_affine maps stored voxels to the same world points as the original
        a_st = np.array(m["stored_affine"])
        for v in np.argwhere(lab == 2)[:5]:
            w = a_st @ np.r_[v, 1.0]
            o = np.round(np.linalg.solve(orig_aff, w)[:3]).astype(int)
            assert orig_lab[tuple(o)] == 2
    assert open_case(out, "c_las").meta["stratum"] == "control"
    assert open_case(out, "c_las").meta["age"] == 38.5
    assert open_case(out, "c_las").meta["original_orientation"] == "LAS"
    assert open_case(out, "c_lps").meta["original_orientation"] == "LPS"


def test_crop_box_and_zscore(tmp_path):
    ds = _make_v2(tmp_path, {"a": "RAS"})
    out = tmp_path / "store"
    prepare(ds, out, num_workers=1, progress=False)
    c, img, lab = _stored(out, "a")
    # RAS input: the crop box is the nonzero box written by _case_arrays
    assert c.meta["crop_box"] == [[2, SHAPE[0] - 1], [1, SHAPE[1] - 2], [2, SHAPE[2] - 2]]
    assert c.shape == (SHAPE[0] - 3, SHAPE[1] - 3, SHAPE[2] - 4)
    assert c.meta["cropped_shape"] == list(c.shape)
    chans, orig_lab = _case_arrays(0)
    np.testing.assert_array_equal(lab, orig_lab[2:-1, 1:-2, 2:-2])
    for ch in range(2):
        v = img[..., ch][chans[ch][2:-1, 1:-2, 2:-2] != 0].astype(np.float64)
        assert abs(v.mean()) < 1e-5 and abs(v.std() - 1) < 1e-5
        ref = chans[ch][2:-1, 1:-2, 2:-2]
        np.testing.assert_allclose(c.meta["normalization"]["mean"][ch], ref.mean(), rtol=1e-5)
    assert c.meta["spacing"] == pytest.approx([1.0, 1.2, 1.5]) and not c.meta["resampled"]


def test_crop_keeps_zero_background_inside_and_outside_mask(tmp_path):
    ds = _make_v2(tmp_path, {"a": "RAS"}, n_ch=1)
    # zero a hole inside the head: outside the nonzero mask -> stays exactly 0 after z-scoring
    p = ds / "imagesTr" / "a_0000.nii.gz"
    v, aff, _ = load_nifti(p)
    v[4, 4, 4] = 0
    _write(p, v, aff)
    out = tmp_path / "store"
    prepare(ds, out, num_workers=1, progress=False)
    c, img, _ = _stored(out, "a")
    assert img[4 - 2, 4 - 1, 4 - 2, 0] == 0.0
    nz = img[..., 0][v[2:-1, 1:-2, 2:-2] != 0]
    assert abs(nz.mean()) < 1e-5 and abs(nz.std() - 1) < 1e-5


def test_resampling_to_target_and_median(tmp_path):
    ds = _make_v2(tmp_path, {"a": "LPS", "b": "oblique"}, spacing=(1.0, 1.2, 1.5))
    # upsampling by exactly 2 along every axis: nearest there and back is exact
    out = tmp_path / "s_half"
    rep = prepare(ds, out, target_spacing=(0.5, 0.6, 0.75), num_workers=1, progress=False)
    assert rep["target_spacing"] == [0.5, 0.6, 0.75]
    for cid in ("a", "b"):
        c, img, lab = _stored(out, cid)
        m = c.meta
        assert m["resampled"] and list(c.shape) == [2 * s for s in m["cropped_shape"]]
        assert m["spacing"] == pytest.approx([0.5, 0.6, 0.75])
        orig_lab, _, _ = load_nifti(ds / "labelsTr" / f"{cid}.nii.gz")
        np.testing.assert_array_equal(restore_geometry(lab, m), orig_lab)
        assert np.isfinite(img).all()
    assert read_dataset_meta(out)["spacing"] == [0.5, 0.6, 0.75]
    # "median": every case here has (1, 1.2, 1.5) in RAS order -> no resampling needed
    out2 = tmp_path / "s_med"
    rep2 = prepare(ds, out2, target_spacing="median", num_workers=1, progress=False)
    assert rep2["target_spacing"] == pytest.approx([1.0, 1.2, 1.5])
    assert not open_case(out2, "a").meta["resampled"]
    # downsampling: restore gives the original grid and mostly the same labels
    out3 = tmp_path / "s_coarse"
    prepare(ds, out3, target_spacing=(1.5, 1.5, 1.5), num_workers=1, progress=False)
    c, img, lab = _stored(out3, "a")
    assert c.meta["resampled"] and c.meta["cropped_shape"] != list(c.shape)
    back = restore_geometry(lab, c.meta)
    orig_lab, _, _ = load_nifti(ds / "labelsTr" / "a.nii.gz")
    assert back.shape == SHAPE and (back == orig_lab).mean() > 0.9


def test_median_spacing_of_mixed_dataset(tmp_path):
    ds = _make_v2(tmp_path, {"a": "RAS"})
    for cid, sp in (("b", (2.0, 1.0, 1.0)), ("c", (3.0, 1.0, 1.0))):
        chans, lab = _case_arrays(1)
        aff = _affine("LPS", sp)
        for ch, v in enumerate(chans):
            _write(ds / "imagesTr" / f"{cid}_{ch:04d}.nii.gz", v, aff)
        _write(ds / "labelsTr" / f"{cid}.nii.gz", lab, aff)
    meta = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").write_text(json.dumps({**meta, "numTraining": 3}))
    from jaxseg.data.datasets import read_dataset
    assert prep.median_spacing(read_dataset(ds).cases) == pytest.approx((2.0, 1.0, 1.0))


# --------------------------------------------------------------------------- resume / atomicity


def test_rerun_skips_completed_cases(tmp_path, monkeypatch):
    ds = _make_v2(tmp_path, {"a": "RAS", "b": "LAS", "c": "LPS"})
    out = tmp_path / "store"
    writes = []
    real = store.write_case

    def counting(root, cid, *a, **k):
        writes.append(cid)
        return real(root, cid, *a, **k)

    monkeypatch.setattr(store, "write_case", counting)
    rep = prepare(ds, out, num_workers=1, progress=False)
    assert writes == ["a", "b", "c"] and rep["prepared"] == ["a", "b", "c"]
    mtime = (out / "b" / "meta.json").stat().st_mtime_ns
    writes.clear()
    rep2 = prepare(ds, out, num_workers=1, progress=False)
    assert writes == [] and rep2["prepared"] == [] and rep2["skipped_existing"] == ["a", "b", "c"]
    assert (out / "b" / "meta.json").stat().st_mtime_ns == mtime
    # a different preprocessing setting on the same store is refused
    with pytest.raises(DataError, match="different settings"):
        prepare(ds, out, target_spacing=(2.0, 2.0, 2.0), num_workers=1, progress=False)


def test_killed_run_leaves_no_corrupt_case_and_resumes(tmp_path, monkeypatch):
    ds = _make_v2(tmp_path, {"a": "RAS", "b": "LAS", "c": "LPS"})
    out = tmp_path / "store"
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(os.sep + "b"):
            raise KeyboardInterrupt("killed while finishing case b")
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        prepare(ds, out, num_workers=1, progress=False)
    monkeypatch.undo()
    assert list_cases(out) == ["a"]
    assert not (out / "b").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    # a leftover from a truly killed process (dead pid) is cleaned on the next run
    (out / ".tmp-c-99999999").mkdir()
    rep = prepare(ds, out, num_workers=1, progress=False)
    assert rep["skipped_existing"] == ["a"] and rep["prepared"] == ["b", "c"]
    assert list_cases(out) == ["a", "b", "c"]
    assert not [p for p in os.listdir(out) if p.startswith(".")]


def test_two_workers_match_serial(tmp_path):
    ds = _make_v2(tmp_path, {"a": "RAS", "b": "LAS", "c": "oblique"})
    rep = prepare(ds, tmp_path / "par", num_workers=2, progress=False)  # spawned processes
    assert rep["prepared"] == ["a", "b", "c"]
    prepare(ds, tmp_path / "ser", num_workers=1, progress=False)
    for cid in ("a", "b", "c"):
        _, i1, l1 = _stored(tmp_path / "par", cid)
        _, i2, l2 = _stored(tmp_path / "ser", cid)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(l1, l2)


def test_thread_pool_first_bad_case_raises_and_keeps_good_cases(tmp_path):
    ds = _make_v2(tmp_path, {"a": "RAS", "b_bad": "LAS", "c": "LPS", "d": "RAS"})
    path, problem = _break(ds, "nan")
    out = tmp_path / "store"
    with pytest.raises(DataError, match=problem):
        prepare(ds, out, num_workers=2, executor="thread", progress=False)
    done = list_cases(out)
    assert "b_bad" not in done
    for cid in done:
        _stored(out, cid)  # complete and readable
    rep = prepare(ds, out, num_workers=2, executor="thread", skip_bad=True, progress=False)
    assert sorted(rep["prepared"] + rep["skipped_existing"]) == ["a", "c", "d"]
    assert [r["case_id"] for r in rep["rejected"]] == ["b_bad"] and path in rep["rejected"][0]["reason"]


# --------------------------------------------------------------------------- bad inputs


def _break(ds: Path, kind: str) -> tuple[str, str]:
    """Make case 'b_bad' bad in one way; returns (the file the message must name, problem regex)."""
    img0 = ds / "imagesTr" / "b_bad_0000.nii.gz"
    img1 = ds / "imagesTr" / "b_bad_0001.nii.gz"
    lab = ds / "labelsTr" / "b_bad.nii.gz"
    v, aff, _ = load_nifti(img1)
    if kind == "truncated":
        raw = img1.read_bytes()
        img1.write_bytes(raw[: len(raw) // 2])
        return str(img1), "truncated or corrupt"
    if kind == "missing_channel":
        img1.unlink()
        return str(img1), "missing channel file"
    if kind == "shape_mismatch":
        l, laff, _ = load_nifti(lab)
        _write(lab, l[:, :, :-1], laff)
        return str(lab), r"label shape \(10, 9, 7\) does not match image .*b_bad_0000.nii.gz"
    if kind == "affine_mismatch":
        a2 = aff.copy()
        a2[0, 3] += 0.5
        _write(img1, v, a2)
        return str(img1), r"affine does not match .*b_bad_0000.nii.gz"
    if kind == "4d":
        _write(img1, np.stack([v, v], -1), aff)
        return str(img1), "4D image .* where a 3D volume was expected"
    if kind in ("nan", "inf"):
        v[5, 4, 4] = np.nan if kind == "nan" else -np.inf
        _write(img1, v, aff)
        return str(img1), "non-finite voxel" + (".*1 NaN" if kind == "nan" else ".*1 Inf")
    if kind == "label_values":
        l, laff, _ = load_nifti(lab)
        l[4, 4, 4] = 7
        l[5, 4, 4] = 9
        _write(lab, l, laff)
        return str(lab), r"label values \[7, 9\] are not in the declared label set"
    if kind == "all_zero":
        _write(img0, np.zeros_like(v), aff)
        return str(img0), "all-zero image"
    raise AssertionError(kind)


BAD_KINDS = ["truncated", "missing_channel", "shape_mismatch", "affine_mismatch", "4d", "nan", "inf",
             "label_values", "all_zero"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_raises_naming_file_and_problem(tmp_path, kind):
    ds = _make_v2(tmp_path, {"a_good": "LAS", "b_bad": "LAS", "c_good": "RAS"})
    path, problem = _break(ds, kind)
    out = tmp_path / "store"
    with pytest.raises(DataError, match=problem) as ei:
        prepare(ds, out, num_workers=1, progress=False)
    msg = str(ei.value)
    assert path in msg or str(Path(path).resolve()) in msg
    # nothing half-written; cases finished before the bad one are complete and valid
    assert "b_bad" not in list_cases(out)
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")] if out.exists() else True
    for cid in list_cases(out):
        c, img, lab = _stored(out, cid)
        assert img.shape[:3] == lab.shape == c.shape


def test_skip_bad_rejects_all_kinds_and_prepares_good(tmp_path):
    cases = {"a_good": "LPS", "z_good": "oblique"}
    cases.update({f"b_bad_{k}": "LAS" for k in BAD_KINDS})
    ds = _make_v2(tmp_path, cases)
    expected = {}
    for k in BAD_KINDS:
        # reuse _break by renaming the files of this case to b_bad and back
        cid = f"b_bad_{k}"
        for f in sorted((ds / "imagesTr").glob(f"{cid}_*")) + [ds / "labelsTr" / f"{cid}.nii.gz"]:
            f.rename(f.with_name(f.name.replace(cid, "b_bad")))
        path, problem = _break(ds, k)
        for f in sorted((ds / "imagesTr").glob("b_bad_0*")) + [ds / "labelsTr" / "b_bad.nii.gz"]:
            if f.exists():
                f.rename(f.with_name(f.name.replace("b_bad", cid)))
        expected[cid] = (path.replace("b_bad", cid), problem.replace("b_bad", cid))
    out = tmp_path / "store"
    rep = prepare(ds, out, num_workers=1, skip_bad=True, progress=False)
    assert rep["prepared"] == ["a_good", "z_good"]
    assert list_cases(out) == ["a_good", "z_good"]
    rejected = json.loads((out / "rejected.json").read_text())["rejected"]
    assert rejected == rep["rejected"]
    assert [r["case_id"] for r in rejected] == sorted(expected)
    import re

    for r in rejected:
        path, problem = expected[r["case_id"]]
        assert path in r["reason"] or str(Path(path).resolve()) in r["reason"], r
        assert re.search(problem, r["reason"]), r
    assert read_dataset_meta(out)["n_cases"] == 2


def _make_manifest(tmp_path: Path, rows: dict[str, str]) -> Path:
    """rows: case -> orientation; writes T1/T2/label files and manifest.csv (+ labels.json)."""
    lines = ["case,image_T1,image_T2,label,stratum,age,site"]
    for i, (cid, kind) in enumerate(sorted(rows.items())):
        aff = _affine(kind)
        chans, lab = _case_arrays(i)
        d = tmp_path / "raw" / cid
        _write(d / "t1.nii.gz", chans[0], aff)
        _write(d / "t2.nii.gz", chans[1], aff)
        _write(d / "seg.nii.gz", lab, aff)
        lines.append(f"{cid},raw/{cid}/t1.nii.gz,raw/{cid}/t2.nii.gz,raw/{cid}/seg.nii.gz,grp{i},{30 + i},site{i}")
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    csv = tmp_path / "manifest.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_manifest_prepare_and_row_pointing_nowhere(tmp_path):
    csv = _make_manifest(tmp_path, {"m1": "LPS", "m2": "RAS", "m3": "oblique"})
    (tmp_path / "raw" / "m2" / "t2.nii.gz").unlink()
    missing = str((tmp_path / "raw" / "m2" / "t2.nii.gz").resolve())
    out = tmp_path / "store"
    with pytest.raises(DataError) as ei:
        prepare(csv, out, num_workers=1, progress=False)
    msg = str(ei.value)
    assert str(csv.resolve()) in msg and "row 2" in msg and missing in msg and "file not found" in msg
    rep = prepare(csv, out, num_workers=1, skip_bad=True, progress=False)
    assert rep["prepared"] == ["m1", "m3"]
    assert rep["rejected"] == [{"case_id": "m2", "reason": msg}]
    assert json.loads((out / "rejected.json").read_text())["rejected"] == rep["rejected"]
    c = open_case(out, "m3")
    assert (c.meta["stratum"], c.meta["age"], c.meta["site"]) == ("grp2", 32.0, "site2")
    assert c.meta["channel_names"] == ["T1", "T2"]
    lab = c.label.read().result()
    orig, _, _ = load_nifti(tmp_path / "raw" / "m3" / "seg.nii.gz")
    np.testing.assert_array_equal(restore_geometry(lab, c.meta), orig)


def test_restore_geometry_with_channel_axis_and_shape_check(tmp_path):
    ds = _make_v2(tmp_path, {"a": "PSL"})
    out = tmp_path / "store"
    prepare(ds, out, num_workers=1, progress=False)
    c, img, lab = _stored(out, "a")
    probs = np.stack([lab == k for k in range(3)], axis=-1).astype(np.float32)
    back = restore_geometry(probs, c.meta)
    orig, _, _ = load_nifti(ds / "labelsTr" / "a.nii.gz")
    assert back.shape == (*SHAPE, 3)
    np.testing.assert_array_equal(back.argmax(-1), orig)
    with pytest.raises(ValueError, match="stored shape"):
        restore_geometry(lab[:-1], c.meta)

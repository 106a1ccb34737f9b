"""jaxseg.data.io and jaxseg.data.datasets: NIfTI loading errors, atomic saving, reorientation,
nnU-Net raw (v2, v1) and CSV manifest readers."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxseg.data import io as jio
from jaxseg.data.datasets import CaseRecord, read_dataset, read_manifest, read_nnunet_raw
from jaxseg.data.io import DataError, from_canonical, load_nifti, save_nifti, to_canonical


def _write(path: Path, arr, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return path


def _vol(shape=(6, 7, 8), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).random(shape).astype(dtype) + 1


def _rot(ax_deg: float, az_deg: float) -> np.ndarray:
    a, b = np.deg2rad(ax_deg), np.deg2rad(az_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


# --------------------------------------------------------------------------- load / save


def test_load_save_roundtrip_and_dtypes(tmp_path):
    aff = np.diag([1.2, 1.0, 2.0, 1.0])
    aff[:3, 3] = [-10, 5, 3]
    img = _vol()
    p = save_nifti(tmp_path / "sub" / "img.nii.gz", img, aff)
    data, a, hdr = load_nifti(p)
    np.testing.assert_array_equal(data, img)
    np.testing.assert_allclose(a, aff, atol=1e-6)
    assert hdr.get_data_shape() == img.shape
    lab = np.arange(6 * 7 * 8).reshape(6, 7, 8) % 3
    p2 = save_nifti(tmp_path / "lab.nii", lab, aff, hdr, dtype=np.uint8)
    d2, _, _ = load_nifti(p2)
    assert d2.dtype == np.uint8
    np.testing.assert_array_equal(d2, lab)
    assert sorted(os.listdir(tmp_path)) == ["lab.nii", "sub"]
    assert os.listdir(tmp_path / "sub") == ["img.nii.gz"]


def test_save_nifti_is_atomic(tmp_path, monkeypatch):
    p = save_nifti(tmp_path / "x.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    before = p.read_bytes()

    def boom(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(jio.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        save_nifti(p, np.zeros((5, 5, 5), np.float32), np.eye(4))
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.nii.gz"]


def test_trailing_singleton_4th_dim_is_3d(tmp_path):
    img = _vol((5, 6, 7, 1))
    p = _write(tmp_path / "x.nii.gz", img)
    data, _, _ = load_nifti(p)
    assert data.shape == (5, 6, 7)


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("missing", "file not found"),
        ("text", "not a readable NIfTI"),
        ("truncated", "truncated or corrupt"),
        ("truncated_header", "not a readable NIfTI"),
        ("4d", "4D image .* where a 3D volume was expected"),
        ("nan", "non-finite voxel.*NaN"),
        ("inf", "non-finite voxel.*Inf"),
        ("2d", "2D image"),
    ],
)
def test_load_errors_name_file_and_problem(tmp_path, kind, pattern):
    p = tmp_path / f"bad_{kind}.nii.gz"
    if kind == "text":
        p.write_text("hello, I am not an image\n")
    elif kind in ("truncated", "truncated_header"):
        _write(p, np.random.default_rng(0).random((12, 12, 12)).astype(np.float32))
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) // 2] if kind == "truncated" else raw[:60])
    elif kind == "4d":
        _write(p, _vol((5, 5, 5, 2)))
    elif kind in ("nan", "inf"):
        v = _vol()
        v[1, 2, 3] = np.nan if kind == "nan" else np.inf
        _write(p, v)
    elif kind == "2d":
        _write(p, _vol((5, 5)))
    with pytest.raises(DataError, match=pattern) as ei:
        load_nifti(p)
    assert str(p) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_gzip_truncated_plain_nii(tmp_path):
    # An uncompressed .nii whose data section is cut short.
    p = _write(tmp_path / "cut.nii", _vol((10, 10, 10)))
    raw = p.read_bytes()
    p.write_bytes(raw[:-500])
    with pytest.raises(DataError, match="truncated or corrupt") as ei:
        load_nifti(p)
    assert str(p) in str(ei.value)
    # and a .nii.gz that is a valid gzip stream of garbage
    q = tmp_path / "garbage.nii.gz"
    q.write_bytes(gzip.compress(b"\x00" * 100))
    with pytest.raises(DataError, match=str(q)):
        load_nifti(q)


# --------------------------------------------------------------------------- orientation


def _affine_for(codes: str, spacing=(1.0, 1.5, 2.0), shape=(5, 6, 7)) -> np.ndarray:
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    t = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    aff = nib.orientations.inv_ornt_aff(t, shape) @ np.diag([*spacing, 1.0])
    aff[:3, 3] += [3.0, -4.0, 5.0]
    return aff


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS", "ASL", "PIR", "oblique"])
def test_to_canonical_roundtrip(codes):
    shape = (5, 6, 7)
    if codes == "oblique":
        aff = np.eye(4)
        aff[:3, :3] = _rot(15, -25) @ np.diag([1.0, 1.5, 2.0]) @ np.diag([-1, 1, -1])
        aff[:3, 3] = [10, 20, -5]
    else:
        aff = _affine_for(codes, shape=shape)
    arr = np.random.default_rng(1).random(shape)
    ras, aff_ras, undo = to_canonical(arr, aff)
    assert nib.aff2axcodes(aff_ras) == ("R", "A", "S")
    undo2 = json.loads(json.dumps(undo))  # JSON-serialisable
    back = from_canonical(ras, undo2)
    assert back.shape == shape
    np.testing.assert_array_equal(back, arr)
    # the same world point holds the same value in both grids
    rng = np.random.default_rng(2)
    for _ in range(10):
        i = np.array([rng.integers(0, s) for s in shape])
        w = aff @ np.r_[i, 1.0]
        j = np.linalg.solve(aff_ras, w)[:3]
        jj = np.round(j).astype(int)
        np.testing.assert_allclose(j, jj, atol=1e-6)
        assert ras[tuple(jj)] == arr[tuple(i)]
    # channel axes travel along
    arr4 = np.stack([arr, -arr], axis=-1)
    ras4, _, undo4 = to_canonical(arr4, aff)
    np.testing.assert_array_equal(ras4[..., 0], ras)
    np.testing.assert_array_equal(from_canonical(ras4, undo4), arr4)


def test_canonical_spacing_matches_reoriented_affine():
    aff = _affine_for("PIR", spacing=(0.5, 0.8, 3.0))
    _, aff_ras, _ = to_canonical(np.zeros((5, 6, 7)), aff)
    np.testing.assert_allclose(jio.canonical_spacing(aff), jio.voxel_spacing(aff_ras))


# --------------------------------------------------------------------------- nnU-Net raw v2


def _make_v2(root: Path, cases=("c01", "c02", "c03"), test_cases=("t01",), with_labels_ts=True) -> Path:
    ds = root / "Dataset001_Tiny"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for i, c in enumerate(cases):
        for ch in range(2):
            _write(ds / "imagesTr" / f"{c}_{ch:04d}.nii.gz", _vol(seed=10 * i + ch))
        _write(ds / "labelsTr" / f"{c}.nii.gz", np.zeros((6, 7, 8), np.uint8))
    if test_cases:
        (ds / "imagesTs").mkdir()
        for c in test_cases:
            for ch in range(2):
                _write(ds / "imagesTs" / f"{c}_{ch:04d}.nii.gz", _vol())
            if with_labels_ts:
                _write(ds / "labelsTs" / f"{c}.nii.gz", np.zeros((6, 7, 8), np.uint8))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "wm": 1, "gm": 2},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": "Tiny",
    }))
    return ds


def test_read_nnunet_v2(tmp_path):
    ds_dir = _make_v2(tmp_path)
    (ds_dir / "metadata.csv").write_text(
        "case,stratum,age,site,split\n"
        "c01,control,30.5,siteA,train\n"
        "c02,abnormal,,siteB,val\n"
        "zzz,control,1,x,train\n"  # not in the dataset: ignored
    )
    ds = read_nnunet_raw(ds_dir)
    assert ds.format == "nnunet_v2"
    assert ds.channel_names == ["T1", "T2"]
    assert ds.labels == {"background": 0, "wm": 1, "gm": 2}
    assert [c.case_id for c in ds.cases] == ["c01", "c02", "c03", "t01"]
    c1, c2, c3, t1 = ds.cases
    assert c1.images == [ds_dir.resolve() / "imagesTr" / "c01_0000.nii.gz",
                         ds_dir.resolve() / "imagesTr" / "c01_0001.nii.gz"]
    assert c1.label == ds_dir.resolve() / "labelsTr" / "c01.nii.gz"
    assert (c1.stratum, c1.age, c1.site, c1.split) == ("control", 30.5, "siteA", "train")
    assert (c2.stratum, c2.age, c2.site, c2.split) == ("abnormal", None, "siteB", "val")
    assert (c3.stratum, c3.age, c3.site, c3.split) == (None, None, None, "train")
    assert t1.split == "test" and t1.label == ds_dir.resolve() / "labelsTs" / "t01.nii.gz"
    assert all(c.problem is None for c in ds.cases)
    assert read_dataset(ds_dir).cases == ds.cases
    json.dumps([c.to_json() for c in ds.cases])


def test_read_nnunet_v2_unlabelled_test_and_missing_channel(tmp_path):
    ds_dir = _make_v2(tmp_path, with_labels_ts=False)
    ds = read_nnunet_raw(ds_dir)
    assert ds.cases[-1].case_id == "t01" and ds.cases[-1].label is None
    missing = ds_dir / "imagesTr" / "c02_0001.nii.gz"
    missing.unlink()
    with pytest.raises(DataError, match="missing channel file") as ei:
        read_nnunet_raw(ds_dir)
    assert str(missing.resolve()) in str(ei.value) or str(missing) in str(ei.value)
    ds = read_nnunet_raw(ds_dir, strict=False)
    bad = {c.case_id: c.problem for c in ds.cases if c.problem}
    assert list(bad) == ["c02"] and "c02_0001.nii.gz" in bad["c02"]


def test_read_nnunet_v2_bad_json(tmp_path):
    ds_dir = _make_v2(tmp_path)
    (ds_dir / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="dataset.json: not valid JSON"):
        read_nnunet_raw(ds_dir)
    (ds_dir / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"a": 1}}))
    with pytest.raises(DataError, match="no background"):
        read_nnunet_raw(ds_dir)


# --------------------------------------------------------------------------- nnU-Net raw v1


def test_read_nnunet_v1(tmp_path):
    ds_dir = tmp_path / "Task002_Old"
    for c in ("a", "b"):
        for ch in range(2):
            _write(ds_dir / "imagesTr" / f"{c}_{ch:04d}.nii.gz", _vol())
        _write(ds_dir / "labelsTr" / f"{c}.nii.gz", np.zeros((6, 7, 8), np.uint8))
    for ch in range(2):
        _write(ds_dir / "imagesTs" / f"z_{ch:04d}.nii.gz", _vol())
    (ds_dir / "dataset.json").write_text(json.dumps({
        "name": "Old",
        "modality": {"0": "FLAIR", "1": "T1"},
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": 2,
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
                     {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}],
        "test": ["./imagesTs/z.nii.gz"],
    }))
    (ds_dir / "metadata.csv").write_text("case,site,age\nb,center07,44\n")
    ds = read_dataset(ds_dir)
    assert ds.format == "nnunet_v1"
    assert ds.channel_names == ["FLAIR", "T1"]
    assert ds.labels == {"background": 0, "lesion": 1}
    assert [c.case_id for c in ds.cases] == ["a", "b", "z"]
    a, b, z = ds.cases
    assert a.images[1] == (ds_dir / "imagesTr" / "a_0001.nii.gz").resolve()
    assert a.label == (ds_dir / "labelsTr" / "a.nii.gz").resolve()
    assert (b.site, b.age) == ("center07", 44.0)
    assert z.label is None and z.split == "test"


# --------------------------------------------------------------------------- CSV manifest


def _make_manifest(tmp_path: Path, header="case,image_T1w,image_T2w,label,stratum,age,site,split") -> Path:
    d = tmp_path / "data"
    for c in ("s1", "s2"):
        _write(d / c / "t1.nii.gz", _vol())
        _write(d / c / "t2.nii.gz", _vol())
        _write(d / c / "seg.nii.gz", np.zeros((6, 7, 8), np.uint8))
    csv = tmp_path / "manifest.csv"
    csv.write_text(
        header + "\n"
        "s1,data/s1/t1.nii.gz,data/s1/t2.nii.gz,data/s1/seg.nii.gz,control,40.1,A,train\n"
        f"s2,{(d / 's2' / 't1.nii.gz').resolve()},data/s2/t2.nii.gz,,preterm,,B,test\n"
    )
    return csv


def test_read_manifest(tmp_path):
    csv = _make_manifest(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"background": 0, "csf": 1, "gm": 2}))
    ds = read_dataset(csv)
    assert ds.format == "manifest"
    assert ds.channel_names == ["T1w", "T2w"]
    assert ds.labels == {"background": 0, "csf": 1, "gm": 2}
    s1, s2 = ds.cases
    assert s1 == CaseRecord("s1", [(tmp_path / "data/s1/t1.nii.gz").resolve(), (tmp_path / "data/s1/t2.nii.gz").resolve()],
                            (tmp_path / "data/s1/seg.nii.gz").resolve(), "control", 40.1, "A", "train")
    assert s2.label is None and s2.age is None and s2.images[0].is_absolute() and s2.split == "test"


def test_read_manifest_channels_argument_and_labels_argument(tmp_path):
    csv = _make_manifest(tmp_path, header="case,t1_path,t2_path,label,stratum,age,site,split")
    ds = read_manifest(csv, channels=["t2_path", "t1_path"], labels={"background": 0, "lesion": 1})
    assert ds.channel_names == ["t2_path", "t1_path"]
    assert ds.cases[0].images[0].name == "t2.nii.gz"
    assert ds.labels == {"background": 0, "lesion": 1}
    ds2 = read_manifest(csv, channels=["t1_path"])
    assert ds2.labels is None and ds2.n_channels == 1


def test_read_manifest_default_case_ids(tmp_path):
    _write(tmp_path / "imgs" / "caseA_0000.nii.gz", _vol())
    _write(tmp_path / "imgs" / "caseB_0000.nii.gz", _vol())
    csv = tmp_path / "m.csv"
    csv.write_text("image\nimgs/caseA_0000.nii.gz\nimgs/caseB_0000.nii.gz\n")
    ds = read_manifest(csv)
    assert [c.case_id for c in ds.cases] == ["caseA", "caseB"]
    assert ds.channel_names == ["image"]


def test_read_manifest_missing_file_names_csv_row_and_path(tmp_path):
    csv = _make_manifest(tmp_path)
    text = csv.read_text().replace("data/s2/t2.nii.gz", "data/s2/nowhere.nii.gz")
    csv.write_text(text)
    with pytest.raises(DataError) as ei:
        read_manifest(csv)
    msg = str(ei.value)
    assert str(csv.resolve()) in msg and "row 2" in msg and "line 3" in msg
    assert str((tmp_path / "data/s2/nowhere.nii.gz").resolve()) in msg and "file not found" in msg
    ds = read_manifest(csv, strict=False)
    assert ds.cases[0].problem is None and ds.cases[1].problem == msg


def test_read_manifest_bad_age_and_duplicates(tmp_path):
    csv = _make_manifest(tmp_path)
    csv.write_text(csv.read_text().replace("40.1", "forty"))
    with pytest.raises(DataError, match=r"row 1 \(line 2\): age 'forty' is not a number"):
        read_manifest(csv)
    csv2 = _make_manifest(tmp_path / "b")
    csv2.write_text(csv2.read_text().replace("s2,", "s1,", 1))
    with pytest.raises(DataError, match=r"manifest\.csv: duplicate case id\(s\): 's1' in rows 1, 2"):
        read_manifest(csv2)


def test_read_dataset_dispatch_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_dataset(tmp_path / "nothing")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder or a .csv"):
        read_dataset(tmp_path / "x.txt")

"""Bad inputs through the real CLI (`jaxseg.launch.main`): a user's mistake is one line on stderr
naming the file / flag / key, exit code 1, no traceback, and nothing half-written; silently wrong
inputs (absurd voxel sizes, changed sources, unfinished stores, config/store mismatches) are refused
or redone, clearly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxseg.data.store import list_cases, read_case_meta, read_dataset_meta
from jaxseg.launch import main

TRAIN = ["data.patch_size=[16,16,16]", "data.batch_size=8", "data.fold=all", "data.threads=1",
         "model.features_base=4", "model.features_max=8", "train.epochs=1", "train.steps_per_epoch=1",
         "data.augment=none"]


def _write(path: Path, arr, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return path


def _dataset(root: Path, cases, spacing=None, labels=None, shape=(10, 9, 8)) -> Path:
    """A one-channel nnU-Net v2 folder; spacing: case id -> voxel size (default 1 mm)."""
    for i, cid in enumerate(cases):
        aff = np.diag([*(spacing or {}).get(cid, (1.0, 1.0, 1.0)), 1.0])
        v = np.zeros(shape, np.float32)
        v[2:-1, 1:-2, 2:-2] = np.random.default_rng(i).uniform(10, 100, (shape[0] - 3, shape[1] - 3, shape[2] - 4))
        _write(root / "imagesTr" / f"{cid}_0000.nii.gz", v, aff)
        lab = np.zeros(shape, np.uint8)
        lab[3:6, 2:5, 3:5] = 1
        _write(root / "labelsTr" / f"{cid}.nii.gz", lab, aff)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": labels or {"background": 0, "fg": 1},
        "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return root


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str, *needles) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("prepare:")]  # tqdm's bar
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


# --------------------------------------------------------------------------- prepare: spacing


def test_absurd_voxel_size_with_median_spacing_is_refused_naming_the_file(tmp_path, capsys):
    ds = _dataset(tmp_path / "raw", ["a", "b"], spacing={"b": (4e6, 4e6, 4e6)})
    store = tmp_path / "store"
    rc, _, err = _run(capsys, "prepare", "--dataset", ds, "--store", store, "--spacing", "median", "--workers", 1)
    assert rc == 1
    _one_line_error(err, ds / "imagesTr" / "b_0000.nii.gz", "implausible voxel size", "--skip-bad")
    assert not store.exists()  # refused before the store was created

    # --skip-bad: the outlier is rejected and left out of the median; the good case keeps its grid
    rc, out, err = _run(capsys, "prepare", "--dataset", ds, "--store", store, "--spacing", "median",
                        "--workers", 1, "--skip-bad")
    assert rc == 0 and "1 rejected" in out
    meta = read_case_meta(store, "a")
    assert meta["target_spacing"] == [1.0, 1.0, 1.0] and meta["shape"] == meta["cropped_shape"]
    assert list_cases(store) == ["a"]
    rejected = json.loads((store / "rejected.json").read_text())["rejected"]
    assert rejected[0]["case_id"] == "b" and "b_0000.nii.gz: implausible voxel size" in rejected[0]["reason"]


def test_absurd_voxel_size_without_resampling_names_the_file(tmp_path, capsys):
    ds = _dataset(tmp_path / "raw", ["a"], spacing={"a": (1.0, 1.0, 5e-5)})
    rc, _, err = _run(capsys, "prepare", "--dataset", ds, "--store", tmp_path / "store", "--workers", 1)
    assert rc == 1
    _one_line_error(err, ds / "imagesTr" / "a_0000.nii.gz", "implausible voxel size")
    assert list_cases(tmp_path / "store") == []
    assert read_dataset_meta(tmp_path / "store")["status"] == "in progress"


def test_median_spacing_warns_about_a_far_but_plausible_case(tmp_path, capsys):
    ds = _dataset(tmp_path / "raw", ["a", "b", "c"], spacing={"c": (20.0, 20.0, 20.0)})
    with pytest.warns(UserWarning, match=r"c_0000\.nii\.gz \(20, 20, 20 mm\)"):
        rc, _, _ = _run(capsys, "prepare", "--dataset", ds, "--store", tmp_path / "store", "--spacing", "median",
                        "--workers", 1)
    assert rc == 0 and read_case_meta(tmp_path / "store", "a")["target_spacing"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("value", ["2,abc", "0,0,0", "1,1", "nan,1,1", "1e6,1,1"])
def test_bad_spacing_flag_is_one_line(tmp_path, capsys, value):
    ds = _dataset(tmp_path / "raw", ["a"])
    rc, _, err = _run(capsys, "prepare", "--dataset", ds, "--store", tmp_path / "store", "--spacing", value)
    assert rc == 1
    _one_line_error(err, "spacing")
    if value != "1e6,1,1":
        _one_line_error(err, f"--spacing {value!r}")
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- prepare: resume


def test_changed_source_file_is_redone_and_says_why(tmp_path, capsys):
    ds = _dataset(tmp_path / "raw", ["a", "b"])
    store = tmp_path / "store"
    assert _run(capsys, "prepare", "--dataset", ds, "--store", store, "--workers", 1)[0] == 0
    before_a = (store / "a" / "meta.json").stat().st_mtime_ns
    old_b = read_case_meta(store, "b")
    assert [f["path"] for f in old_b["source_fingerprint"]] == [str(ds / "imagesTr" / "b_0000.nii.gz"),
                                                                 str(ds / "labelsTr" / "b.nii.gz")]
    # a different image for b (another intensity range; new size and mtime)
    img = ds / "imagesTr" / "b_0000.nii.gz"
    v = np.asarray(nib.load(str(img)).dataobj) * 3 + 7 * (np.asarray(nib.load(str(img)).dataobj) > 0)
    _write(img, v.astype(np.float32), np.eye(4))
    os.utime(img, ns=(old_b["source_fingerprint"][0]["mtime_ns"] + 10**9,) * 2)
    rc, out, err = _run(capsys, "prepare", "--dataset", ds, "--store", store, "--workers", 1)
    assert rc == 0
    assert "1 redone" in out and "1 already done" in out
    assert f"redid case 'b': {img} changed since it was prepared" in err
    new_b = read_case_meta(store, "b")
    assert new_b["normalization"]["mean"] != old_b["normalization"]["mean"]
    assert new_b["source_fingerprint"][0]["size"] == img.stat().st_size
    assert (store / "a" / "meta.json").stat().st_mtime_ns == before_a  # untouched
    assert read_dataset_meta(store)["status"] == "complete"


def test_store_without_fingerprint_is_redone(tmp_path, capsys):
    ds = _dataset(tmp_path / "raw", ["a"])
    store = tmp_path / "store"
    assert _run(capsys, "prepare", "--dataset", ds, "--store", store, "--workers", 1)[0] == 0
    meta = read_case_meta(store, "a")
    del meta["source_fingerprint"]  # a store written before fingerprints existed
    (store / "a" / "meta.json").write_text(json.dumps(meta))
    rc, out, err = _run(capsys, "prepare", "--dataset", ds, "--store", store, "--workers", 1)
    assert rc == 0 and "1 redone" in out and "no fingerprint" in err
    assert "source_fingerprint" in read_case_meta(store, "a")


def test_another_dataset_into_the_same_store_is_refused(tmp_path, capsys):
    a = _dataset(tmp_path / "A", ["x", "y"])
    b = _dataset(tmp_path / "B", ["x", "y"], labels={"background": 0, "lesion": 1})
    store = tmp_path / "store"
    assert _run(capsys, "prepare", "--dataset", a, "--store", store, "--workers", 1)[0] == 0
    ds_json = (store / "dataset.json").read_text()
    case_meta = (store / "x" / "meta.json").read_text()
    rc, _, err = _run(capsys, "prepare", "--dataset", b, "--store", store, "--workers", 1)
    assert rc == 1
    _one_line_error(err, store / "dataset.json", f"prepared from {a}", f"not {b}", "another --store")
    assert (store / "dataset.json").read_text() == ds_json and (store / "x" / "meta.json").read_text() == case_meta

    # the same dataset with a changed label set is refused too
    meta = json.loads((a / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "fg": 1, "extra": 2}
    (a / "dataset.json").write_text(json.dumps(meta))
    rc, _, err = _run(capsys, "prepare", "--dataset", a, "--store", store, "--workers", 1)
    assert rc == 1
    _one_line_error(err, store / "dataset.json", "'extra': 2")
    assert (store / "dataset.json").read_text() == ds_json


# --------------------------------------------------------------------------- prepare: unreadable inputs


def test_zero_size_image_names_the_file(tmp_path, capsys):
    ds = _dataset(tmp_path / "raw", ["a"])
    bad = _write(ds / "imagesTr" / "a_0000.nii.gz", np.zeros((10, 0, 8), np.float32), np.eye(4))
    rc, _, err = _run(capsys, "prepare", "--dataset", ds, "--store", tmp_path / "store", "--workers", 1)
    assert rc == 1
    _one_line_error(err, bad, "empty image", "(10, 0, 8)", "zero-length axis")
    assert list_cases(tmp_path / "store") == []


@pytest.mark.parametrize("change, needles", [
    (lambda m: m.__setitem__("label", m.pop("labels")), ["missing key 'labels'", "found 'label'"]),
    (lambda m: m.pop("channel_names"), ["missing key 'channel_names'", "modality"]),
    (lambda m: m.__setitem__("numTraining", "two"), ["'numTraining' must be an integer"]),
])
def test_dataset_json_with_renamed_keys_names_file_and_key(tmp_path, capsys, change, needles):
    ds = _dataset(tmp_path / "raw", ["a"])
    meta = json.loads((ds / "dataset.json").read_text())
    change(meta)
    (ds / "dataset.json").write_text(json.dumps(meta))
    rc, _, err = _run(capsys, "prepare", "--dataset", ds, "--store", tmp_path / "store", "--workers", 1)
    assert rc == 1
    _one_line_error(err, ds / "dataset.json", *needles)
    assert not (tmp_path / "store").exists()


def test_duplicate_case_id_in_manifest_names_csv_id_and_rows(tmp_path, capsys):
    _dataset(tmp_path / "raw", ["a", "b"])
    csv = tmp_path / "cases.csv"
    csv.write_text("case,image,label\n"
                   "x,raw/imagesTr/a_0000.nii.gz,raw/labelsTr/a.nii.gz\n"
                   "y,raw/imagesTr/b_0000.nii.gz,raw/labelsTr/b.nii.gz\n"
                   "x,raw/imagesTr/b_0000.nii.gz,raw/labelsTr/b.nii.gz\n")
    rc, _, err = _run(capsys, "prepare", "--dataset", csv, "--store", tmp_path / "store", "--workers", 1)
    assert rc == 1
    _one_line_error(err, csv, "duplicate case id", "'x' in rows 1, 3", "'case' column unique")
    assert "add a 'case' column" not in err
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- train on a bad store


def unfinished_copy(store, tmp_path):
    """A copy of `store` whose dataset.json says prepare did not finish."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    meta = json.loads((copy / "dataset.json").read_text())
    meta["status"] = "in progress"
    (copy / "dataset.json").write_text(json.dumps(meta))
    return copy, meta


def test_train_on_unfinished_store_is_refused_with_the_command(tiny_store, tmp_path, capsys):
    store, meta = unfinished_copy(tiny_store, tmp_path)
    rc, _, err = _run(capsys, "train", "--workdir", tmp_path / "run", f"data.store={store}", *TRAIN)
    assert rc == 1
    _one_line_error(err, store / "dataset.json", "'in progress'",
                    f"python -m jaxseg.launch prepare --dataset {meta['source']} --store {store}")
    assert not (tmp_path / "run").exists()


def test_dlb_train_on_unfinished_store_is_refused(tiny_store, tmp_path, capsys):
    store, meta = unfinished_copy(tiny_store, tmp_path)
    rc, _, err = _run(capsys, "dlb-train", "--workdir", tmp_path / "run", f"data.store={store}",
                      "data.num_channels=1", "data.num_classes=8")
    assert rc == 1
    _one_line_error(err, store / "dataset.json", "'in progress'", "prepare --dataset")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, needles", [
    ("data.num_classes=7", ["data.num_classes=7", "has 8 classes", "set data.num_classes=8"]),
    ("data.num_channels=3", ["data.num_channels=3", "has 1 channel(s)", "set data.num_channels=1"]),
])
def test_train_with_classes_or_channels_unlike_the_store_is_refused(tiny_store, tmp_path, capsys, override,
                                                                    needles):
    rc, _, err = _run(capsys, "train", "--workdir", tmp_path / "run", f"data.store={tiny_store}", *TRAIN, override)
    assert rc == 1
    _one_line_error(err, tiny_store, *needles)
    assert not (tmp_path / "run").exists()

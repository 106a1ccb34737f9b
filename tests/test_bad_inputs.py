"""Bad inputs through the real CLI (`jaxseg.launch.main`): a user's mistake is one line on stderr
naming the file / flag / key, exit code 1, no traceback, and nothing half-written; silently wrong
inputs (absurd voxel sizes, changed sources, unfinished stores, config/store mismatches) are refused
or redone, clearly."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxseg.data.store import list_cases
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

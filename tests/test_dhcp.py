"""dHCP manifest builder (jaxseg.neonatal.dhcp): tree scanning, skipped sessions, the paper's splits."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxseg.neonatal import dhcp
from jaxseg.data.datasets import read_dataset, read_manifest
from jaxseg.data.io import DataError

# subject -> [(session id as written in sessions.tsv, scan age)]; "B02" is scanned twice (preterm and
# at term), "C03"'s second session has no T1w, "D04"'s age is "n/a".
SUBJECTS = {
    "A01": [("1001", 44.1)],
    "B02": [("ses-2001", 29.0), ("2002", 41.5)],
    "C03": [("3001", 30.2), ("3002", 40.0)],
    "D04": [("4001", "n/a")],
    "E05": [("5001", 27.3)], "F06": [("6001", 43.9)], "G07": [("7001", 33.3)], "H08": [("8001", 42.7)],
    "J09": [("9001", 35.0)], "K10": [("1101", 38.2)], "L11": [("1201", 31.1)], "M12": [("1301", 44.9)],
    "N13": [("1401", 36.6)], "P14": [("1501", 26.9)],
}
NO_T1W = "sub-C03_ses-3002"
N_USABLE = 14  # 16 sessions - missing T1w - age n/a


def _nii(path: Path, value: int, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((4, 4, 4), value, dtype)
    arr[0] = 0
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dhcp")
    anat_root = root / "derivatives" / "dhcp_anat_pipeline"
    anat_root.mkdir(parents=True)
    with open(anat_root / "participants.tsv", "w") as f:
        f.write("participant_id\tsex\tbirth_age\n")
        for i, sub in enumerate(SUBJECTS):
            f.write(f"sub-{sub}\tfemale\t{28 + i * 0.5}\n")
    for sub, sessions in SUBJECTS.items():
        (anat_root / f"sub-{sub}").mkdir()
        with open(anat_root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv", "w") as f:
            f.write("session_id\tscan_age\tradiology_score\n")
            for ses, age in sessions:
                f.write(f"{ses}\t{age}\t1\n")
        for ses, _ in sessions:
            ses = ses.removeprefix("ses-")
            case = f"sub-{sub}_ses-{ses}"
            d = anat_root / f"sub-{sub}" / f"ses-{ses}" / "anat"
            _nii(d / f"{case}_desc-restore_T2w.nii.gz", 2)
            if case != NO_T1W:
                _nii(d / f"{case}_desc-restore_T1w.nii.gz", 1)
            _nii(d / f"{case}_desc-drawem9_dseg.nii.gz", 3, np.uint8)
            (d / f"{case}_desc-drawem87_dseg.nii.gz").write_bytes(b"")  # other derivatives are ignored
    return root


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_scan_finds_sessions_ages_and_skips_with_reasons(tree):
    scan = dhcp.scan_dhcp(tree)
    assert scan.root == (tree / "derivatives" / "dhcp_anat_pipeline").resolve()
    assert len(scan.sessions) == N_USABLE
    by_case = {s.case_id: s for s in scan.sessions}
    assert by_case["sub-B02_ses-2001"].age == 29.0  # "ses-" prefix in sessions.tsv
    assert by_case["sub-B02_ses-2002"].age == 41.5
    assert by_case["sub-A01_ses-1001"].birth_age == 28.0
    s = by_case["sub-P14_ses-1501"]
    assert s.t1w.name == "sub-P14_ses-1501_desc-restore_T1w.nii.gz" and s.t1w.is_file()
    assert s.t2w.name == "sub-P14_ses-1501_desc-restore_T2w.nii.gz"
    assert s.label.name == "sub-P14_ses-1501_desc-drawem9_dseg.nii.gz"
    skipped = dict(scan.skipped)
    assert set(skipped) == {NO_T1W, "sub-D04_ses-4001"}
    assert "missing T1w (sub-C03_ses-3002_desc-restore_T1w.nii.gz)" in skipped[NO_T1W]
    assert "scan_age of session 4001 is 'n/a'" in skipped["sub-D04_ses-4001"]
    # the pipeline folder itself works as the root too
    assert [x.case_id for x in dhcp.scan_dhcp(scan.root).sessions] == [x.case_id for x in scan.sessions]


def test_pipeline_manifest_is_readable_age_stratified_and_deterministic(tree, tmp_path):
    out = tmp_path / "m" / "pipeline.csv"
    res = dhcp.build_manifest(tree, out, split="pipeline", seed=3, fraction=0.5, val_fraction=0.25, n_test=4)
    # 14 usable: subset round(7.0) = 7 (val round(1.75) = 2, train 5), test 4, unused 3
    assert res.counts == {"train": 5, "val": 2, "test": 4, "unused": 3}
    assert [c for c, _ in res.skipped] == [NO_T1W, "sub-D04_ses-4001"]
    rows = rows_of(out)
    assert [r["case"] for r in rows] == sorted(r["case"] for r in rows) and len(rows) == N_USABLE
    assert list(rows[0]) == list(dhcp.COLUMNS)

    ds = read_manifest(out)  # the project's reader: every file exists, labels.json is picked up
    assert ds.channel_names == ["T1w", "T2w"]
    assert ds.labels == dhcp.DRAWEM9_LABELS
    recs = {r.case_id: r for r in ds.cases}
    assert recs["sub-B02_ses-2002"].age == 41.5 and recs["sub-B02_ses-2002"].images[0].name.endswith("_T1w.nii.gz")
    assert Counter(r.split for r in ds.cases) == Counter(res.counts)
    assert read_dataset(out).cases[0].label.is_file()

    # age-representative: one training-subset session in each of the 7 consecutive bins of 2 by age
    ages = sorted((float(r["age"]), r["case"]) for r in rows)
    subset = {r["case"] for r in rows if r["split"] in ("train", "val")}
    assert [sum(c in subset for _, c in ages[2 * i: 2 * i + 2]) for i in range(7)] == [1] * 7
    # no subject on both sides of train/val/test
    sides = {}
    for r in rows:
        if r["split"] != "unused":
            sides.setdefault(r["subject"], set()).add(r["split"])
    assert all(len(v) == 1 for v in sides.values()), sides

    again = dhcp.build_manifest(tree, tmp_path / "again.csv", split="pipeline", seed=3, fraction=0.5,
                                val_fraction=0.25, n_test=4)
    assert again.path.read_text() == out.read_text()
    others = [dhcp.build_manifest(tree, tmp_path / f"s{s}.csv", split="pipeline", seed=s, fraction=0.5,
                                  val_fraction=0.25, n_test=4).rows for s in (4, 5, 6)]
    assert any([r["split"] for r in o] != [r["split"] for r in rows] for o in others)


def test_transfer_split_counts_ages_and_phases(tree, tmp_path):
    out = tmp_path / "transfer.csv"
    kw = dict(n_old=4, n_old_val=1, n_young=5, n_finetune=2)
    res = dhcp.build_manifest(tree, out, split="transfer", seed=0, relative=True, **kw)
    assert res.counts == {"pretrain": 3, "pretrain_val": 1, "finetune": 2, "test": 3, "unused": 5}
    rows = rows_of(out)
    assert not Path(rows[0]["image_T2w"]).is_absolute()
    by = {k: [r for r in rows if r["split"] == k] for k in res.counts}
    old = by["pretrain"] + by["pretrain_val"]
    young = by["finetune"] + by["test"]
    # the 4 oldest sessions: 44.9, 44.1, 43.9, 42.7
    assert sorted(float(r["age"]) for r in old) == [42.7, 43.9, 44.1, 44.9]
    # the 5 youngest: 26.9, 27.3, 29.0 (B02's preterm scan; its term scan 41.5 is not a source session), ...
    assert sorted(float(r["age"]) for r in young) == [26.9, 27.3, 29.0, 30.2, 31.1]
    assert not {r["subject"] for r in old} & {r["subject"] for r in young}
    assert read_manifest(out).cases[0].images[1].is_file()

    same = dhcp.build_manifest(tree, tmp_path / "t2.csv", split="transfer", seed=0, **kw)
    assert [r["split"] for r in same.rows] == [r["split"] for r in res.rows]

    pre = dhcp.phase_rows(res.rows, "pretrain")
    assert Counter(r["split"] for r in pre) == {"train": 3, "val": 1}
    assert dhcp.main([str(tree), "--out", str(tmp_path / "ft.csv"), "--split", "transfer", "--n-old", "4",
                      "--n-old-val", "1", "--n-young", "5", "--n-finetune", "2", "--phase", "finetune"]) == 0
    ft = read_manifest(tmp_path / "ft.csv")
    assert Counter(c.split for c in ft.cases) == {"train": 2, "test": 3}
    assert {c.case_id for c in ft.cases if c.split == "train"} == {r["case"] for r in by["finetune"]}


def test_cli_pipeline_and_report(tree, tmp_path, capsys):
    rc = dhcp.main([str(tree), "--out", str(tmp_path / "p.csv"), "--split", "pipeline", "--fraction", "0.5",
                    "--n-test", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "14 sessions (train 6, val 1, test 2, unused 5)" in text
    assert f"  {NO_T1W}: missing T1w" in text
    rc = dhcp.main([str(tree), "--out", str(tmp_path / "q.csv"), "--split", "pipeline"])  # n_test=100
    assert rc == 1 and "n_test=100 but only" in capsys.readouterr().err


def test_absent_or_empty_tree_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: dHCP folder not found"):
        dhcp.scan_dhcp(tmp_path / "nope")
    (tmp_path / "empty" / "derivatives" / "dhcp_anat_pipeline").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no dHCP subjects found"):
        dhcp.scan_dhcp(tmp_path / "empty")
    d = tmp_path / "bare" / "sub-X1" / "ses-1" / "anat"
    d.mkdir(parents=True)
    with pytest.raises(DataError, match=r"no usable dHCP session \(1 skipped: sub-X1_ses-1: missing T2w"):
        dhcp.scan_dhcp(tmp_path / "bare")


def test_transfer_needs_enough_sessions(tree):
    sessions = dhcp.scan_dhcp(tree).sessions
    with pytest.raises(ValueError, match=r"needs n_old \+ n_young = 220 sessions but the tree has 14 usable"):
        dhcp.transfer_split(sessions)


def fake_sessions(n: int, seed: int = 0) -> list[dhcp.Session]:
    ages = np.random.default_rng(seed).uniform(26.7, 45.1, n)
    return [dhcp.Session(f"S{i:04d}", "1", Path("t1"), Path("t2"), Path("l"), float(a)) for i, a in enumerate(ages)]


def test_paper_counts():
    sessions = fake_sessions(709)
    p = Counter(dhcp.pipeline_split(sessions, seed=1).values())
    assert p == {"train": 114, "val": 28, "test": 100, "unused": 467}
    t = dhcp.transfer_split(sessions, seed=1)
    assert Counter(t.values()) == {"pretrain": 90, "pretrain_val": 10, "finetune": 40, "test": 80, "unused": 489}
    age = {s.case_id: s.age for s in sessions}
    old = [age[c] for c, v in t.items() if v.startswith("pretrain")]
    young = [age[c] for c, v in t.items() if v in ("finetune", "test")]
    assert min(old) > max(young)
    assert sorted(age.values())[-100] == min(old) and sorted(age.values())[119] == max(young)

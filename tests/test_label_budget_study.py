"""The label-budgeting study (jaxseg.neonatal.label_budget) and data.max_train_cases."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.config import ConfigError
from jaxseg.config import load_config as _load_config
from jaxseg.losses import deep_supervision_loss, dice_ce
from jaxseg.neonatal.config import NeonatalConfig
from jaxseg.neonatal.label_budget import (
    COLUMNS,
    SETTINGS,
    case_dice,
    labelled_counts,
    n_full_subjects,
    setting_config,
    table_markdown,
    write_table,
)
from jaxseg.data.splits import kfold_split, limit_cases


def load_config(path, overrides=()):
    """The neonatal studies' config (core + synth + transfer sections)."""
    return _load_config(path, overrides, NeonatalConfig)

IDS = [f"case_{i:03d}" for i in range(30)]


# ------------------------------------------------------------------------------ data.max_train_cases


def test_limit_cases_selects_exactly_n_deterministically():
    train, _ = kfold_split(IDS, 0)
    for n in (1, 8, len(train) - 1):
        got = limit_cases(train, n, seed=12345)
        assert len(got) == n and len(set(got)) == n and set(got) <= set(train)
        assert got == sorted(got) == limit_cases(list(reversed(train)), n, seed=12345)  # input order irrelevant
    assert limit_cases(train, 8, seed=1) != limit_cases(train, 8, seed=2)  # the seed matters
    # nested: a smaller N is a subset of a larger one (the "full" subjects are among the dispersed ones)
    assert set(limit_cases(train, 5)) <= set(limit_cases(train, 12))
    # None or N >= all: every case, unchanged
    assert limit_cases(train, None) == train == limit_cases(train, len(train)) == limit_cases(train, 10 ** 6)


def test_max_train_cases_config():
    assert load_config(None).data.max_train_cases is None
    assert load_config(None, ["data.max_train_cases=16"]).data.max_train_cases == 16
    with pytest.raises(ConfigError, match="data.max_train_cases"):
        load_config(None, ["data.max_train_cases=0"])


def test_resume_of_a_checkpoint_written_before_max_train_cases_existed(tmp_path):
    # Its fingerprint was computed without the field; the saved config, read with this code, is the same.
    from jaxseg.config import dump_config
    from jaxseg.train.checkpoint import IncompatibleResume, check_compatible

    cfg = load_config(None)
    old_text = "\n".join(l for l in dump_config(cfg).splitlines() if "max_train_cases" not in l) + "\n"
    assert old_text != dump_config(cfg)
    check_compatible({"fingerprint": "from an older schema", "config": old_text}, cfg, tmp_path)
    with pytest.raises(IncompatibleResume, match="data.max_train_cases: null -> 5"):
        check_compatible({"fingerprint": "from an older schema", "config": old_text},
                         load_config(None, ["data.max_train_cases=5"]), tmp_path)


def test_budget_study_command_has_help(capsys):
    from jaxseg.launch import main

    with pytest.raises(SystemExit) as e:
        main(["budget-study", "--help"])
    assert e.value.code == 0 and "runs/budget_study" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- settings


def test_settings_configs_and_equal_slice_budget():
    cfg = load_config(None, ["seed=3"])
    assert [s[0] for s in SETTINGS] == ["random", "sagittal", "coronal", "axial", "full"]
    train = IDS[:24]
    n_full = n_full_subjects(len(train), cfg.data.label_budget.fraction)
    assert n_full == 8
    shapes = {c: (30, 30, 30) for c in IDS}
    counts = {}
    for name, enabled, axis in SETTINGS:
        rc = setting_config(cfg, name, n_full)
        assert rc.data.label_budget.enabled is enabled
        assert rc.data.max_train_cases == (None if enabled else n_full)
        if enabled:
            assert rc.data.label_budget.axis == axis
        ids = limit_cases(train, rc.data.max_train_cases)
        counts[name] = labelled_counts(rc, shapes, ids)
    assert counts["full"] == {"subjects": 8, "labelled_slices": 8 * 30, "labelled_voxels": 8 * 30 ** 3}
    for name in ("random", "sagittal", "coronal", "axial"):  # 10 of 30 slices per subject: equal budget
        assert counts[name] == {"subjects": 24, "labelled_slices": 24 * 10, "labelled_voxels": 24 * 10 * 900}


def test_case_dice_with_and_without_background():
    ref = np.zeros((4, 4, 4), int)
    ref[:2] = 1
    pred = ref.copy()
    pred[0, 0, :] = 2  # 4 voxels of class 1 predicted as class 2 (absent from the reference)
    d = case_dice(pred, ref, [0, 1, 2, 3])
    d1 = 2 * 28 / (28 + 32)
    assert d["per_class"][0] == 1.0 and d["per_class"][1] == pytest.approx(d1) and d["per_class"][2] == 0.0
    assert np.isnan(d["per_class"][3])  # absent from both: left out of the means
    assert d["all"] == pytest.approx((1 + d1 + 0) / 3) and d["fg"] == pytest.approx((d1 + 0) / 2)


# ---------------------------------------------------------------------------------------- the table


def _rows():
    vals = {"random": 0.91, "sagittal": 0.90, "coronal": 0.913, "axial": 0.905, "full": 0.852}
    return [{"setting": s, "subjects": 16 if s == "full" else 48, "labelled_slices": 800 if s == "full" else 790,
             "labelled_voxels": 10 ** 6, "val_dice_all": v + 0.01, "val_dice_fg": v - 0.02, "test_dice_all": v,
             "test_dice_fg": v - 0.03, "n_val": 12, "n_test": 20, "best_step": 250, "train_val_dice": v - 0.05}
            for s, v in vals.items()]


def test_write_table_on_hand_made_numbers(tmp_path):
    rows = _rows()
    per_class = {r["setting"]: {"test": {"background": 0.99, "WM": r["test_dice_fg"]}} for r in rows}
    paths = write_table(tmp_path, rows, per_class=per_class, timings={"total_s": 12.5}, info={"steps": 250},
                        notes=["a note"])
    md = (tmp_path / "table.md").read_text().splitlines()
    assert md[0].startswith("| Setting | Training subjects | Labelled slices |")
    assert "Validation Dice (all classes)" in md[0] and "Test Dice (foreground)" in md[0]
    body = [l for l in md[2:] if l.startswith("| ")]
    assert [l.split("|")[1].strip() for l in body] == ["random", "sagittal", "coronal", "axial", "full"]
    assert body[0] == "| random | 48 | 790 | 1000000 | 0.920 | 0.890 | 0.910 | 0.880 | 0.910 |"
    assert body[4] == "| full | 16 | 800 | 1000000 | 0.862 | 0.832 | 0.852 | 0.822 | 0.852 |"
    assert md[-1] == "a note"
    with open(tmp_path / "table.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(COLUMNS) and len(got) == 5
    assert float(got[2]["test_dice_all"]) == pytest.approx(0.913) and got[4]["subjects"] == "16"
    record = json.loads((tmp_path / "table.json").read_text())
    assert record["timings"] == {"total_s": 12.5} and record["info"] == {"steps": 250}
    assert record["per_class"]["axial"]["test"]["WM"] == pytest.approx(0.875)
    assert record["paper_table3_test"]["full"] == 0.852
    assert paths["plot"].stat().st_size > 5000
    # NaN prints as nan, not as a crash
    assert "| nan |" in table_markdown([{**rows[0], "val_dice_all": float("nan")}])


# -------------------------------------------------------- masked deep supervision (upsample_outputs)


def test_upsample_outputs_ignores_labels_of_unlabelled_voxels():
    # tests/test_losses.py covers downsample_targets at every resolution and the all-unlabelled patch in
    # both modes; in upsample_outputs every head is compared at full resolution, so the labels of the
    # unlabelled voxels must not matter either.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(2, 8, 8, 8)).astype(np.int32)
    outputs = [rng.normal(size=(2, 8 // f, 8 // f, 8 // f, 3)).astype(np.float32) for f in (1, 2, 4)]
    mask = rng.random(labels.shape) < 0.4
    other = labels.copy()
    other[~mask] = (other[~mask] + 1) % 3
    loss = lambda lab, m: np.asarray(deep_supervision_loss(dice_ce, outputs, lab, m, weights=[0.5, 0.3, 0.2],
                                                           mode="upsample_outputs"))
    np.testing.assert_allclose(loss(other, mask), loss(labels, mask), rtol=1e-6)
    assert not np.allclose(loss(other, None), loss(labels, None))
    g = jax.grad(lambda os: deep_supervision_loss(dice_ce, os, labels, np.zeros_like(mask),
                                                  mode="upsample_outputs").sum())([jnp.asarray(o) for o in outputs])
    assert all(np.all(np.asarray(gi) == 0) for gi in g)


# ------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_label_budget_tiny(tmp_path, monkeypatch):
    from jaxseg.launch import main
    from jaxseg.neonatal import label_budget

    # Three of the five settings (random, axial, full: both code paths) keep the smoke test near a minute;
    # each run costs its compiles (~20 s on the 2-core CPU) whatever the step count.
    monkeypatch.setattr(label_budget, "SETTINGS", tuple(s for s in SETTINGS if s[0] in ("random", "axial", "full")))

    overrides = ["synth.n_subjects=14", "synth.n_test=3", "synth.spacing=8.0", "data.patch_size=[16,16,16]",
                 "model.features_base=4", "model.features_max=8", "data.batch_size=8",
                 "train.epochs=1", "train.steps_per_epoch=2", "train.val_every=1", "train.checkpoint_every=2",
                 "data.threads=1", "eval.window_batch=8"]
    work = tmp_path / "study"
    assert main(["budget-study", "--workdir", str(work), *overrides]) == 0
    record = json.loads((work / "table.json").read_text())
    rows = {r["setting"]: r for r in record["rows"]}
    assert list(rows) == ["random", "axial", "full"]
    # 11 training cases, fold 0: 8 train / 3 validation; "full" = round(8 / 3) = 3 subjects
    assert record["info"]["n_train"] == 8 and record["info"]["n_full"] == 3
    assert rows["full"]["subjects"] == 3 and all(rows[s]["subjects"] == 8 for s in rows if s != "full")
    for name, r in rows.items():
        assert r["n_val"] == 3 and r["n_test"] == 3 and r["best_step"] == 2
        for k in ("val_dice_all", "val_dice_fg", "test_dice_all", "test_dice_fg"):
            assert 0.0 <= r[k] <= 1.0
        assert len(list((work / name / "predictions").glob("*.nii.gz"))) == 6  # validation + test
        cfg = load_config(work / name / "config.yaml")
        assert cfg.data.label_budget.enabled is (name != "full")
        assert cfg.data.max_train_cases == (3 if name == "full" else None)
    assert record["timings"]["total_s"] > 0 and "train_full_s" in record["timings"]
    assert (work / "table.md").read_text().count("\n| ") >= 3 and (work / "budget.png").exists()
    # A rerun resumes: nothing is trained or predicted again, the table is the same.
    assert main(["budget-study", "--workdir", str(work), *overrides]) == 0
    again = json.loads((work / "table.json").read_text())
    assert [r["test_dice_all"] for r in again["rows"]] == [r["test_dice_all"] for r in record["rows"]]

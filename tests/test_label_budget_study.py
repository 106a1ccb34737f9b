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
    summarise,
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
    assert [s[0] for s in SETTINGS] == ["random", "sagittal", "coronal", "axial", "full", "full_epochs"]
    train = IDS[:24]
    n_full = n_full_subjects(len(train), cfg.data.label_budget.fraction)
    assert n_full == 8
    shapes = {c: (30, 30, 30) for c in IDS}
    counts = {}
    for name, enabled, axis in SETTINGS:
        rc = setting_config(cfg, name, n_full, len(train))
        assert rc.data.label_budget.enabled is enabled
        assert rc.data.max_train_cases == (None if enabled else n_full)
        if enabled:
            assert rc.data.label_budget.axis == axis
        ids = limit_cases(train, rc.data.max_train_cases)
        counts[name] = labelled_counts(rc, shapes, ids)
    assert counts["full"] == counts["full_epochs"] == {"subjects": 8, "labelled_slices": 8 * 30,
                                                       "labelled_voxels": 8 * 30 ** 3}
    # equal steps vs equal epochs: full_epochs makes as many passes over its 8 subjects as the others over 24
    steps = {n: setting_config(cfg, n, n_full, len(train)).train for n in ("random", "full", "full_epochs")}
    assert steps["random"] == steps["full"] == cfg.train
    assert steps["full_epochs"].steps_per_epoch == round(cfg.train.steps_per_epoch * 8 / 24)
    assert steps["full_epochs"].epochs == cfg.train.epochs
    with pytest.raises(ValueError, match="full_epochs needs"):
        setting_config(cfg, "full_epochs", n_full)
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
    vals = {"random": 0.91, "sagittal": 0.90, "coronal": 0.913, "axial": 0.905, "full": 0.852, "full_epochs": 0.80}
    return [{"setting": s, "seed": seed, "steps": 100 if s == "full_epochs" else 300,
             "subjects": 16 if s.startswith("full") else 48, "labelled_slices": 800 if s.startswith("full") else 790,
             "labelled_voxels": 10 ** 6, "val_dice_all": v + 0.01 + d, "val_dice_fg": v - 0.02 + d,
             "test_dice_all": v + d, "test_dice_fg": v - 0.03 + (6 * d if s == "axial" else d), "n_val": 12,
             "n_test": 20, "best_step": 250, "train_val_dice": v - 0.05}
            for seed, d in ((0, -0.01), (1, 0.0), (2, 0.01)) for s, v in vals.items()]


def test_write_table_on_hand_made_numbers(tmp_path):
    rows = _rows()
    per_class = {s: {"test": {"background": 0.99, "WM": 0.5}} for s in {r["setting"] for r in rows}}
    paths = write_table(tmp_path, rows, per_class=per_class, timings={"total_s": 12.5}, info={"steps": 300},
                        notes=["a note"])
    md = (tmp_path / "table.md").read_text().splitlines()
    assert md[0].startswith("| Setting | Steps | Training subjects | Labelled slices |")
    assert "Validation Dice (all classes)" in md[0] and "Test Dice (foreground)" in md[0]
    assert "vs full (equal steps)" in md[0] and "vs full_epochs (equal epochs)" in md[0]
    body = [l for l in md[2:] if l.startswith("| ")]
    assert [l.split("|")[1].strip() for l in body] == ["random", "sagittal", "coronal", "axial", "full", "full_epochs"]
    # mean ± SD over the 3 seeds (SD of -0.01, 0, 0.01 = 0.01); Δ fg vs full = 0.88 - 0.822 = 0.058 > 0.02: starred;
    # axial's fg SD is 0.06, so its Δ vs full (0.053) is not beyond 0.06 + 0.01
    assert body[0] == ("| random | 300 | 48 | 790 | 0.920 ± 0.010 | 0.890 ± 0.010 | 0.910 ± 0.010 | 0.880 ± 0.010 | "
                       "+0.058* | +0.110* | 0.910 |")
    assert body[3].split("|")[9:11] == [" +0.053 ", " +0.105* "]
    assert body[4].split("|")[9:11] == [" - ", " +0.052* "] and body[4].endswith("| - |")  # no paper row at equal steps
    assert body[5].startswith("| full_epochs | 100 | 16 | 800 |") and body[5].endswith("| - | 0.852 |")
    assert md[-1] == "a note"
    with open(tmp_path / "table.csv") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(COLUMNS) and len(got) == 18 and got[0]["seed"] == "0"
    assert float(got[2]["test_dice_all"]) == pytest.approx(0.903) and got[4]["subjects"] == "16"
    record = json.loads((tmp_path / "table.json").read_text())
    assert record["timings"] == {"total_s": 12.5} and record["info"] == {"steps": 300}
    summary = {r["setting"]: r for r in record["summary"]}
    assert summary["coronal"]["test_dice_all_mean"] == pytest.approx(0.913)
    assert summary["coronal"]["test_dice_all_sd"] == pytest.approx(np.std([0.903, 0.913, 0.923], ddof=1))
    assert summary["random"]["vs_full_test_dice_fg"]["exceeds"] is True
    assert record["paper_table3_test"]["full_epochs"] == 0.852
    assert paths["plot"].stat().st_size > 5000
    # NaN prints as nan, not as a crash
    nan_rows = [{**r, "val_dice_all": float("nan")} for r in rows if r["setting"] == "random"]
    assert "| nan |" in table_markdown(summarise(nan_rows))


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

    # Four of the six settings (random, axial, full, full_epochs: every code path) keep the smoke test near a
    # minute; each run costs its compiles (~20 s on the 2-core CPU) whatever the step count.
    monkeypatch.setattr(label_budget, "SETTINGS",
                        tuple(s for s in SETTINGS if s[0] in ("random", "axial", "full", "full_epochs")))

    overrides = ["synth.n_subjects=14", "synth.n_test=3", "synth.spacing=8.0", "data.patch_size=[16,16,16]",
                 "model.features_base=4", "model.features_max=8", "data.batch_size=8",
                 "train.epochs=1", "train.steps_per_epoch=6", "train.val_every=1", "train.checkpoint_every=6",
                 "data.threads=1", "eval.window_batch=8", "seeds=[0,1]"]
    work = tmp_path / "study"
    assert main(["budget-study", "--workdir", str(work), *overrides]) == 0
    record = json.loads((work / "table.json").read_text())
    assert [(r["setting"], r["seed"]) for r in record["rows"]] == [
        (s, seed) for seed in (0, 1) for s in ("random", "axial", "full", "full_epochs")]
    # 11 training cases, fold 0: 8 train / 3 validation; "full" = round(8 / 3) = 3 subjects
    assert record["info"]["n_train"] == 8 and record["info"]["n_full"] == 3 and record["info"]["seeds"] == [0, 1]
    for r in record["rows"]:
        assert r["subjects"] == (3 if r["setting"].startswith("full") else 8)
        assert r["steps"] == r["best_step"] == (2 if r["setting"] == "full_epochs" else 6)  # round(6 * 3 / 8)
        assert r["n_val"] == 3 and r["n_test"] == 3
        for k in ("val_dice_all", "val_dice_fg", "test_dice_all", "test_dice_fg"):
            assert 0.0 <= r[k] <= 1.0
        run = work / r["setting"] / f"seed{r['seed']}"
        assert len(list((run / "predictions").glob("*.nii.gz"))) == 6  # validation + test
        cfg = load_config(run / "config.yaml")
        assert cfg.seed == r["seed"] and cfg.data.label_budget.enabled is (not r["setting"].startswith("full"))
        assert cfg.data.max_train_cases == (3 if r["setting"].startswith("full") else None)
    # the seeds are different runs
    by = {(r["setting"], r["seed"]): r for r in record["rows"]}
    assert by[("random", 0)]["labelled_slices"] != by[("random", 1)]["labelled_slices"] or \
        by[("random", 0)]["test_dice_all"] != by[("random", 1)]["test_dice_all"]
    summary = {r["setting"]: r for r in record["summary"]}
    vals = [by[("axial", s)]["test_dice_fg"] for s in (0, 1)]
    assert summary["axial"]["test_dice_fg_mean"] == pytest.approx(np.mean(vals))
    assert summary["axial"]["test_dice_fg_sd"] == pytest.approx(np.std(vals, ddof=1))
    assert summary["axial"]["vs_full_test_dice_fg"]["diff"] == pytest.approx(
        np.mean(vals) - np.mean([by[("full", s)]["test_dice_fg"] for s in (0, 1)]))
    assert record["timings"]["total_s"] > 0 and "train_full_epochs_seed1_s" in record["timings"]
    assert (work / "table.md").read_text().count("\n| ") == 4 and (work / "budget.png").exists()  # 4 settings
    # A rerun resumes: nothing is trained or predicted again, the table is the same.
    assert main(["budget-study", "--workdir", str(work), *overrides]) == 0
    again = json.loads((work / "table.json").read_text())
    assert [r["test_dice_all"] for r in again["rows"]] == [r["test_dice_all"] for r in record["rows"]]

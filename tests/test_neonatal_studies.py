"""The AgeU-Net and transfer-learning studies: age targets through training, the centred age head,
explicit case lists, roles by age, the statistics, and each study end to end at a tiny size."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import tiny_cfg

from jaxseg.config import ConfigError
from jaxseg.config import load_config as _load_config
from jaxseg.data.io import DataError
from jaxseg.data.pipeline import CaseSource
from jaxseg.data.splits import select_cases
from jaxseg.models import UNet3D, build_model, explicit_topology
from jaxseg.neonatal import age_unet, transfer
from jaxseg.neonatal.config import NeonatalConfig
from jaxseg.train.checkpoint import load_params
from jaxseg.train.loop import TrainingError, train_and_evaluate


def load_config(path, overrides=()):
    """The neonatal studies' config (core + synth + transfer sections)."""
    return _load_config(path, overrides, NeonatalConfig)

# --------------------------------------------------------------------------------- case selection


def test_explicit_case_lists_replace_the_fold_split():
    ids = [f"c{i}" for i in range(6)]
    cfg = load_config(None, ["data.train_cases=[c4,c1]", "data.val_cases=[c2]"])
    assert select_cases(ids, cfg, "STORE") == (["c1", "c4"], ["c2"])
    cfg = load_config(None, ["data.train_cases=[c1]"])
    assert select_cases(ids, cfg, "STORE") == (["c1"], [])
    with pytest.raises(DataError, match=r"STORE: data.val_cases names 1 case\(s\).*'zz'"):
        select_cases(ids, load_config(None, ["data.train_cases=[c1]", "data.val_cases=[zz]"]), "STORE")


@pytest.mark.parametrize("overrides, key", [
    (["data.val_cases=[a]"], "data.val_cases"),
    (["data.train_cases=[a,b]", "data.val_cases=[b]"], "data.val_cases"),
    (["data.train_cases=[a,a]"], "data.train_cases"),
    (["model.age_scale=0"], "model.age_scale"),
    (["transfer.n_finetune=30"], "transfer.n_finetune"),
])
def test_bad_case_lists_and_study_settings_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


# ------------------------------------------------------------------------------------------ age head


def test_centred_age_head_is_a_fixed_affine_of_the_same_parameters():
    topo = explicit_topology([(1, 1, 1), (2, 2, 2), (2, 2, 2)], [(3, 3, 3)] * 3, (16, 16, 16),
                             features_base=4, features_max=8)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 16, 1))
    plain = UNet3D(num_classes=3, topology=topo, age_head=True)
    centred = UNet3D(num_classes=3, topology=topo, age_head=True, age_offset=36.0, age_scale=5.0)
    params = plain.init(jax.random.key(1), x)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(centred.init(jax.random.key(1), x)["params"])
    # With the output PReLU's slope at 1 it is the identity, so the outputs differ by the affine exactly.
    params = dict(params, age_head=dict(params["age_head"], act_out={"negative_slope": jnp.ones(())}))
    a = plain.apply({"params": params}, x).age
    b = centred.apply({"params": params}, x).age
    assert a.shape == b.shape == (2,)
    np.testing.assert_allclose(np.asarray(b), 36.0 + 5.0 * np.asarray(a), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_training_regresses_each_patch_to_its_subject_age(tiny_store, tmp_path):
    cfg = tiny_cfg(tiny_store, "model.age_head=true", "model.age_offset=35.0", "model.age_scale=5.0",
                   "data.fold=0", "train.epochs=1", "train.val_every=1", "optim.kind=adam", "optim.lr=0.001",
                   "optim.age_head_lr=0.01")
    out = train_and_evaluate(cfg, tmp_path / "run", progress=False)
    params, _ = load_params(tmp_path / "run", "last")
    init_key = jax.random.split(jax.random.key(cfg.seed))[0]  # the loop's init key
    init = jax.jit(lambda k: build_model(cfg).init(k, jnp.zeros((1, 16, 16, 16, 1)))["params"])(init_key)
    # The age loss reaches the head: its dense layer moved.
    assert not np.allclose(np.asarray(params["age_head"]["dense"]["kernel"]),
                           np.asarray(init["age_head"]["dense"]["kernel"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_dice" in r]
    assert val and all(math.isfinite(r["val_age_mae"]) and r["val_age_mae"] >= 0 for r in val)
    assert out["best"]["step"] == 2


def test_a_training_case_without_an_age_is_refused(tiny_store, tmp_path):
    source = CaseSource(tiny_store, split="train")
    victim = source.case_ids[0]
    meta_path = tiny_store / victim / "meta.json"
    original = meta_path.read_text()
    try:
        meta = json.loads(original)
        meta["age"] = None
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(TrainingError, match=f"case '{victim}' has no age"):
            train_and_evaluate(tiny_cfg(tiny_store, "model.age_head=true"), tmp_path / "run", max_steps=1,
                               progress=False)
    finally:
        meta_path.write_text(original)


def test_age_metrics_against_hand_computation():
    true = {"a": 30.0, "b": 35.0, "c": 40.0}
    pred = {"a": 32.0, "b": 35.0, "c": 37.0}
    m = age_unet.age_metrics(pred, true, baseline=36.0)
    assert m["age_mae"] == pytest.approx((2 + 0 + 3) / 3)
    assert m["age_mse"] == pytest.approx((4 + 0 + 9) / 3)
    assert m["baseline_mae"] == pytest.approx((6 + 1 + 4) / 3)
    assert m["baseline_mse"] == pytest.approx((36 + 1 + 16) / 3)
    assert m["age_pred_sd"] == pytest.approx(np.std([32, 35, 37]))
    p, t = np.array([32, 35, 37.0]), np.array([30, 35, 40.0])
    r = ((p - p.mean()) * (t - t.mean())).sum() / np.sqrt(((p - p.mean()) ** 2).sum() * ((t - t.mean()) ** 2).sum())
    assert m["age_r"] == pytest.approx(r)
    # A head collapsed to one value has no correlation.
    assert math.isnan(age_unet.age_metrics({k: 36.0 for k in true}, true, 36.0)["age_r"])


def test_age_study_variants():
    cfg = load_config(None, ["optim.age_head_lr=0.0003", "optim.lr=0.003"])
    ages = [30.0, 34.0, 38.0, 42.0]
    runs = {name: age_unet.variant_config(cfg, name, ages) for name, *_ in age_unet.VARIANTS}
    assert not runs["unet"].model.age_head and runs["unet"].optim.age_head_lr is None
    assert runs["ageunet"].model.age_head and runs["ageunet"].optim.age_head_lr is None
    assert runs["ageunet"].model.age_offset == 0.0 and runs["ageunet"].model.age_scale == 1.0
    assert runs["ageunet_head_lr"].optim.age_head_lr == 0.0003 and runs["ageunet_head_lr"].model.age_offset == 0.0
    c = runs["ageunet_centred"].model
    assert c.age_offset == pytest.approx(36.0) and c.age_scale == pytest.approx(np.std(ages))
    with pytest.raises(ValueError, match="age_head_lr"):
        age_unet.variant_config(load_config(None, []), "ageunet_head_lr", ages)


# ------------------------------------------------------------------------------------------ transfer


def test_roles_by_age_are_disjoint_oldest_and_youngest():
    rng = np.random.default_rng(0)
    ages = {f"s{i:02d}": float(a) for i, a in enumerate(rng.uniform(26, 45, 40))}
    tc = load_config(None, ["transfer.n_old=10", "transfer.n_old_val=2", "transfer.n_young=12",
                            "transfer.n_finetune=4"]).transfer
    roles = transfer.assign_roles(ages, tc, seed=7)
    by_age = sorted(ages, key=ages.get)
    assert set(roles["old_train"]) | set(roles["old_val"]) == set(by_age[-10:])
    assert set(roles["finetune"]) | set(roles["test"]) == set(by_age[:12])
    assert [len(roles[k]) for k in ("old_train", "old_val", "finetune", "test")] == [8, 2, 4, 8]
    assert transfer.assign_roles(ages, tc, seed=7) == roles
    assert transfer.assign_roles(ages, tc, seed=8) != roles
    with pytest.raises(ValueError, match="n_old \\+ transfer.n_young = 42"):
        transfer.assign_roles(ages, load_config(None, ["transfer.n_old=30", "transfer.n_young=12"]).transfer, 0)


def test_strategy_configs(tmp_path):
    cfg = load_config(None, ["transfer.finetune_steps=7", "transfer.finetune_lr=0.001", "optim.lr=0.01",
                             "transfer.scratch_lr=0.005"])
    roles = {"old_train": ["a"], "old_val": ["b"], "finetune": ["c", "d"], "test": ["e"]}
    deep = transfer.strategy_config(cfg, "deep", 2, roles, tmp_path / "pre")
    assert deep.train.finetune == "deep" and deep.train.init_from == str(tmp_path / "pre")
    assert deep.optim.lr == 0.001 and deep.seed == 2 and deep.train.epochs * deep.train.steps_per_epoch == 7
    assert deep.data.train_cases == ("c", "d") and deep.data.val_cases is None
    scratch = transfer.strategy_config(cfg, "scratch", 1, roles, tmp_path / "pre")
    assert scratch.train.init_from is None and scratch.train.finetune == "full" and scratch.optim.lr == 0.005
    pre = transfer.pretrain_config(cfg, roles)
    assert pre.data.train_cases == ("a",) and pre.data.val_cases == ("b",)
    with pytest.raises(ValueError, match="none"):
        transfer.strategy_config(cfg, "none", 0, roles, tmp_path / "pre")


def test_paired_tests_on_seed_means_against_the_formula():
    # Per strategy, each case's Dice is first averaged over the seeds; the t-test is paired over the cases.
    rng = np.random.default_rng(1)
    cases = [f"k{i}" for i in range(12)]
    base = rng.uniform(0.5, 0.9, len(cases))
    def run(shift, noise):
        v = base + shift + rng.normal(0, noise, len(cases))
        return {"cases": {c: {"all": float(x), "fg": float(x) - 0.1, "per_class": {0: 1.0, 1: float(x)}}
                          for c, x in zip(cases, v)}}
    runs = {"none": [run(0.0, 0.01)], "shallow": [run(0.02, 0.03) for _ in range(3)],
            "full": [run(0.05, 0.03) for _ in range(3)]}
    summary = transfer.summarise(runs, {0: "background", 1: "tissue"})
    got = transfer.paired_tests(summary, "fg")
    assert list(got) == [("none", "shallow"), ("none", "full"), ("shallow", "full")]
    for (x, y), p in got.items():
        a = np.mean([[r["cases"][c]["fg"] for c in cases] for r in runs[x]], axis=0)
        b = np.mean([[r["cases"][c]["fg"] for c in cases] for r in runs[y]], axis=0)
        d = a - b
        t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
        from scipy import stats
        assert p == pytest.approx(min(1.0, 3 * 2 * stats.t.sf(abs(t), len(d) - 1)), rel=1e-9)
    # the spread test on run means: B - A of the means, starred when beyond SD_A + SD_B
    spread = transfer.spread_pairs(summary, "fg")
    full, shallow = summary["full"]["per_run"]["fg"], summary["shallow"]["per_run"]["fg"]
    c = spread[("shallow", "full")]
    assert c["diff"] == pytest.approx(np.mean(full) - np.mean(shallow))
    assert c["exceeds"] == (abs(c["diff"]) > np.std(full, ddof=1) + np.std(shallow, ddof=1))
    table = transfer.table_markdown(summary, {0: "background", 1: "tissue"},
                                    {w: transfer.paired_tests(summary, w) for w in ("all", "fg")})
    assert "paired t-tests over the test cases" in table and "beyond the seed spread" in table


def test_summary_means_and_sds_over_runs():
    def run(values):
        return {"cases": {f"k{i}": {"all": v, "fg": v - 0.1, "per_class": {0: 1.0, 1: v}} for i, v in enumerate(values)}}

    s = transfer.summarise({"full": [run([0.5, 0.7]), run([0.8, 0.8])], "none": [run([0.4, 0.6])]},
                           {0: "background", 1: "tissue"})
    assert s["full"]["mean"]["all"] == pytest.approx((0.6 + 0.8) / 2)
    assert s["full"]["sd"]["all"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert s["full"]["mean"]["1"] == pytest.approx(0.7) and s["full"]["n_runs"] == 2
    assert math.isnan(s["none"]["sd"]["fg"]) and s["none"]["mean"]["fg"] == pytest.approx(0.4)
    assert s["full"]["case_means_all"] == pytest.approx({"k0": 0.65, "k1": 0.75})  # each case once
    with pytest.raises(ValueError, match="same cases"):
        transfer.summarise({"full": [run([0.5, 0.7]), run([0.8])]}, {0: "background", 1: "tissue"})


# ---------------------------------------------------------------------------------- end to end


TINY = ["synth.spacing=8.0", "data.patch_size=[16,16,16]", "model.features_base=4", "model.features_max=8",
        "data.batch_size=8", "data.threads=1", "eval.window_batch=8"]


@pytest.mark.slow
def test_age_study_tiny(tmp_path, monkeypatch):
    from jaxseg.launch import main

    # Two of the four rows (the U-Net and the centred AgeU-Net) keep it near a minute: each run costs its compiles.
    monkeypatch.setattr(age_unet, "VARIANTS", tuple(v for v in age_unet.VARIANTS
                                                    if v[0] in ("unet", "ageunet_centred")))
    work = tmp_path / "age"
    args = ["age-study", "--workdir", str(work), *TINY, "model.n_stages=3", "synth.n_subjects=12", "synth.n_test=3",
            "train.epochs=1", "train.steps_per_epoch=2", "train.val_every=1", "train.checkpoint_every=2", "seeds=[0,1]"]
    assert main(args) == 0
    record = json.loads((work / "table.json").read_text())
    assert [(r["model"], r["seed"]) for r in record["rows"]] == [("unet", 0), ("ageunet_centred", 0),
                                                                 ("unet", 1), ("ageunet_centred", 1)]
    rows = {(r["model"], r["seed"]): r for r in record["rows"]}
    assert set(record["predicted_ages"]) == {"0", "1"}
    true = record["true_ages"]
    maes = []
    for seed in (0, 1):
        pred = record["predicted_ages"][str(seed)]["ageunet_centred"]
        assert set(pred) == set(true) and len(true) == 3
        ref = age_unet.age_metrics(pred, true, record["baseline_age"])
        assert rows[("ageunet_centred", seed)]["age_mae"] == pytest.approx(ref["age_mae"])
        maes.append(ref["age_mae"])
        assert math.isnan(rows[("unet", seed)]["age_mae"])
        assert rows[("unet", seed)]["baseline_mae"] == pytest.approx(ref["baseline_mae"])
        # The centred head starts at the training ages' mean (an uncentred one starts near 0 weeks): after 2
        # steps its predictions are still within 10 weeks of it.
        assert abs(np.mean(list(pred.values())) - record["baseline_age"]) < 10.0
        assert (work / "ageunet_centred" / f"seed{seed}" / "predictions" / "ages.csv").is_file()
    # the summary: mean ± SD over the seeds, the difference to the U-Net's Dice and to the baseline's MAE
    summary = {r["model"]: r for r in record["summary"]}
    assert summary["ageunet_centred"]["age_mae_mean"] == pytest.approx(np.mean(maes))
    assert summary["ageunet_centred"]["age_mae_sd"] == pytest.approx(np.std(maes, ddof=1))
    fg = {m: [rows[(m, s)]["test_dice_fg"] for s in (0, 1)] for m in ("unet", "ageunet_centred")}
    assert summary["ageunet_centred"]["vs_unet_test_dice_fg"]["diff"] == pytest.approx(
        np.mean(fg["ageunet_centred"]) - np.mean(fg["unet"]))
    assert summary["ageunet_centred"]["vs_baseline_mae"]["diff"] == pytest.approx(
        np.mean(maes) - rows[("unet", 0)]["baseline_mae"])
    for r in rows.values():
        assert 0.0 <= r["test_dice_all"] <= 1.0
    assert (work / "age.png").exists() and (work / "age_effect.png").exists()
    assert " ± " in (work / "table.md").read_text()
    effect = json.loads((work / "age_effect.json").read_text())["pearson_r_with_age"]
    assert effect["brain_ml"] > 0.5 and effect["wm_gm_contrast"] > 0.5  # the cohort carries an age effect
    # A rerun resumes without training or predicting again, and keeps the ages.
    assert main(args) == 0
    again = json.loads((work / "table.json").read_text())
    assert again["predicted_ages"] == record["predicted_ages"]


@pytest.mark.slow
def test_transfer_study_tiny(tmp_path):
    from jaxseg.launch import main

    work = tmp_path / "transfer"
    # 3 stages: shallow = bottleneck + level 1; full differs from it; deep/medium would equal full/shallow.
    args = ["transfer-study", "--workdir", str(work), *TINY, "model.strides=null", "model.n_stages=3",
            "synth.n_subjects=12", "transfer.n_old=5", "transfer.n_old_val=1", "transfer.n_young=6",
            "transfer.n_finetune=2", "seeds=[0,1]", "transfer.strategies=[none,shallow,scratch]",
            "transfer.finetune_steps=1", "train.epochs=1", "train.steps_per_epoch=1", "train.val_every=1",
            "train.checkpoint_every=1"]
    assert main(args) == 0
    record = json.loads((work / "table.json").read_text())
    roles = record["roles"]
    assert len(roles["test"]) == 4 and len(roles["finetune"]) == 2
    s = record["summary"]
    assert [s[k]["n_runs"] for k in ("none", "shallow", "scratch")] == [1, 2, 2]
    assert set(record["bonferroni_p"]["fg"]) == {"none vs shallow", "none vs scratch", "shallow vs scratch"}
    # The shallow runs started from the pre-trained parameters and froze the outermost level.
    pre, _ = load_params(work / "pretrain", "best")
    ft, _ = load_params(work / "shallow" / "seed0", "last")
    # (the study's config has the paper's residual blocks: each stage's first conv is res/conv1)
    np.testing.assert_array_equal(np.asarray(ft["encoder_0"]["res"]["conv1"]["kernel"]),
                                  np.asarray(pre["encoder_0"]["res"]["conv1"]["kernel"]))
    assert not np.array_equal(np.asarray(ft["bottleneck"]["res"]["conv1"]["kernel"]),
                              np.asarray(pre["bottleneck"]["res"]["conv1"]["kernel"]))
    table = (work / "table.md").read_text()
    assert "Table 4" in table and "Table 5" in table and "Table 6" in table
    assert (work / "transfer.png").exists()

import json

import jax
import numpy as np
import pytest

from _tiny import tiny_cfg
from jaxseg.train.checkpoint import IncompatibleResume
from jaxseg.data.splits import kfold_split
from jaxseg.train.loop import train_and_evaluate


def test_kfold_split_matches_sklearn_kfold():
    ids = [f"case_{i:03d}" for i in range(13)]
    # sklearn.model_selection.KFold(5, shuffle=True, random_state=12345) over sorted ids, fold 2
    rng = np.random.RandomState(12345)
    idx = np.arange(13)
    rng.shuffle(idx)
    sizes = [3, 3, 3, 2, 2]
    expected_val = sorted(ids[i] for i in idx[6:9])
    train, val = kfold_split(ids, 2)
    assert val == expected_val and sorted(train + val) == ids and not set(train) & set(val)
    folds = [set(kfold_split(ids, f)[1]) for f in range(5)]
    assert [len(f) for f in folds] == sizes and set().union(*folds) == set(ids)
    assert kfold_split(ids, "all") == (ids, [])


@pytest.mark.slow
def test_one_step_through_train_and_evaluate(tiny_store, tmp_path):
    cfg = tiny_cfg(tiny_store, "dro.enabled=true", "dro.log_every=1")
    out = train_and_evaluate(cfg, tmp_path / "run", max_steps=1, progress=False)
    assert out["step"] == 1 and out["skipped_steps"] == 0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(lines[0]["loss"])
    assert any("dro_bound_a05" in l for l in lines)
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "ckpt" / "1").exists()
    # the table holds the step's per-sample losses for the training cases it drew
    assert np.sum(np.abs(out["dro_table"] - 2.0) > 1e-2) >= 1
    # what the step trained on, per stratum, and where the sampler's mass is
    from jaxseg.data.pipeline import CaseSource

    strata = {str(m.get("stratum") or "none") for m in CaseSource(tiny_store, split="train").metas}
    drawn = lines[0]["drawn_stratum"]
    assert set(drawn) <= strata and abs(sum(drawn.values()) - 1) < 1e-9
    assert round(sum(drawn.values()) * 8) == 8 and all(round(v * 8) == v * 8 for v in drawn.values())
    share = lines[0]["patch_class_share"]  # what the patches contained, per class name of the store
    assert len(share) == cfg.data.num_classes and abs(sum(share.values()) - 1) < 1e-9
    dro = next(l for l in lines if "dro_p_stratum" in l)
    assert set(dro["dro_p_stratum"]) == strata and abs(sum(dro["dro_p_stratum"].values()) - 1) < 1e-6
    assert dro["dro_table_spread"] > 0
    from jaxseg.evaluation.plots import sampling_shares

    assert sampling_shares({"DRO": lines}, tmp_path / "shares.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_continues_and_incompatible_resume_is_refused(tiny_store, tmp_path):
    cfg = tiny_cfg(tiny_store)
    ref = train_and_evaluate(cfg, tmp_path / "ref", max_steps=3, progress=False)
    train_and_evaluate(cfg, tmp_path / "cut", max_steps=2, progress=False)
    resumed = train_and_evaluate(cfg, tmp_path / "cut", max_steps=3, progress=False)
    assert resumed["step"] == 3
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(ref["params"])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(IncompatibleResume, match=r"optim.lr: 0.01 -> 0.02"):
        train_and_evaluate(tiny_cfg(tiny_store, "optim.lr=0.02"), tmp_path / "cut", max_steps=4, progress=False)


@pytest.mark.slow
def test_nonfinite_steps_stop_the_run_with_last_good_checkpoint_intact(tiny_store, tmp_path, monkeypatch):
    from jaxseg.data import pipeline
    from jaxseg.train.loop import TrainingError
    from jaxseg.train.checkpoint import load_params

    original = pipeline.PatchBatchIterator.__next__

    def poisoned(self):
        batch = original(self)
        if self.step > 1:  # from the second step on, every batch is NaN
            batch["image"] = np.full_like(batch["image"], np.nan)
        return batch

    cfg = tiny_cfg(tiny_store, "train.max_nonfinite=2")
    one_step = train_and_evaluate(cfg, tmp_path / "one", max_steps=1, progress=False)["params"]
    monkeypatch.setattr(pipeline.PatchBatchIterator, "__next__", poisoned)
    with pytest.raises(TrainingError, match=r"2 consecutive non-finite steps .* at step 3; the last good "
                                            r"checkpoint .* is intact"):
        train_and_evaluate(cfg, tmp_path / "run", max_steps=6, progress=False)
    # Skipped steps changed nothing: the last checkpoint holds the parameters of the one good step.
    params, _ = load_params(tmp_path / "run", "last")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one_step)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_log_counts_patch_classes_under_the_mask():
    from jaxseg.train.loop import TrainLog

    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (2, 4, 4, 4))
    mask = rng.random((2, 4, 4, 4)) > 0.5
    log = TrainLog(["a", "b"], 10, ["bg", "x", "y"])
    log.drew(np.array([0, 1]), label, mask)
    log.drew(np.array([1, 1]), label, None)
    rec = log.flush(2, {"grad_norm": 1.0})
    want = np.bincount(label[mask], minlength=3) + np.bincount(label.ravel(), minlength=3)
    np.testing.assert_allclose([rec["patch_class_share"][n] for n in ("bg", "x", "y")], want / want.sum())
    assert rec["drawn_stratum"] == {"a": 0.25, "b": 0.75}
    assert "patch_class_share" not in log.flush(3, {"grad_norm": 1.0})  # a fresh window

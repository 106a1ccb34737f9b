"""DeepLesionBrain training and prediction drivers: pools, sub-volume gathering, the uncropped store,
and a one-step train -> predict run on a tiny synthetic MS cohort."""

import json

import jax
import nibabel as nib
import numpy as np
import pytest

from jaxseg.config import SynthConfig, load_config
from jaxseg.data.io import DataError
from jaxseg.data.prepare import prepare
from jaxseg.data.synth import write_cohort
from jaxseg.dlb.grid import make_grid
from jaxseg.dlb.train import (
    PoolSampler,
    gather,
    load_cases,
    network_pools,
    predict_dlb,
    split_cases,
    train_dlb,
)


def test_pools_hold_own_and_mirror_tiles_and_lesion_only_filters():
    g = make_grid((12, 8, 8), 8, 3)  # x starts (0, 2, 4); 27 tiles, 18 networks
    labels = np.zeros((2, 12, 8, 8), np.uint8)
    labels[1, 11, 0, 0] = 1  # only in tiles with ix = 2 (x 4..11), case 1
    every = network_pools(g, labels, lesion_only=False)
    for k in range(g.n_networks):
        tiles = {t for t, _ in g.tiles_of(k)}
        assert {t for _, t in every[k]} == tiles and len(every[k]) == 2 * len(tiles)
    lesion = network_pools(g, labels, lesion_only=True)
    k = g.network_of(g.index(2, 0, 0))[0]
    assert lesion[k] == [(1, g.index(2, 0, 0))]
    # a region with no lesion anywhere falls back to all of its sub-volumes
    assert lesion[g.index(1, 0, 0)] == every[g.index(1, 0, 0)]


def test_gather_flips_mirrored_tiles():
    g = make_grid((12, 8, 8), 8, 3)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 12, 8, 8, 2)).astype(np.float32)
    labels = (rng.random((2, 12, 8, 8)) < 0.3).astype(np.uint8)
    t_own, t_mirror = g.index(0, 1, 2), g.index(2, 1, 2)
    img, lab = gather(images, labels, g, [[(0, t_own), (1, t_mirror)]])
    np.testing.assert_array_equal(img[0, 0], images[0, 0:8, 0:8, 0:8])
    np.testing.assert_array_equal(img[0, 1], images[1, 4:12, 0:8, 0:8][::-1])
    np.testing.assert_array_equal(lab[0, 1], labels[1, 4:12, 0:8, 0:8][::-1])


def test_pool_sampler_is_deterministic_and_covers_each_pool():
    pools = [[(0, 1), (0, 2), (1, 1)], [(2, 5)]]
    a = [PoolSampler(pools, 1, seed=3).next() for _ in range(1)]
    s1, s2 = PoolSampler(pools, 1, seed=3), PoolSampler(pools, 1, seed=3)
    draws1 = [s1.next() for _ in range(6)]
    assert draws1 == [s2.next() for _ in range(6)] and draws1[0] == a[0]
    first_pass = [d[0][0] for d in draws1[:3]]
    assert sorted(first_pass) == sorted(pools[0])  # a whole pass before any repeat
    assert all(d[1] == [(2, 5)] for d in draws1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("dlb")
    ds = root / "raw"
    write_cohort(ds, SynthConfig(n_subjects=6, seed=1, spacing=8.0, flavour="lesion", p_ventriculomegaly=0.0,
                                 p_cerebellar_hypoplasia=0.0, sites=2, n_test=2), progress=False)
    prepare(ds, root / "store", crop=False, progress=False, num_workers=1)
    prepare(ds, root / "store_cropped", progress=False, num_workers=1)
    return root


def tiny_cfg(root, *extra):
    from jaxseg.dlb.config import DLBAblationConfig

    return load_config("configs/dlb_ablation_synth.yaml", schema=DLBAblationConfig, overrides=[
        f"data.dataset={root / 'raw'}", f"data.store={root / 'store'}", "model.features_base=4",
        "model.norm_groups=2", "dlb.tile_size=16", "dlb.tiles_per_axis=3",
        "dlb.generic_steps_per_epoch=1", "dlb.generic_max_epochs=2", "dlb.steps_per_epoch=1", "dlb.max_epochs=1",
        "dlb.generic_batch_size=2", "dlb.train_sites=null", "dlb.group_size=9", *extra])


def test_uncropped_store_keeps_the_grid_and_cropped_store_is_refused(cohort):
    meta = json.loads((cohort / "store" / "dataset.json").read_text())
    assert meta["preprocessing"]["crop"] == "none"
    cfg = tiny_cfg(cohort)
    split = split_cases(cfg.data.store, cfg)
    images, labels, metas = load_cases(cfg.data.store, split["train"])
    assert images.shape[1:4] == tuple(metas[0]["original_shape"][:3])
    with pytest.raises(DataError, match="store_cropped.*crop"):
        load_cases(cohort / "store_cropped", split["train"])


@pytest.mark.slow
def test_train_then_predict_writes_nifti_in_input_geometry(cohort, tmp_path, monkeypatch):
    cfg = tiny_cfg(cohort)
    summary = train_dlb(cfg, tmp_path / "run", log=lambda *_: None)
    assert summary["generic"]["epochs"] == 2 and summary["ensemble"]["epochs"] == 1
    assert (tmp_path / "run" / "ensemble" / "ckpt").is_dir()
    # the run's config holds the sections it uses: the core's and dlb, not the ablation's cohort
    sections = {line.split(":")[0] for line in (tmp_path / "run" / "config.yaml").read_text().splitlines()
                if line and not line.startswith((" ", "#"))}
    assert "dlb" in sections and "data" in sections and not sections & {"synth", "transfer"}
    hist = json.loads((tmp_path / "run" / "ensemble" / "history.json").read_text())
    assert hist["networks"] == 18 and len(hist["best_val_loss"]) == 18
    preds = predict_dlb(cfg, tmp_path / "run", tmp_path / "pred", log=lambda *_: None)
    test = split_cases(cfg.data.store, cfg)["test"]
    assert [p["case"] for p in preds] == test
    for p in preds:
        out = nib.load(p["path"])
        src = nib.load(cohort / "raw" / "imagesTs" / f"{p['case']}_0000.nii.gz")
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine)
        assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    # the generic network alone predicts from the same run
    generic = predict_dlb(tiny_cfg(cohort, "dlb.method=generic"), tmp_path / "run", tmp_path / "pred_g",
                          log=lambda *_: None)
    assert len(generic) == len(test)
    # dlb-predict without --config reads the run's own config.yaml (written by dlb-train), from any folder
    from jaxseg.launch import main

    assert {"config.yaml", "run.json", "preprocessing.json"} <= {p.name for p in (tmp_path / "run").iterdir()}
    monkeypatch.chdir(tmp_path / "pred")
    assert main(["dlb-predict", "--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "pred_cli")]) == 0
    for p in preds:
        np.testing.assert_array_equal(np.asarray(nib.load(p["path"]).dataobj),
                                      np.asarray(nib.load(tmp_path / "pred_cli" / f"{p['case']}.nii.gz").dataobj))


def test_predict_without_training_names_the_missing_run(cohort, tmp_path):
    with pytest.raises(FileNotFoundError, match="dlb-train"):
        predict_dlb(tiny_cfg(cohort), tmp_path / "nothing", tmp_path / "pred", log=lambda *_: None)


@pytest.mark.slow
def test_predict_refuses_an_unfinished_stage(cohort, tmp_path):
    import shutil

    cfg = tiny_cfg(cohort, "dlb.method=generic", "dlb.generic_max_epochs=2")
    train_dlb(cfg, tmp_path / "run", log=lambda *_: None)
    ckpts = sorted(int(p.name) for p in (tmp_path / "run" / "generic" / "ckpt").iterdir() if p.name.isdigit())
    shutil.rmtree(tmp_path / "run" / "generic" / "ckpt" / str(ckpts[-1]))  # as if killed after epoch 1
    with pytest.raises(FileNotFoundError, match="before it finished.*resume"):
        predict_dlb(cfg, tmp_path / "run", tmp_path / "pred", log=lambda *_: None)


@pytest.mark.slow
def test_resume_refuses_a_changed_config(cohort, tmp_path):
    from jaxseg.train.checkpoint import IncompatibleResume

    train_dlb(tiny_cfg(cohort, "dlb.method=generic", "dlb.generic_max_epochs=1"), tmp_path / "run",
              log=lambda *_: None)
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(IncompatibleResume, match=r"optim\.lr: 0\.001 -> 0\.01"):
        train_dlb(tiny_cfg(cohort, "dlb.method=generic", "dlb.generic_max_epochs=1", "optim.lr=0.01"),
                  tmp_path / "run", log=lambda *_: None)
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # refused before anything was written


@pytest.mark.slow
def test_stages_use_the_core_optimiser(cohort, tmp_path, monkeypatch):
    """optim.kind / schedule / weight decay reach the DLB stages (jaxseg.train.optim.make_optimizer)."""
    import jaxseg.dlb.train as dlb_train

    seen = []
    real = dlb_train.make_optimizer
    monkeypatch.setattr(dlb_train, "make_optimizer", lambda c, *a: seen.append((c, a)) or real(c, *a))
    cfg = tiny_cfg(cohort, "dlb.method=generic", "dlb.generic_max_epochs=2", "optim.kind=sgd",
                   "optim.schedule=poly", "optim.weight_decay=0.001")
    train_dlb(cfg, tmp_path / "run", log=lambda *_: None)
    assert seen == [(cfg.optim, (2, 1))]


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_matches_uninterrupted_run(cohort, tmp_path_factory, tmp_path):
    """`launch dlb-train` killed (SIGKILL, process group) after an epoch of the ensemble stage and run
    again resumes that stage from its last checkpoint and ends with the same parameters, bit for bit,
    as a run that was never killed (as tests/test_kill_resume.py does for the main loop)."""
    import signal
    import sys
    import time

    from test_kill_resume import finished_steps, kill_group, start

    from jaxseg.dlb.train import stage_params

    cache = tmp_path_factory.mktemp("xla_cache_dlb")
    overrides = [f"data.dataset={cohort / 'raw'}", f"data.store={cohort / 'store'}", "model.features_base=4",
                 "model.norm_groups=2", "dlb.tile_size=16", "dlb.tiles_per_axis=2", "dlb.stride=null", "dlb.offset=null",
                 "dlb.train_sites=null",
                 "dlb.generic_steps_per_epoch=1", "dlb.generic_max_epochs=1", "dlb.generic_batch_size=2",
                 "dlb.steps_per_epoch=1", "dlb.max_epochs=8", "dlb.patience=8", "dlb.group_size=1"]

    def cmd(workdir):
        return [sys.executable, "-m", "jaxseg.launch", "dlb-train", "--config", "configs/dlb_msseg.yaml",
                "--workdir", str(workdir), *overrides]

    def run_to_end(workdir, log):
        proc = start(cmd(workdir), log, cache)
        assert proc.wait(timeout=600) == 0, log.read_text(errors="replace")[-4000:]

    run_to_end(tmp_path / "ref", tmp_path / "ref.log")
    workdir, log = tmp_path / "cut", tmp_path / "cut.log"
    ckpt_dir = workdir / "ensemble" / "ckpt"
    proc = start(cmd(workdir), log, cache)
    deadline = time.monotonic() + 600
    try:
        while not (finished_steps(ckpt_dir) and finished_steps(ckpt_dir)[-1] >= 3):
            assert proc.poll() is None, f"ended before it was killed\n{log.read_text(errors='replace')[-4000:]}"
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.005)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    at_kill = finished_steps(ckpt_dir)[-1]
    assert 3 <= at_kill < 8, at_kill
    run_to_end(workdir, log)
    assert f"[ensemble] resumed from epoch {at_kill} (step {at_kill})" in log.read_text(errors="replace")
    assert "[generic] resumed from epoch 1 (step 1), finished" in log.read_text(errors="replace")
    for stage in ("generic", "ensemble"):
        ref, got = stage_params(tmp_path / "ref", stage), stage_params(workdir, stage)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"{stage} {path}")
    ref_hist = json.loads((tmp_path / "ref" / "ensemble" / "history.json").read_text())
    got_hist = json.loads((workdir / "ensemble" / "history.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(got_hist["epochs"]) == strip(ref_hist["epochs"]) and len(got_hist["epochs"]) == 8


def _fake_seed(seed, shift):
    """One seed's `run_ablation_seed` output on hand-made numbers: two variants, one test set of 6 images."""
    from jaxseg.dlb import ablation

    rng = np.random.default_rng(seed)
    table, cases = [], []
    for k, (label, *_rest) in enumerate(ablation.VARIANTS[:2]):
        rows = [{"variant": label, "case": f"c{i}", "site": "site1", "dice": float(d), "ppv": float(p),
                 "tpr": 0.5, "lfpr": float(f), "ltpr": float(t), "pred_ml": float(v), "ref_ml": float(v + rng.normal())}
                for i, (d, p, f, t, v) in enumerate(zip(rng.uniform(0.4, 0.8, 6) - 0.1 * k + shift,
                                                        rng.uniform(0.5, 0.9, 6), rng.uniform(0, 0.5, 6),
                                                        rng.uniform(0.4, 0.9, 6), rng.uniform(5, 30, 6)))]
        row = {"variant": label, "test": "cross-site site1", **ablation.summarise(rows)}
        for r in rows:
            r["test"], r["hybrid_image"] = row["test"], ablation.image_hybrid(r, row["corr"])
        table.append(row)
        cases += rows
    return {"table": table, "cases": cases, "timings": {"total_s": 1.0}}


def test_ablation_over_seeds_on_hand_made_numbers(tmp_path):
    from scipy import stats

    from jaxseg.dlb import ablation

    per_seed = {s: _fake_seed(s, 0.01 * s) for s in (0, 1, 2)}
    rows, cases = ablation.write_over_seeds(tmp_path, per_seed, {"total_s": 3.0})
    ref_label, other = ablation.VARIANTS[0][0], ablation.VARIANTS[1][0]
    by = {r["variant"]: r for r in rows}
    hyb = {v: [next(t["hybrid"] for t in per_seed[s]["table"] if t["variant"] == v) for s in (0, 1, 2)]
           for v in (ref_label, other)}
    assert by[other]["hybrid_mean"] == pytest.approx(np.mean(hyb[other]))
    assert by[other]["hybrid_sd"] == pytest.approx(np.std(hyb[other], ddof=1))
    assert by[other]["vs_ref_hybrid"]["diff"] == pytest.approx(np.mean(hyb[other]) - np.mean(hyb[ref_label]))
    # per-image hybrid = the ISBI formula with the test set's Corr; Wilcoxon over images on their seed means
    c = per_seed[1]["cases"][3]
    corr = next(t["corr"] for t in per_seed[1]["table"] if t["variant"] == c["variant"])
    assert c["hybrid_image"] == pytest.approx(c["dice"] / 8 + c["ppv"] / 8 + (1 - c["lfpr"]) / 4 + c["ltpr"] / 4
                                              + corr / 4)
    mean_img = {v: [np.mean([x["hybrid_image"] for s in (0, 1, 2) for x in per_seed[s]["cases"]
                             if x["variant"] == v and x["case"] == f"c{i}"]) for i in range(6)] for v in hyb}
    assert by[other]["wilcoxon_p"] == pytest.approx(stats.wilcoxon(mean_img[ref_label], mean_img[other]).pvalue)
    assert "vs_ref_hybrid" not in by[ref_label]
    md = (tmp_path / "table.md").read_text()
    assert "Wilcoxon" in md and " ± " in md and len(cases) == 3 * 2 * 6
    assert (tmp_path / "ablation.png").stat().st_size > 5000 and (tmp_path / "cases.csv").exists()


@pytest.mark.slow
def test_ablation_study_over_two_seeds_resumes(cohort, tmp_path, monkeypatch):
    from jaxseg.dlb import ablation

    # the full method and its generic network: one training per seed
    monkeypatch.setattr(ablation, "VARIANTS", (ablation.VARIANTS[0], ablation.VARIANTS[3]))
    cfg = tiny_cfg(cohort, "seeds=[0,1]")
    out = ablation.run_ablation(cfg, tmp_path / "abl", log=lambda *_: None)
    for s in (0, 1):
        assert (tmp_path / "abl" / f"seed{s}" / "table.md").exists()
        assert (tmp_path / "abl" / f"seed{s}" / "hsl_iqda" / "config.yaml").exists()
    rows = {(r["variant"], r["test"]): r for r in out["table"]}
    for (variant, test), r in rows.items():
        per = [next(t["hybrid"] for t in out["per_seed"][s]["table"] if t["variant"] == variant and t["test"] == test)
               for s in (0, 1)]
        assert r["hybrid"] == per and r["hybrid_mean"] == pytest.approx(np.mean(per))
    # a rerun trains nothing again and gives the same table
    again = ablation.run_ablation(cfg, tmp_path / "abl", log=lambda *_: None)
    assert [r["hybrid"] for r in again["table"]] == [r["hybrid"] for r in out["table"]]

"""Folder evaluation, stratified tables, method comparison and the report (tiny NIfTI volumes)."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from jaxseg.data.io import DataError, save_nifti
from jaxseg.evaluation import metrics as M
from jaxseg.evaluation import plots as P
from jaxseg.evaluation.evaluate import (
    evaluate_folder,
    evaluate_lesions,
    read_case_csv,
    write_case_csv,
)
from jaxseg.evaluation.report import compare_methods, compare_over_seeds, stratified_table, write_report

SHAPE = (12, 10, 8)
SPACING = (1.0, 1.5, 2.0)
AFFINE = np.diag(SPACING + (1.0,))
AFFINE[:3, 3] = (-5.0, 3.0, 10.0)
LABELS = {"background": 0, "WM": 1, "Vent": 2}
STRATA = {"c0": "Controls", "c1": "Controls", "c2": "Controls", "s0": "SB", "s1": "SB", "s2": "SB"}


def _reference(i: int) -> np.ndarray:
    ref = np.zeros(SHAPE, np.uint8)
    ref[2:10, 2:8, 1:7] = 1
    ref[4: 6 + i % 3, 4:6, 3:5] = 2
    return ref


def _prediction(i: int, ref: np.ndarray) -> np.ndarray:
    pred = ref.copy()
    pred[2:2 + i, 2:4, 1:3] = 0  # case-dependent WM misses
    if i == 4:
        pred[pred == 2] = 1  # a missed ventricle: Dice 0, HD inf
    if i == 5:
        pred[0, 0, 0] = 2  # a far false positive
    return pred


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Reference labels (mapping + nnU-Net raw folder) and predictions of one method."""
    root = tmp_path_factory.mktemp("eval")
    refs, preds = {}, {}
    ds = root / "Dataset001_Tiny"
    for i, case in enumerate(sorted(STRATA)):
        ref = _reference(i)
        refs[case] = save_nifti(ds / "labelsTr" / f"{case}.nii.gz", ref, AFFINE)
        save_nifti(ds / "imagesTr" / f"{case}_0000.nii.gz", ref.astype(np.float32), AFFINE)
        preds[case] = _prediction(i, ref)
        save_nifti(root / "pred" / f"{case}.nii.gz", preds[case], AFFINE)
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2w"}, "labels": LABELS, "numTraining": len(STRATA),
        "file_ending": ".nii.gz"}))
    (ds / "metadata.csv").write_text("case,stratum\n" + "".join(f"{c},{s}\n" for c, s in STRATA.items()))
    return {"root": root, "refs": refs, "preds": preds, "ds": ds, "pred_dir": root / "pred"}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=0)
    return a == b


# --------------------------------------------------------------------------- evaluate_folder


def test_evaluate_folder_matches_metrics(data):
    labels = {"WM": 1, "Vent": 2}
    rows = evaluate_folder(data["pred_dir"], data["refs"], labels, strata=STRATA, method="ERM",
                           num_workers=1)
    assert [r["case"] for r in rows] == sorted(STRATA) and rows.missing == []
    for r in rows:
        case = r["case"]
        assert r["method"] == "ERM" and r["stratum"] == STRATA[case]
        i = sorted(STRATA).index(case)
        want = M.evaluate_case(data["preds"][case], _reference(i), [1, 2], SPACING)
        for name, v in labels.items():
            for key in ("dice", "iou", "hd95", "msd", "vol_pred", "vol_ref"):
                assert _same(r[f"{key}_{name}"], want[f"{key}_{v}"]), (case, key, name)
    by = {r["case"]: r for r in rows}
    assert by["s1"]["dice_Vent"] == 0.0 and by["s1"]["hd95_Vent"] == math.inf
    assert by["c0"]["dice_WM"] == 1.0 and by["c0"]["vol_ref_WM"] == 8 * 6 * 6 * 3.0 - by["c0"]["vol_ref_Vent"]


def test_evaluate_folder_dataset_strata_labels_and_workers(data):
    serial = evaluate_folder(data["pred_dir"], data["ds"], None, method="DRO", num_workers=1)
    assert "dice_background" not in serial[0] and "dice_WM" in serial[0]  # labels from dataset.json
    assert {r["case"]: r["stratum"] for r in serial} == STRATA  # strata from metadata.csv
    parallel = evaluate_folder(data["pred_dir"], data["ds"], {"WM": 1, "Vent": 2}, method="DRO",
                               num_workers=2)
    assert len(parallel) == len(serial)
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def test_shape_and_affine_mismatch_name_both_files(data, tmp_path):
    ref = data["refs"]["c0"]
    bad_shape = save_nifti(tmp_path / "shape" / "c0.nii.gz", np.zeros((12, 10, 7), np.uint8), AFFINE)
    with pytest.raises(DataError, match="shape") as e:
        evaluate_folder(bad_shape.parent, {"c0": ref}, {"WM": 1}, num_workers=1)
    assert str(bad_shape) in str(e.value) and str(ref) in str(e.value)
    moved = AFFINE.copy()
    moved[0, 3] += 0.5
    bad_aff = save_nifti(tmp_path / "aff" / "c0.nii.gz", data["preds"]["c0"], moved)
    with pytest.raises(DataError, match="affine") as e:
        evaluate_folder(bad_aff.parent, {"c0": ref}, {"WM": 1}, num_workers=1)
    assert str(bad_aff) in str(e.value) and str(ref) in str(e.value)


def test_missing_prediction(data, tmp_path):
    pred_dir = tmp_path / "partial"
    pred_dir.mkdir()
    for case in ("c0", "s0"):  # uncompressed .nii predictions are found too
        nib.save(nib.load(str(data["pred_dir"] / f"{case}.nii.gz")), str(pred_dir / f"{case}.nii"))
    refs = {c: data["refs"][c] for c in ("c0", "c1", "s0")}
    with pytest.raises(DataError, match="'c1'") as e:
        evaluate_folder(pred_dir, refs, {"WM": 1}, num_workers=1)
    assert str(pred_dir / "c1.nii.gz") in str(e.value)
    with pytest.warns(UserWarning, match="c1"):
        rows = evaluate_folder(pred_dir, refs, {"WM": 1}, num_workers=1, allow_missing=True)
    assert [r["case"] for r in rows] == ["c0", "s0"] and rows.missing == ["c1"]


def test_evaluate_lesions(data):
    rows, summary = evaluate_lesions(data["pred_dir"], data["refs"], lesion_label=2, method="x",
                                     strata=STRATA, num_workers=1)
    vp, vr = [], []
    for r in rows:
        i = sorted(STRATA).index(r["case"])
        p, ref = data["preds"][r["case"]] == 2, _reference(i) == 2
        for key, fn in (("dice", M.dice), ("ppv", M.ppv), ("tpr", M.tpr), ("ltpr", M.ltpr), ("lfpr", M.lfpr)):
            assert _same(r[key], fn(p, ref)), (r["case"], key)
        vp.append(M.volume_mm3(p, SPACING))
        vr.append(M.volume_mm3(ref, SPACING))
    assert rows[-1]["lfpr"] == 0.5 and rows[-1]["n_lesions_pred"] == 2  # s2: the far false positive
    corr = M.volume_correlation(vp, vr)
    assert np.isfinite(corr) and summary["volume_correlation"] == pytest.approx(corr)
    means = [np.nanmean([r[k] for r in rows]) for k in ("dice", "ppv", "ltpr", "lfpr")]
    assert summary["isbi_score"] == pytest.approx(M.isbi_score(*means, corr))
    assert summary["dice"]["n"] == 6 and summary["ppv"]["n"] == 6  # s1 predicts no lesion: PPV 0
    assert summary["empty_pred"] == "zero"


# Lesion label 2: c0..s0 are perfect; s1 predicts nothing (Dice 0, TPR 0, LTPR 0); s2 has 16 lesion
# voxels found plus one far false-positive voxel (Dice 32/33, PPV 16/17, LFPR 1/2).
@pytest.mark.parametrize("empty_pred, ppv, lfpr, n", [
    ("zero", (4 + 0 + 16 / 17) / 6, (0 + 0 + 1 / 2) / 6, 6),
    ("nan", (4 + 16 / 17) / 5, (0 + 1 / 2) / 5, 5),
])
def test_evaluate_lesions_empty_prediction(data, empty_pred, ppv, lfpr, n):
    rows, summary = evaluate_lesions(data["pred_dir"], data["refs"], lesion_label=2, num_workers=1,
                                     empty_pred=empty_pred)
    s1 = next(r for r in rows if r["case"] == "s1")
    assert s1["n_lesions_pred"] == 0 and s1["dice"] == 0.0 and s1["ltpr"] == 0.0
    if empty_pred == "zero":
        assert s1["ppv"] == 0.0 and s1["lfpr"] == 0.0
    else:
        assert math.isnan(s1["ppv"]) and math.isnan(s1["lfpr"])
    assert summary["empty_pred"] == empty_pred
    assert summary["ppv"]["n"] == summary["lfpr"]["n"] == n
    assert summary["ppv"]["mean"] == pytest.approx(ppv) and summary["lfpr"]["mean"] == pytest.approx(lfpr)
    dice, ltpr = (4 + 0 + 32 / 33) / 6, 5 / 6
    corr = summary["volume_correlation"]
    assert summary["isbi_score"] == pytest.approx(dice / 8 + ppv / 8 + (1 - lfpr) / 4 + ltpr / 4 + corr / 4)
    with pytest.raises(ValueError, match="empty_pred"):
        evaluate_lesions(data["pred_dir"], data["refs"], lesion_label=2, num_workers=1, empty_pred="0")


@pytest.mark.parametrize("empty_pred", ["zero", "nan"])
def test_ablation_table_states_empty_convention(tmp_path, empty_pred):
    from jaxseg.dlb import ablation

    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    pred = ref.copy()
    pred[5, 5, 5] = 1  # one false-positive component: PPV 8/9, LFPR 1/2
    rows = [{"variant": "v", "case": c, "site": 0, "seconds": 0.0,
             **ablation.case_metrics(p, ref, (1.0, 1.0, 1.0), empty_pred)}
            for c, p in (("a", pred), ("b", np.zeros_like(ref)))]
    out = ablation.summarise(rows)
    if empty_pred == "zero":
        assert out["ppv"] == pytest.approx((8 / 9 + 0) / 2) and out["lfpr"] == pytest.approx((1 / 2 + 0) / 2)
    else:
        assert out["ppv"] == pytest.approx(8 / 9) and out["lfpr"] == pytest.approx(1 / 2)
    ablation._write(tmp_path, [{"variant": "v", "test": "t", **out}], rows, {}, {}, empty_pred)
    assert M.EMPTY_PRED_NOTES[empty_pred] in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "table.json").read_text())["empty_pred"] == empty_pred


# --------------------------------------------------------------------------- tables


def _hand_rows():
    vals = {  # method -> stratum -> WM Dice values (Vent = 1 - WM / 2)
        "ERM": {"A": [0.9, 0.8, 0.95, 0.7, math.nan], "B": [0.5, 0.6, 0.99, 0.85, 0.1, 0.75]},
        "DRO": {"A": [0.91, 0.82, 0.93, 0.75, 0.6], "B": [0.55, 0.65, 0.98, 0.86, 0.4, 0.7]},
    }
    rows = []
    for m, by in vals.items():
        for s, vs in by.items():
            for i, v in enumerate(vs):
                rows.append({"case": f"{s}{i}", "method": m, "stratum": s, "dice_WM": v,
                             "dice_Vent": 1 - v / 2})
    return rows, vals


def _np_stats(v):
    v = np.asarray([x for x in v if not math.isnan(x)])
    return {"n": v.size, "mean": v.mean(), "std": v.std(ddof=1),
            **{f"p{q}": np.percentile(v, q) for q in (50, 25, 10, 5)}}


def test_stratified_table_matches_numpy():
    rows, vals = _hand_rows()
    with pytest.raises(ValueError, match="several methods"):
        stratified_table(rows)
    table = stratified_table(rows, "dice", ["WM", "Vent"], method="ERM")
    assert [(r["stratum"], r["structure"]) for r in table] == [
        ("A", "WM"), ("A", "Vent"), ("B", "WM"), ("B", "Vent"), ("all", "WM"), ("all", "Vent")]
    for r in table:
        wm = vals["ERM"]["A"] + vals["ERM"]["B"] if r["stratum"] == "all" else vals["ERM"][r["stratum"]]
        v = wm if r["structure"] == "WM" else [1 - x / 2 for x in wm]
        want = _np_stats(v)
        assert r["n"] == want["n"]
        for k in ("mean", "std", "p50", "p25", "p10", "p5"):
            assert r[k] == pytest.approx(want[k], rel=1e-12), (r["stratum"], r["structure"], k)
    assert table[0]["n"] == 4  # the NaN is dropped
    t75 = stratified_table(rows, "dice", ["WM"], percentiles=(75,), method="DRO", strata=["B"])
    assert [r["stratum"] for r in t75] == ["B", "all"]
    assert t75[0]["p75"] == pytest.approx(np.percentile(vals["DRO"]["B"], 75))


def test_compare_methods_differences():
    rows, _ = _hand_rows()
    cmp = compare_methods(rows, ("ERM", "DRO"), "dice", ["WM", "Vent"])
    ta = stratified_table(rows, "dice", ["WM", "Vent"], method="ERM")
    tb = stratified_table(rows, "dice", ["WM", "Vent"], method="DRO")
    assert len(cmp) == len(ta) == 6
    for c, a, b in zip(cmp, ta, tb):
        assert (c["stratum"], c["structure"]) == (a["stratum"], a["structure"])
        assert c["ERM_n"] == a["n"] and c["DRO_n"] == b["n"] and "diff_n" not in c
        for st in ("mean", "std", "p50", "p25", "p10", "p5"):
            assert c[f"ERM_{st}"] == a[st] and c[f"DRO_{st}"] == b[st]
            assert c["diff_" + st] == pytest.approx(b[st] - a[st])
    wm_b = next(c for c in cmp if (c["stratum"], c["structure"]) == ("B", "WM"))
    assert wm_b["diff_p5"] == pytest.approx(np.percentile([0.55, 0.65, 0.98, 0.86, 0.4, 0.7], 5)
                                           - np.percentile([0.5, 0.6, 0.99, 0.85, 0.1, 0.75], 5))
    with pytest.raises(ValueError, match="different cases"):
        compare_methods(rows[:-1], ("ERM", "DRO"), "dice", ["WM"])
    with pytest.raises(ValueError, match="no rows for method 'X'"):
        compare_methods(rows, ("ERM", "X"))


# --------------------------------------------------------------------------- report, plots, CSV


def test_write_report(tmp_path, data):
    rows, _ = _hand_rows()
    img = _reference(0).astype(np.float32) + 0.1 * np.arange(np.prod(SHAPE)).reshape(SHAPE) / 100
    ov = P.worst_case_overlays(img, _reference(1), data["preds"]["c1"], tmp_path / "src" / "c1.png",
                               spacing=SPACING, title="c1")
    curves = {m: [{"step": s, "loss": 1.0 / (s + 1) + k, "dice": s / 10} for s in range(10)]
              for k, m in enumerate(("ERM", "DRO"))}
    out = write_report(tmp_path / "work", rows, methods=("ERM", "DRO"), structures=["WM", "Vent"],
                       title="Tiny DRO", training_curves=curves, overlays=[ov],
                       extra_sections={"Notes": "Some **bold** text.\n\n- item one\n- item `two`"})
    md_path, html_path = out["markdown"], out["html"]
    assert md_path == tmp_path / "work" / "report.md" and html_path == tmp_path / "work" / "report.html"
    assert md_path.stat().st_size > 0 and html_path.stat().st_size > 0
    assert len(out["plots"]) == 3 + 1 + 1  # strata A, B, all + curves + overlay
    for p in out["plots"]:
        assert p.parent == tmp_path / "work" / "plots" and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = md_path.read_text()
    cmp = compare_methods(rows, ("ERM", "DRO"), "dice", ["WM", "Vent"])
    for c in cmp:
        for st in ("mean", "std", "p50", "p25", "p10", "p5"):
            assert f"{c['ERM_' + st]:.3f}" in md and f"{c['DRO_' + st]:.3f}" in md
    # the better p5 in stratum B / WM (DRO: 0.4 vs 0.1 at the tail) is bold, the worse is not
    wm_b = next(c for c in cmp if (c["stratum"], c["structure"]) == ("B", "WM"))
    assert f"**{wm_b['DRO_p5']:.3f}**" in md and f"**{wm_b['ERM_p5']:.3f}**" not in md
    assert f"+{wm_b['diff_p5']:.3f}" in md
    for table in (stratified_table(rows, method="ERM"), stratified_table(rows, method="DRO")):
        assert f"{table[0]['mean']:.3f}" in md
    assert "plots/training_curves.png" in md and "## Notes" in md and "Some **bold** text." in md
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 5 and "<style>" in page
    assert 'src="plots/' not in page and "<b>bold</b>" in page and "<code>two</code>" in page
    assert f"<b>{wm_b['DRO_p5']:.3f}</b>" in page


def test_largest_error_point_is_on_largest_error():
    ref = np.zeros((20, 20, 20), np.uint8)
    pred = ref.copy()
    pred[2, 2, 2] = 1  # small error
    pred[10:14, 5:8, 12:15] = 1  # the largest error component
    pt = P.largest_error_point(ref, pred)
    assert pred[pt] == 1 and 10 <= pt[0] < 14 and 5 <= pt[1] < 8 and 12 <= pt[2] < 15
    assert P.largest_error_point(ref, ref) == (10, 10, 10)


def test_case_csv_round_trip(tmp_path, data):
    rows = evaluate_folder(data["pred_dir"], data["refs"], {"WM": 1, "Vent": 2}, method="ERM",
                           num_workers=1)  # no strata: stratum None
    rows[0]["extra"] = 3.25
    path = write_case_csv(rows, tmp_path / "sub" / "cases.csv")
    assert [p.name for p in path.parent.iterdir()] == ["cases.csv"]  # no temp file left behind
    back = read_case_csv(path)
    assert list(back[0])[:3] == ["case", "method", "stratum"]
    assert len(back) == len(rows)
    for a, b in zip(rows, back):
        assert b["stratum"] is None and b["case"] == a["case"] and b["method"] == "ERM"
        for k, v in a.items():
            if k not in ("case", "method", "stratum"):
                assert _same(float(v), b[k]), k
    assert back[0]["extra"] == 3.25 and all(b["extra"] is None for b in back[1:])
    assert any(r["hd95_Vent"] == math.inf for r in back)


def test_training_curve_panels_skip_flat_values_and_keep_validation(tmp_path):
    recs = [{"step": s, "loss": 1.0 / (s + 1), "grad_norm": 2.0 + s, "skipped_steps": 0, "epoch": s / 5}
            for s in range(1, 6)]
    recs += [{"step": 5, "val_dice": 0.4, "val_cases": 3}, {"step": 10, "val_dice": 0.6, "val_cases": 3}]
    curves = {"ERM": recs, "DRO": [dict(r, loss=r.get("loss", 0) * 2) if "loss" in r else r for r in recs]}
    assert P.curve_keys(curves) == ["loss", "grad_norm", "val_dice"]
    assert P.training_curves(curves, tmp_path / "c.png").stat().st_size > 1000
    assert P.sampling_shares(curves, tmp_path / "s.png") is None  # nothing of the kind was logged
    assert P.keyed_curves(curves, "val_dice_class", tmp_path / "k.png") is None
    curves["ERM"].append({"step": 10, "val_dice": 0.6, "val_dice_class": {"csf": 0.5, "wm": 0.7}})
    assert P.keyed_curves(curves, "val_dice_class", tmp_path / "k.png").stat().st_size > 1000


def test_compare_over_seeds_mean_sd_and_spread_flag(tmp_path):
    rng = np.random.default_rng(3)
    cases = [f"c{i}" for i in range(12)]
    rows, vals = [], {}
    for seed in (0, 1, 2):
        for method, shift in (("ERM", 0.0), ("DRO", 0.2)):
            v = rng.uniform(0.3, 0.7, len(cases)) + shift  # DRO clearly better in "a", not in "b"
            w = rng.uniform(0.3, 0.7, len(cases))
            vals[seed, method] = (v, w)
            rows += [{"case": c, "method": method, "seed": seed, "stratum": "s", "dice_a": float(x),
                      "dice_b": float(y)} for c, x, y in zip(cases, v, w)]
    out = {(r["stratum"], r["structure"]): r for r in compare_over_seeds(rows, ("ERM", "DRO"))}
    for k, st in enumerate(("a", "b")):
        r = out["s", st]
        assert r["seeds"] == 3 and r["n"] == 12
        for m in ("ERM", "DRO"):
            p10 = [np.percentile(vals[sd, m][k], 10) for sd in (0, 1, 2)]
            means = [np.mean(vals[sd, m][k]) for sd in (0, 1, 2)]
            assert math.isclose(r[f"{m}_p10"], np.mean(p10), rel_tol=1e-9)
            assert math.isclose(r[f"{m}_p10_sd"], np.std(p10, ddof=1), rel_tol=1e-9)
            assert math.isclose(r[f"{m}_mean"], np.mean(means), rel_tol=1e-9)
        assert math.isclose(r["diff_mean"], r["DRO_mean"] - r["ERM_mean"], abs_tol=1e-12)
        assert r["exceeds_mean"] == (abs(r["diff_mean"]) > r["ERM_mean_sd"] + r["DRO_mean_sd"])
    assert out["s", "a"]["exceeds_mean"]
    # the report shows the over-seeds table (mean ± SD, * on the spread-exceeding Δ) instead of pooling
    md = write_report(tmp_path, rows, methods=["ERM", "DRO"])["markdown"].read_text()
    assert "over 3 training seeds" in md and " ± " in md and " *" in md

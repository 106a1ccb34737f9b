"""Tests for jaxseg.data.synth (the embedded synthetic cohort). Small: the template at 2 mm,
subjects at 3-4 mm, a handful of subjects."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from jaxseg.config import SynthConfig
from jaxseg.data import synth as S

L = S.LABELS


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    cache = tmp_path_factory.mktemp("synth_cache")
    t = S.load_template(2, cache=cache)
    files = list(cache.iterdir())
    assert [f.name for f in files] == [f"mni152_labels_v{S.template._TEMPLATE_VERSION}_2mm.npz"]
    again = S.load_template(2, cache=cache)  # from the cache, identical
    np.testing.assert_array_equal(again.labels, t.labels)
    np.testing.assert_array_equal(again.affine, t.affine)
    return t


def _vol(label, value, spacing):
    return float((label == value).sum()) * spacing**3 / 1000.0


# ------------------------------------------------------------------ template


def test_labels_order():
    assert list(S.LABELS) == ["background", "csf", "cortical_gm", "white_matter", "ventricles",
                              "cerebellum", "deep_gm", "brainstem"]
    assert list(S.LABELS.values()) == list(range(8))


def test_template_label_map_2mm(template):
    lab = template.labels
    assert lab.dtype == np.uint8 and template.resolution == 2.0
    assert set(np.unique(lab).tolist()) == set(range(8))
    v = template.volumes_ml()
    assert v["white_matter"] > 10 * v["deep_gm"] > 0
    assert v["cortical_gm"] > v["cerebellum"] > v["brainstem"] > 5
    assert v["cortical_gm"] > v["white_matter"] > v["cerebellum"]
    assert 5 < v["ventricles"] < 60 and 5 < v["deep_gm"] < 60
    assert 1000 < sum(x for k, x in v.items() if k != "background") < 2500

    brain = np.argwhere(lab > 0).mean(0) * template.resolution + template.origin
    c = {k: template.centroid_mm(L[k])
         for k in ("ventricles", "cerebellum", "brainstem", "deep_gm")}
    # cerebellum inferior and posterior to the brain centre, brainstem inferior, both midline
    assert c["cerebellum"][2] < brain[2] - 30 and c["cerebellum"][1] < brain[1] - 30
    assert c["brainstem"][2] < brain[2] - 25 and abs(c["brainstem"][0]) < 3
    assert c["cerebellum"][2] < c["brainstem"][2] + 15 and c["cerebellum"][1] < c["brainstem"][1]
    # ventricles and deep GM central
    for k in ("ventricles", "deep_gm"):
        assert abs(c[k][0]) < 3 and np.linalg.norm(c[k] - brain) < 20, (k, c[k], brain)
    # left-right symmetric (the template is symmetric)
    mid = int(round(-template.origin[0] / template.resolution))
    for k in ("ventricles", "cerebellum", "deep_gm", "white_matter"):
        left, right = (lab[:mid] == L[k]).sum(), (lab[mid + 1:] == L[k]).sum()
        assert abs(left - right) < 0.1 * (left + right), k


# ------------------------------------------------------------------ subjects


def test_subject_same_seed_identical_different_seed_differs(template):
    kw = dict(stratum="ventriculomegaly", age=33.0, site=1, spacing=4.0, channels=("T1", "T2"))
    a = S.make_subject((5, 3), template, **kw)
    b = S.make_subject((5, 3), template, **kw)
    c = S.make_subject((5, 4), template, **kw)
    for ch in ("T1", "T2"):
        assert a["images"][ch].tobytes() == b["images"][ch].tobytes()
    assert a["label"].tobytes() == b["label"].tobytes()
    assert a["metadata"] == b["metadata"]
    assert not np.array_equal(a["images"]["T1"], c["images"]["T1"])
    assert not np.array_equal(a["label"], c["label"])


def test_control_subject_geometry_and_classes(template):
    s = S.make_subject(11, template, stratum="control", age=40.0, site=0, spacing=4.0)
    shape, affine = S.output_grid(4.0)
    assert s["label"].shape == shape and s["label"].dtype == np.uint8
    assert list(s["images"]) == ["T1"]
    img = s["images"]["T1"]
    assert img.shape == shape and img.dtype == np.float32 and np.isfinite(img).all()
    assert img.min() >= 0
    np.testing.assert_allclose(s["affine"], affine)
    assert np.allclose(np.diag(s["affine"])[:3], 4.0)  # RAS, isotropic spacing
    assert set(np.unique(s["label"]).tolist()) == set(range(8))
    assert s["lesion"] is None and s["metadata"]["stratum"] == "control"


def test_strata_change_anatomy_of_the_same_subject(template):
    for seed in (0, 1):
        kw = dict(age=40.0, site=seed, spacing=4.0)
        ctl = S.make_subject(seed, template, stratum="control", **kw)
        vm = S.make_subject(seed, template, stratum="ventriculomegaly", **kw)
        ch = S.make_subject(seed, template, stratum="cerebellar_hypoplasia", **kw)
        v_ctl, v_vm = _vol(ctl["label"], L["ventricles"], 4), _vol(vm["label"], L["ventricles"], 4)
        assert v_vm > 1.6 * v_ctl, (v_vm, v_ctl)
        # the tissue around is pushed, not replaced: WM keeps most of its volume
        w_ctl = _vol(ctl["label"], L["white_matter"], 4)
        w_vm = _vol(vm["label"], L["white_matter"], 4)
        assert 0.85 * w_ctl < w_vm < w_ctl
        c_ctl, c_ch = _vol(ctl["label"], L["cerebellum"], 4), _vol(ch["label"], L["cerebellum"], 4)
        assert c_ch < 0.8 * c_ctl, (c_ch, c_ctl)
        assert _vol(ch["label"], L["csf"], 4) > _vol(ctl["label"], L["csf"], 4)
        # everything outside the posterior fossa is untouched; the appearance stream is shared
        far = (ctl["label"] != L["cerebellum"]) & (ch["label"] != L["cerebellum"])
        far &= (ch["label"] == ctl["label"])
        assert far.mean() > 0.95
        assert vm["metadata"]["ventricle_target_ratio"] >= 2.0


def test_age_effects(template):
    kw = dict(stratum="control", site=2, spacing=4.0, channels=("T1", "T2"))
    young = S.make_subject(21, template, age=26.0, **kw)
    old = S.make_subject(21, template, age=45.0, **kw)
    bv_y = _vol(young["label"] > 0, True, 4)
    bv_o = _vol(old["label"] > 0, True, 4)
    assert bv_y < 0.6 * bv_o

    def mean(s, ch, k):
        return float(s["images"][ch][s["label"] == L[k]].mean())

    # myelination: T1 WM darker than cortical GM when young, brighter when old; T2 the reverse
    assert mean(young, "T1", "white_matter") < mean(young, "T1", "cortical_gm")
    assert mean(old, "T1", "white_matter") > mean(old, "T1", "cortical_gm")
    assert mean(young, "T2", "white_matter") > mean(young, "T2", "cortical_gm")
    assert mean(old, "T2", "white_matter") < mean(old, "T2", "cortical_gm")
    # relatively larger ventricles when young
    rv_y = _vol(young["label"], L["ventricles"], 4) / bv_y
    rv_o = _vol(old["label"], L["ventricles"], 4) / bv_o
    assert rv_y > 1.2 * rv_o


def test_lesions_in_white_matter_bright_on_flair(template):
    from scipy import ndimage as ndi

    s = S.make_subject(3, template, age=45.0, age_unit="years", spacing=3.0, lesions=True, site=0)
    les, tissue = s["label"], s["tissue"]
    assert s["lesion"] is les and set(np.unique(les).tolist()) == {0, 1}
    assert list(s["images"]) == ["T1", "FLAIR"]
    assert 3 <= s["metadata"]["n_lesions"] <= 30
    m = les > 0
    assert m.sum() >= 3
    assert (tissue[m] == L["white_matter"]).all()
    ring = ndi.binary_dilation(m, iterations=2) & ~ndi.binary_dilation(m)
    ring &= tissue == L["white_matter"]
    assert ring.sum() > 10
    flair, t1 = s["images"]["FLAIR"], s["images"]["T1"]
    assert flair[m].mean() > 1.2 * flair[ring].mean()
    assert t1[m].mean() < 0.9 * t1[ring].mean()
    # periventricular preference (60% of lesions are drawn next to the ventricles)
    d = ndi.distance_transform_edt(tissue != L["ventricles"], sampling=3.0)
    comp, n = ndi.label(m)
    assert n >= 10
    d_min = np.asarray(ndi.minimum(d, comp, range(1, n + 1)))
    assert (d_min <= 8).mean() >= 0.4


def test_skull_strip_zero_outside_brain_nonzero_inside(template):
    from scipy import ndimage as ndi

    kw = dict(stratum="ventriculomegaly", age=30.0, site=1, spacing=4.0,
              channels=("T1", "T2", "FLAIR"))
    s = S.make_subject((7, 2), template, **kw)  # skull_strip defaults to True
    raw = S.make_subject((7, 2), template, skull_strip=False, **kw)
    mask = s["brain_mask"]
    assert mask.dtype == bool and mask.shape == s["label"].shape
    # all non-background labels, dilated by one voxel
    np.testing.assert_array_equal(mask, ndi.binary_dilation(s["tissue"] > 0))
    np.testing.assert_array_equal(mask, S.brain_mask(s["tissue"]))
    assert (mask & (s["tissue"] == 0)).any() and 0.05 < mask.mean() < 0.8
    assert s["metadata"]["skull_strip"] is True and raw["metadata"]["skull_strip"] is False
    # the label map and the random streams are untouched
    np.testing.assert_array_equal(s["label"], raw["label"])
    np.testing.assert_array_equal(raw["brain_mask"], mask)
    for ch in kw["channels"]:
        img, noisy = s["images"][ch], raw["images"][ch]
        assert img.dtype == np.float32
        assert (img[~mask] == 0).all(), ch  # exactly 0 outside
        assert (img[mask] > 0).all(), ch  # never 0 inside: nonzero == brain mask
        np.testing.assert_array_equal(img != 0, mask)
        # inside the mask nothing changes (applied after noise / bias / gain)
        assert img[mask].tobytes() == noisy[mask].tobytes(), ch
        # without skull stripping the background keeps its Rician noise
        assert (noisy[~mask] > 0).mean() > 0.99, ch
        # crop-to-nonzero gives the brain mask's bounding box
        nz, mk = np.nonzero(img), np.nonzero(mask)
        assert [(a.min(), a.max()) for a in nz] == [(a.min(), a.max()) for a in mk]
    # lesion subjects: the mask comes from the tissue map, not the lesion label
    les = S.make_subject(3, template, age=45.0, age_unit="years", spacing=4.0, lesions=True)
    np.testing.assert_array_equal(les["brain_mask"], S.brain_mask(les["tissue"]))
    for img in les["images"].values():
        np.testing.assert_array_equal(img != 0, les["brain_mask"])


def test_skull_strip_nudges_exact_zeros_inside():
    img = np.array([[0.0, -0.5, 3.0], [0.0, 2.0, 7.0]], np.float32)
    mask = np.array([[True, True, True], [False, False, True]])
    out = S.subject._skull_strip(img.copy(), mask)
    np.testing.assert_array_equal(
        out, np.array([[S.MIN_BRAIN_INTENSITY, S.MIN_BRAIN_INTENSITY, 3.0], [0, 0, 7.0]],
                      np.float32))
    assert np.float16(S.MIN_BRAIN_INTENSITY) > 0  # survives a half-precision cast


# ------------------------------------------------------------------ written cohorts


def _read_rows(out):
    with open(out / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def _check_dataset(out, n, channels, labels):
    ds = json.loads((out / "dataset.json").read_text())
    for key in ("channel_names", "labels", "numTraining", "file_ending", "description"):
        assert key in ds
    assert ds["channel_names"] == {str(i): c for i, c in enumerate(channels)}
    assert ds["labels"] == labels and ds["file_ending"] == ".nii.gz"
    rows = _read_rows(out)
    assert list(rows[0])[:5] == ["case", "stratum", "age", "site", "split"]
    assert len(rows) == n
    assert [r["case"] for r in rows] == [f"synth_{i:04d}" for i in range(1, n + 1)]
    train = [r["case"] for r in rows if r["split"] == "train"]
    test = [r["case"] for r in rows if r["split"] == "test"]
    assert ds["numTraining"] == len(train)
    for split, cases in (("Tr", train), ("Ts", test)):
        imgs = sorted(p.name for p in (out / f"images{split}").glob("*.nii.gz")) if cases else []
        labs = sorted(p.name for p in (out / f"labels{split}").glob("*.nii.gz")) if cases else []
        assert imgs == sorted(f"{c}_{k:04d}.nii.gz" for c in cases for k in range(len(channels)))
        assert labs == sorted(f"{c}.nii.gz" for c in cases)
        for c in cases:
            lab = nib.load(out / f"labels{split}" / f"{c}.nii.gz")
            assert lab.get_data_dtype() == np.uint8
            lv = np.asarray(lab.dataobj)
            assert set(np.unique(lv).tolist()) <= set(labels.values())
            for k in range(len(channels)):
                im = nib.load(out / f"images{split}" / f"{c}_{k:04d}.nii.gz")
                assert im.shape == lab.shape and im.get_data_dtype() == np.float32
                np.testing.assert_allclose(im.affine, lab.affine)
                assert nib.aff2axcodes(im.affine) == ("R", "A", "S")
    assert not (out / ".tmp").exists()
    return ds, rows


def test_write_cohort_tissue_valid(template, tmp_path):
    out = tmp_path / "Dataset900_Synth"
    info = S.write_cohort(out, SynthConfig(n_subjects=5, seed=3, spacing=4.0, n_test=1), channels=("T1", "T2"),
                          workers=1, progress=False, template=template)
    ds, rows = _check_dataset(out, 5, ["T1", "T2"], S.LABELS)
    assert (out / "preview.png").stat().st_size > 10_000
    assert info["preview"] == out / "preview.png"
    # skull-stripped by default, and recorded
    assert ds["synth"]["skull_strip"] is True and "Skull-stripped" in ds["description"]
    for r in rows:
        sp = "Ts" if r["split"] == "test" else "Tr"
        lab = np.asarray(nib.load(out / f"labels{sp}" / f"{r['case']}.nii.gz").dataobj)
        for k in range(2):
            im = np.asarray(nib.load(out / f"images{sp}" / f"{r['case']}_{k:04d}.nii.gz").dataobj)
            np.testing.assert_array_equal(im != 0, S.brain_mask(lab))
    assert ds["numTraining"] == 4 and sum(r["split"] == "test" for r in rows) == 1
    # strata allocated exactly by largest remainder (80/10/10 of 5 -> 4/1/0)
    assert sorted(r["stratum"] for r in rows) == ["control"] * 4 + ["ventriculomegaly"]
    assert {r["site"] for r in rows} == {"site0", "site1", "site2"}
    assert all(26.0 <= float(r["age"]) <= 45.0 for r in rows)
    lab = np.asarray(nib.load(out / "labelsTr" / f"{rows[0]['case']}.nii.gz").dataobj)
    if rows[0]["split"] == "train":
        assert lab.max() == 7
    # the project's reader accepts it
    try:
        from jaxseg.data.datasets import read_nnunet_raw
    except ImportError:  # pragma: no cover - reader not there yet
        return
    dset = read_nnunet_raw(out)
    assert len(dset) == 5
    # refuses to write over an existing cohort unless asked
    with pytest.raises(FileExistsError):
        S.write_cohort(out, SynthConfig(n_subjects=2, spacing=4.0), workers=1, progress=False, template=template)


def test_write_cohort_deterministic_any_workers(template, tmp_path):
    kw = dict(progress=False, template=template, preview=False)
    S.write_cohort(tmp_path / "a", SynthConfig(n_subjects=3, seed=9, spacing=4.0, n_test=1), workers=2, **kw)
    S.write_cohort(tmp_path / "b", SynthConfig(n_subjects=3, seed=9, spacing=4.0, n_test=1), workers=1, **kw)
    S.write_cohort(tmp_path / "c", SynthConfig(n_subjects=3, seed=10, spacing=4.0, n_test=1), workers=1, **kw)
    a_dir = tmp_path / "a"
    files = sorted(p.relative_to(a_dir) for p in a_dir.rglob("*") if p.is_file())
    assert len(files) == 3 * 2 + 2  # images + labels, dataset.json, metadata.csv
    for f in files:  # byte-identical files, whatever the scheduling
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    a = np.asarray(nib.load(tmp_path / "a" / "imagesTr" / "synth_0001_0000.nii.gz").dataobj)
    c_path = next((tmp_path / "c").rglob("synth_0001_0000.nii.gz"))
    assert not np.array_equal(a, np.asarray(nib.load(c_path).dataobj))


def test_write_cohort_lesion_flavour(template, tmp_path):
    out = tmp_path / "les"
    S.write_cohort(out, SynthConfig(n_subjects=3, seed=1, spacing=4.0, flavour="lesion", n_test=0,
                                    p_ventriculomegaly=0.0, p_cerebellar_hypoplasia=0.0),
                   workers=1, progress=False, template=template)
    ds, rows = _check_dataset(out, 3, ["T1", "FLAIR"], S.LESION_LABELS)
    assert ds["labels"] == {"background": 0, "lesion": 1}
    assert all(int(r["n_lesions"]) >= 3 and r["age_unit"] == "years" for r in rows)
    lab = np.asarray(nib.load(out / "labelsTr" / "synth_0001.nii.gz").dataobj)
    assert lab.max() == 1
    assert (out / "preview.png").is_file()


def test_write_cohort_without_skull_strip(template, tmp_path):
    out = tmp_path / "raw"
    S.write_cohort(out, SynthConfig(n_subjects=1, seed=2, spacing=4.0, n_test=0), workers=1, progress=False,
                   preview=False, template=template, skull_strip=False)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["synth"]["skull_strip"] is False and "Not skull-stripped" in ds["description"]
    im = np.asarray(nib.load(out / "imagesTr" / "synth_0001_0000.nii.gz").dataobj)
    lab = np.asarray(nib.load(out / "labelsTr" / "synth_0001.nii.gz").dataobj)
    bg = ~S.brain_mask(lab)
    assert (im[bg] != 0).mean() > 0.99  # a noisy background, not zeros


def test_interrupted_write_leaves_no_half_files(template, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = S.make_subject

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(S.cohort, "make_subject", flaky)  # where the subject jobs look it up
    out = tmp_path / "x"
    with pytest.raises(KeyboardInterrupt):
        S.write_cohort(out, SynthConfig(n_subjects=4, seed=0, spacing=4.0, n_test=0), workers=1, progress=False,
                       template=template)
    assert not (out / "dataset.json").exists()  # written last: the cohort is visibly incomplete
    written = list((out / "imagesTr").glob("*.nii.gz")) + list((out / "labelsTr").glob("*.nii.gz"))
    assert len(written) == 4
    for p in written:  # whatever is there is whole
        assert np.asarray(nib.load(p).dataobj).size > 0


def test_bad_arguments(template, tmp_path):
    with pytest.raises(ValueError, match="stratum"):
        S.make_subject(0, template, stratum="hydrocephalus", spacing=4.0)
    with pytest.raises(ValueError, match="flavour"):
        S.write_cohort(tmp_path / "y", SynthConfig(n_subjects=2, flavour="fetal"), template=template)
    with pytest.raises(ValueError, match="strata"):
        S.write_cohort(tmp_path / "y", SynthConfig(n_subjects=2, p_ventriculomegaly=0.7, p_cerebellar_hypoplasia=0.7),
                       template=template)
    with pytest.raises(ValueError, match="channel"):
        S.write_cohort(tmp_path / "y", SynthConfig(n_subjects=2), channels=("T1", "DWI"), template=template)
    assert not (tmp_path / "y").exists()  # refused before anything is written


def test_lesion_radius_sets_the_lesion_load(template, tmp_path):
    small = S.make_subject(3, template, age=45.0, age_unit="years", spacing=3.0, lesions=True)
    large = S.make_subject(3, template, age=45.0, age_unit="years", spacing=3.0, lesions=True,
                           lesion_radius_mm=(3.0, 12.0))
    assert small["metadata"]["n_lesions"] == large["metadata"]["n_lesions"]  # same draws, larger radii
    assert (large["label"] > 0).sum() > 3 * (small["label"] > 0).sum()
    with pytest.raises(ValueError, match="lesion_radius_mm"):
        S.write_cohort(tmp_path / "z", SynthConfig(n_subjects=2, flavour="lesion", lesion_radius_mm=(5.0, 2.0)),
                       template=template)


def test_demo_and_synth_command_write_the_whole_synth_section(tmp_path, monkeypatch):
    # Both hand the config's synth section to write_cohort as it is (the demo used to drop lesion_radius_mm).
    from jaxseg import demo, launch
    from jaxseg.config import SynthRunConfig, load_config

    seen = []

    class Stop(Exception):
        pass

    def fake_write_cohort(out_dir, cfg, **kw):
        seen.append(cfg)
        raise Stop

    overrides = ["synth.flavour=lesion", "synth.lesion_radius_mm=[2.0,6.0]", "synth.n_subjects=7", "synth.seed=4"]
    cfg = load_config(None, overrides, SynthRunConfig)
    monkeypatch.setattr(demo, "write_cohort", fake_write_cohort)
    monkeypatch.setattr(S, "write_cohort", fake_write_cohort)  # cmd_synth imports it from the package
    with pytest.raises(Stop):
        demo.run_demo(cfg, tmp_path / "demo", progress=False)
    with pytest.raises(Stop):
        launch.main(["synth", "--out", str(tmp_path / "raw"), *overrides])
    assert seen == [cfg.synth, cfg.synth]
    assert seen[0].lesion_radius_mm == (2.0, 6.0) and seen[1].flavour == "lesion"

import json
import subprocess
import sys

import pytest

from jaxseg.config import load_config
from jaxseg.launch import main

COMMANDS = ("synth", "prepare", "train", "predict", "evaluate", "demo")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--workdir", str(tmp_path / "w"), "model.widht=16"]) == 1
    err = capsys.readouterr().err
    assert "model.widht" in err and "unknown key" in err and "features_base" in err


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--workdir", str(tmp_path / "w"), f"data.store={tmp_path / 'nowhere'}", "data.batch_size=8"]) == 1
    assert "no prepared case store" in capsys.readouterr().err


def test_prepare_on_missing_dataset_fails_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxseg.launch", "prepare", "--dataset", str(tmp_path / "none"),
                           "--store", str(tmp_path / "store")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert str(tmp_path / "none") in proc.stderr
    assert not (tmp_path / "store" / "dataset.json").exists()


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    # The whole main job on a tiny cohort: synth -> prepare -> ERM and DRO -> predict -> evaluate -> report.
    overrides = ["synth.n_subjects=14", "synth.n_test=4", "synth.spacing=6.0", "data.patch_size=[16,16,16]",
                 "model.features_base=4", "model.features_max=8", "train.epochs=1", "data.batch_size=8",
                 "train.steps_per_epoch=2", "train.val_every=1", "data.threads=1", "data.augment=none",
                 "dro.log_every=1", "seeds=[0,1]"]
    assert main(["demo", "--workdir", str(tmp_path / "demo"), *overrides]) == 0
    work = tmp_path / "demo"
    md = (work / "report.md").read_text()
    assert "ERM" in md and "DRO" in md and "p5" in md and "over 2 training seeds" in md
    assert (work / "report.html").stat().st_size > 1000
    timings = json.loads((work / "timings.json").read_text())
    for method in ("erm", "dro"):
        for seed in (0, 1):
            assert timings[f"train_{method.upper()}_seed{seed}_s"] > 0
            assert len(list((work / method / f"seed{seed}" / "predictions").glob("*.nii.gz"))) == 4
            assert load_config(work / method / f"seed{seed}" / "config.yaml").seed == seed
            # a training run's config holds the core sections; the demo's own keeps the cohort's
            assert "synth:" not in (work / method / f"seed{seed}" / "config.yaml").read_text().splitlines()
    assert "synth:" in (work / "config.yaml").read_text().splitlines()
    rows = (work / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 4


@pytest.mark.parametrize("flags, want", [([], "zero"), (["--lesion-empty-pred", "nan"], "nan"),
                                         (["eval.lesion_empty_pred=nan"], "nan")])
def test_dlb_ablation_empty_prediction_switch(tmp_path, monkeypatch, flags, want):
    from jaxseg.dlb import ablation

    seen = {}

    def fake(cfg, workdir):
        seen["cfg"] = cfg
        return {"timings": {"total_s": 0.0}}

    monkeypatch.setattr(ablation, "run_ablation", fake)
    assert main(["dlb-ablation", "--workdir", str(tmp_path), *flags]) == 0
    assert seen["cfg"].eval.lesion_empty_pred == want

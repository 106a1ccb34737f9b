"""Issue 14, predict / evaluate / run directory side: a user's mistake is one line on stderr and exit
code 1 (no traceback, nothing half-written), one writer per run directory / store / output folder,
resumes that do not log a step twice, and the README's predict -> evaluate flow."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxseg.launch import main
from jaxseg.locks import LockError, hold

REPO = Path(__file__).resolve().parent.parent


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _tiny_overrides(store, *extra):
    return [f"data.store={store}", "data.patch_size=[16,16,16]", "data.batch_size=8", "data.fold=all",
            "data.threads=1", "model.features_base=4", "model.features_max=8", "train.epochs=2",
            "train.steps_per_epoch=2", "train.checkpoint_every=1", "train.log_every=1", "data.augment=none", *extra]


def _steps(workdir):
    return [json.loads(line)["step"] for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tiny_store, tmp_path_factory):
    from _tiny import tiny_cfg

    from jaxseg.train.loop import train_and_evaluate

    d = tmp_path_factory.mktemp("run") / "run"
    train_and_evaluate(tiny_cfg(tiny_store), d, max_steps=1, progress=False)
    return d


# --------------------------------------------------------------------------- locks


_HOLDER = "import sys, time; from jaxseg.locks import hold\nwith hold(sys.argv[1], 'test holder'):\n" \
          "    print('held', flush=True); time.sleep(600)\n"


def test_lock_names_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "w")], stdout=subprocess.PIPE,
                            text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"{tmp_path / 'w'}.*pid {proc.pid} on "), \
                hold(tmp_path / "w", "second"):
            pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with hold(tmp_path / "w", "after the kill") as path:  # the kernel dropped the dead holder's lock
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "w" / ".lock").exists()


@pytest.mark.slow
def test_second_train_on_a_workdir_is_refused_while_the_first_runs(tiny_store, tmp_path):
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "jaxseg.launch", "train", "--workdir", str(work),
           *_tiny_overrides(tiny_store, "train.epochs=40", "train.checkpoint_every=20")]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 120
        while not (work / "metrics.jsonl").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()
        second = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False, timeout=120)
        assert second.returncode == 1
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in second.stderr, second.stderr
        assert str(work) in err[0] and f"pid {first.pid}" in err[0] and "--workdir" in err[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed first run's lock is gone with it: a resume proceeds and logs every step once
    assert main(["train", "--workdir", str(work), *_tiny_overrides(tiny_store, "train.epochs=40",
                                                                    "train.checkpoint_every=20"),
                 "--max-steps", "2"]) == 0
    steps = _steps(work)
    assert len(steps) == len(set(steps)) and not (work / ".lock").exists()


@pytest.mark.slow
def test_prepare_and_predict_refuse_a_locked_folder(tmp_path, run_dir, tiny_store, capsys):
    raw = tiny_store.parent / "raw"
    with hold(tmp_path / "store", "someone else"):
        assert main(["prepare", "--dataset", str(raw), "--store", str(tmp_path / "store")]) == 1
        assert f"{tmp_path / 'store'} (--store): in use by someone else (pid {os.getpid()}" in capsys.readouterr().err
    with hold(tmp_path / "pred", "someone else"):
        assert main(["predict", "--run", str(run_dir), "--input", str(raw), "--output", str(tmp_path / "pred")]) == 1
        assert f"{tmp_path / 'pred'} (--output): in use" in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [".lock"]  # only the holder's lock
    assert not any(tmp_path.iterdir())  # the holders created the folders and removed them, empty


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_says_so_and_drops_replayed_metrics(tiny_store, tmp_path, capsys):
    work = tmp_path / "w"
    over = _tiny_overrides(tiny_store, "train.keep_checkpoints=5")
    assert main(["train", "--workdir", str(work), *over, "--max-steps", "3"]) == 0
    out = capsys.readouterr()
    assert "no validation ran" in out.out and "-inf" not in out.out and "resumed" not in out.err
    assert _steps(work) == [1, 2, 3]
    shutil.rmtree(work / "ckpt" / "3")  # killed after logging step 3, before its checkpoint
    assert main(["train", "--workdir", str(work), *over]) == 0
    assert f"{work}: resumed from step 2" in capsys.readouterr().err
    assert _steps(work) == [1, 2, 3, 4]


# --------------------------------------------------------------------------- predict


def test_predict_not_a_run_directory(tmp_path, tiny_store, capsys):
    raw = tiny_store.parent / "raw"
    assert main(["predict", "--run", str(raw), "--input", str(raw), "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {raw}: not a run directory (no config.yaml / parameters: best/ or ckpt/)"
    assert not (tmp_path / "p").exists()


def test_predict_failing_early_leaves_no_output_folder(tmp_path, run_dir, capsys):
    assert main(["predict", "--run", str(run_dir), "--input", str(tmp_path / "nowhere"),
                 "--output", str(tmp_path / "p")]) == 1
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_predict_ensemble_of_different_runs_is_refused_up_front(tmp_path, run_dir, tiny_store, capsys):
    other = tmp_path / "run4"
    shutil.copytree(run_dir, other)
    cfg = (other / "config.yaml").read_text()
    assert "num_classes: 8" in cfg
    (other / "config.yaml").write_text(cfg.replace("num_classes: 8", "num_classes: 4"))
    t0 = time.time()
    assert main(["predict", "--run", str(run_dir), "--run", str(other), "--input", str(tiny_store.parent / "raw"),
                 "--split", "test", "--output", str(tmp_path / "p")]) == 1
    assert time.time() - t0 < 10
    err = capsys.readouterr().err
    assert f"--run {run_dir} and --run {other} cannot be ensembled: data.num_classes 8 vs 4" in err
    assert not (tmp_path / "p").exists()


def test_unwritable_output_folders_are_refused_before_any_work(tmp_path, run_dir, tiny_store, capsys):
    raw = str(tiny_store.parent / "raw")
    (tmp_path / "a_file").write_text("x")
    assert main(["predict", "--run", str(run_dir), "--input", raw, "--output", str(tmp_path / "a_file" / "p")]) == 1
    assert f"{tmp_path / 'a_file' / 'p'} (--output): output folder is not writable" in capsys.readouterr().err
    assert main(["evaluate", "--pred", f"X={tmp_path}", "--reference", raw, "--out", str(tmp_path / "a_file")]) == 1
    assert f"{tmp_path / 'a_file'} (--out): exists and is not a folder" in capsys.readouterr().err
    assert main(["train", "--workdir", str(tmp_path / "a_file" / "w"), *_tiny_overrides(tiny_store)]) == 1
    assert f"{tmp_path / 'a_file' / 'w'} (--workdir): output folder is not writable" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    if os.geteuid() != 0:  # root writes through permission bits
        (tmp_path / "ro").mkdir(mode=0o555)
        assert main(["predict", "--run", str(run_dir), "--input", raw, "--output", str(tmp_path / "ro")]) == 1
        assert f"{tmp_path / 'ro'} (--output): output folder is not writable" in capsys.readouterr().err
        assert not any((tmp_path / "ro").iterdir())


@pytest.mark.slow
def test_readme_flow_predict_split_then_evaluate(tmp_path, run_dir, tiny_store):
    raw = tiny_store.parent / "raw"
    pred = tmp_path / "pred"
    cmd = [sys.executable, "-m", "jaxseg.launch"]
    p = subprocess.run([*cmd, "predict", "--run", str(run_dir), "--input", str(raw), "--split", "test",
                        "--output", str(pred)], capture_output=True, text=True, env=_env(), check=False, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "WARNING:absl" not in p.stderr and "wrote 2 predictions" in p.stdout
    assert len(list(pred.iterdir())) == 2
    predicted = sorted(x.name[: -len(".nii.gz")] for x in pred.iterdir())
    # as the README writes it: the predicted cases are evaluated, the others named
    e = subprocess.run([*cmd, "evaluate", "--pred", f"DRO={pred}", "--reference", str(raw), "--out",
                        str(tmp_path / "rep")], capture_output=True, text=True, env=_env(), check=False, timeout=300)
    assert e.returncode == 0, e.stderr
    assert "evaluated the 2 predicted case(s) of 12; 10 without a prediction" in e.stderr
    rows = (tmp_path / "rep" / "metrics.csv").read_text().splitlines()
    assert sorted(r.split(",")[0] for r in rows[1:]) == predicted
    # --split test: the same cases, none missing
    assert main(["evaluate", "--pred", f"DRO={pred}", "--reference", str(raw), "--split", "test",
                 "--out", str(tmp_path / "rep2")]) == 0
    assert len((tmp_path / "rep2" / "metrics.csv").read_text().splitlines()) == 3
    # a rerun keeps the finished files
    before = {x.name: x.stat().st_mtime_ns for x in pred.iterdir()}
    assert main(["predict", "--run", str(run_dir), "--input", str(raw), "--split", "test",
                 "--output", str(pred)]) == 0
    assert {x.name: x.stat().st_mtime_ns for x in pred.iterdir()} == before


def test_predict_skip_bad_predicts_the_others_and_fails_at_the_end(tmp_path, run_dir, tiny_store, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for img in sorted((tiny_store.parent / "raw" / "imagesTs").iterdir()):
        shutil.copy(img, src / img.name)
    (src / "bad_0000.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run_dir), "--input", str(src), "--output", str(out)]) == 1
    assert "bad_0000.nii.gz" in capsys.readouterr().err
    assert main(["predict", "--run", str(run_dir), "--input", str(src), "--output", str(out), "--skip-bad"]) == 1
    err = capsys.readouterr().err
    assert "1 case(s) failed and were skipped: bad: " in err and "bad_0000.nii.gz" in err
    names = sorted(x.name for x in out.iterdir())
    assert len(names) == 2 and all(n.startswith("synth_") and n.endswith(".nii.gz") for n in names)


# --------------------------------------------------------------------------- evaluate


def _manifest(tmp_path, raw, cases):
    m = tmp_path / "man"
    m.mkdir()
    lines = ["case,image,label"] + [f"{c},{raw / 'imagesTr' / (c + '_0000.nii.gz')},{raw / 'labelsTr' / (c + '.nii.gz')}"
                                    for c in cases]
    (m / "cases.csv").write_text("\n".join(lines) + "\n")
    return m / "cases.csv"


def test_evaluate_csv_without_labels_json(tmp_path, tiny_store, capsys):
    raw = tiny_store.parent / "raw"
    case = min(raw.joinpath("labelsTr").iterdir()).name[: -len(".nii.gz")]
    csv_path = _manifest(tmp_path, raw, [case])
    (tmp_path / "pred").mkdir()
    shutil.copy(raw / "labelsTr" / f"{case}.nii.gz", tmp_path / "pred")
    assert main(["evaluate", "--pred", f"X={tmp_path / 'pred'}", "--reference", str(csv_path),
                 "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(csv_path) in err[0] and "labels.json" in err[0]
    assert not (tmp_path / "rep").exists()


def test_evaluate_warns_on_an_undeclared_label_value(tmp_path, tiny_store):
    raw = tiny_store.parent / "raw"
    case = min(raw.joinpath("labelsTr").iterdir()).name[: -len(".nii.gz")]
    csv_path = _manifest(tmp_path, raw, [case])
    (csv_path.parent / "labels.json").write_text(json.dumps({"background": 0, "a": 1, "b": 2, "c": 3, "d": 4,
                                                             "e": 5, "f": 6, "g": 7}))
    img = nib.load(raw / "labelsTr" / f"{case}.nii.gz")
    a = np.asarray(img.dataobj).copy()
    a.flat[0] = 9
    (tmp_path / "pred").mkdir()
    nib.save(nib.Nifti1Image(a, img.affine, img.header), tmp_path / "pred" / f"{case}.nii.gz")
    with pytest.warns(UserWarning, match=rf"case '{case}'.*label value\(s\) \[9\].*does not declare"):
        assert main(["evaluate", "--pred", f"X={tmp_path / 'pred'}", "--reference", str(csv_path),
                     "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "metrics.csv").is_file()

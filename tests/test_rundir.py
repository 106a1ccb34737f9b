"""The run directory as the only contract between training and prediction (jaxseg.rundir): a run
predicts from any working directory, without its store and when copied; old runs get a clear error;
resume compares only what changes the trajectory; the import graph has no upward import."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxseg import rundir
from jaxseg.launch import main

JAXSEG = Path(__file__).resolve().parent.parent / "jaxseg"
TINY = ["data.patch_size=[16,16,16]", "data.batch_size=8", "data.fold=all", "data.threads=1",
        "model.features_base=4", "model.features_max=8", "train.epochs=2", "train.steps_per_epoch=2",
        "train.checkpoint_every=1", "train.log_every=1", "data.augment=none"]


def _predict(run, raw, out) -> dict:
    assert main(["predict", "--run", str(run), "--input", str(raw), "--split", "test", "--output", str(out)]) == 0
    got = {}
    for p in sorted(Path(out).glob("*.nii.gz")):
        img = nib.load(str(p))
        got[p.name] = (np.asarray(img.dataobj), img.affine)
    assert len(got) == 2
    return got


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0])
        np.testing.assert_array_equal(a[k][1], b[k][1])


@pytest.mark.slow
def test_a_run_predicts_from_anywhere_without_its_store_and_when_copied(tiny_store, tmp_path, monkeypatch, capsys):
    raw = tiny_store.parent / "raw"
    train_dir, other = tmp_path / "train_here", tmp_path / "elsewhere"
    train_dir.mkdir()
    other.mkdir()
    shutil.copytree(tiny_store, train_dir / "store")
    monkeypatch.chdir(train_dir)  # relative store and workdir, as a user types them
    assert main(["train", "--workdir", "run", "data.store=store", *TINY, "--max-steps", "2"]) == 0

    # Resume after moving the store, with other loader threads / prefetch: the batches do not depend on
    # them and the store's content is the same, so this is not refused.
    (train_dir / "store").rename(train_dir / "moved_store")
    capsys.readouterr()
    assert main(["train", "--workdir", "run", "data.store=moved_store", *TINY, "data.threads=2",
                 "data.prefetch=3"]) == 0
    assert "run: resumed from step 2" in capsys.readouterr().err
    run = train_dir / "run"
    pre = json.loads((run / "preprocessing.json").read_text())
    spacings = [json.loads((tiny_store / c / "meta.json").read_text())["spacing"]
                for c in sorted(p.name for p in tiny_store.iterdir() if (p / "meta.json").is_file())]
    assert pre["median_spacing"] == [float(v) for v in np.median(np.asarray(spacings), axis=0)]
    assert pre["channel_names"] == json.loads((tiny_store / "dataset.json").read_text())["channel_names"]
    assert pre["labels"] == json.loads((tiny_store / "dataset.json").read_text())["labels"]

    monkeypatch.chdir(other)
    first = _predict(run, raw, other / "p1")
    shutil.rmtree(train_dir / "moved_store")  # the store is gone: predict reads only the run directory
    _same(first, _predict(run, raw, other / "p2"))
    copied = other / "copied_run"
    shutil.copytree(run, copied)
    shutil.rmtree(run)
    _same(first, _predict(copied, raw, other / "p3"))

    # A run directory written before preprocessing.json existed: a clear error, nothing written.
    saved = (copied / "preprocessing.json").read_text()
    (copied / "preprocessing.json").unlink()
    # ... whose config.yaml also carries the method sections older runs wrote into every config
    with open(copied / "config.yaml", "a") as f:
        f.write("synth:\n  n_subjects: 7\ntransfer:\n  n_old: 3\ndlb:\n  tile_size: 16\n")
    capsys.readouterr()
    assert main(["predict", "--run", str(copied), "--input", str(raw), "--split", "test",
                 "--output", str(other / "p4")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {copied}: no preprocessing.json") and "add_preprocessing" in err[0]
    assert not (other / "p4").exists()
    # ... and the fix it names, from the store the run was trained on, gives the same predictions
    rundir.add_preprocessing(copied, tiny_store)
    assert {k: v for k, v in json.loads((copied / "preprocessing.json").read_text()).items() if k != "store"} \
        == {k: v for k, v in json.loads(saved).items() if k != "store"}
    _same(first, _predict(copied, raw, other / "p5"))


def test_resume_compares_only_what_changes_the_trajectory(tmp_path):
    from jaxseg.config import load_config
    from jaxseg.train.checkpoint import (
        IncompatibleResume,
        check_compatible,
        meta_record,
    )

    cfg = load_config(None, ["data.store=a/store"])
    meta = meta_record(cfg, 3, store_fingerprint="f" * 64)
    for change in (["data.threads=7"], ["data.prefetch=9"], ["data.store=/elsewhere/store"],
                   ["data.dataset=/moved/raw"], ["train.log_every=3"]):
        check_compatible(meta, load_config(None, change), tmp_path, store_fingerprint="f" * 64)
    with pytest.raises(IncompatibleResume, match=r"data.patch_size: \[64, 64, 64\] -> \[32, 32, 32\]"):
        check_compatible(meta, load_config(None, ["data.patch_size=[32,32,32]"]), tmp_path, store_fingerprint="f" * 64)
    with pytest.raises(IncompatibleResume, match=r"case store a/store holds other cases .* ffffffffffff -> 000000000000"):
        check_compatible(meta, cfg, tmp_path, store_fingerprint="0" * 64)


def test_spacing_null_plans_the_topology_on_the_dataset_median(tmp_path):
    from jaxseg.config import load_config
    from jaxseg.data import store
    from jaxseg.models import build_model, plan_topology

    for i, sp in enumerate(([1.0, 1.0, 3.0], [1.0, 1.2, 4.0], [0.8, 1.0, 3.5])):
        store.write_case(tmp_path, f"c{i}", np.ones((4, 4, 4, 1), np.float32), None, {"spacing": sp})
    assert store.median_spacing(tmp_path) == [1.0, 1.0, 3.5]  # the per-axis median
    cfg = load_config(None, ["data.patch_size=[64,64,16]"])
    pre = {"median_spacing": store.median_spacing(tmp_path)}
    assert rundir.model_spacing(cfg, pre) == (1.0, 1.0, 3.5)
    topo = build_model(cfg, rundir.model_spacing(cfg, pre)).topology
    assert topo == plan_topology((64, 64, 16), (1.0, 1.0, 3.5), features_base=32, features_max=320)
    assert topo != plan_topology((64, 64, 16), (1.0, 1.0, 1.0), features_base=32, features_max=320)
    # an explicit data.spacing wins
    assert rundir.model_spacing(load_config(None, ["data.spacing=[2,2,2]"]), pre) == (2.0, 2.0, 2.0)


def test_content_fingerprint_ignores_where_the_store_is(tmp_path):
    from jaxseg.data import store

    store.write_case(tmp_path / "s", "c0", np.ones((4, 4, 4, 1), np.float32), None, {"spacing": [1, 1, 1]})
    store.write_dataset_meta(tmp_path / "s", {"labels": {"background": 0}, "preprocessing": {"crop": "none"}})
    fp = store.content_fingerprint(tmp_path / "s")
    shutil.copytree(tmp_path / "s", tmp_path / "t")
    assert store.content_fingerprint(tmp_path / "t") == fp
    store.write_case(tmp_path / "t", "c1", np.ones((4, 4, 4, 1), np.float32), None, {"spacing": [1, 1, 1]})
    assert store.content_fingerprint(tmp_path / "t") != fp


# --------------------------------------------------------------------------- the code's shape


def _modules():
    for path in sorted(JAXSEG.rglob("*.py")):
        rel = path.relative_to(JAXSEG.parent)
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text(), str(path))


def _imports(name: str, path: Path, tree) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import statement, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def test_the_import_graph_has_no_upward_import_and_no_private_cross_package_import():
    seen = set()
    for name, path, tree in _modules():
        seen.add(name)
        for mod, names in _imports(name, path, tree):
            full = [mod] + [f"{mod}.{n}" for n in names]
            if name.startswith(("jaxseg.inference", "jaxseg.rundir")):
                assert not any(f == "jaxseg.train" or f.startswith("jaxseg.train.") for f in full), (name, mod)
            if name == "jaxseg.rundir":
                assert not any(f.startswith("jaxseg.inference") for f in full), (name, mod)
            # a package's modules may share private helpers (jaxseg.data.pipeline.*); other packages may not
            if mod.startswith("jaxseg") and mod.rsplit(".", 1)[0] != name.rsplit(".", 1)[0] and mod != name:
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{name} imports private {private} from {mod}"
            # the case splits live in data/, not in the trainer
            if mod.startswith("jaxseg.train"):
                assert not {"kfold_split", "select_cases", "limit_cases"} & set(names), (name, mod)
    assert {"jaxseg.rundir", "jaxseg.inference.runs", "jaxseg.data.splits"} <= seen


def test_one_atomic_writer_and_store_internals_only_in_the_store():
    for name, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                if f.attr == "replace" and isinstance(f.value, ast.Name) and f.value.id == "os":
                    # fileio's atomic_path; the store swaps whole case folders
                    assert name in ("jaxseg.fileio", "jaxseg.data.store"), f"{name}: os.replace outside fileio"
                if (f.attr == "result" and isinstance(f.value, ast.Call) and isinstance(f.value.func, ast.Attribute)
                        and f.value.func.attr == "read"):
                    assert name == "jaxseg.data.store", f"{name}: reads a tensorstore future"
            if isinstance(node, ast.Constant) and node.value == "meta.json":
                assert name == "jaxseg.data.store", f"{name}: a store meta path outside data/store.py"


def test_atomic_path_same_name_keeps_the_file_name_and_leaves_nothing_on_failure(tmp_path):
    from jaxseg.fileio import atomic_path

    target = tmp_path / "x.nii.gz"
    with atomic_path(target, same_name=True) as tmp:
        assert tmp.name == "x.nii.gz" and tmp.parent != tmp_path
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one" and sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]
    with pytest.raises(RuntimeError), atomic_path(target, same_name=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"one" and sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]


def test_predict_with_a_run_that_does_not_exist(tmp_path, capsys):
    assert main(["predict", "--run", str(tmp_path / "nope"), "--input", str(tmp_path),
                 "--output", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such run directory"
    assert not (tmp_path / "out").exists()

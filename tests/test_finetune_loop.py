"""train.init_from / train.finetune through train_and_evaluate: start from another run's parameters,
freeze the stages the strategy does not train, resume from the run's own checkpoint, refuse bad sources."""

import json
import re

import jax
import numpy as np
import pytest

from _tiny import tiny_cfg
from jaxseg.train.checkpoint import IncompatibleResume, load_params
from jaxseg.train.loop import TrainingError, train_and_evaluate

@pytest.fixture(scope="module")
def run_a(tiny_store, tmp_path_factory):
    """A pre-trained run: two steps from random init (fold=all: no best/, so init_from takes ckpt/)."""
    workdir = tmp_path_factory.mktemp("pretrain") / "A"
    train_and_evaluate(tiny_cfg(tiny_store), workdir, max_steps=2, progress=False)
    return workdir


# The 3-stage tiny U-Net under `shallow`: bottleneck + level n-2 = 1 (its encoder, decoder and head).
SHALLOW = {"bottleneck", "encoder_1", "decoder_1", "head_1"}


def _by_key(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_shallow_finetune_from_a_run_freezes_the_rest_and_resumes_from_its_own_checkpoint(tiny_store, run_a,
                                                                                          tmp_path):
    pre, _ = load_params(run_a, "best")  # what init_from=RUN reads: best/, else the last in ckpt/
    cfg = tiny_cfg(tiny_store, f"train.init_from={run_a}", "train.finetune=shallow")
    out = train_and_evaluate(cfg, tmp_path / "B", max_steps=2, progress=False)
    assert out["step"] == 2 and out["skipped_steps"] == 0
    before, after = _by_key(pre), _by_key(out["params"])
    assert before.keys() == after.keys()
    stage = {k: re.match(r"\['(\w+)'\]", k).group(1) for k in before}
    assert set(stage.values()) >= SHALLOW | {"encoder_0", "decoder_0", "head_0"}
    frozen = [k for k in before if stage[k] not in SHALLOW]
    trainable = [k for k in before if stage[k] in SHALLOW]
    for k in frozen:  # bit for bit
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        assert after[k].dtype == before[k].dtype
    assert any(not np.array_equal(after[k], before[k]) for k in trainable)

    record = json.loads((tmp_path / "B" / "run.json").read_text())["transfer"]
    assert record["finetune"] == "shallow"
    assert record["trainable"].startswith("trainable: encoder_1, bottleneck, decoder_1, head_1; frozen: ")
    assert record["init_from"]["path"] == str((run_a / "ckpt" / "2").absolute())
    assert record["init_from"]["step"] == 2

    # Resuming B continues from B's own checkpoint (step 2), not from A again.
    resumed = train_and_evaluate(cfg, tmp_path / "B", max_steps=3, progress=False)
    assert resumed["step"] == 3
    steps = [json.loads(l)["step"] for l in (tmp_path / "B" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    for k, v in _by_key(resumed["params"]).items():
        if k in frozen:
            np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert json.loads((tmp_path / "B" / "run.json").read_text())["transfer"]["init_from"]["step"] == 2
    # init_from is part of the trajectory: resuming B with another source is refused.
    other = tiny_cfg(tiny_store, f"train.init_from={run_a / 'ckpt'}", "train.finetune=shallow")
    with pytest.raises(IncompatibleResume, match=r"train\.init_from"):
        train_and_evaluate(other, tmp_path / "B", max_steps=4, progress=False)


def test_init_from_a_missing_path_names_it(tiny_store, tmp_path):
    missing = tmp_path / "no_such_run"
    cfg = tiny_cfg(tiny_store, f"train.init_from={missing}", "train.finetune=shallow")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        train_and_evaluate(cfg, tmp_path / "B", max_steps=1, progress=False)


def test_init_from_a_wider_model_names_the_key_and_both_shapes(tiny_store, run_a, tmp_path):
    # A has features (4, 8, 8); this model (8, 8, 8): the full-resolution stages differ.
    cfg = tiny_cfg(tiny_store, "model.features_base=8", f"train.init_from={run_a / 'ckpt'}")
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(cfg, tmp_path / "B", max_steps=1, progress=False)
    msg = str(e.value)
    assert str(run_a / "ckpt") in msg
    m = re.search(r"(\['\w+'\](?:\['\w+'\])+) has shape (\([\d, ]+\)) in the checkpoint but (\([\d, ]+\)) in "
                  r"the model", msg)
    assert m, msg
    key, saved, now = m.groups()
    pre = _by_key(load_params(run_a, "last")[0])
    assert saved == str(pre[key].shape) and saved != now


def test_init_from_accepts_a_run_its_checkpoint_directory_or_one_step(run_a):
    from jaxseg.train.checkpoint import load_init_params

    ref = _by_key(load_params(run_a, "last")[0])
    for path in (run_a, run_a / "ckpt", run_a / "ckpt" / "2", run_a / "ckpt" / "1"):
        params, meta, where = load_init_params(path)
        assert where == run_a / "ckpt" / ("1" if path.name == "1" else "2") and meta["step"] == int(where.name)
        got = _by_key(params)
        assert got.keys() == ref.keys()
        if meta["step"] == 2:
            assert all(np.array_equal(v, ref[k]) for k, v in got.items())

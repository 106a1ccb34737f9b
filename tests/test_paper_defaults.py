"""The papers' settings are the defaults (a default Config, configs/base.yaml and the method configs), and a
config that departs from one says why on that line."""

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from _tiny import tiny_cfg

from jaxseg.config import Config, SynthRunConfig, load_config
from jaxseg.data.pipeline import CaseSampler
from jaxseg.dlb.config import DLBAblationConfig, DLBRunConfig
from jaxseg.dlb.grid import make_grid, reference_grid
from jaxseg.dlb.train import grid_for
from jaxseg.neonatal.config import NeonatalConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# key -> the paper's value (Kamraoui et al.: majority vote; nnU-Net v2's oversampling of the last patches of a
# batch; Fidon et al.'s reference sampler: table initialised at 2.0 with noise std 0.002)
PAPER = {
    "dlb.fusion": "majority_vote",
    "data.oversample": "last",
    "data.foreground_oversampling": 0.33,
    "dro.init_loss": 2.0,
    "dro.init_noise": 0.002,
    "dlb.tile_size": 96,
    "dlb.tiles_per_axis": 5,
}


def _load(path, overrides=()):
    """A config file with its method's schema (the core config holds no method section)."""
    name = Path(path).name
    schema = (DLBAblationConfig if name.startswith("dlb") else NeonatalConfig if name.startswith("neonatal")
              else SynthRunConfig)
    return load_config(path, overrides, schema)


def _get(obj, key):
    for part in key.split("."):
        obj = getattr(obj, part) if not isinstance(obj, dict) else obj[part]
    return obj


@pytest.mark.parametrize("source", ["DLBRunConfig()", "dlb_base.yaml"])
def test_defaults_are_the_papers(source):
    # the core keys in Config / base.yaml, DeepLesionBrain's in its run config / dlb_base.yaml
    cfg = DLBRunConfig() if source == "DLBRunConfig()" else load_config(CONFIGS / "dlb_base.yaml", schema=DLBRunConfig)
    for key, value in PAPER.items():
        assert _get(cfg, key) == value, key
    assert (cfg.dlb.stride, cfg.dlb.offset) == (None, None)  # the reference grid on MNI volumes (next test)
    if source == "dlb_base.yaml":  # spelled out in the files, not only inherited from the schema
        raw = {**yaml.safe_load((CONFIGS / "base.yaml").read_text()),
               **yaml.safe_load((CONFIGS / "dlb_base.yaml").read_text())}
        for key, value in PAPER.items():
            assert _get(raw, key) == value, key


def test_default_grid_on_mni_is_the_reference_codes():
    cfg = DLBRunConfig()
    g = grid_for(cfg, (181, 217, 181))
    assert g.starts == ((4, 24, 44, 64, 84), (4, 33, 62, 91, 120), (0, 20, 40, 60, 80))
    assert g.tile == (96, 96, 96) and g.n_tiles == 125 and g.n_networks == 75
    assert g == reference_grid()
    nets, flips = g.pairing()
    assert len(set(nets.tolist())) == 75 and flips.sum() == 50  # ix = 3, 4 run flipped through ix = 1, 0
    for t in range(125):
        ix, iy, iz = g.coords(t)
        assert nets[t] == g.index(min(ix, 4 - ix), iy, iz)
    # covered: x 4..179, y 4..215, z 0..175 (the MNI brain); the thin margins outside are background
    cov = g.coverage()
    assert cov[4:180, 4:216, 0:176].min() >= 1 and cov.sum() == 125 * 96 ** 3
    assert not cov[:4].any() and not cov[:, :4].any() and not cov[:, :, 176:].any()
    # explicit strides / offsets still win, and any other volume spreads the tiles evenly
    assert make_grid((181, 217, 181), 96, 5, stride=(21, 30, 21)).starts[0] == (0, 21, 42, 63, 84)
    other = make_grid((57, 70, 56), 24, 5)  # configs/dlb_ablation_synth.yaml's 3 mm volumes
    assert other.starts == ((0, 8, 16, 24, 32), (1, 12, 23, 34, 45), (0, 8, 16, 24, 32))
    assert make_grid((181, 217, 181), 96, 4).starts[0] == (0, 28, 56, 84)


def test_method_configs():
    dro = load_config(CONFIGS / "fetal_dro.yaml")
    assert (dro.dro.init_loss, dro.dro.init_noise, dro.data.oversample) == (2.0, 0.002, "last")
    assert load_config(CONFIGS / "fetal_erm.yaml").data.oversample == "last"
    msseg = load_config(CONFIGS / "dlb_msseg.yaml", schema=DLBRunConfig)
    assert msseg.dlb.fusion == "majority_vote"
    assert grid_for(msseg, (181, 217, 181)) == reference_grid()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_a_config_that_departs_says_why(path):
    cfg = _load(path)
    lines = path.read_text().splitlines()
    for key, value in PAPER.items():
        if not hasattr(cfg, key.split(".")[0]) or _get(cfg, key) == value:
            continue
        leaf = key.split(".")[-1]
        line = next((ln for ln in lines if re.match(rf"\s*{leaf}\s*:", ln)), None)
        assert line is not None and "#" in line, f"{path.name}: {key} departs from the paper without a comment"


def test_initial_table_noise_has_the_configured_std():
    t = CaseSampler(20000, mode="hardness", seed=1).table  # the sampler's own default: 2.0, std 0.002
    assert abs(t.mean() - 2.0) < 1e-4 and abs(t.std() / 0.002 - 1) < 0.03
    t = CaseSampler(20000, mode="hardness", seed=1, init_loss=1.0, init_noise=0.05).table
    assert abs(t.mean() - 1.0) < 2e-3 and abs(t.std() / 0.05 - 1) < 0.03
    with pytest.raises(Exception, match="dro.init_noise"):
        load_config(None, ["dro.init_noise=-1"])
    with pytest.raises(Exception, match="data.oversample"):
        load_config(None, ["data.oversample=first"])


def _first_batch(monkeypatch, cfg, tmp_path):
    from jaxseg.data import pipeline
    from jaxseg.train.loop import train_and_evaluate

    seen = {}
    original = pipeline.PatchBatchIterator.__next__

    def recording(self):
        if not seen:
            seen.update(table=self.sampler.table, mode=self.oversample, n=self.sampler.n_cases)
        batch = original(self)
        seen.setdefault("fg_forced", batch["fg_forced"].tolist())
        return batch

    monkeypatch.setattr(pipeline.PatchBatchIterator, "__next__", recording)
    train_and_evaluate(cfg, tmp_path, max_steps=1, progress=False)
    return seen


@pytest.mark.parametrize("overrides", [(), ("data.oversample=random", "dro.init_noise=0.01")])
@pytest.mark.slow
def test_training_uses_the_configured_rule_and_table(tiny_store, tmp_path, monkeypatch, overrides):
    cfg = tiny_cfg(tiny_store, "dro.enabled=true", "dro.mode=sampling", "train.epochs=1",
                   "train.steps_per_epoch=1", *overrides)
    seen = _first_batch(monkeypatch, cfg, tmp_path / "run")
    want = CaseSampler(seen["n"], mode="hardness", seed=cfg.seed, init_loss=2.0,
                       init_noise=cfg.dro.init_noise).table
    np.testing.assert_array_equal(seen["table"], want)
    assert seen["mode"] == cfg.data.oversample
    if cfg.data.oversample == "last":  # nnU-Net v2: slots >= round(8 * 0.67) = 5 of the global batch
        assert seen["fg_forced"] == [False] * 5 + [True] * 3


NEONATAL = sorted(CONFIGS.glob("neonatal_*.yaml"))


@pytest.mark.parametrize("path", NEONATAL, ids=lambda p: p.name)
def test_neonatal_configs_use_the_papers_network(path):
    import jax
    import jax.numpy as jnp

    from jaxseg.models import build_model, model_topology
    from jaxseg.train import finetune

    cfg = _load(path)
    assert cfg.model.arch == "unet" and cfg.model.block == "residual" and cfg.model.deep_supervision
    header = "".join(ln for ln in path.read_text().splitlines(keepends=True) if ln.startswith("#"))
    assert "residual U-Net with deep supervision" in header
    # as the paper: labels downsampled to each head, nnU-Net's Dice (the reference code's are selectable)
    assert (cfg.loss.ds_mode, cfg.loss.dice_activation, cfg.loss.dice_squared) == (
        "downsample_targets", "softmax", False)
    patch = model_topology(cfg).patch_size
    x = jnp.zeros((1, *patch, cfg.data.num_channels))
    age = [_load(path, ["model.age_head=true"])] if "age" in path.name else []
    for c in (cfg, *age):  # AgeU-Net on the residual bottleneck too
        params = jax.eval_shape(lambda k, c=c: build_model(c).init(k, x)["params"], jax.random.key(0))
        names = {k.key for path_, _ in jax.tree_util.tree_flatten_with_path(params)[0] for k in path_}
        assert "res" in names  # the residual blocks' 1x1x1 skip projections
        out = jax.eval_shape(lambda p, c=c: build_model(c).apply({"params": p}, x), params)
        assert len(out.seg) > 1 and out.seg[0].shape == (1, *patch, cfg.data.num_classes)
        assert (out.age is not None) == c.model.age_head
    if "transfer" not in path.name:
        return
    # the transfer strategies select residual stages from the bottleneck outwards: each trains more
    sizes = []
    for strategy in ("shallow", "medium", "deep"):
        mask = finetune.trainable_mask(params, strategy)
        sizes.append(sum(int(np.prod(p.shape)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
                         if m))
    assert 0 < sizes[0] < sizes[1] < sizes[2] < sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_a_run_saved_before_oversample_existed_resumes_only_with_its_rule(tmp_path):
    # Such a run forced each patch with probability p: resuming it under the new default would change its
    # trajectory, so the resume is refused naming the key, and accepted with data.oversample=random.
    from jaxseg.config import dump_config
    from jaxseg.train.checkpoint import IncompatibleResume, check_compatible

    old_text = "\n".join(ln for ln in dump_config(Config()).splitlines() if "oversample:" not in ln.split("#")[0]
                         or "foreground_oversampling" in ln) + "\n"
    assert "  oversample:" not in old_text and "foreground_oversampling" in old_text
    meta = {"fingerprint": "from an older schema", "config": old_text}
    with pytest.raises(IncompatibleResume, match=r"data.oversample: random -> last"):
        check_compatible(meta, Config(), tmp_path)
    check_compatible(meta, load_config(None, ["data.oversample=random"]), tmp_path)
    # a run saved with the key resumes as before
    check_compatible({"fingerprint": "x", "config": dump_config(Config())}, Config(), tmp_path)

"""Tests of jaxseg.config: YAML -> frozen typed dataclasses, overrides, round trips."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from jaxseg.config import (
    Config,
    ConfigError,
    DataConfig,
    DROConfig,
    ModelConfig,
    config_fingerprint,
    diff_configs,
    dump_config,
    from_dict,
    load_config,
    restrict,
    save_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]
BASE_YAML = REPO / "configs" / "base.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------- round trips


def test_defaults_round_trip(tmp_path):
    cfg = Config()
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert dump_config(load_config(path)) == dump_config(cfg)
    assert os.listdir(tmp_path / "run") == ["config.yaml"]  # no temp file left behind


def test_non_default_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "experiment=2024",
            "data.fold=all",
            "data.spacing=[0.5, 0.5, 1]",
            "data.label_budget.fraction=0.3",
            "model.strides=[[1,1,1],[2,2,2],[2,2,1]]",
            "model.kernels=[[3,3,3],[3,3,3],[3,3,1]]",
            "model.n_stages=3",
            "loss.smooth=1e-7",
            "optim.grad_clip=null",
            "train.init_from=runs/x/ckpt",
            "eval.percentiles=[50]",
        ],
    )
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg
    save_config(cfg, path)  # overwriting works too
    assert load_config(path) == cfg


def test_decoder_fields_round_trip_and_validate(tmp_path):
    # what an imported MONAI DynUNet writes: bias-free convs, plain decoder under a residual encoder,
    # decoder level i convolved with kernels[i + 1]
    cfg = load_config(None, ["model.n_stages=3", "model.strides=[[1,1,1],[2,2,2],[2,2,2]]",
                             "model.kernels=[[3,3,1],[3,3,3],[3,3,3]]", "model.block=residual",
                             "model.decoder_block=plain", "model.decoder_kernels=[[3,3,3],[3,3,3]]",
                             "model.conv_bias=false"])
    m = cfg.model
    assert (m.decoder_block, m.decoder_kernels, m.conv_bias) == ("plain", ((3, 3, 3), (3, 3, 3)), False)
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg
    assert (Config().model.decoder_block, Config().model.decoder_kernels, Config().model.conv_bias) == (
        "same", None, True)
    msg = error_of(None, ["model.n_stages=3", "model.decoder_kernels=[[3,3,3]]"])
    assert "model.decoder_kernels" in msg and "2 decoder levels" in msg
    msg = error_of(None, ["model.strides=[[1,1,1],[2,2,2]]", "model.decoder_kernels=[[3,3,3],[3,3,3]]"])
    assert "model.decoder_kernels" in msg and "strides" in msg
    assert "model.decoder_kernels[0][2]" in error_of(None, ["model.decoder_kernels=[[3,3,0]]"])
    assert "model.decoder_block" in error_of(None, ["model.decoder_block=dense"])


def test_dump_keeps_field_order():
    text = dump_config(Config())
    top = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert top == [f.name for f in dataclasses.fields(Config)]
    assert "patch_size: [64, 64, 64]" in text


def _schemas():
    from jaxseg.config import SynthRunConfig
    from jaxseg.dlb.config import DLBRunConfig

    return [("base.yaml", Config), ("synth_base.yaml", SynthRunConfig), ("dlb_base.yaml", DLBRunConfig)]


@pytest.mark.parametrize("name", ["base.yaml", "synth_base.yaml", "dlb_base.yaml"])
def test_base_yaml_is_the_defaults(name):
    schema = dict(_schemas())[name]
    path = REPO / "configs" / name
    assert load_config(path, schema=schema) == schema()
    # and it lists every key (not only the ones that differ from the defaults), its own section's included
    import yaml

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    raw = yaml.safe_load(path.read_text())
    raw.pop("base", None)
    own = keys(to_dict(schema())) - keys(to_dict(Config())) if schema is not Config else keys(to_dict(Config()))
    assert keys(raw) == own


def test_core_config_holds_no_method_section(tmp_path):
    """A method's keys are not in every run's config: the core refuses them, naming the file / override
    and the key; the method's own config takes them with typed access and validation."""
    from jaxseg.dlb.config import DLBAblationConfig, DLBRunConfig
    from jaxseg.neonatal.config import NeonatalConfig

    core = {f.name for f in dataclasses.fields(Config)}
    assert not core & {"dlb", "transfer", "synth"}
    assert not {"dlb:", "synth:", "transfer:"} & set(dump_config(Config()).splitlines())
    path = write(tmp_path / "m.yaml", "dlb:\n  tile_size: 16\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: dlb: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"<override> 'transfer.n_old=3'.*transfer: unknown key"):
        load_config(None, ["transfer.n_old=3"])
    assert load_config(path, ["dlb.method=generic"], DLBRunConfig).dlb.tile_size == 16
    with pytest.raises(ConfigError, match=r"m2\.yaml: dlb\.tile_size: must be a positive multiple of 8"):
        load_config(write(tmp_path / "m2.yaml", "dlb:\n  tile_size: 12\n"), schema=DLBRunConfig)
    with pytest.raises(ConfigError, match=r"dlb\.tile_sise: unknown key"):
        load_config(None, ["dlb.tile_sise=8"], DLBRunConfig)
    assert load_config(None, ["transfer.n_old=5"], NeonatalConfig).transfer.n_old == 5
    abl = load_config(REPO / "configs" / "dlb_ablation_synth.yaml", schema=DLBAblationConfig)
    assert abl.synth.flavour == "lesion" and abl.dlb.tile_size == 24
    # a run keeps the sections it uses: restrict() drops the rest, and the result round-trips
    run = restrict(abl, DLBRunConfig)
    assert type(run) is DLBRunConfig and "synth:" not in dump_config(run).splitlines() and run.dlb == abl.dlb
    save_config(run, tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml", schema=DLBRunConfig) == run
    # prepare reads data.* from any experiment's config: the other sections are dropped, not refused
    assert load_config(REPO / "configs" / "dlb_msseg.yaml", ignore_sections=True).data.num_channels == 2


def test_partial_file_takes_defaults(tmp_path):
    path = write(tmp_path / "exp.yaml", "model:\n  features_base: 16\nloss:\n")
    cfg = load_config(path)
    assert cfg.model == ModelConfig(features_base=16)
    assert cfg.loss == Config().loss
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()
    assert load_config(None) == Config()


def test_types_are_converted(tmp_path):
    path = write(
        tmp_path / "exp.yaml",
        "data:\n  patch_size: [32, 32, 16]\n  spacing: [1, 1, 2]\n  foreground_oversampling: 1\n"
        "loss:\n  smooth: 1e-5\n",
    )
    cfg = load_config(path)
    assert cfg.data.patch_size == (32, 32, 16)
    assert cfg.data.spacing == (1.0, 1.0, 2.0) and all(type(v) is float for v in cfg.data.spacing)
    assert type(cfg.data.foreground_oversampling) is float
    assert cfg.loss.smooth == 1e-5  # YAML 1.1 would read `1e-5` as a string
    hash(cfg)


# ------------------------------------------------------------------------ errors


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    path = write(tmp_path / "exp.yaml", "model:\n  upsampel: transpose\n")
    msg = error_of(path)
    assert "model.upsampel" in msg
    assert "exp.yaml" in msg
    assert "upsample" in msg and "features_base" in msg and "deep_supervision" in msg
    assert "did you mean 'upsample'" in msg


def test_unknown_top_level_and_nested_section(tmp_path):
    msg = error_of(write(tmp_path / "a.yaml", "modle:\n  arch: unet\n"))
    assert "modle" in msg and "a.yaml" in msg and "model" in msg and "dro" in msg
    msg = error_of(write(tmp_path / "b.yaml", "data:\n  label_budget:\n    axes: axial\n"))
    assert "data.label_budget.axes" in msg and "b.yaml" in msg and "exclude_border" in msg


@pytest.mark.parametrize(
    "yaml_text, key, bad",
    [
        ('model:\n  features_base: "big"\n', "model.features_base", "'big'"),
        ("model:\n  features_base: true\n", "model.features_base", "True"),
        ("model:\n  features_base: 16.5\n", "model.features_base", "16.5"),
        ("model:\n  deep_supervision: 1\n", "model.deep_supervision", "1"),
        ("model:\n  deep_supervision: 'true'\n", "model.deep_supervision", "'true'"),
        ("optim:\n  lr: fast\n", "optim.lr", "'fast'"),
        ("optim:\n  lr: false\n", "optim.lr", "False"),
        ("data:\n  patch_size: [64, 64]\n", "data.patch_size", "[64, 64]"),
        ("data:\n  patch_size: [64, 64, 6.5]\n", "data.patch_size[2]", "6.5"),
        ("data:\n  patch_size: 64\n", "data.patch_size", "64"),
        ("data:\n  fold: 0.5\n", "data.fold", "0.5"),
        ("data:\n  fold: some\n", "data.fold", "'some'"),
        ("data: 3\n", "data", "3"),
        ("experiment: 7\n", "experiment", "7"),
        ("model:\n  strides: [[1, 1, 1], [2, 2]]\n", "model.strides[1]", "[2, 2]"),
    ],
)
def test_wrong_type(tmp_path, yaml_text, key, bad):
    msg = error_of(write(tmp_path / "exp.yaml", yaml_text))
    assert f"{key}:" in msg and "exp.yaml" in msg and bad in msg


def test_int_accepts_integral_float(tmp_path):
    assert load_config(write(tmp_path / "e.yaml", "train:\n  epochs: 1.0e3\n")).train.epochs == 1000


def test_bad_literal_lists_choices(tmp_path):
    msg = error_of(write(tmp_path / "exp.yaml", "model:\n  upsample: bilinear\n"))
    assert "model.upsample" in msg and "exp.yaml" in msg and "'bilinear'" in msg
    for choice in ("transpose", "resize_conv", "pixel_shuffle"):
        assert choice in msg
    msg = error_of(write(tmp_path / "fold.yaml", "data:\n  fold: ALL\n"))
    assert "data.fold" in msg and "'all'" in msg


def test_value_validation_names_key(tmp_path):
    msg = error_of(write(tmp_path / "exp.yaml", "data:\n  patch_size: [64, 0, 64]\n"))
    assert "data.patch_size[1]" in msg and "exp.yaml" in msg
    msg = error_of(write(tmp_path / "exp.yaml", "dro:\n  w_min: 20.0\n"))
    assert "dro.w_min" in msg and "w_max" in msg and "exp.yaml" in msg
    msg = error_of(write(tmp_path / "exp.yaml", "data:\n  foreground_oversampling: 1.5\n"))
    assert "data.foreground_oversampling" in msg
    msg = error_of(write(tmp_path / "exp.yaml", "data:\n  label_budget:\n    fraction: 0\n"))
    assert "data.label_budget.fraction" in msg
    msg = error_of(write(tmp_path / "exp.yaml", "data:\n  fold: 5\n"))
    assert "data.fold" in msg and "num_folds" in msg
    msg = error_of(None, ["model.n_stages=2", "model.strides=[[1,1,1]]"])
    assert "model.strides" in msg and "n_stages" in msg and "<override>" in msg


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="ModelConfig.upsample"):
        ModelConfig(upsample="bilinear")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="w_min"):
        dataclasses.replace(Config().dro, w_min=50.0)
    assert DataConfig(patch_size=[8, 8, 8]).patch_size == (8, 8, 8)  # type: ignore[arg-type]
    assert DROConfig(beta=5).beta == 5.0 and type(DROConfig(beta=5).beta) is float


def test_missing_file_and_invalid_yaml(tmp_path):
    msg = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg
    msg = error_of(write(tmp_path / "broken.yaml", "model:\n  arch: [unet\n"))
    assert "broken.yaml" in msg and "invalid YAML" in msg
    msg = error_of(write(tmp_path / "list.yaml", "- a\n- b\n"))
    assert "list.yaml" in msg and "mapping" in msg
    msg = error_of(write(tmp_path / "dup.yaml", "model:\n  arch: unet\n  arch: dlb_compact\n"))
    assert "dup.yaml" in msg and "duplicate key 'arch'" in msg


def test_from_dict_direct():
    model = from_dict(ModelConfig, {"features_base": 8}, source="x.yaml", path="model")
    assert model == ModelConfig(features_base=8)
    with pytest.raises(ConfigError) as info:
        from_dict(ModelConfig, {"norm": "batch"}, source="x.yaml", path="model")
    msg = str(info.value)
    assert "x.yaml" in msg and "model.norm" in msg and "'instance'" in msg and "'group'" in msg


# --------------------------------------------------------------------- overrides


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        BASE_YAML,
        [
            "model.features_base=16",
            "data.patch_size=[64,64,32]",
            "dro.enabled=true",
            "model.n_stages=4",
            "model.n_stages=null",  # last one wins
            "data.fold=all",
            "optim.lr=1e-3",
            "experiment=2024",  # string field: raw text kept
            "seed=3",
        ],
    )
    assert cfg.model.features_base == 16 and type(cfg.model.features_base) is int
    assert cfg.data.patch_size == (64, 64, 32)
    assert cfg.dro.enabled is True
    assert cfg.model.n_stages is None
    assert cfg.data.fold == "all"
    assert cfg.optim.lr == 1e-3
    assert cfg.experiment == "2024"
    assert cfg.seed == 3
    assert load_config(None, ["data.fold=3"]).data.fold == 3
    assert load_config(None, ["optim.grad_clip=null"]).optim.grad_clip is None


def test_override_applies_on_top_of_file(tmp_path):
    path = write(tmp_path / "exp.yaml", "model:\n  features_base: 16\n  block: residual\n")
    cfg = load_config(path, ["model.features_base=24"])
    assert cfg.model.features_base == 24 and cfg.model.block == "residual"


@pytest.mark.parametrize(
    "override, expect",
    [
        ("model.features_base", ["malformed", "key.sub=value"]),
        ("=3", ["malformed"]),
        ("model.widht=16", ["model.widht", "features_base", "upsample"]),
        ("modle.width=16", ["modle", "valid keys", "model"]),
        ("model.features_base=big", ["model.features_base", "'big'"]),
        ("model.features_base=true", ["model.features_base", "True"]),
        ("model.upsample=bilinear", ["model.upsample", "pixel_shuffle"]),
        ("data.patch_size=[64,64]", ["data.patch_size", "length"]),
        ("data.patch_size.x=3", ["data.patch_size", "not a section"]),
        ("dro.enabled=[true", ["dro.enabled", "YAML"]),
        ("base=other.yaml", ["base", "valid keys"]),
    ],
)
def test_bad_overrides(tmp_path, override, expect):
    path = write(tmp_path / "exp.yaml", "seed: 1\n")
    msg = error_of(path, [override])
    assert "<override>" in msg and override in msg
    assert "exp.yaml" not in msg
    for text in expect:
        assert text in msg


# -------------------------------------------------------------------------- base


def test_base_inheritance(tmp_path):
    write(tmp_path / "common" / "root.yaml", "seed: 1\nmodel:\n  features_base: 16\n  block: residual\n")
    write(tmp_path / "common" / "mid.yaml", "base: root.yaml\nseed: 2\nmodel:\n  norm: group\n")
    child = write(tmp_path / "exp" / "child.yaml", "base: ../common/mid.yaml\nmodel:\n  features_base: 24\n")
    cfg = load_config(child)
    assert cfg.seed == 2
    assert cfg.model == ModelConfig(features_base=24, block="residual", norm="group")


def test_base_list_and_empty_section_keeps_base(tmp_path):
    write(tmp_path / "a.yaml", "model:\n  features_base: 16\n")
    write(tmp_path / "b.yaml", "dro:\n  enabled: true\n")
    child = write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\nmodel:\n")
    cfg = load_config(child)
    assert cfg.model.features_base == 16 and cfg.dro.enabled


def test_base_errors_name_the_right_file(tmp_path):
    write(tmp_path / "root.yaml", "model:\n  featurs_base: 16\n")
    child = write(tmp_path / "child.yaml", "base: root.yaml\nseed: 2\n")
    msg = error_of(child)
    assert "root.yaml" in msg and "child.yaml" not in msg and "model.featurs_base" in msg
    msg = error_of(write(tmp_path / "orphan.yaml", "base: missing.yaml\n"))
    assert "missing.yaml" in msg and "not found" in msg


def test_base_cycle(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    msg = error_of(tmp_path / "a.yaml")
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg
    msg = error_of(write(tmp_path / "self.yaml", "base: self.yaml\n"))
    assert "cycle" in msg


def test_base_diamond_is_not_a_cycle(tmp_path):
    write(tmp_path / "d.yaml", "seed: 4\n")
    write(tmp_path / "b.yaml", "base: d.yaml\n")
    write(tmp_path / "c.yaml", "base: d.yaml\n")
    assert load_config(write(tmp_path / "a.yaml", "base: [b.yaml, c.yaml]\n")).seed == 4


# ------------------------------------------------------------ fingerprint / diff


def test_fingerprint():
    cfg = Config()
    fp = config_fingerprint(cfg)
    assert fp == config_fingerprint(Config()) and len(fp) == 64
    changed = load_config(None, ["model.features_base=16"])
    assert config_fingerprint(changed) != fp
    assert config_fingerprint(changed, sections=["model"]) != config_fingerprint(cfg, sections=["model"])
    assert config_fingerprint(changed, sections=["data", "loss"]) == config_fingerprint(cfg, sections=["data", "loss"])
    assert config_fingerprint(cfg, sections=["loss", "data"]) == config_fingerprint(cfg, sections=["data", "loss"])
    assert config_fingerprint(cfg, sections="model") == config_fingerprint(cfg, sections=["model"])
    assert config_fingerprint(cfg, sections=["data.patch_size"]) != config_fingerprint(cfg, sections=["data"])
    with pytest.raises(ConfigError, match="modle"):
        config_fingerprint(cfg, sections=["modle"])


def test_fingerprint_survives_save_and_load(tmp_path):
    cfg = load_config(None, ["loss.smooth=1e-6", "data.label_budget.fraction=0.3"])
    assert config_fingerprint(load_config(save_config(cfg, tmp_path / "c.yaml"))) == config_fingerprint(cfg)


def test_diff_configs():
    a = Config()
    b = load_config(None, ["model.features_base=16", "data.patch_size=[64,64,32]", "dro.enabled=true"])
    assert diff_configs(a, a) == []
    assert diff_configs(a, b) == [
        "data.patch_size: [64, 64, 64] -> [64, 64, 32]",
        "model.features_base: 32 -> 16",
        "dro.enabled: false -> true",
    ]


# ------------------------------------------------------------------------ frozen


def test_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.features_base = 16  # type: ignore[misc]
    assert isinstance(cfg.data.patch_size, tuple) and isinstance(cfg.eval.percentiles, tuple)


def test_lesion_empty_pred_convention():
    assert load_config(None, []).eval.lesion_empty_pred == "zero"
    assert load_config(None, ["eval.lesion_empty_pred=nan"]).eval.lesion_empty_pred == "nan"
    with pytest.raises(ConfigError, match="lesion_empty_pred"):
        load_config(None, ["eval.lesion_empty_pred=0"])

"""Typed, frozen experiment configuration.

A config is a tree of frozen stdlib dataclasses (:class:`Config` at the root).
YAML files and ``a.b.c=value`` command-line overrides are converted into it by a
generic, type-hint driven converter (:func:`from_dict`), so the dataclass
definitions below are the single source of truth for names, types, defaults and
valid choices:

* ``typing.Literal[...]`` fields accept exactly the listed values;
* ``tuple[int, int, int]`` / ``tuple[float, ...]`` accept YAML lists (length is
  checked when fixed) and are stored as tuples;
* ``X | None`` accepts ``null``; other unions (``int | Literal["all"]``) accept
  any member;
* ``bool`` accepts only ``true``/``false``; ``int`` refuses bools and floats with a
  fractional part; ``float`` accepts ints.

Every problem is a :class:`ConfigError` naming the full dotted key, where the
value came from (file name or ``<override>``) and, where it helps, the valid
keys or choices.

Public API::

    load_config(path, overrides=()) -> Config
    from_dict(cls, data, *, source, path="") -> cls
    to_dict(obj) -> dict
    dump_config(cfg) -> str
    save_config(cfg, path) -> Path
    config_fingerprint(cfg, sections=None) -> str
    diff_configs(a, b) -> list[str]

YAML files may start from another file with a top-level ``base: other.yaml`` (or a
list of files), resolved relative to the file that names it; bases are merged
depth-first and then overridden by the file's own keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from jaxseg.fileio import write_text_atomic

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "LabelBudgetConfig",
    "ModelConfig",
    "SynthConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "DROConfig",
    "EvalConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "dump_config",
    "save_config",
    "config_fingerprint",
    "diff_configs",
]


# --------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """Any problem with a configuration: unknown key, wrong type, bad value, bad file."""


class _Invalid(ConfigError):
    """Internal: a problem at a dotted ``key`` (relative to where it was raised).

    Raised by the converter and by ``__post_init__`` validation. :func:`from_dict`
    turns it into a plain :class:`ConfigError` carrying the full key and source.
    ``related`` names other keys involved (for cross-field checks) so the source
    lookup can find the file that set them.
    """

    def __init__(self, key: str, problem: str, related: Sequence[str] = (), owner: str = ""):
        self.key = key
        self.problem = problem
        self.related = tuple(related)
        where = f"{owner}.{key}" if owner and key else (owner or key)
        super().__init__(f"{where}: {problem}" if where else problem)


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def _check(ok: bool, key: str, problem: str, *related: str) -> None:
    if not ok:
        raise _Invalid(key, problem, related)


# ------------------------------------------------------------------------- schema


class _Section:
    """Mixin for config sections: coerces and validates fields on construction.

    Runs on every construction path (``from_dict``, direct calls,
    ``dataclasses.replace``), so a config object is always well typed.
    """

    def __post_init__(self) -> None:
        try:
            for f in dataclasses.fields(self):  # type: ignore[arg-type]
                tp = _type_hints(type(self))[f.name]
                value = getattr(self, f.name)
                converted = _convert(tp, value, f.name, strict_sections=True)
                if converted is not value:
                    object.__setattr__(self, f.name, converted)
            self._validate()
        except _Invalid as e:  # name the class for direct construction / dataclasses.replace
            raise _Invalid(e.key, e.problem, e.related, owner=type(self).__name__) from None

    def _validate(self) -> None:  # overridden by sections with cross-field rules
        pass


def _positive(values: Sequence[float] | None, key: str) -> None:
    if values is not None:
        for i, v in enumerate(values):
            _check(v > 0, f"{key}[{i}]", f"must be > 0, got {v!r}")


@dataclass(frozen=True)
class LabelBudgetConfig(_Section):
    """Sparse-annotation simulation: only a fraction of slices along one axis is labelled."""

    enabled: bool = False
    axis: Literal["sagittal", "coronal", "axial", "random"] = "random"
    fraction: float = 1 / 3
    exclude_border: float = 0.05

    def _validate(self) -> None:
        _check(0.0 < self.fraction <= 1.0, "fraction", f"must be in (0, 1], got {self.fraction!r}")
        _check(
            0.0 <= self.exclude_border < 0.5,
            "exclude_border",
            f"must be in [0, 0.5), got {self.exclude_border!r}",
        )


@dataclass(frozen=True)
class DataConfig(_Section):
    dataset: str = "runs/data/synth"
    store: str = "runs/data/store"
    num_channels: int = 1
    num_classes: int = 8
    patch_size: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] | None = None
    batch_size: int = 2
    foreground_oversampling: float = 0.33
    fold: int | Literal["all"] = 0
    num_folds: int = 5
    split_seed: int = 12345
    threads: int = 2
    prefetch: int = 2
    augment: Literal["nnunet", "neonatal", "dlb_iqda", "none"] = "nnunet"
    label_budget: LabelBudgetConfig = field(default_factory=LabelBudgetConfig)
    max_train_cases: int | None = None
    # Explicit case lists (nnU-Net's splits_final.json): they replace the fold split when set; an empty
    # or absent val_cases trains without validation (the last checkpoint stands for the best).
    train_cases: tuple[str, ...] | None = None
    val_cases: tuple[str, ...] | None = None

    def _validate(self) -> None:
        _check(self.num_channels >= 1, "num_channels", f"must be >= 1, got {self.num_channels}")
        _check(self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        _positive(self.patch_size, "patch_size")
        _positive(self.spacing, "spacing")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(
            0.0 <= self.foreground_oversampling <= 1.0,
            "foreground_oversampling",
            f"must be in [0, 1], got {self.foreground_oversampling!r}",
        )
        _check(self.num_folds >= 2, "num_folds", f"must be >= 2, got {self.num_folds}")
        if self.fold != "all":
            _check(
                0 <= self.fold < self.num_folds,
                "fold",
                f"must be 'all' or an int in [0, {self.num_folds - 1}] (num_folds={self.num_folds}), "
                f"got {self.fold!r}",
                "num_folds",
            )
        _check(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        _check(self.prefetch >= 0, "prefetch", f"must be >= 0, got {self.prefetch}")
        if self.max_train_cases is not None:
            _check(self.max_train_cases >= 1, "max_train_cases",
                   f"must be >= 1 or null (all), got {self.max_train_cases}")
        if self.train_cases is not None:
            _check(len(self.train_cases) >= 1, "train_cases", "must not be empty (use null for the fold split)")
            _check(len(set(self.train_cases)) == len(self.train_cases), "train_cases", "has duplicate cases")
            both = sorted(set(self.train_cases) & set(self.val_cases or ()))
            _check(not both, "val_cases", f"shares cases with train_cases: {both[:3]}", "train_cases")
        else:
            _check(self.val_cases is None, "val_cases", "needs train_cases (otherwise data.fold chooses them)",
                   "train_cases")


@dataclass(frozen=True)
class ModelConfig(_Section):
    arch: Literal["unet"] = "unet"  # DeepLesionBrain builds its compact U-Net itself (jaxseg.dlb.model)
    features_base: int = 32
    features_max: int = 320
    n_stages: int | None = None
    strides: tuple[tuple[int, int, int], ...] | None = None
    kernels: tuple[tuple[int, int, int], ...] | None = None
    block: Literal["plain", "residual"] = "plain"
    norm: Literal["instance", "group"] = "instance"
    norm_groups: int = 8
    activation: Literal["leaky_relu", "relu"] = "leaky_relu"
    upsample: Literal["transpose", "resize_conv", "pixel_shuffle"] = "transpose"
    deep_supervision: bool = True
    num_ds_heads: int | None = None
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    age_head: bool = False
    # AgeU-Net output = age_offset + age_scale * (head), before its final PReLU: with the training ages'
    # mean and SD the untrained head starts at the mean age instead of 0 (the paper's MSE starts ~10^3).
    age_offset: float = 0.0
    age_scale: float = 1.0
    dropout: float = 0.0
    # U-Net details that differ between the torch U-Nets jaxseg imports (jaxseg.interop): MONAI's DynUNet
    # has bias-free convolutions, plain decoder blocks under a residual encoder, and convolves decoder
    # level i with kernels[i + 1]. "same": decoder blocks like `block`; decoder_kernels null: decoder
    # level i uses kernels[i] (nnU-Net); one entry per decoder level (n_stages - 1), level 0 first.
    # conv_bias: biases of the encoder/decoder convolutions (the 1x1x1 heads always have one).
    decoder_block: Literal["same", "plain", "residual"] = "same"
    decoder_kernels: tuple[tuple[int, int, int], ...] | None = None
    conv_bias: bool = True

    def _validate(self) -> None:
        _check(self.features_base >= 1, "features_base", f"must be >= 1, got {self.features_base}")
        _check(
            self.features_max >= self.features_base,
            "features_max",
            f"must be >= features_base ({self.features_base}), got {self.features_max}",
            "features_base",
        )
        if self.n_stages is not None:
            _check(self.n_stages >= 1, "n_stages", f"must be >= 1, got {self.n_stages}")
        for name in ("strides", "kernels"):
            value = getattr(self, name)
            if value is None:
                continue
            _check(len(value) >= 1, name, "must not be empty (use null for automatic)")
            for i, triple in enumerate(value):
                _positive(triple, f"{name}[{i}]")
            if self.n_stages is not None:
                _check(
                    len(value) == self.n_stages,
                    name,
                    f"has {len(value)} entries but n_stages is {self.n_stages}",
                    "n_stages",
                )
        if self.strides is not None and self.kernels is not None:
            _check(
                len(self.strides) == len(self.kernels),
                "kernels",
                f"has {len(self.kernels)} entries but strides has {len(self.strides)}",
                "strides",
            )
        if self.decoder_kernels is not None:
            _check(len(self.decoder_kernels) >= 1, "decoder_kernels",
                   "must not be empty (use null for the encoder kernels)")
            for i, triple in enumerate(self.decoder_kernels):
                _positive(triple, f"decoder_kernels[{i}]")
            for name in ("n_stages", "strides", "kernels"):
                value = getattr(self, name)
                if value is None:
                    continue
                stages = value if name == "n_stages" else len(value)
                _check(
                    len(self.decoder_kernels) == stages - 1,
                    "decoder_kernels",
                    f"has {len(self.decoder_kernels)} entries but the network has {stages - 1} decoder levels "
                    f"({name} gives {stages} stages)",
                    name,
                )
                break
        _check(self.norm_groups >= 1, "norm_groups", f"must be >= 1, got {self.norm_groups}")
        if self.num_ds_heads is not None:
            _check(self.num_ds_heads >= 1, "num_ds_heads", f"must be >= 1, got {self.num_ds_heads}")
        _check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        _check(self.age_scale > 0.0, "age_scale", f"must be > 0, got {self.age_scale!r}")


@dataclass(frozen=True)
class LossConfig(_Section):
    kind: Literal["dice_ce", "dice", "ce", "gen_jaccard"] = "dice_ce"
    batch_dice: bool = False
    smooth: float = 1e-5
    ds_mode: Literal["downsample_targets", "upsample_outputs"] = "downsample_targets"
    ds_weights: Literal["nnunet", "neonatal"] = "nnunet"
    age_weight: float = 0.01

    def _validate(self) -> None:
        _check(self.smooth >= 0.0, "smooth", f"must be >= 0, got {self.smooth!r}")
        _check(self.age_weight >= 0.0, "age_weight", f"must be >= 0, got {self.age_weight!r}")


@dataclass(frozen=True)
class OptimConfig(_Section):
    kind: Literal["sgd", "adam"] = "sgd"
    lr: float = 1e-2
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    schedule: Literal["poly", "constant"] = "poly"
    poly_power: float = 0.9
    poly_per: Literal["epoch", "step"] = "epoch"
    grad_clip: float | None = 12.0
    age_head_lr: float | None = None

    def _validate(self) -> None:
        _check(self.lr > 0.0, "lr", f"must be > 0, got {self.lr!r}")
        _check(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum!r}")
        _check(self.weight_decay >= 0.0, "weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        _check(self.poly_power >= 0.0, "poly_power", f"must be >= 0, got {self.poly_power!r}")
        if self.grad_clip is not None:
            _check(self.grad_clip > 0.0, "grad_clip", f"must be > 0 or null, got {self.grad_clip!r}")
        if self.age_head_lr is not None:
            _check(self.age_head_lr > 0.0, "age_head_lr", f"must be > 0 or null, got {self.age_head_lr!r}")


@dataclass(frozen=True)
class TrainConfig(_Section):
    epochs: int = 1000
    steps_per_epoch: int = 250
    parallel: Literal["jit", "pmap"] = "jit"
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    val_every: int = 50
    log_every: int = 10
    max_nonfinite: int = 10
    # Neonatal transfer learning (jaxseg.train.finetune): which U-Net stages train, from the bottleneck
    # outwards. null = ordinary training; "full" trains everything too (the same updates; kept as the
    # default because configs/base.yaml spells it out).
    finetune: Literal["none", "shallow", "medium", "deep", "full"] | None = "full"
    init_from: str | None = None  # a run, its ckpt/ or best/ dir, or one step dir to start from; null = random init

    def _validate(self) -> None:
        for name in ("epochs", "steps_per_epoch", "checkpoint_every", "keep_checkpoints", "val_every", "log_every"):
            value = getattr(self, name)
            _check(value >= 1, name, f"must be >= 1, got {value}")
        _check(self.max_nonfinite >= 0, "max_nonfinite", f"must be >= 0, got {self.max_nonfinite}")
        if self.init_from is not None:
            _check(bool(self.init_from.strip()), "init_from",
                   "must be a run or checkpoint directory, or null (got an empty string)")
        if self.finetune in ("none", "shallow", "medium", "deep"):
            _check(
                self.init_from is not None,
                "finetune",
                f"{self.finetune!r} freezes pre-trained stages, so it needs train.init_from (the checkpoint "
                f"directory to start from); use full or null to train from scratch",
                "init_from",
            )


@dataclass(frozen=True)
class DROConfig(_Section):
    enabled: bool = False
    beta: float = 100.0
    mode: Literal["sampling", "weighting", "sampling_is"] = "sampling_is"
    w_min: float = 0.1
    w_max: float = 10.0
    init_loss: float = 2.0
    prob_floor: float = 1e-4
    log_every: int = 50

    def _validate(self) -> None:
        _check(self.beta > 0.0, "beta", f"must be > 0, got {self.beta!r}")
        _check(self.w_min > 0.0, "w_min", f"must be > 0, got {self.w_min!r}")
        _check(
            self.w_min <= self.w_max,
            "w_min",
            f"must be <= w_max ({self.w_max!r}), got {self.w_min!r}",
            "w_max",
        )
        _check(self.init_loss >= 0.0, "init_loss", f"must be >= 0, got {self.init_loss!r}")
        _check(0.0 <= self.prob_floor < 1.0, "prob_floor", f"must be in [0, 1), got {self.prob_floor!r}")
        _check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")


@dataclass(frozen=True)
class EvalConfig(_Section):
    step_size: float = 0.5
    gaussian_sigma: float = 0.125
    mirror_tta: bool = False
    window_batch: int = 4
    percentiles: tuple[int, ...] = (50, 25, 10, 5)
    # lesion PPV / LFPR of an empty prediction: "zero" scores it 0 (ISBI 2015), "nan" leaves it undefined
    lesion_empty_pred: Literal["zero", "nan"] = "zero"

    def _validate(self) -> None:
        _check(0.0 < self.step_size <= 1.0, "step_size", f"must be in (0, 1], got {self.step_size!r}")
        _check(self.gaussian_sigma > 0.0, "gaussian_sigma", f"must be > 0, got {self.gaussian_sigma!r}")
        _check(self.window_batch >= 1, "window_batch", f"must be >= 1, got {self.window_batch}")
        for i, p in enumerate(self.percentiles):
            _check(0 <= p <= 100, f"percentiles[{i}]", f"must be in [0, 100], got {p}")


@dataclass(frozen=True)
class SynthConfig(_Section):
    """The embedded synthetic cohort (jaxseg.data.synth): what `launch synth` and `launch demo` write."""

    n_subjects: int = 100
    n_test: int | None = None  # None: 20%
    spacing: float = 2.0
    seed: int = 0
    flavour: Literal["tissue", "lesion"] = "tissue"
    sites: int = 3
    p_ventriculomegaly: float = 0.1
    p_cerebellar_hypoplasia: float = 0.1
    lesion_radius_mm: tuple[float, float] = (1.0, 5.0)  # lesion flavour: log-uniform equivalent radius

    def _validate(self) -> None:
        _check(0 < self.lesion_radius_mm[0] <= self.lesion_radius_mm[1], "lesion_radius_mm",
               f"must be [low, high] with 0 < low <= high, got {list(self.lesion_radius_mm)}")
        _check(self.n_subjects >= 1, "n_subjects", f"must be >= 1, got {self.n_subjects}")
        if self.n_test is not None:
            _check(0 <= self.n_test < self.n_subjects, "n_test", f"must be in [0, n_subjects), got {self.n_test}",
                   "n_subjects")
        _check(self.spacing > 0, "spacing", f"must be > 0, got {self.spacing!r}")
        _check(self.sites >= 1, "sites", f"must be >= 1, got {self.sites}")
        _check(self.p_ventriculomegaly >= 0 and self.p_cerebellar_hypoplasia >= 0
               and self.p_ventriculomegaly + self.p_cerebellar_hypoplasia <= 1, "p_ventriculomegaly",
               "the abnormal strata's proportions must be >= 0 and sum to at most 1", "p_cerebellar_hypoplasia")

    def strata(self) -> dict[str, float]:
        p_v, p_c = self.p_ventriculomegaly, self.p_cerebellar_hypoplasia
        return {"control": 1.0 - p_v - p_c, "ventriculomegaly": p_v, "cerebellar_hypoplasia": p_c}


@dataclass(frozen=True)
class DLBConfig(_Section):
    """DeepLesionBrain (jaxseg.dlb): the tile grid, the ensemble's training and the fusion."""

    tiles_per_axis: int = 5
    tile_size: int = 96
    stride: tuple[int, int, int] | None = None  # null = tiles spread evenly; reference MNI grid [20, 29, 20]
    offset: tuple[int, int, int] | None = None  # null = centred; reference MNI grid [4, 4, 0]
    method: Literal["hsl", "independent", "generic"] = "hsl"
    lesion_only: bool = True
    batch_size: int = 1
    generic_batch_size: int = 1
    steps_per_epoch: int | None = None
    generic_steps_per_epoch: int | None = None
    max_epochs: int = 500
    patience: int = 50
    generic_max_epochs: int = 500
    generic_patience: int = 50
    val_fraction: float = 0.2
    val_max_subvolumes: int = 64
    train_sites: tuple[str, ...] | None = None
    group_size: int = 25
    fusion: Literal["mean_prob", "majority_vote"] = "mean_prob"

    def _validate(self) -> None:
        _check(self.tiles_per_axis >= 1, "tiles_per_axis", f"must be >= 1, got {self.tiles_per_axis}")
        _check(self.tile_size >= 8 and self.tile_size % 8 == 0, "tile_size",
               f"must be a positive multiple of 8 (the compact U-Net pools 3 times), got {self.tile_size}")
        for name in ("batch_size", "generic_batch_size", "max_epochs", "patience", "generic_max_epochs",
                     "generic_patience", "group_size", "val_max_subvolumes"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "generic_steps_per_epoch"):
            v = getattr(self, name)
            _check(v is None or v >= 1, name, f"must be >= 1 or null, got {v}")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        if self.stride is not None:
            _check(all(v >= 0 for v in self.stride), "stride", f"must be >= 0, got {self.stride}")
        if self.offset is not None:
            _check(all(v >= 0 for v in self.offset), "offset", f"must be >= 0, got {self.offset}")


@dataclass(frozen=True)
class TransferConfig(_Section):
    """The transfer-learning study (jaxseg.neonatal.transfer): roles by age in the synthetic cohort
    (paper: oldest 100 -> 90 pre-train / 10 validation; youngest 120 -> 40 fine-tune / 80 test)."""

    n_old: int = 30                # oldest subjects: pre-training
    n_old_val: int = 4             # of which validation (the pre-trained model's best checkpoint)
    n_young: int = 30              # youngest subjects: fine-tuning and test
    n_finetune: int = 10           # of which fine-tuning (drawn with data.split_seed); the rest test
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[Literal["none", "shallow", "medium", "deep", "full", "scratch"], ...] = (
        "none", "shallow", "medium", "deep", "full", "scratch")
    finetune_steps: int = 100      # fine-tuning and from-scratch runs alike (train.* sets pre-training)
    finetune_lr: float = 1e-3      # the paper's fine-tuning lr (SPEC 3)
    scratch_lr: float | None = None  # null: optim.lr (a fresh network, as pre-training)

    def _validate(self) -> None:
        _check(self.n_old >= 2, "n_old", f"must be >= 2, got {self.n_old}")
        _check(1 <= self.n_old_val < self.n_old, "n_old_val", f"must be in [1, n_old), got {self.n_old_val}", "n_old")
        _check(self.n_young >= 2, "n_young", f"must be >= 2, got {self.n_young}")
        _check(1 <= self.n_finetune < self.n_young, "n_finetune",
               f"must be in [1, n_young) (the rest are the test set), got {self.n_finetune}", "n_young")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds",
               f"must be distinct and not empty, got {list(self.seeds)}")
        _check(len(self.strategies) >= 1 and len(set(self.strategies)) == len(self.strategies), "strategies",
               f"must be distinct and not empty, got {list(self.strategies)}")
        _check(self.finetune_steps >= 1, "finetune_steps", f"must be >= 1, got {self.finetune_steps}")
        _check(self.finetune_lr > 0, "finetune_lr", f"must be > 0, got {self.finetune_lr}")
        if self.scratch_lr is not None:
            _check(self.scratch_lr > 0, "scratch_lr", f"must be > 0 or null, got {self.scratch_lr}")


@dataclass(frozen=True)
class Config(_Section):
    experiment: str = "default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dro: DROConfig = field(default_factory=DROConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    dlb: DLBConfig = field(default_factory=DLBConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    def _validate(self) -> None:
        _check(bool(self.experiment.strip()), "experiment", "must not be empty")


# ---------------------------------------------------------------------- converter


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


_PLURAL = {str: "strings", bool: "bools", int: "ints", float: "floats"}


def _describe_many(tp: Any) -> str:
    if tp in _PLURAL:
        return _PLURAL[tp]
    if typing.get_origin(tp) is tuple:
        return _describe(tp).replace("a list", "lists", 1)
    return f"values that are {_describe(tp)}"


def _describe(tp: Any) -> str:
    """Human description of an annotation, for error messages."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "anything"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe_many(args[0])}"
        if args and all(a == args[0] for a in args):
            return f"a list of {len(args)} {_describe_many(args[0])}"
        return "a list [" + ", ".join(_describe(a) for a in args) + "]"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    if isinstance(tp, type):
        return {str: "a string", bool: "a bool (true/false)", int: "an int", float: "a float"}.get(tp, tp.__name__)
    return str(tp)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _valid_keys_hint(cls: type, key: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(names)}"


def _convert(tp: Any, value: Any, path: str, *, strict_sections: bool = False) -> Any:
    """Validate ``value`` against annotation ``tp`` and return the typed value.

    Raises :class:`_Invalid` with ``path`` (the full dotted key known so far).
    """
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Invalid(path, f"expected null, got {_show(value)}")

    origin = typing.get_origin(tp)

    if origin is Literal:
        for choice in typing.get_args(tp):
            # type check too, so that True does not match 1 and 1.0 does not match 1
            if type(value) is type(choice) and value == choice:
                return choice
        choices = ", ".join(repr(c) for c in typing.get_args(tp))
        raise _Invalid(path, f"invalid value {_show(value)}; valid choices: {choices}")

    if _is_union(tp):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        candidates = [m for m in members if m is not type(None)]
        errors: list[_Invalid] = []
        for member in candidates:
            try:
                return _convert(member, value, path, strict_sections=strict_sections)
            except _Invalid as e:
                errors.append(e)
        # A nested problem (a tuple element, a section key) is more useful than a summary.
        deep = [e for e in errors if e.key != path]
        if len(deep) == 1:
            raise deep[0]
        raise _Invalid(path, f"expected {_describe(tp)}, got {_show(value)}")

    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _Invalid(path, f"expected {_describe(tp)}, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            elem_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise _Invalid(path, f"expected {_describe(tp)} (length {len(args)}), got length {len(value)}: {_show(value)}")
            elem_types = list(args)
        out = tuple(_convert(t, v, f"{path}[{i}]", strict_sections=strict_sections) for i, (t, v) in enumerate(zip(elem_types, value)))
        return value if isinstance(value, tuple) and all(a is b for a, b in zip(out, value)) else out

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if value is None and not strict_sections:
            value = {}  # an empty YAML section (`model:` with everything commented out)
        if isinstance(value, Mapping):
            return _build_dataclass(tp, value, path)
        raise _Invalid(path, f"expected {_describe(tp)} for section {path!r}, got {_show(value)}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(path, f"expected a bool (true/false), got {_show(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise _Invalid(path, f"expected an int, got bool {_show(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Invalid(path, f"expected an int, got {_show(value)}")
    if tp is float:
        if isinstance(value, bool):
            raise _Invalid(path, f"expected a float, got bool {_show(value)}")
        if isinstance(value, float):
            return value
        if isinstance(value, int):
            return float(value)
        raise _Invalid(path, f"expected a float, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid(path, f"expected a string, got {_show(value)}")

    raise TypeError(f"jaxseg.config: unsupported annotation {tp!r} at {path!r}")


def _build_dataclass(cls: type, data: Mapping[str, Any], path: str) -> Any:
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise _Invalid(_join(path, str(key)), f"unknown key{_valid_keys_hint(cls, key)}")
        kwargs[key] = _convert(hints[key], value, _join(path, key))
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and no_default and f.name not in kwargs:
            raise _Invalid(_join(path, f.name), "missing required key")
    try:
        return cls(**kwargs)
    except _Invalid as e:  # raised by __post_init__ with keys relative to this section
        raise _Invalid(_join(path, e.key), e.problem, [_join(path, r) for r in e.related]) from None


_SourceLookup = Callable[[str, Sequence[str]], str]


def _from_dict(cls: type, data: Any, where: _SourceLookup, path: str = "") -> Any:
    try:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise _Invalid(path, f"expected a mapping, got {_show(data)}")
        return _build_dataclass(cls, data, path)
    except _Invalid as e:
        source = where(e.key, e.related)
        what = f"{e.key}: " if e.key else ""
        raise ConfigError(f"{source}: {what}{e.problem}") from None


def from_dict(cls: type, data: Mapping[str, Any] | None, *, source: str, path: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) nested mapping.

    Missing keys take the dataclass defaults. ``source`` (a file name, or
    ``"<override>"``) and ``path`` (the dotted key of ``data`` within the whole
    config, e.g. ``"model"``) only serve to make error messages precise.
    Raises :class:`ConfigError`.
    """
    return _from_dict(cls, data, lambda key, related: source, path)


def to_dict(obj: Any) -> Any:
    """Plain YAML-ready structure of a config: dataclasses -> dicts (field order), tuples -> lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- YAML

# PyYAML implements YAML 1.1, where `1e-5` (no dot) is a *string*. Config files are
# written by people who expect it to be a float, so the loader and dumper below
# use a YAML 1.2-style float pattern. Both share it, so dumped strings that look
# like floats get quoted and round-trip.
_FLOAT_RE = re.compile(
    r"""^(?:
        [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
      | [-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
      | [-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
      | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
      | [-+]?\.(?:inf|Inf|INF)
      | \.(?:nan|NaN|NAN)
    )$""",
    re.X,
)
_FLOAT_TAG = "tag:yaml.org,2002:float"


def _with_float_resolver(resolvers: dict) -> dict:
    # Deep copy: PyYAML's add_implicit_resolver mutates lists shared with SafeLoader.
    out = {ch: [r for r in lst if r[0] != _FLOAT_TAG] for ch, lst in resolvers.items()}
    for ch in "-+0123456789.":
        out.setdefault(ch, []).append((_FLOAT_TAG, _FLOAT_RE))
    return out


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers = _with_float_resolver(yaml.SafeLoader.yaml_implicit_resolvers)

    def construct_mapping(self, node, deep=False):
        # PyYAML silently keeps the last of duplicate keys; in a config that hides mistakes.
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable key; PyYAML reports it below
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    yaml_implicit_resolvers = _with_float_resolver(yaml.SafeDumper.yaml_implicit_resolvers)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    # [64, 64, 64] on one line; lists of lists / mappings in block style
    flat = dumper.default_flow_style is True or all(not isinstance(v, (list, tuple, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(tuple, _represent_list)


def _yaml_load(text: str, name: str = "<override>") -> Any:
    loader = _Loader(text)
    loader.name = name  # shown in YAML error marks instead of "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_dump(data: Any, **kwargs: Any) -> str:
    kwargs.setdefault("sort_keys", False)
    kwargs.setdefault("default_flow_style", False)
    kwargs.setdefault("allow_unicode", True)
    return yaml.dump(data, Dumper=_Dumper, **kwargs)


# ------------------------------------------------------------------ file loading


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    try:
        data = _yaml_load(text, str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys, got {_show(data)}")
    return data


def _record(prov: dict[str, str], data: Any, prefix: str, source: str) -> None:
    """Remember which source set each dotted key (later sources win)."""
    prov[prefix] = source
    if isinstance(data, dict):
        for k, v in data.items():
            _record(prov, v, _join(prefix, str(k)), source)


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: mappings merge key by key; anything else in ``top`` replaces.

    An empty section in ``top`` (``model:`` -> None) leaves ``base``'s section as is.
    """
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v is None and isinstance(out.get(k), dict):
            continue
        else:
            out[k] = v
    return out


def _load_tree(path: Path, prov: dict[str, str], stack: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError(f"{path}: cycle in 'base' includes: {chain}")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: base: expected a file name or a list of file names, got {_show(bases)}")
    merged: dict = {}
    for b in bases:
        base_path = Path(os.path.expanduser(b))
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        merged = _merge(merged, _load_tree(base_path, prov, (*stack, resolved)))
    for k, v in data.items():
        _record(prov, v, str(k), str(path))
    return _merge(merged, data)


def _override_target(key: str, source: str) -> Any:
    """Check a dotted override key against the schema; return the field's annotation."""
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"{source}: malformed key {key!r}; expected dotted field names like model.features_base")
    cls: Any = Config
    path = ""
    tp: Any = None
    for i, part in enumerate(parts):
        path = _join(path, part)
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(f"{source}: {path}: unknown key{_valid_keys_hint(cls, part)}")
        tp = _type_hints(cls)[part]
        if i < len(parts) - 1:
            inner = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
            sections = [a for a in inner if dataclasses.is_dataclass(a)]
            if not sections:
                raise ConfigError(f"{source}: {path}: is a value, not a section; cannot set {key!r}")
            cls = sections[0]
    return tp


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    return _is_union(tp) and str in typing.get_args(tp)


def _apply_override(data: dict, prov: dict[str, str], text: str) -> dict:
    source = f"<override> {text!r}"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source}: malformed override; expected key.sub=value, e.g. model.features_base=16")
    tp = _override_target(key, source)
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: {key}: value is not valid YAML: {e}") from None
    if _accepts_str(tp) and value is not None and not isinstance(value, str):
        value = raw.strip()  # a string field takes the text as is: experiment=2024 -> "2024"
    parts = key.split(".")
    out = dict(data)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    _record(prov, value, key, source)
    return out


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    ``overrides`` are ``"a.b.c=value"`` strings; ``value`` is parsed as YAML
    (``model.features_base=16``, ``data.patch_size=[64,64,32]``,
    ``dro.enabled=true``, ``model.n_stages=null``); for string fields the raw
    text is kept. Raises :class:`ConfigError`.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    prov: dict[str, str] = {}
    fallback = "<defaults>"
    data: dict = {}
    if path is not None:
        p = Path(path)
        fallback = str(p)
        data = _load_tree(p, prov, ())
    for text in overrides:
        data = _apply_override(data, prov, text)

    def where(key: str, related: Sequence[str]) -> str:
        for k in (key, *related):
            if k in prov:
                return prov[k]
        k = key
        while k:
            shorter = re.sub(r"(\[\d+\]|\.?[^.\[]+)$", "", k)
            if shorter == k:
                break
            k = shorter
            if k in prov:
                return prov[k]
        return fallback

    return _from_dict(Config, data, where)


# ------------------------------------------------------------------ writing out


def dump_config(cfg: Any) -> str:
    """YAML text of a config, keys in dataclass field order; ``load_config`` reads it back equal."""
    return _yaml_dump(to_dict(cfg))


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``dump_config(cfg)`` to ``path`` atomically (temp file in the same folder + os.replace)."""
    return write_text_atomic(path, dump_config(cfg))


# ------------------------------------------------------------ comparing configs


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            out.update(_flatten(getattr(obj, f.name), _join(prefix, f.name)))
        return out
    return {prefix: obj}


def _lookup(cfg: Any, key: str) -> Any:
    obj = cfg
    for i, part in enumerate(key.split(".")):
        if not (dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}):
            where = ".".join(key.split(".")[:i]) or "config"
            names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
            valid = f" valid keys in {where}: {', '.join(names)}" if names else f" {where} is not a section"
            raise ConfigError(f"config_fingerprint: unknown section {key!r};{valid}")
        obj = getattr(obj, part)
    return obj


def config_fingerprint(cfg: Any, sections: str | Sequence[str] | None = None) -> str:
    """Stable sha256 (hex) of the canonical YAML of the chosen parts of ``cfg``.

    ``sections`` are top-level field names or dotted keys (``"model"``,
    ``"data.patch_size"``); None means the whole config. Order and repeats do not
    matter. Compare fingerprints computed with the same code version: a new
    field changes the hash of every config that contains its section.
    """
    if sections is None:
        chosen = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    else:
        if isinstance(sections, str):
            sections = [sections]
        chosen = {key: to_dict(_lookup(cfg, key)) for key in sorted(set(sections))}
    canonical = _yaml_dump(chosen, sort_keys=True, width=1 << 30)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _fmt(value: Any) -> str:
    text = _yaml_dump(to_dict(value), default_flow_style=True, width=1 << 30).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text


def diff_configs(a: Any, b: Any) -> list[str]:
    """Changed leaves from ``a`` to ``b`` as ``"model.features_base: 32 -> 16"`` lines, in field order."""
    fa, fb = _flatten(a), _flatten(b)
    lines = []
    for key in list(fa) + [k for k in fb if k not in fa]:
        old, new = fa.get(key, "<absent>"), fb.get(key, "<absent>")
        if old != new or type(old) is not type(new):
            lines.append(f"{key}: {_fmt(old)} -> {_fmt(new)}")
    return lines

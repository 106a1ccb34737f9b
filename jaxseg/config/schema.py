"""The core configuration schema: one frozen dataclass per section, :class:`Config` at the root.

The core config holds the core's sections only. A method package adds its own section by extending
:class:`Config` (``jaxseg.dlb.config.DLBRunConfig``, ``jaxseg.neonatal.config.NeonatalConfig``) and
passes that class to :func:`jaxseg.config.load_config`; the synthetic cohort's section lives on
:class:`SynthRunConfig`, used by `launch synth` and `launch demo` (a training run writes the core
sections only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from jaxseg.config.convert import check_field, Section


def _positive(values: Sequence[float] | None, key: str) -> None:
    if values is not None:
        for i, v in enumerate(values):
            check_field(v > 0, f"{key}[{i}]", f"must be > 0, got {v!r}")


@dataclass(frozen=True)
class LabelBudgetConfig(Section):
    """Sparse-annotation simulation: only a fraction of slices along one axis is labelled."""

    enabled: bool = False
    axis: Literal["sagittal", "coronal", "axial", "random"] = "random"
    fraction: float = 1 / 3
    exclude_border: float = 0.05

    def _validate(self) -> None:
        check_field(0.0 < self.fraction <= 1.0, "fraction", f"must be in (0, 1], got {self.fraction!r}")
        check_field(
            0.0 <= self.exclude_border < 0.5,
            "exclude_border",
            f"must be in [0, 0.5), got {self.exclude_border!r}",
        )


@dataclass(frozen=True)
class DataConfig(Section):
    dataset: str = "runs/data/synth"
    store: str = "runs/data/store"
    num_channels: int = 1
    num_classes: int = 8
    patch_size: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] | None = None
    batch_size: int = 2
    foreground_oversampling: float = 0.33
    # Which patches are forced onto foreground: "last" is nnU-Net v2's rule (slots >= round(B * (1 - p)) of
    # every global batch; with B = 2 one patch in two); "random" forces each patch with probability p.
    oversample: Literal["last", "random"] = "last"
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
        check_field(self.num_channels >= 1, "num_channels", f"must be >= 1, got {self.num_channels}")
        check_field(self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        _positive(self.patch_size, "patch_size")
        _positive(self.spacing, "spacing")
        check_field(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check_field(
            0.0 <= self.foreground_oversampling <= 1.0,
            "foreground_oversampling",
            f"must be in [0, 1], got {self.foreground_oversampling!r}",
        )
        check_field(self.num_folds >= 2, "num_folds", f"must be >= 2, got {self.num_folds}")
        if self.fold != "all":
            check_field(
                0 <= self.fold < self.num_folds,
                "fold",
                f"must be 'all' or an int in [0, {self.num_folds - 1}] (num_folds={self.num_folds}), "
                f"got {self.fold!r}",
                "num_folds",
            )
        check_field(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        check_field(self.prefetch >= 0, "prefetch", f"must be >= 0, got {self.prefetch}")
        if self.max_train_cases is not None:
            check_field(self.max_train_cases >= 1, "max_train_cases",
                   f"must be >= 1 or null (all), got {self.max_train_cases}")
        if self.train_cases is not None:
            check_field(len(self.train_cases) >= 1, "train_cases", "must not be empty (use null for the fold split)")
            check_field(len(set(self.train_cases)) == len(self.train_cases), "train_cases", "has duplicate cases")
            both = sorted(set(self.train_cases) & set(self.val_cases or ()))
            check_field(not both, "val_cases", f"shares cases with train_cases: {both[:3]}", "train_cases")
        else:
            check_field(self.val_cases is None, "val_cases", "needs train_cases (otherwise data.fold chooses them)",
                   "train_cases")


@dataclass(frozen=True)
class ModelConfig(Section):
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
        check_field(self.features_base >= 1, "features_base", f"must be >= 1, got {self.features_base}")
        check_field(
            self.features_max >= self.features_base,
            "features_max",
            f"must be >= features_base ({self.features_base}), got {self.features_max}",
            "features_base",
        )
        if self.n_stages is not None:
            check_field(self.n_stages >= 1, "n_stages", f"must be >= 1, got {self.n_stages}")
        for name in ("strides", "kernels"):
            value = getattr(self, name)
            if value is None:
                continue
            check_field(len(value) >= 1, name, "must not be empty (use null for automatic)")
            for i, triple in enumerate(value):
                _positive(triple, f"{name}[{i}]")
            if self.n_stages is not None:
                check_field(
                    len(value) == self.n_stages,
                    name,
                    f"has {len(value)} entries but n_stages is {self.n_stages}",
                    "n_stages",
                )
        if self.strides is not None and self.kernels is not None:
            check_field(
                len(self.strides) == len(self.kernels),
                "kernels",
                f"has {len(self.kernels)} entries but strides has {len(self.strides)}",
                "strides",
            )
        if self.decoder_kernels is not None:
            check_field(len(self.decoder_kernels) >= 1, "decoder_kernels",
                   "must not be empty (use null for the encoder kernels)")
            for i, triple in enumerate(self.decoder_kernels):
                _positive(triple, f"decoder_kernels[{i}]")
            for name in ("n_stages", "strides", "kernels"):
                value = getattr(self, name)
                if value is None:
                    continue
                stages = value if name == "n_stages" else len(value)
                check_field(
                    len(self.decoder_kernels) == stages - 1,
                    "decoder_kernels",
                    f"has {len(self.decoder_kernels)} entries but the network has {stages - 1} decoder levels "
                    f"({name} gives {stages} stages)",
                    name,
                )
                break
        check_field(self.norm_groups >= 1, "norm_groups", f"must be >= 1, got {self.norm_groups}")
        if self.num_ds_heads is not None:
            check_field(self.num_ds_heads >= 1, "num_ds_heads", f"must be >= 1, got {self.num_ds_heads}")
        check_field(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        check_field(self.age_scale > 0.0, "age_scale", f"must be > 0, got {self.age_scale!r}")


@dataclass(frozen=True)
class LossConfig(Section):
    kind: Literal["dice_ce", "dice", "ce", "gen_jaccard"] = "dice_ce"
    batch_dice: bool = False
    smooth: float = 1e-5
    # The Dice term as nnU-Net computes it (softmax, 2 tp + fp + fn, foreground classes); the neonatal
    # reference code's MONAI DiceCELoss: sigmoid, squared (sum p^2 + sum t^2), background included.
    dice_activation: Literal["softmax", "sigmoid"] = "softmax"
    dice_squared: bool = False
    dice_background: bool = False
    ds_mode: Literal["downsample_targets", "upsample_outputs"] = "downsample_targets"
    # upsample_outputs: how the lower-resolution logits are resized to the labels' grid; nearest is
    # MONAI DynUNet's (the neonatal reference code)
    ds_upsample: Literal["nearest", "trilinear"] = "nearest"
    ds_weights: Literal["nnunet", "neonatal"] = "nnunet"
    age_weight: float = 0.01

    def _validate(self) -> None:
        check_field(self.smooth >= 0.0, "smooth", f"must be >= 0, got {self.smooth!r}")
        check_field(self.age_weight >= 0.0, "age_weight", f"must be >= 0, got {self.age_weight!r}")


@dataclass(frozen=True)
class OptimConfig(Section):
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
        check_field(self.lr > 0.0, "lr", f"must be > 0, got {self.lr!r}")
        check_field(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum!r}")
        check_field(self.weight_decay >= 0.0, "weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        check_field(self.poly_power >= 0.0, "poly_power", f"must be >= 0, got {self.poly_power!r}")
        if self.grad_clip is not None:
            check_field(self.grad_clip > 0.0, "grad_clip", f"must be > 0 or null, got {self.grad_clip!r}")
        if self.age_head_lr is not None:
            check_field(self.age_head_lr > 0.0, "age_head_lr", f"must be > 0 or null, got {self.age_head_lr!r}")


@dataclass(frozen=True)
class TrainConfig(Section):
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
            check_field(value >= 1, name, f"must be >= 1, got {value}")
        check_field(self.max_nonfinite >= 0, "max_nonfinite", f"must be >= 0, got {self.max_nonfinite}")
        if self.init_from is not None:
            check_field(bool(self.init_from.strip()), "init_from",
                   "must be a run or checkpoint directory, or null (got an empty string)")
        if self.finetune in ("none", "shallow", "medium", "deep"):
            check_field(
                self.init_from is not None,
                "finetune",
                f"{self.finetune!r} freezes pre-trained stages, so it needs train.init_from (the checkpoint "
                f"directory to start from); use full or null to train from scratch",
                "init_from",
            )


@dataclass(frozen=True)
class DROConfig(Section):
    enabled: bool = False
    beta: float = 100.0
    mode: Literal["sampling", "weighting", "sampling_is"] = "sampling_is"
    w_min: float = 0.1
    w_max: float = 10.0
    init_loss: float = 2.0
    # Std of the Gaussian noise added to the initial loss table to break ties: Fidon et al.'s reference
    # sampler draws N(init_loss, 0.001 * init_loss), i.e. 0.002 at init_loss 2.0.
    init_noise: float = 0.002
    prob_floor: float = 1e-4
    log_every: int = 50

    def _validate(self) -> None:
        check_field(self.beta > 0.0, "beta", f"must be > 0, got {self.beta!r}")
        check_field(self.w_min > 0.0, "w_min", f"must be > 0, got {self.w_min!r}")
        check_field(
            self.w_min <= self.w_max,
            "w_min",
            f"must be <= w_max ({self.w_max!r}), got {self.w_min!r}",
            "w_max",
        )
        check_field(self.init_loss >= 0.0, "init_loss", f"must be >= 0, got {self.init_loss!r}")
        check_field(self.init_noise >= 0.0, "init_noise", f"must be >= 0, got {self.init_noise!r}")
        check_field(0.0 <= self.prob_floor < 1.0, "prob_floor", f"must be in [0, 1), got {self.prob_floor!r}")
        check_field(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")


@dataclass(frozen=True)
class EvalConfig(Section):
    step_size: float = 0.5
    gaussian_sigma: float = 0.125
    mirror_tta: bool = False
    window_batch: int = 4
    percentiles: tuple[int, ...] = (50, 25, 10, 5)
    # lesion PPV / LFPR of an empty prediction: "zero" scores it 0 (ISBI 2015), "nan" leaves it undefined
    lesion_empty_pred: Literal["zero", "nan"] = "zero"

    def _validate(self) -> None:
        check_field(0.0 < self.step_size <= 1.0, "step_size", f"must be in (0, 1], got {self.step_size!r}")
        check_field(self.gaussian_sigma > 0.0, "gaussian_sigma", f"must be > 0, got {self.gaussian_sigma!r}")
        check_field(self.window_batch >= 1, "window_batch", f"must be >= 1, got {self.window_batch}")
        for i, p in enumerate(self.percentiles):
            check_field(0 <= p <= 100, f"percentiles[{i}]", f"must be in [0, 100], got {p}")


@dataclass(frozen=True)
class Config(Section):
    experiment: str = "default"
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # training seeds of a multi-seed job (demo, studies); None = (seed,)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dro: DROConfig = field(default_factory=DROConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def _validate(self) -> None:
        check_field(bool(self.experiment.strip()), "experiment", "must not be empty")
        if self.seeds is not None:
            check_field(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds",
                   f"must be distinct and not empty, got {list(self.seeds)}")


@dataclass(frozen=True)
class SynthConfig(Section):
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
        check_field(0 < self.lesion_radius_mm[0] <= self.lesion_radius_mm[1], "lesion_radius_mm",
               f"must be [low, high] with 0 < low <= high, got {list(self.lesion_radius_mm)}")
        check_field(self.n_subjects >= 1, "n_subjects", f"must be >= 1, got {self.n_subjects}")
        if self.n_test is not None:
            check_field(0 <= self.n_test < self.n_subjects, "n_test", f"must be in [0, n_subjects), got {self.n_test}",
                   "n_subjects")
        check_field(self.spacing > 0, "spacing", f"must be > 0, got {self.spacing!r}")
        check_field(self.sites >= 1, "sites", f"must be >= 1, got {self.sites}")
        check_field(self.p_ventriculomegaly >= 0 and self.p_cerebellar_hypoplasia >= 0
               and self.p_ventriculomegaly + self.p_cerebellar_hypoplasia <= 1, "p_ventriculomegaly",
               "the abnormal strata's proportions must be >= 0 and sum to at most 1", "p_cerebellar_hypoplasia")

    def strata(self) -> dict[str, float]:
        p_v, p_c = self.p_ventriculomegaly, self.p_cerebellar_hypoplasia
        return {"control": 1.0 - p_v - p_c, "ventriculomegaly": p_v, "cerebellar_hypoplasia": p_c}


@dataclass(frozen=True)
class SynthRunConfig(Config):
    """The core config plus the synthetic cohort (`launch synth`, `launch demo`)."""

    synth: SynthConfig = field(default_factory=SynthConfig)

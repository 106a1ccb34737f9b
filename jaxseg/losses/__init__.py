"""Losses: per-sample segmentation losses, deep supervision and DRO (nnU-Net, Isensee et al. 2021;
Fidon et al. 2021, nnU-Net-DRO)."""

from jaxseg.losses.deep_supervision import deep_supervision_loss, downsample_nearest, ds_weights
from jaxseg.losses.dro import (
    dro_dual,
    dro_objective,
    dro_weights,
    effective_sample_size,
    importance_weights,
    percentile_bound,
    sampling_probs,
)
from jaxseg.losses.segmentation import (
    cross_entropy,
    dice_ce,
    generalised_jaccard,
    mse,
    soft_dice,
)

__all__ = [
    "soft_dice",
    "cross_entropy",
    "dice_ce",
    "generalised_jaccard",
    "mse",
    "ds_weights",
    "deep_supervision_loss",
    "downsample_nearest",
    "percentile_bound",
    "dro_objective",
    "dro_weights",
    "dro_dual",
    "sampling_probs",
    "importance_weights",
    "effective_sample_size",
]

"""Inference: nnU-Net-style sliding-window prediction (Gaussian weighting, mirror TTA, fold
ensembles) and whole-case / whole-folder prediction back to the input image grid."""

from jaxseg.inference.predict import (
    Prediction,
    find_cases,
    inference_kwargs,
    make_apply_fn,
    predict_case,
    predict_folder,
    predict_preprocessed,
    predict_stored_case,
)
from jaxseg.inference.sliding_window import (
    average_apply_fns,
    ensemble_logits,
    gaussian_importance_map,
    mirror_subsets,
    mirror_tta,
    pad_to_patch,
    sliding_window_ensemble,
    sliding_window_logits,
    window_starts,
    window_steps,
)

__all__ = [
    "Prediction",
    "average_apply_fns",
    "ensemble_logits",
    "find_cases",
    "gaussian_importance_map",
    "inference_kwargs",
    "make_apply_fn",
    "mirror_subsets",
    "mirror_tta",
    "pad_to_patch",
    "predict_case",
    "predict_folder",
    "predict_preprocessed",
    "predict_stored_case",
    "sliding_window_ensemble",
    "sliding_window_logits",
    "window_starts",
    "window_steps",
]

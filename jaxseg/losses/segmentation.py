"""Per-sample segmentation losses (channels-last, masked, jit-able).

Conventions shared by every function in this module:

* ``logits``: float array ``(B, X, Y, Z, C)`` (channels last).
* ``labels``: integer array ``(B, X, Y, Z)`` with values ``0..C-1``.
* ``mask``: optional ``(B, X, Y, Z)`` array, bool or float in {0, 1}; 1 = labelled voxel
  (label budgeting). ``None`` means every voxel is labelled. Values other than 0/1 act as
  voxel weights (they multiply each voxel's contribution), but only {0, 1} is part of the
  contract.
* Every loss returns a per-sample vector of shape ``(B,)``; the distributionally robust
  objective (``jaxseg.losses.dro``) needs per-sample losses, reduce with ``mean`` yourself.
* Masked voxels contribute nothing at all: their logits are replaced by 0 and their labels by
  class 0 *before* anything else is computed (``jnp.where``), so even NaN/inf logits or
  out-of-range "ignore" labels (-1, 255) at masked voxels cannot leak into the value or the
  gradient (the gradient w.r.t. a masked logit is exactly 0).
* A sample with no labelled voxel gets exactly 0 and finite (zero) gradients: every division
  uses the double-``where`` trick (safe denominator in the forward pass, result selected
  afterwards) so that neither the forward nor the backward pass sees 0/0.
* Computations run in at least float32 (bf16 logits are promoted).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["soft_dice", "cross_entropy", "dice_ce", "generalised_jaccard", "mse"]

_SPATIAL = (1, 2, 3)


def _compute_dtype(x):
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _prepare(logits, labels, mask):
    """Sanitise masked voxels and return (logits, one_hot, weights, labelled_bool).

    ``weights`` has shape (B, X, Y, Z, 1) and the logits' compute dtype.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    dtype = _compute_dtype(logits)
    logits = logits.astype(dtype)
    n_classes = logits.shape[-1]
    if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {logits.shape} must be labels {labels.shape} plus a channel axis"
        )
    if mask is None:
        labelled = jnp.ones(labels.shape, dtype=bool)
        weights = jnp.ones(labels.shape, dtype=dtype)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != labels.shape:
            raise ValueError(f"mask {mask.shape} must have the labels' shape {labels.shape}")
        labelled = mask != 0
        weights = jnp.where(labelled, mask.astype(dtype), 0)
        # Double-where: the masked voxels' logits / labels never enter the computation.
        logits = jnp.where(labelled[..., None], logits, 0)
        labels = jnp.where(labelled, labels, 0)
    onehot = jax.nn.one_hot(labels, n_classes, dtype=dtype)
    return logits, onehot, weights[..., None], labelled


def _has_labels(labelled):
    return jnp.any(labelled.reshape(labelled.shape[0], -1), axis=1)


def _safe_div(num, den, ok):
    """num / den where ok, else 0; no 0/0 in either pass."""
    safe_den = jnp.where(ok, den, jnp.ones_like(den))
    return jnp.where(ok, num / safe_den, jnp.zeros_like(num))


def soft_dice(
    logits,
    labels,
    mask=None,
    *,
    smooth: float = 1e-5,
    batch_dice: bool = False,
    include_background: bool = False,
    activation: str = "softmax",
    squared: bool = False,
):
    """Soft Dice *score* on softmax probabilities, averaged over classes -> ``(B,)``.

    nnU-Net's ``SoftDiceLoss`` formula, per class ``c``::

        dc_c = (2 tp_c + smooth) / max(2 tp_c + fp_c + fn_c + smooth, 1e-8)

    with ``tp = sum p t``, ``fp = sum p (1 - t)``, ``fn = sum (1 - p) t`` over the labelled
    voxels of a sample. The score is averaged over classes ``1..C-1`` (or ``0..C-1`` with
    ``include_background=True``). A class absent from both target and prediction scores
    ``smooth/smooth = 1``, as in nnU-Net.

    ``batch_dice=True`` sums tp/fp/fn over the batch too (nnU-Net's batch Dice) and returns that
    single batch value broadcast to ``(B,)``: it is *not* a per-sample quantity, so per-sample
    DRO (hardness-weighted sampling, ``dro_objective``) must use ``batch_dice=False``.

    A sample with no labelled voxel scores exactly 0 (so that ``dice_ce`` is 0 there); with
    ``batch_dice=True`` all samples score 0 only if the whole batch is unlabelled.

    The neonatal reference code's variant (MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)``
    on one-hot targets, Richter & Fetit): ``activation="sigmoid"`` (each class's own sigmoid
    instead of the softmax), ``squared=True`` (denominator ``sum p^2 + sum t^2``, i.e.
    ``dc_c = (2 tp_c + smooth) / (sum p_c^2 + sum t_c + smooth)``) and ``include_background=True``.
    """
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    logits, onehot, w, labelled = _prepare(logits, labels, mask)
    probs = jax.nn.softmax(logits, axis=-1) if activation == "softmax" else jax.nn.sigmoid(logits)
    tp = jnp.sum(probs * onehot * w, axis=_SPATIAL)  # (B, C)
    if squared:  # sum p^2 + sum t^2 (t is one-hot, t^2 = t)
        terms = [jnp.sum(probs * probs * w, axis=_SPATIAL), jnp.sum(onehot * w, axis=_SPATIAL)]
    else:  # 2 tp + fp + fn (= sum p + sum t)
        terms = [2 * tp, jnp.sum(probs * (1 - onehot) * w, axis=_SPATIAL),
                 jnp.sum((1 - probs) * onehot * w, axis=_SPATIAL)]
    has = _has_labels(labelled)  # (B,)
    if batch_dice:
        tp, *terms = (jnp.sum(v, axis=0, keepdims=True) for v in (tp, *terms))
        has = jnp.any(has, keepdims=True)
    nominator = 2 * tp + smooth
    denominator = jnp.maximum(sum(terms[1:], start=terms[0]) + smooth, 1e-8)
    dc = nominator / denominator
    if not include_background:
        dc = dc[:, 1:]
    score = jnp.where(has, jnp.mean(dc, axis=-1), 0)
    return jnp.broadcast_to(score, (onehot.shape[0],))


def cross_entropy(logits, labels, mask=None):
    """Mean over labelled voxels of the per-voxel cross-entropy -> ``(B,)``.

    ``-log softmax(logits)[label]``; a sample without labelled voxel gets 0.
    """
    logits, onehot, w, labelled = _prepare(logits, labels, mask)
    ce = -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)  # (B, X, Y, Z)
    w = w[..., 0]
    num = jnp.sum(ce * w, axis=_SPATIAL)
    den = jnp.sum(w, axis=_SPATIAL)
    return _safe_div(num, den, _has_labels(labelled) & (den > 0))


def dice_ce(logits, labels, mask=None, **dice_kwargs):
    """nnU-Net's ``DC_and_CE_loss``: ``CE - Dice`` per sample -> ``(B,)``.

    ``dice_kwargs`` go to :func:`soft_dice` (``smooth``, ``batch_dice``,
    ``include_background``, ``activation``, ``squared``). MONAI's ``DiceCELoss`` is ``CE + 1 - Dice``:
    the same gradient, the value shifted by 1. An all-unlabelled sample gets exactly 0 (both terms are 0).
    """
    return cross_entropy(logits, labels, mask) - soft_dice(logits, labels, mask, **dice_kwargs)


def generalised_jaccard(logits, labels, mask=None, smooth: float = 1.0):
    """DeepLesionBrain's generalised Jaccard loss on softmax probabilities -> ``(B,)``.

    Over ALL classes ``c`` (background included), per sample::

        w_c = 1 / (1 + sum_i t_ci)
        I   = sum_c w_c sum_i p_ci t_ci
        U   = sum_c w_c (sum_i (p_ci + t_ci) - sum_i p_ci t_ci)
        loss = 1 - (smooth + I) / (smooth + U)

    sums over the labelled voxels ``i``. An all-unlabelled sample gets exactly 0.
    """
    logits, onehot, w, labelled = _prepare(logits, labels, mask)
    probs = jax.nn.softmax(logits, axis=-1)
    inter = jnp.sum(probs * onehot * w, axis=_SPATIAL)  # (B, C)
    total = jnp.sum((probs + onehot) * w, axis=_SPATIAL)
    wc = 1.0 / (1.0 + jnp.sum(onehot * w, axis=_SPATIAL))
    num = smooth + jnp.sum(wc * inter, axis=-1)
    den = smooth + jnp.sum(wc * (total - inter), axis=-1)
    has = _has_labels(labelled)
    return jnp.where(has, 1.0 - _safe_div(num, den, has & (den != 0)), 0)


def mse(pred, target):
    """Squared error of the age head per sample -> ``(B,)``.

    ``pred`` / ``target`` of shape ``(B,)`` or ``(B, 1)`` (any trailing shape is averaged).
    """
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    dtype = jnp.promote_types(jnp.promote_types(pred.dtype, target.dtype), jnp.float32)
    b = pred.shape[0]
    diff = pred.reshape(b, -1).astype(dtype) - target.reshape(b, -1).astype(dtype)
    return jnp.mean(diff * diff, axis=-1)

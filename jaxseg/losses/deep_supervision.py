"""Deep supervision: weighted sum of a per-sample loss over multi-resolution outputs.

Two ways of matching an output to the full-resolution target:

* ``"downsample_targets"`` (nnU-Net, the default): labels AND the labelled-voxel mask are
  downsampled to each output's spatial shape by nearest neighbour. For the integer factors a
  U-Net produces we use strided slicing ``x[:, ::fx, ::fy, ::fz]`` (voxel ``f*i`` of each block,
  the first one): exact, cheap, jit-friendly, and it never mixes classes. nnU-Net's
  order-0 ``resize`` may pick another voxel of the block; for a label map the difference is a
  sub-voxel shift at the coarse resolution. The factor must divide the full shape (asserted).
  The mask is downsampled with the same slicing, so a coarse voxel is labelled iff the
  full-resolution voxel it was taken from is labelled: unlabelled voxels stay ignored at every
  resolution.
* ``"upsample_outputs"`` (neonatal reference code / MONAI DynUNet-style heads): each output's
  logits are resized to the full spatial shape with ``jax.image.resize`` (``"trilinear"`` by
  default, half-pixel centres, i.e. PyTorch ``align_corners=False``) and compared with the
  full-resolution labels and mask. The neonatal reference code's MONAI DynUNet upsamples with
  ``interpolate``'s default, nearest: ``resize_method="nearest"`` (config ``loss.ds_upsample``,
  its default) repeats each coarse voxel over its ``f^3`` block, exactly as PyTorch does for the
  integer factors of a U-Net, so the gradient of a coarse logit is the sum over its block.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ds_weights", "deep_supervision_loss", "downsample_nearest"]


def ds_weights(n_outputs: int, scheme: str = "nnunet") -> np.ndarray:
    """Deep supervision weights, highest resolution first.

    * ``"nnunet"``: ``1/2^i``, the last (lowest-resolution) weight set to 0, normalised to sum 1
      (n=5 -> [0.533, 0.267, 0.133, 0.067, 0]). For ``n_outputs == 1`` the single weight is 1.
    * ``"neonatal"``: ``1, 0.5, 0.25, 0.125, ...`` unnormalised (neonatal paper's reference code).
    """
    if n_outputs < 1:
        raise ValueError("n_outputs must be >= 1")
    w = np.array([1.0 / (2**i) for i in range(n_outputs)], dtype=np.float64)
    if scheme == "nnunet":
        if n_outputs > 1:
            w[-1] = 0.0
        return w / w.sum()
    if scheme == "neonatal":
        return w
    raise ValueError(f"unknown deep supervision scheme {scheme!r} (nnunet | neonatal)")


def _factors(full_shape, out_shape):
    factors = []
    for full, out in zip(full_shape, out_shape):
        if out > full or full % out != 0:
            raise AssertionError(
                f"output spatial shape {tuple(out_shape)} must divide the target shape "
                f"{tuple(full_shape)} by integer factors"
            )
        factors.append(full // out)
    return tuple(factors)


def downsample_nearest(x, spatial_shape):
    """Nearest-neighbour downsampling of ``(B, X, Y, Z, ...)`` by strided slicing."""
    fx, fy, fz = _factors(x.shape[1:4], spatial_shape)
    return x[:, ::fx, ::fy, ::fz]


def _concrete_weights(weights):
    """Weights as floats if they are concrete, else None (traced: cannot skip zeros)."""
    try:
        return [float(w) for w in np.asarray(weights).reshape(-1)]
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def deep_supervision_loss(
    loss_fn: Callable,
    outputs: Sequence,
    labels,
    mask=None,
    weights=None,
    mode: str = "downsample_targets",
    *,
    resize_method: str = "trilinear",
):
    """``sum_i w_i * loss_fn(output_i, labels_i, mask_i)`` -> ``(B,)``.

    ``outputs``: list of logits ``(B, x_i, y_i, z_i, C)``, highest resolution first (a single
    array is treated as a one-element list). ``labels``/``mask``: full resolution
    ``(B, X, Y, Z)``. ``weights``: defaults to ``ds_weights(len(outputs), "nnunet")``.
    ``loss_fn(logits, labels, mask)`` must return a per-sample ``(B,)`` vector (e.g.
    :func:`jaxseg.losses.dice_ce`; bind keyword options with ``functools.partial``).

    Outputs whose weight is exactly 0 are not evaluated at all (nnU-Net's lowest-resolution
    head); this needs concrete (non-traced) weights, the normal case. Traced weights are
    accepted but then every output is evaluated.
    """
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    n = len(outputs)
    if weights is None:
        weights = ds_weights(n, "nnunet")
    concrete = _concrete_weights(weights)
    if concrete is not None and len(concrete) != n:
        raise ValueError(f"{len(concrete)} weights for {n} outputs")
    if mode not in ("downsample_targets", "upsample_outputs"):
        raise ValueError(f"unknown mode {mode!r} (downsample_targets | upsample_outputs)")
    if resize_method not in ("nearest", "trilinear"):
        raise ValueError(f"unknown resize_method {resize_method!r} (nearest | trilinear)")

    labels = jnp.asarray(labels)
    full_spatial = labels.shape[1:4]
    total = None
    for i, out in enumerate(outputs):
        if concrete is not None:
            if concrete[i] == 0.0:
                continue
            w_i = concrete[i]
        else:
            w_i = weights[i]
        out = jnp.asarray(out)
        out_spatial = out.shape[1:4]
        if tuple(out_spatial) == tuple(full_spatial):
            lab_i, mask_i = labels, mask
        elif mode == "downsample_targets":
            lab_i = downsample_nearest(labels, out_spatial)
            mask_i = None if mask is None else downsample_nearest(jnp.asarray(mask), out_spatial)
        else:
            shape = (out.shape[0], *full_spatial, out.shape[-1])
            out = jax.image.resize(out, shape, method=resize_method)
            lab_i, mask_i = labels, mask
        term = w_i * loss_fn(out, lab_i, mask_i)
        total = term if total is None else total + term
    if total is None:  # every weight is zero
        return jnp.zeros((labels.shape[0],), dtype=jnp.result_type(float))
    return total

"""Sliding-window inference (nnU-Net's algorithm, MONAI-style small functional pieces).

A volume larger than the network's patch is covered by overlapping windows (step 0.5 of the
patch by default, :func:`window_starts`); every window's logits are multiplied by a Gaussian
importance map (:func:`gaussian_importance_map`, sigma = patch / 8) and summed; the sum is
divided by the summed weights. Volumes smaller than the patch are zero-padded (symmetrically,
like nnU-Net's ``pad_nd_image``) and the result is cropped back. Optional mirror test-time
augmentation averages the logits over every subset of the mirrored axes (8 passes for all three
axes), and several parameter sets (folds, checkpoints) are ensembled by averaging logits
(:func:`average_apply_fns`, :func:`sliding_window_ensemble`, :func:`ensemble_logits`).

An ``apply_fn`` maps a batch of windows ``(n, px, py, pz, C)`` to logits ``(n, px, py, pz, K)``,
or to a pair ``(logits, age)`` with ``age`` of shape ``(n,)`` (AgeU-Net): the per-case age is the
mean of the window predictions (over mirror passes and ensemble members too). It should be a
jitted function (see :func:`jaxseg.inference.predict.make_apply_fn`); it is always called with
the same batch shape, ``min(window_batch, number of windows)`` windows, the last batch being
padded with zero windows whose outputs are ignored.

Accumulation (``accumulate=``): ``"host"`` sums ``logits x weight`` into a float32 numpy array
(the default on the CPU backend, where host and device memory are the same); ``"device"`` keeps
the float32 accumulator on the accelerator and adds each batch with one jitted, buffer-donating
scatter (the default on GPU/TPU: no per-batch transfer of window logits). Either way the summed
weights are a host array of the padded spatial shape, computed once, and the division happens on
the host. Memory for a 256^3 volume with K classes: 256^3 x K x 4 bytes (671 MB for K = 10) for
the accumulator, plus 67 MB for the weights.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "gaussian_importance_map",
    "window_steps",
    "window_starts",
    "pad_to_patch",
    "mirror_subsets",
    "mirror_tta",
    "average_apply_fns",
    "sliding_window_logits",
    "sliding_window_ensemble",
    "ensemble_logits",
]

Triple = tuple[int, int, int]


def _triple(value: Sequence[int], name: str) -> Triple:
    try:
        t = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be 3 integers, got {value!r}") from None
    if len(t) != 3 or any(v < 1 for v in t) or any(int(v) != v for v in value):
        raise ValueError(f"{name} must be 3 positive integers, got {value!r}")
    return t  # type: ignore[return-value]


# --------------------------------------------------------------------------- importance map


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float | Sequence[float] = 1.0 / 8, *,
                            nnunet_centre: bool = False) -> np.ndarray:
    """nnU-Net's Gaussian importance map, float32 of shape ``patch_size``.

    ``exp(-d^2 / (2 sigma^2))`` per axis with ``sigma = patch * sigma_scale``, normalised to a
    maximum of 1; zeros (underflow at very small ``sigma_scale``) are replaced by the smallest
    nonzero value so that every voxel of a window gets some weight.

    By default the Gaussian is centred exactly in the patch (at ``(p - 1) / 2``, as MONAI's
    ``compute_importance_map``), so the map is symmetric under flipping every axis.
    ``nnunet_centre=True`` reproduces nnU-Net bit for bit in shape: a delta at voxel ``p // 2``
    filtered with ``scipy.ndimage.gaussian_filter`` (truncated at 4 sigma), which is half a voxel
    off-centre for even patch sizes. Both agree for odd sizes.
    """
    patch = _triple(patch_size, "patch_size")
    scales = (sigma_scale,) * 3 if np.isscalar(sigma_scale) else tuple(sigma_scale)  # type: ignore[arg-type]
    if len(scales) != 3 or any(not (float(s) > 0) for s in scales):
        raise ValueError(f"sigma_scale must be > 0 (one value or 3), got {sigma_scale!r}")
    sigmas = [p * float(s) for p, s in zip(patch, scales)]
    if nnunet_centre:
        from scipy.ndimage import gaussian_filter

        tmp = np.zeros(patch, dtype=np.float64)
        tmp[tuple(p // 2 for p in patch)] = 1.0
        g = gaussian_filter(tmp, sigmas, 0, mode="constant", cval=0)
    else:
        axes = [np.exp(-((np.arange(p, dtype=np.float64) - (p - 1) / 2.0) ** 2) / (2.0 * s * s))
                for p, s in zip(patch, sigmas)]
        g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    g = (g / g.max()).astype(np.float32)
    zero = g == 0
    if zero.any():
        g[zero] = g[~zero].min()
    return g


# --------------------------------------------------------------------------- window positions


def window_steps(image_shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Per-axis window start positions (nnU-Net's ``compute_steps_for_sliding_window``).

    The target step is ``patch * step`` voxels; the number of windows per axis is the smallest
    that reaches the far edge with that step, and the starts are spread evenly (rounded) from 0 to
    ``image - patch``, so the first window starts at 0 and the last ends exactly at the edge.
    The image must be at least as large as the patch on every axis (see :func:`pad_to_patch`).
    """
    shape = _triple(tuple(image_shape)[:3], "image_shape")
    patch = _triple(patch_size, "patch_size")
    if not 0.0 < float(step) <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step!r}")
    small = [i for i in range(3) if shape[i] < patch[i]]
    if small:
        raise ValueError(f"image shape {shape} is smaller than the patch {patch} on axes {small}; pad it first "
                         f"(pad_to_patch)")
    steps = []
    for size, p in zip(shape, patch):
        target = p * float(step)
        n = int(math.ceil((size - p) / target)) + 1
        max_start = size - p
        actual = max_start / (n - 1) if n > 1 else 0.0
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


def window_starts(image_shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[Triple]:
    """All window start corners ``(x, y, z)``, x slowest (the order nnU-Net visits them)."""
    return [tuple(s) for s in itertools.product(*window_steps(image_shape, patch_size, step))]  # type: ignore[misc]


def pad_to_patch(image: np.ndarray, patch_size: Sequence[int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Zero-pad the spatial axes of ``image`` (X, Y, Z, ...) to at least ``patch_size``,
    symmetrically (``diff // 2`` before, the rest after, as nnU-Net's ``pad_nd_image``).
    Returns the padded array (the input itself when no padding is needed) and the
    ``(before, after)`` padding per spatial axis."""
    patch = _triple(patch_size, "patch_size")
    pads = []
    for size, p in zip(image.shape[:3], patch):
        diff = max(p - int(size), 0)
        pads.append((diff // 2, diff - diff // 2))
    if not any(a or b for a, b in pads):
        return image, pads
    return np.pad(image, pads + [(0, 0)] * (image.ndim - 3), mode="constant", constant_values=0), pads


# --------------------------------------------------------------------------- apply_fn wrappers


def _split_output(out: Any) -> tuple[Any, Any]:
    """(logits, age | None) from an apply_fn's output: an array, a ``(logits, age)`` pair, or a
    model output with ``.seg`` (highest resolution first) and ``.age``."""
    if hasattr(out, "seg") and hasattr(out, "age"):
        seg = out.seg
        return (seg[0] if isinstance(seg, (list, tuple)) else seg), out.age
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"apply_fn returned a sequence of {len(out)} items; expected logits or (logits, age)")
        return out[0], out[1]
    return out, None


def _mean_outputs(outs: list, what: str):
    """Mean logits (and mean age) of several (logits, age | None) pairs."""
    has_age = [a is not None for _, a in outs]
    if any(has_age) and not all(has_age):
        raise ValueError(f"{what} disagree: some predict an age, others do not")
    logits = outs[0][0]
    for lg, _ in outs[1:]:
        logits = logits + lg
    age = None
    if all(has_age):
        age = outs[0][1]
        for _, a in outs[1:]:
            age = age + a
        age = age / len(outs)
    return logits / len(outs), age


def mirror_subsets(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``mirror_axes`` (spatial axes 0, 1, 2), the identity ``()`` first."""
    axes = tuple(sorted({int(a) for a in mirror_axes}))
    if any(a not in (0, 1, 2) for a in axes) or len(axes) != len(tuple(mirror_axes)):
        raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2, got {tuple(mirror_axes)!r}")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def mirror_tta(apply_fn: Callable, mirror_axes: Sequence[int]) -> Callable:
    """Wrap ``apply_fn`` with mirror test-time augmentation: for every subset of
    ``mirror_axes`` (identity included) flip the input windows, run, flip the logits back; return
    the mean logits (and the mean age when ``apply_fn`` predicts one). Flips run as jnp ops on
    the device; ``apply_fn`` itself stays the jitted unit."""
    subsets = mirror_subsets(mirror_axes)
    if len(subsets) == 1:
        return apply_fn

    def tta_fn(x):
        x = jnp.asarray(x)
        outs = []
        for axes in subsets:
            bax = tuple(a + 1 for a in axes)  # batch axis first
            logits, age = _split_output(apply_fn(jnp.flip(x, bax) if axes else x))
            outs.append((jnp.flip(logits, bax) if axes else logits, age))
        return _mean_outputs(outs, "mirror passes")

    return tta_fn


def average_apply_fns(apply_fns: Callable | Sequence[Callable]) -> Callable:
    """One apply_fn that returns the mean logits (and mean age) of several, e.g. the five folds
    of a cross-validation. Averaging per window is exactly averaging the members' sliding-window
    logits (the Gaussian weighting is linear), with one accumulator instead of one per member."""
    fns = [apply_fns] if callable(apply_fns) else list(apply_fns)
    if not fns:
        raise ValueError("no apply_fn given (an empty ensemble)")
    if not all(callable(f) for f in fns):
        raise TypeError("apply_fns must be callables")
    if len(fns) == 1:
        return fns[0]

    def mean_fn(x):
        return _mean_outputs([_split_output(f(x)) for f in fns], "ensemble members")

    return mean_fn


# --------------------------------------------------------------------------- the sliding window


def _device_accumulate(acc, logits, weight, starts, valid):
    """acc (X, Y, Z, K) += logits[i] * weight at starts[i], for every window i with valid[i]."""
    size = logits.shape[1:]

    def body(i, acc):
        s = starts[i]
        corner = (s[0], s[1], s[2], 0)
        cur = jax.lax.dynamic_slice(acc, corner, size)
        return jax.lax.dynamic_update_slice(acc, cur + logits[i] * (weight * valid[i]), corner)

    return jax.lax.fori_loop(0, logits.shape[0], body, acc)


_device_accumulate_jit = jax.jit(_device_accumulate, donate_argnums=0)


def sliding_window_logits(
    apply_fn: Callable,
    image: np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    *,
    step: float = 0.5,
    sigma_scale: float = 1.0 / 8,
    window_batch: int = 4,
    mirror_axes: Sequence[int] = (),
    accumulate: str = "auto",
    importance_map: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict]:
    """Sliding-window logits of a whole volume.

    ``image``: (X, Y, Z, C) array (cast to float32). ``apply_fn``: windows (n, px, py, pz, C) ->
    logits (n, px, py, pz, ``num_classes``) or (logits, age (n,)). Returns ``(logits, extra)``:
    logits float32 numpy (X, Y, Z, num_classes) = sum over windows of logits x Gaussian divided by
    the summed Gaussians; ``extra`` = {"age": mean age over the windows (and mirror passes) or
    None, "n_windows", "starts" (on the padded grid), "padding" ((before, after) per axis),
    "batch_size"}.

    ``step``: window step as a fraction of the patch (nnU-Net 0.5). ``sigma_scale``: Gaussian
    sigma / patch (1/8). ``window_batch``: windows per apply_fn call. ``mirror_axes``: spatial
    axes for mirror TTA (``(0, 1, 2)``: nnU-Net's 8 passes). ``accumulate``: ``"host"``,
    ``"device"`` or ``"auto"`` (host on the CPU backend, device elsewhere; see the module
    docstring). ``importance_map``: a precomputed map of shape ``patch_size`` (else
    :func:`gaussian_importance_map`). ``progress``: a tqdm bar over the window batches.
    """
    patch = _triple(patch_size, "patch_size")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(f"image must be (X, Y, Z, C) channels-last, got shape {image.shape}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if int(window_batch) < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    if accumulate == "auto":
        accumulate = "host" if jax.default_backend() == "cpu" else "device"
    if accumulate not in ("host", "device"):
        raise ValueError(f"accumulate must be 'auto', 'host' or 'device', got {accumulate!r}")
    k = int(num_classes)
    fn = mirror_tta(apply_fn, mirror_axes)

    if importance_map is None:
        weight = gaussian_importance_map(patch, sigma_scale)
    else:
        weight = np.asarray(importance_map, dtype=np.float32)
        if weight.shape != patch:
            raise ValueError(f"importance_map shape {weight.shape} != patch_size {patch}")
        if not np.all(weight > 0):
            raise ValueError("importance_map must be > 0 everywhere (replace zeros by the smallest nonzero value)")

    orig_shape = image.shape[:3]
    padded, pads = pad_to_patch(image, patch)
    pshape = padded.shape[:3]
    starts = window_starts(pshape, patch, step)
    n_win = len(starts)
    bsz = min(int(window_batch), n_win)

    wsum = np.zeros(pshape, dtype=np.float32)
    for s in starts:
        wsum[s[0]:s[0] + patch[0], s[1]:s[1] + patch[1], s[2]:s[2] + patch[2]] += weight

    ages: list[Any] = []
    batches = _window_logits(fn, padded, starts, patch, bsz, k, ages, progress)
    accumulate_fn = _accumulate_on_host if accumulate == "host" else _accumulate_on_device
    out = accumulate_fn(batches, (*pshape, k), weight, bsz)
    np.divide(out, wsum[..., None], out=out)
    if any(a or b for a, b in pads):
        sl = tuple(slice(a, a + n) for (a, _), n in zip(pads, orig_shape))
        out = np.ascontiguousarray(out[sl])

    mean_age = None
    if ages:
        vals = np.concatenate([np.asarray(a, dtype=np.float64)[:n] for a, n in ages])
        mean_age = float(vals.mean())
    extra = {"age": mean_age, "n_windows": n_win, "starts": starts, "padding": pads, "batch_size": bsz}
    return out, extra


def _window_logits(fn, padded, starts, patch, bsz, k, ages: list, progress: bool) -> Iterator[tuple]:
    """(logits on the device (bsz, *patch, k), the batch's window starts, n valid) per batch of `bsz`
    windows of `padded`, the last one filled with zero windows; each batch's ages (bsz,) and its n valid
    are appended to `ages`. The first batch's output shapes are checked against `k` and `bsz`."""
    from tqdm.auto import tqdm

    n_batches = -(-len(starts) // bsz)
    for b in tqdm(range(n_batches), desc="windows", unit="batch", disable=not progress, leave=False):
        bstarts = starts[b * bsz:(b + 1) * bsz]
        nvalid = len(bstarts)
        # A fresh buffer per batch: on the CPU backend jnp.asarray may alias numpy memory, and the
        # computation runs asynchronously, so a reused buffer could be overwritten while read.
        buf = np.zeros((bsz, *patch, padded.shape[3]), dtype=np.float32)
        for i, (x, y, z) in enumerate(bstarts):
            buf[i] = padded[x:x + patch[0], y:y + patch[1], z:z + patch[2]]
        logits, age = _split_output(fn(jnp.asarray(buf)))
        if b == 0:
            want = (bsz, *patch, k)
            if tuple(logits.shape) != want:
                raise ValueError(f"apply_fn returned logits of shape {tuple(logits.shape)} for windows of shape "
                                 f"{buf.shape}; expected {want} (num_classes={k})")
            if age is not None and int(np.prod(age.shape)) != bsz:
                raise ValueError(f"apply_fn returned an age of shape {tuple(age.shape)}; expected ({bsz},)")
        if age is not None:
            ages.append((jnp.reshape(age, (bsz,)), nvalid))
        yield logits, bstarts, nvalid


def _accumulate_on_host(batches, shape, weight, bsz) -> np.ndarray:
    """Sum of logits x weight per window in a numpy array of `shape` (X, Y, Z, K). The host adds a batch
    only after the next one was dispatched, so the device computes while the host accumulates."""
    acc = np.zeros(shape, dtype=np.float32)
    weight4 = weight[..., None]
    patch = weight.shape

    def add(logits_dev, bstarts, nvalid):
        logits_np = np.asarray(logits_dev)
        for i in range(nvalid):
            x, y, z = bstarts[i]
            acc[x:x + patch[0], y:y + patch[1], z:z + patch[2]] += logits_np[i] * weight4

    pending = None
    for batch in batches:
        if pending is not None:
            add(*pending)
        pending = batch
    if pending is not None:
        add(*pending)
    return acc


def _accumulate_on_device(batches, shape, weight, bsz) -> np.ndarray:
    """Sum of logits x weight per window in a device array of `shape` (X, Y, Z, K), donated from batch
    to batch; the padding windows of the last batch are masked out. Returns a writeable numpy copy."""
    acc = jnp.zeros(shape, dtype=jnp.float32)
    weight_dev = jnp.asarray(weight)[..., None]
    for logits, bstarts, nvalid in batches:
        st = np.zeros((bsz, 3), dtype=np.int32)
        st[:nvalid] = bstarts
        valid = np.zeros((bsz,), dtype=np.float32)
        valid[:nvalid] = 1.0
        acc = _device_accumulate_jit(acc, jnp.asarray(logits, jnp.float32), weight_dev, jnp.asarray(st),
                                     jnp.asarray(valid))
    out = np.asarray(acc, dtype=np.float32)
    return out if out.flags.writeable else out.copy()


def sliding_window_ensemble(apply_fns: Sequence[Callable], image: np.ndarray, patch_size: Sequence[int],
                            num_classes: int, **kwargs) -> tuple[np.ndarray, dict]:
    """:func:`sliding_window_logits` with the mean of several apply_fns (folds / checkpoints):
    the mean of their sliding-window logits (and ages), computed with one accumulator."""
    return sliding_window_logits(average_apply_fns(apply_fns), image, patch_size, num_classes, **kwargs)


def ensemble_logits(list_of_logits: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of several logit volumes of the same shape (float32), e.g. per-fold predictions."""
    arrs = list(list_of_logits)
    if not arrs:
        raise ValueError("ensemble_logits: empty list")
    shape = np.shape(arrs[0])
    out = np.array(arrs[0], dtype=np.float32, copy=True)
    for a in arrs[1:]:
        if np.shape(a) != shape:
            raise ValueError(f"ensemble_logits: shapes differ ({shape} vs {np.shape(a)})")
        out += np.asarray(a, dtype=np.float32)
    out /= len(arrs)
    return out

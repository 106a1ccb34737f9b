"""Building blocks shared by the U-Nets: convolutions (two implementations), norms, activations.

Everything is channels-last (N, X, Y, Z, C). Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

ConvImpl = Literal["auto", "xla", "im2col"]
Triple = tuple[int, int, int]

# nnU-Net initialises with kaiming_normal_(a=1e-2): std = sqrt(2 / (1 + a^2) / fan_in), untruncated.
kaiming_normal = nn.initializers.variance_scaling(2.0 / (1.0 + 0.01**2), "fan_in", "normal")


# benchmarks/results/model_cpu.json (2-core CPU), fwd+bwd of a 3x3x3 conv, XLA vs im2col: 0.47 vs 0.23 s at
# 8->8 channels (2x48^3), 0.53 vs 0.41 s at 32->32 (2x32^3); the whole 64^3 U-Net step: 79 vs 22 s. Layers
# with fewer input channels (the 1-2 channel image) were not measured and stay on XLA's.
IM2COL_MIN_CHANNELS = 8
# Autodiff keeps every kernel row's patch tensor (9x the input) for the weight gradient: the compact
# DeepLesionBrain U-Net at 96^3 asked for a 40 GB buffer. Above this size per row, `auto` takes XLA's.
IM2COL_MAX_ROW_BYTES = 2 * 2**30


def resolve_conv_impl(impl: ConvImpl, in_channels: int | None = None,
                      row_bytes: int | None = None) -> Literal["xla", "im2col"]:
    """`auto`: XLA's convolution (cuDNN) off CPU; on CPU im2col for layers with at least
    IM2COL_MIN_CHANNELS input channels, where it measured faster, unless one kernel row's patch tensor
    would exceed IM2COL_MAX_ROW_BYTES."""
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        if row_bytes is not None and row_bytes > IM2COL_MAX_ROW_BYTES:
            return "xla"
        return "im2col" if in_channels is None or in_channels >= IM2COL_MIN_CHANNELS else "xla"
    return impl


def _as_triple(v: int | Sequence[int]) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 values, got {v!r}")
    return t  # type: ignore[return-value]


def conv3d(x: jax.Array, kernel: jax.Array, strides: Triple, impl: Literal["xla", "im2col"],
           padding: Literal["same", "valid"] = "same") -> jax.Array:
    """3D convolution. "same" is PyTorch-style symmetric padding k//2 (nnU-Net's and MONAI's), so that
    a stride-2 conv on an even size halves it exactly and imported torch weights line up.

    x: (N, X, Y, Z, Cin); kernel: (kx, ky, kz, Cin, Cout).
    """
    ks = kernel.shape[:3]
    pad = [(k // 2, k // 2) if padding == "same" else (0, 0) for k in ks]
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=strides, padding=pad,
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return _conv3d_im2col(x, kernel, strides, pad)


def _conv3d_im2col(x, kernel, strides, pad):
    # One einsum per kernel offset along the first axis over the (ky*kz) shifted slices concatenated
    # on channels: the same arithmetic as full im2col with a third of its memory.
    kx, ky, kz, cin, cout = kernel.shape
    xp = jnp.pad(x, [(0, 0), *pad, (0, 0)])
    out = [(xp.shape[1 + a] - kernel.shape[a]) // strides[a] + 1 for a in range(3)]
    sx, sy, sz = strides
    acc = None
    for i in range(kx):
        cols = [
            xp[:, i: i + (out[0] - 1) * sx + 1: sx,
               j: j + (out[1] - 1) * sy + 1: sy,
               k: k + (out[2] - 1) * sz + 1: sz, :]
            for j in range(ky) for k in range(kz)
        ]
        patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
        w = kernel[i].reshape(ky * kz * cin, cout)
        y = jnp.einsum("nxyzk,ko->nxyzo", patches, w)
        acc = y if acc is None else acc + y
    return acc


class Conv3D(nn.Module):
    """3D convolution with Kaiming init and a selectable implementation."""

    features: int
    kernel_size: Triple = (3, 3, 3)
    strides: Triple = (1, 1, 1)
    use_bias: bool = True
    padding: Literal["same", "valid"] = "same"
    conv_impl: ConvImpl = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ks, st = _as_triple(self.kernel_size), _as_triple(self.strides)
        kernel = self.param("kernel", kaiming_normal, (*ks, x.shape[-1], self.features), jnp.float32)
        row_bytes = int(np.prod(x.shape)) * ks[1] * ks[2] * jnp.dtype(self.dtype).itemsize
        impl = resolve_conv_impl(self.conv_impl, x.shape[-1], row_bytes)
        y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), st, impl, self.padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class Norm(nn.Module):
    """InstanceNorm (one group per channel) or GroupNorm, statistics in float32, affine."""

    kind: Literal["instance", "group"] = "instance"
    groups: int = 8
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        # GroupNorm(8) cannot split the 2 input channels of DeepLesionBrain's first layer: use gcd.
        g = c if self.kind == "instance" else int(np.gcd(self.groups, c))
        xf = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = xf.mean(axis=axes, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return (y * scale + bias).astype(x.dtype)


def activation(kind: Literal["leaky_relu", "relu"]):
    if kind == "leaky_relu":
        return functools.partial(jax.nn.leaky_relu, negative_slope=0.01)
    if kind == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {kind!r}; choose leaky_relu or relu")


def pixel_shuffle(x: jax.Array, factors: Triple) -> jax.Array:
    """(N, X, Y, Z, C*fx*fy*fz) -> (N, X*fx, Y*fy, Z*fz, C), the 3D depth-to-space."""
    n, X, Y, Z, cf = x.shape
    fx, fy, fz = factors
    c = cf // (fx * fy * fz)
    x = x.reshape(n, X, Y, Z, fx, fy, fz, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(n, X * fx, Y * fy, Z * fz, c)


def upsample_nearest(x: jax.Array, factors: Triple) -> jax.Array:
    for axis, f in zip((1, 2, 3), factors):
        if f > 1:
            x = jnp.repeat(x, f, axis=axis)
    return x


class Upsample(nn.Module):
    """Learned x`factors` upsampling to `features` channels.

    transpose: transposed conv with kernel = stride (nnU-Net, DynUNet). Its XLA gradient is slow on
      GPU (jax issue 31662); with kernel == stride it is computed here as a per-voxel matmul followed
      by depth-to-space, which is the same linear map, so it needs no transposed conv at all.
    pixel_shuffle: 3x3x3 conv to features*prod(factors), then depth-to-space.
    resize_conv: nearest upsampling, then a 3x3x3 conv (Odena et al.: avoids checkerboard artefacts).
    """

    features: int
    factors: Triple
    mode: Literal["transpose", "resize_conv", "pixel_shuffle"] = "transpose"
    conv_impl: ConvImpl = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        f = _as_triple(self.factors)
        nf = int(np.prod(f))
        if self.mode == "transpose":
            # kernel (fx, fy, fz, Cin, Cout) as PyTorch's ConvTranspose3d weight (Cin, Cout, fx, fy, fz)
            # transposed: output voxel (o*f + d) = x[o] @ kernel[d] + bias.
            kernel = self.param("kernel", kaiming_normal, (*f, x.shape[-1], self.features), jnp.float32)
            w = kernel.reshape(nf, x.shape[-1], self.features).transpose(1, 0, 2).reshape(x.shape[-1], -1)
            y = jnp.einsum("nxyzc,ck->nxyzk", x.astype(self.dtype), w.astype(self.dtype))
            y = pixel_shuffle(y, f)
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            return y + bias.astype(self.dtype)
        if self.mode == "pixel_shuffle":
            y = Conv3D(self.features * nf, (3, 3, 3), conv_impl=self.conv_impl, dtype=self.dtype, name="conv")(x)
            return pixel_shuffle(y, f)
        if self.mode == "resize_conv":
            return Conv3D(self.features, (3, 3, 3), conv_impl=self.conv_impl, dtype=self.dtype,
                          name="conv")(upsample_nearest(x, f))
        raise ValueError(f"unknown upsample mode {self.mode!r}; choose transpose, resize_conv or pixel_shuffle")

"""Building blocks shared by the U-Nets: convolutions, norms, activations, upsampling.

Everything is channels-last (N, X, Y, Z, C). Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Triple = tuple[int, int, int]
StridedConv = Literal["native", "space_to_depth", "space_to_depth_grad"]

# nnU-Net initialises with kaiming_normal_(a=1e-2): std = sqrt(2 / (1 + a^2) / fan_in), untruncated.
kaiming_normal = nn.initializers.variance_scaling(2.0 / (1.0 + 0.01**2), "fan_in", "normal")

# How a strided convolution is computed, per backend:
#   native               XLA's strided conv; its input gradient is a conv with lhs dilation, which XLA:CPU
#                        (oneDNN or not) runs 10-40x slower than the forward pass (benchmarks/conv_cpu.py);
#   space_to_depth       forward and gradients as a stride-1 conv on the space-to-depth folded input;
#   space_to_depth_grad  XLA's forward (oneDNN's strided forward is 2-7x faster than the folded one on CPU)
#                        with the gradients of the space-to-depth form: no lhs dilation anywhere.
# cuDNN has dedicated backward-data kernels; benchmarks/gpu.py measures the three on a GPU.
STRIDED_CONV: dict[str, StridedConv] = {"cpu": "space_to_depth_grad", "gpu": "native", "tpu": "native"}


def _as_triple(v: int | Sequence[int]) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 values, got {v!r}")
    return t  # type: ignore[return-value]


def conv3d(x: jax.Array, kernel: jax.Array, strides: Triple = (1, 1, 1),
           padding: Literal["same", "valid"] = "same", strided: StridedConv | None = None) -> jax.Array:
    """3D convolution. "same" is PyTorch-style symmetric padding k//2 (nnU-Net's and MONAI's), so that
    a stride-2 conv on an even size halves it exactly and imported torch weights line up.

    x: (N, X, Y, Z, Cin); kernel: (kx, ky, kz, Cin, Cout). A strided conv is computed as
    `STRIDED_CONV[backend]` unless `strided` says otherwise; all give the same numbers.
    """
    strides = _as_triple(strides)
    pad = tuple((k // 2, k // 2) if padding == "same" else (0, 0) for k in kernel.shape[:3])
    if padding == "same" and x.shape[1:4] == (1, 1, 1) and all(k % 2 for k in kernel.shape[:3]):
        # A one-voxel input (a U-Net bottleneck on a small tile) meets only the kernel's centre tap: a
        # matmul. Exact, and it keeps out the degenerate conv whose vmapped gradient aborts XLA:CPU's
        # oneDNN rewrite with an illegal instruction (jax 0.12, batch 1).
        centre = kernel[kernel.shape[0] // 2, kernel.shape[1] // 2, kernel.shape[2] // 2]
        return jnp.einsum("nxyzc,co->nxyzo", x, centre)
    how = strided or STRIDED_CONV.get(jax.default_backend(), "native")
    if strides == (1, 1, 1) or how == "native":
        return _conv3d_native(x, kernel, strides, pad)
    if how == "space_to_depth":
        return _conv3d_space_to_depth(x, kernel, strides, pad)
    if how == "space_to_depth_grad":
        return _conv3d_native_s2d_grad(x, kernel, strides, pad)
    raise ValueError(f"unknown strided-conv formulation {how!r}; choose native, space_to_depth or "
                     "space_to_depth_grad")


def _conv3d_native(x, kernel, strides, pad):
    return jax.lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pad,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _conv3d_space_to_depth(x, kernel, strides, pad):
    """The strided conv as a stride-1 conv: fold each s-block of the padded input into channels and the
    kernel likewise. Tap t = a*s + r of the kernel reads padded input o*s + t = (o + a)*s + r, i.e. tap
    (a, r) of a ceil(k/s) kernel over the folded input; taps past k are zero."""
    n, *size, cin = x.shape
    ks, cout = kernel.shape[:3], kernel.shape[-1]
    out = [(size[a] + sum(pad[a]) - ks[a]) // strides[a] + 1 for a in range(3)]
    taps = [-(-ks[a] // strides[a]) for a in range(3)]
    # padded length a multiple of s and just long enough; negative high padding crops unused voxels
    length = [strides[a] * (out[a] + taps[a] - 1) for a in range(3)]
    cfg = [(0, 0, 0), *[(pad[a][0], length[a] - size[a] - pad[a][0], 0) for a in range(3)], (0, 0, 0)]
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
    (sx, sy, sz), (lx, ly, lz) = strides, [length[a] // strides[a] for a in range(3)]
    fold = sx * sy * sz
    xp = xp.reshape(n, lx, sx, ly, sy, lz, sz, cin).transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(n, lx, ly, lz, fold * cin)
    w = jnp.pad(kernel, [(0, taps[a] * strides[a] - ks[a]) for a in range(3)] + [(0, 0), (0, 0)])
    w = w.reshape(taps[0], sx, taps[1], sy, taps[2], sz, cin, cout).transpose(0, 2, 4, 1, 3, 5, 6, 7)
    w = w.reshape(*taps, fold * cin, cout)
    return jax.lax.conv_general_dilated(xp, w, (1, 1, 1), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv3d_native_s2d_grad(x, kernel, strides, pad):
    return _conv3d_native(x, kernel, strides, pad)


def _native_s2d_grad_fwd(x, kernel, strides, pad):
    return _conv3d_native(x, kernel, strides, pad), (x, kernel)


def _native_s2d_grad_bwd(strides, pad, res, g):
    # the conv is linear: the folded form's VJP needs only x and the kernel (XLA drops its unused forward)
    return jax.vjp(lambda x, k: _conv3d_space_to_depth(x, k, strides, pad), *res)[1](g)


_conv3d_native_s2d_grad.defvjp(_native_s2d_grad_fwd, _native_s2d_grad_bwd)


class Conv3D(nn.Module):
    """3D convolution with nnU-Net's Kaiming init; see `conv3d`."""

    features: int
    kernel_size: Triple = (3, 3, 3)
    strides: Triple = (1, 1, 1)
    use_bias: bool = True
    padding: Literal["same", "valid"] = "same"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ks, st = _as_triple(self.kernel_size), _as_triple(self.strides)
        kernel = self.param("kernel", kaiming_normal, (*ks, x.shape[-1], self.features), jnp.float32)
        y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), st, self.padding)
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
            y = Conv3D(self.features * nf, (3, 3, 3), dtype=self.dtype, name="conv")(x)
            return pixel_shuffle(y, f)
        if self.mode == "resize_conv":
            return Conv3D(self.features, (3, 3, 3), dtype=self.dtype, name="conv")(upsample_nearest(x, f))
        raise ValueError(f"unknown upsample mode {self.mode!r}; choose transpose, resize_conv or pixel_shuffle")

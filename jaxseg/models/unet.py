"""The nnU-Net / DynUNet family of 3D U-Nets, with deep supervision and the AgeU-Net head.

Parameter tree (names are what fine-tuning strategies select on):
  encoder_0 .. encoder_{n-2}   encoder stages, highest resolution first
  bottleneck                   the last, lowest-resolution stage
  decoder_{n-2} .. decoder_0   decoder stage i upsamples to encoder level i and merges its skip
  head_0 .. head_{n-2}         1x1x1 segmentation heads; head_i reads decoder_i
  age_head                     AgeU-Net regression head on the bottleneck (optional)
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxseg.models.layers import Conv3D, Norm, Triple, Upsample, activation
from jaxseg.models.topology import Topology


class UNetOutput(NamedTuple):
    seg: list  # logits per supervised resolution, highest first; float32 (N, X, Y, Z, classes)
    age: jax.Array | None  # (N,) when the age head is on


class ConvNormAct(nn.Module):
    features: int
    kernel: Triple
    stride: Triple = (1, 1, 1)
    norm: Literal["instance", "group"] = "instance"
    norm_groups: int = 8
    act: Literal["leaky_relu", "relu"] = "leaky_relu"
    conv_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Conv3D(self.features, self.kernel, self.stride, self.conv_bias,
                   dtype=self.dtype, name="conv")(x)
        x = Norm(self.norm, self.norm_groups, name="norm")(x)
        return activation(self.act)(x)


class ResidualBlock(nn.Module):
    """MONAI's UnetResBlock: conv-norm-act-conv-norm, plus a 1x1x1 conv + norm on the skip path when
    the channels or the stride change, add, act."""

    features: int
    kernel: Triple
    stride: Triple = (1, 1, 1)
    norm: Literal["instance", "group"] = "instance"
    norm_groups: int = 8
    act: Literal["leaky_relu", "relu"] = "leaky_relu"
    conv_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype)
        y = Conv3D(self.features, self.kernel, self.stride, self.conv_bias, name="conv1", **kw)(x)
        y = activation(self.act)(Norm(self.norm, self.norm_groups, name="norm1")(y))
        y = Conv3D(self.features, self.kernel, (1, 1, 1), self.conv_bias, name="conv2", **kw)(y)
        y = Norm(self.norm, self.norm_groups, name="norm2")(y)
        if x.shape[-1] != self.features or tuple(self.stride) != (1, 1, 1):
            x = Conv3D(self.features, (1, 1, 1), self.stride, self.conv_bias, name="conv3", **kw)(x)
            x = Norm(self.norm, self.norm_groups, name="norm3")(x)
        return activation(self.act)(y + x)


class Stage(nn.Module):
    """One resolution level: two conv blocks (the first strided), or one residual block."""

    features: int
    kernel: Triple
    stride: Triple
    block: Literal["plain", "residual"] = "plain"
    norm: Literal["instance", "group"] = "instance"
    norm_groups: int = 8
    act: Literal["leaky_relu", "relu"] = "leaky_relu"
    conv_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(norm=self.norm, norm_groups=self.norm_groups, act=self.act, conv_bias=self.conv_bias,
                  dtype=self.dtype)
        if self.block == "residual":
            return ResidualBlock(self.features, self.kernel, self.stride, name="res", **kw)(x)
        if self.block != "plain":
            raise ValueError(f"unknown block {self.block!r}; choose plain or residual")
        x = ConvNormAct(self.features, self.kernel, self.stride, name="block_0", **kw)(x)
        return ConvNormAct(self.features, self.kernel, (1, 1, 1), name="block_1", **kw)(x)


class DecoderStage(nn.Module):
    """Upsample, concatenate the skip, then a `Stage` at stride 1."""

    features: int
    kernel: Triple
    up_factors: Triple
    upsample: Literal["transpose", "resize_conv", "pixel_shuffle"] = "transpose"
    block: Literal["plain", "residual"] = "plain"
    norm: Literal["instance", "group"] = "instance"
    norm_groups: int = 8
    act: Literal["leaky_relu", "relu"] = "leaky_relu"
    conv_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, skip):
        x = Upsample(self.features, self.up_factors, self.upsample, dtype=self.dtype,
                     name="up")(x)
        x = jnp.concatenate([x, skip], axis=-1)
        return Stage(self.features, self.kernel, (1, 1, 1), self.block, self.norm, self.norm_groups, self.act,
                     self.conv_bias, self.dtype, name="stage")(x)


class AgeHead(nn.Module):
    """AgeU-Net (neonatal paper): valid 3x3x3 conv 320 -> 512 + PReLU, flatten, linear -> 1, PReLU."""

    features: int = 512
    offset: float = 0.0  # output = PReLU(offset + scale * dense): a fixed affine, no parameters
    scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32)
        if min(x.shape[1:4]) < 3:
            raise ValueError(f"the age head needs a bottleneck of at least 3^3 voxels, got {x.shape[1:4]}")
        x = Conv3D(self.features, (3, 3, 3), padding="valid", name="conv")(x)
        x = nn.PReLU(negative_slope_init=0.25, name="act_conv")(x)  # torch.nn.PReLU's default slope
        x = nn.Dense(1, name="dense")(x.reshape(x.shape[0], -1))
        x = self.offset + self.scale * x
        return nn.PReLU(negative_slope_init=0.25, name="act_out")(x)[:, 0]


class UNet3D(nn.Module):
    """nnU-Net's PlainConvUNet / MONAI DynUNet, channels-last. Call returns `UNetOutput`."""

    num_classes: int
    topology: Topology
    block: Literal["plain", "residual"] = "plain"
    norm: Literal["instance", "group"] = "instance"
    norm_groups: int = 8
    act: Literal["leaky_relu", "relu"] = "leaky_relu"
    upsample: Literal["transpose", "resize_conv", "pixel_shuffle"] = "transpose"
    deep_supervision: bool = True
    num_ds_heads: int | None = None  # None: every decoder level
    age_head: bool = False
    age_offset: float = 0.0  # AgeHead's fixed output affine (see AgeHead)
    age_scale: float = 1.0
    conv_bias: bool = True
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    # Decoder details that differ between the torch U-Nets (jaxseg.interop imports both). None keeps the
    # defaults above: decoder blocks like `block`, decoder_i convolved with topology.kernels[i] (nnU-Net).
    # MONAI's DynUNet has plain decoder blocks even with res_block=True, and convolves decoder_i with
    # kernels[i + 1]: decoder_block="plain", decoder_kernels=topology.kernels[1:].
    decoder_block: Literal["plain", "residual"] | None = None
    decoder_kernels: tuple[Triple, ...] | None = None  # one per decoder level, decoder_0 first

    @nn.compact
    def __call__(self, x) -> UNetOutput:
        topo = self.topology
        n = topo.n_stages
        total = [1, 1, 1]
        for s in topo.strides:
            total = [t * v for t, v in zip(total, s)]
        if any(d % t for d, t in zip(x.shape[1:4], total)):
            raise ValueError(f"input spatial shape {x.shape[1:4]} is not divisible by the total stride "
                             f"{tuple(total)}: pad the patch (see Topology.patch_size)")
        kw = dict(block=self.block, norm=self.norm, norm_groups=self.norm_groups, act=self.act,
                  conv_bias=self.conv_bias, dtype=self.dtype)
        x = x.astype(self.dtype)
        skips = []
        for i in range(n):
            name = "bottleneck" if i == n - 1 else f"encoder_{i}"
            x = Stage(topo.features[i], topo.kernels[i], topo.strides[i], name=name, **kw)(x)
            skips.append(x)
        age = (AgeHead(offset=self.age_offset, scale=self.age_scale, name="age_head")(x)
               if self.age_head else None)

        n_heads = (self.num_ds_heads or n - 1) if self.deep_supervision else 1
        if not 1 <= n_heads <= n - 1:
            raise ValueError(f"num_ds_heads={self.num_ds_heads} but the network has {n - 1} decoder levels")
        dec_kernels = topo.kernels[:n - 1] if self.decoder_kernels is None else tuple(self.decoder_kernels)
        if len(dec_kernels) != n - 1:
            raise ValueError(f"decoder_kernels has {len(dec_kernels)} entries but the network has {n - 1} decoder "
                             "levels")
        dec_kw = dict(kw, block=self.decoder_block or self.block)
        decoded = {}
        for i in range(n - 2, -1, -1):
            x = DecoderStage(topo.features[i], tuple(dec_kernels[i]), topo.strides[i + 1], self.upsample,
                             name=f"decoder_{i}", **dec_kw)(x, skips[i])
            decoded[i] = x
        seg = [
            Conv3D(self.num_classes, (1, 1, 1), dtype=self.dtype,
                   name=f"head_{i}")(decoded[i]).astype(jnp.float32)
            for i in range(n_heads)
        ]
        return UNetOutput(seg, age)

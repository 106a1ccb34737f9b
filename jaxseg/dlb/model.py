"""DeepLesionBrain's compact U-Net (Kamraoui et al., Fig. 2), one per tile.

Layer for layer the authors' published Keras network (7,071,386 parameters for T1 + FLAIR and 2
classes): 3 max-pool levels with two 3x3x3 convs each, filters doubling inside a level as in Cicek's
3D U-Net (24-48 | 48-96 | 96-192), then one bottleneck conv 192 -> 384. Each conv is GroupNorm(8) ->
conv -> ReLU, except the first, which sees the raw input; dropout 0.5 after each pooling. Decoder:
trilinear upsampling, concat with the skip, one conv per level (192, 96, and again 96 at full
resolution), and a 3x3x3 conv to the classes (softmax is applied by the loss).
Parameter tree: encoder_0..2 (block_0, block_1), bottleneck, decoder_2..0, head.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxseg.models.layers import Conv3D, Norm


class NormConvReLU(nn.Module):
    features: int
    groups: int = 8
    dtype: Any = jnp.float32
    norm: bool = True

    @nn.compact
    def __call__(self, x):
        if self.norm:
            x = Norm("group", self.groups, name="norm")(x)
        x = Conv3D(self.features, (3, 3, 3), dtype=self.dtype, name="conv")(x)
        return jax.nn.relu(x)


class Level(nn.Module):
    """Two NormConvReLU blocks: `features[0]` then `features[1]` filters; `first_norm=False` leaves the
    first block's input unnormalised (the network's raw image, as in the reference)."""

    features: tuple[int, int]
    groups: int = 8
    dtype: Any = jnp.float32
    first_norm: bool = True

    @nn.compact
    def __call__(self, x):
        kw = dict(groups=self.groups, dtype=self.dtype)
        x = NormConvReLU(self.features[0], name="block_0", norm=self.first_norm, **kw)(x)
        return NormConvReLU(self.features[1], name="block_1", **kw)(x)


def max_pool2(x):
    n, X, Y, Z, c = x.shape
    return x.reshape(n, X // 2, 2, Y // 2, 2, Z // 2, 2, c).max(axis=(2, 4, 6))


def upsample_trilinear2(x):
    n, X, Y, Z, c = x.shape
    return jax.image.resize(x, (n, 2 * X, 2 * Y, 2 * Z, c), method="linear")


class CompactUNet(nn.Module):
    num_classes: int = 2
    features: tuple[int, ...] = (24, 48, 96, 192, 384)
    groups: int = 8
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        f = self.features
        levels = len(f) - 2  # pooling levels
        if any(d % 2**levels for d in x.shape[1:4]):
            raise ValueError(f"input spatial shape {x.shape[1:4]} must be divisible by {2**levels}")
        kw = dict(groups=self.groups, dtype=self.dtype)
        x = x.astype(self.dtype)
        skips = []
        for i in range(levels):
            x = Level((f[i], f[i + 1]), name=f"encoder_{i}", first_norm=i > 0, **kw)(x)
            skips.append(x)
            x = nn.Dropout(self.dropout, deterministic=not train)(max_pool2(x))
        x = NormConvReLU(f[levels + 1], name="bottleneck", **kw)(x)
        for i in range(levels - 1, -1, -1):
            # the full-resolution level keeps the width of the one below (nf*4 = 96 in the reference)
            x = jnp.concatenate([upsample_trilinear2(x), skips[i]], axis=-1)
            x = NormConvReLU(f[max(i, 1) + 1], name=f"decoder_{i}", **kw)(x)
        return Conv3D(self.num_classes, (3, 3, 3), dtype=self.dtype,
                      name="head")(x).astype(jnp.float32)


def build_model(cfg) -> CompactUNet:
    """The compact U-Net for ``cfg.model`` (features_base, dropout, norm_groups, compute_dtype) and
    ``cfg.data.num_classes``: filters double per level from features_base (paper: 24-48-96-192-384);
    features_max does not cap them."""
    m = cfg.model
    dtype = jnp.bfloat16 if m.compute_dtype == "bfloat16" else jnp.float32
    features = tuple(m.features_base * 2**i for i in range(5))
    return CompactUNet(num_classes=cfg.data.num_classes, features=features, dropout=m.dropout,
                       groups=m.norm_groups, dtype=dtype)

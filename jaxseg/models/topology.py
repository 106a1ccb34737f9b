"""nnU-Net v2's rule for the U-Net topology from patch size and voxel spacing."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

Triple = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Topology:
    strides: tuple[Triple, ...]  # per stage; stage 0 is (1, 1, 1)
    kernels: tuple[Triple, ...]  # per stage; the bottleneck is always 3x3x3
    features: tuple[int, ...]
    patch_size: Triple  # padded to a multiple of the total stride

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    def bottleneck_size(self, patch_size: Sequence[int] | None = None) -> Triple:
        size = np.array(patch_size or self.patch_size)
        for s in self.strides:
            size = size // np.array(s)
        return tuple(int(v) for v in size)  # type: ignore[return-value]


def stage_features(n_stages: int, base: int = 32, maximum: int = 320) -> tuple[int, ...]:
    return tuple(min(base * 2**i, maximum) for i in range(n_stages))


def plan_topology(
    patch_size: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    features_base: int = 32,
    features_max: int = 320,
    min_feature_map: int = 4,
    max_stages: int | None = None,
) -> Topology:
    """nnU-Net v2 `get_pool_and_conv_props`: pool an axis while its size is >= 2 * min_feature_map and
    its spacing is < 2x the smallest spacing among the poolable axes; a lone poolable axis needs size
    >= 3 * min_feature_map. Kernel 3 on an axis once its spacing is within 2x of the smallest, else 1."""
    spacing_now = [float(s) for s in spacing]
    size = [int(p) for p in patch_size]
    if len(size) != 3 or len(spacing_now) != 3:
        raise ValueError(f"patch_size and spacing need 3 values, got {patch_size!r} and {spacing!r}")
    strides: list[Triple] = [(1, 1, 1)]
    kernels: list[Triple] = []
    kernel = [1, 1, 1]
    n_pool = [0, 0, 0]
    while max_stages is None or len(strides) < max_stages:
        valid = [a for a in range(3) if size[a] >= 2 * min_feature_map]
        if not valid:
            break
        smallest = min(spacing_now[a] for a in valid)
        valid = [a for a in valid if spacing_now[a] / smallest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        for a in range(3):
            if kernel[a] != 3 and spacing_now[a] / min(spacing_now) < 2:
                kernel[a] = 3
        stride = [1, 1, 1]
        for a in valid:
            stride[a] = 2
            n_pool[a] += 1
            spacing_now[a] *= 2
            size[a] = int(np.ceil(size[a] / 2))
        strides.append(tuple(stride))  # type: ignore[arg-type]
        kernels.append(tuple(kernel))  # type: ignore[arg-type]
    kernels.append((3, 3, 3))
    divisible = [2**n for n in n_pool]
    padded = tuple(int(np.ceil(p / d) * d) for p, d in zip(patch_size, divisible))
    return Topology(tuple(strides), tuple(kernels), stage_features(len(strides), features_base, features_max),
                    padded)  # type: ignore[arg-type]


def explicit_topology(strides, kernels, patch_size, *, features_base=32, features_max=320) -> Topology:
    """A topology given by hand (e.g. imported from a trained nnU-Net plan), checked for consistency."""
    strides = tuple(tuple(int(v) for v in s) for s in strides)
    kernels = tuple(tuple(int(v) for v in k) for k in kernels)
    if len(strides) != len(kernels):
        raise ValueError(f"{len(strides)} strides but {len(kernels)} kernels: give one of each per stage")
    total = np.prod(np.array(strides), axis=0)
    if any(int(p) % int(t) for p, t in zip(patch_size, total)):
        raise ValueError(f"patch_size {tuple(patch_size)} is not divisible by the total stride {tuple(total)}")
    return Topology(strides, kernels, stage_features(len(strides), features_base, features_max),
                    tuple(int(p) for p in patch_size))  # type: ignore[arg-type]

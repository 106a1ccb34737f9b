"""DeepLesionBrain's tile grid: overlapping sub-volumes over a registered volume, and mirror pairing.

A grid has ``n`` tiles per axis, so ``n**3`` tiles indexed ``t = n*n*ix + n*iy + iz`` (ix along the
first array axis, left-right in RAS). Along each axis tile ``i`` starts at ``offset + i * stride``.

The reference code (181x217x181 MNI volumes, 96^3 tiles, 5 per axis) uses strides (20, 29, 20)
and offsets (4, 4, 0): starts x 4..84, y 4..120, z 0..80. The paper's "Sx = Sy = 76, Sz = 67" are
the overlaps ``tile - stride`` (with y and z swapped). :func:`make_grid` without strides and offsets
gives exactly that grid on the reference's volume, tile size and tile count (:func:`reference_grid`);
for any other shape it spreads the tiles evenly (stride ``(L - T) // (n - 1)``, the remainder split
between both ends); explicit strides and offsets override both.

Mirror pairing: tile ``(ix, iy, iz)`` and ``(n-1-ix, iy, iz)`` share one network, which sees the
right-hand tile flipped along x. The networks are the tiles with ``ix <= (n-1)//2``: 75 of 125
for n = 5 (the central slab ix = 2 is its own mirror).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

REFERENCE_SHAPE = (181, 217, 181)
REFERENCE_TILE = 96
REFERENCE_TILES_PER_AXIS = 5
REFERENCE_STRIDE = (20, 29, 20)
REFERENCE_OFFSET = (4, 4, 0)


def axis_starts(length: int, tile: int, n: int, stride: int | None = None, offset: int | None = None
                ) -> tuple[int, ...]:
    """Start of each of ``n`` tiles of size ``tile`` along an axis of ``length`` voxels."""
    if n < 1 or tile < 1:
        raise ValueError(f"need n >= 1 and tile >= 1, got n={n}, tile={tile}")
    if tile > length:
        raise ValueError(f"tile size {tile} exceeds the axis length {length}")
    if stride is None:
        stride = (length - tile) // (n - 1) if n > 1 else 0
    if offset is None:
        offset = (length - tile - (n - 1) * stride) // 2
    starts = tuple(offset + i * stride for i in range(n))
    if starts[0] < 0 or starts[-1] + tile > length:
        raise ValueError(f"tiles at {starts} of size {tile} leave the axis of length {length}")
    if n > 1 and stride > tile:
        raise ValueError(f"stride {stride} > tile {tile}: the tiles would leave gaps")
    return starts


@dataclass(frozen=True)
class TileGrid:
    shape: tuple[int, int, int]
    tile: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    def __post_init__(self):
        n = {len(s) for s in self.starts}
        if len(n) != 1:
            raise ValueError(f"the same number of tiles per axis is needed, got {[len(s) for s in self.starts]}")

    @property
    def n(self) -> int:
        return len(self.starts[0])

    @property
    def n_tiles(self) -> int:
        return self.n ** 3

    @property
    def n_networks(self) -> int:
        return (self.n + 1) // 2 * self.n * self.n

    def coords(self, t: int) -> tuple[int, int, int]:
        n = self.n
        return t // (n * n), (t // n) % n, t % n

    def index(self, ix: int, iy: int, iz: int) -> int:
        return self.n * self.n * ix + self.n * iy + iz

    def origin(self, t: int) -> tuple[int, int, int]:
        return tuple(int(self.starts[a][i]) for a, i in enumerate(self.coords(t)))

    def slices(self, t: int) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + s) for o, s in zip(self.origin(t), self.tile))

    def mirror(self, t: int) -> int:
        ix, iy, iz = self.coords(t)
        return self.index(self.n - 1 - ix, iy, iz)

    def network_of(self, t: int) -> tuple[int, bool]:
        """(network index, whether the tile is fed flipped along x)."""
        ix, iy, iz = self.coords(t)
        flipped = ix > (self.n - 1) // 2
        if flipped:
            ix = self.n - 1 - ix
        return self.n * self.n * ix + self.n * iy + iz, flipped

    def tiles_of(self, net: int) -> list[tuple[int, bool]]:
        """The tiles network ``net`` is in charge of: itself, then its mirror when that is another tile."""
        own = net  # network k is the left-hand tile with the same index
        out = [(own, False)]
        m = self.mirror(own)
        if m != own:
            out.append((m, True))
        return out

    def pairing(self) -> tuple[np.ndarray, np.ndarray]:
        """Per tile: network index (int32) and flipped flag (bool), as arrays."""
        nets, flips = zip(*(self.network_of(t) for t in range(self.n_tiles)))
        return np.asarray(nets, np.int32), np.asarray(flips, bool)

    def coverage(self) -> np.ndarray:
        """How many tiles cover each voxel (0 = none)."""
        cov = np.zeros(self.shape, np.int32)
        for t in range(self.n_tiles):
            cov[self.slices(t)] += 1
        return cov


def make_grid(shape: Sequence[int], tile: int | Sequence[int], n: int,
              stride: Sequence[int] | None = None, offset: Sequence[int] | None = None) -> TileGrid:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"a 3D volume shape is needed, got {shape}")
    tile = (int(tile),) * 3 if np.isscalar(tile) else tuple(int(t) for t in tile)
    if stride is None and offset is None and (shape, tile, int(n)) == (
            REFERENCE_SHAPE, (REFERENCE_TILE,) * 3, REFERENCE_TILES_PER_AXIS):
        # The DeepLesionBrain grid is the default on MNI volumes: evenly spread tiles would start
        # x at 0, 21, ..., 84 instead of the reference code's 4, 24, ..., 84.
        stride, offset = REFERENCE_STRIDE, REFERENCE_OFFSET
    stride = (None,) * 3 if stride is None else tuple(stride)
    offset = (None,) * 3 if offset is None else tuple(offset)
    starts = tuple(axis_starts(L, T, n, s, o) for L, T, s, o in zip(shape, tile, stride, offset))
    return TileGrid(shape, tile, starts)  # type: ignore[arg-type]


def reference_grid() -> TileGrid:
    """The reference code's grid on 181x217x181 MNI volumes: 125 tiles of 96^3."""
    return make_grid(REFERENCE_SHAPE, REFERENCE_TILE, REFERENCE_TILES_PER_AXIS)

"""Whole-volume inference with the tile ensemble, and the two fusions.

Every tile goes through its network: the inputs are arranged as (networks, 2 slots, tile, C) — slot 0
the network's own tile, slot 1 its mirror partner flipped along x (for the self-mirrored central slab
slot 1 repeats slot 0 and is ignored) — and all networks run in one vmapped call, group by group.
Outputs of flipped tiles are flipped back, then fused over the volume:

* ``mean_prob`` (the reference code): sum of the covering tiles' softmax, argmax;
* ``majority_vote`` (the paper, the default): each covering tile votes its argmax class; the most
  votes wins and a tie goes to the lower class (background).

Voxels no tile covers, and voxels outside the brain mask (all channels zero) are background.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.dlb.ensemble import over_networks, pad_networks
from jaxseg.dlb.grid import TileGrid

Fusion = Literal["mean_prob", "majority_vote"]


def slot_table(grid: TileGrid) -> np.ndarray:
    """(networks, 2) tile indices: own tile, then its mirror (or the own tile again on the central slab)."""
    table = np.zeros((grid.n_networks, 2), np.int32)
    for k in range(grid.n_networks):
        tiles = grid.tiles_of(k)
        table[k, 0] = tiles[0][0]
        table[k, 1] = tiles[-1][0]
    return table


def _tile_input(volume, grid: TileGrid, t: int):
    x = volume[grid.slices(t)]
    return jnp.flip(x, 0) if grid.network_of(t)[1] else x


def gather_inputs(volume, grid: TileGrid):
    """volume (X, Y, Z, C) -> (networks, 2, Tx, Ty, Tz, C), mirrored tiles flipped along x."""
    table = slot_table(grid)
    return jnp.stack([jnp.stack([_tile_input(volume, grid, int(t)) for t in row]) for row in table])


def tile_outputs(slot_out, grid: TileGrid):
    """(networks, 2, T..., K) network outputs -> (tiles, T..., K) in volume orientation."""
    out = [None] * grid.n_tiles
    for k, row in enumerate(slot_table(grid)):
        for s, t in enumerate(row):
            t = int(t)
            if out[t] is None:
                y = slot_out[k, s]
                out[t] = jnp.flip(y, 0) if grid.network_of(t)[1] else y
    return jnp.stack(out)


def fuse(tile_probs, grid: TileGrid, method: Fusion = "majority_vote"):
    """(tiles, T..., K) probabilities -> (label volume int32, per-class score volume (X, Y, Z, K)).

    The score is the mean probability over covering tiles (mean_prob) or the share of their votes
    (majority_vote); zero where no tile covers.
    """
    k = tile_probs.shape[-1]
    if method == "mean_prob":
        contrib = tile_probs.astype(jnp.float32)
    elif method == "majority_vote":
        contrib = jax.nn.one_hot(jnp.argmax(tile_probs, -1), k, dtype=jnp.float32)
    else:
        raise ValueError(f"fusion must be 'mean_prob' or 'majority_vote', got {method!r}")
    total = jnp.zeros(grid.shape + (k,), jnp.float32)
    for t in range(grid.n_tiles):
        total = total.at[grid.slices(t)].add(contrib[t])
    cover = jnp.asarray(grid.coverage(), jnp.float32)[..., None]
    score = total / jnp.maximum(cover, 1.0)
    return jnp.argmax(total, -1).astype(jnp.int32), score


def brain_mask(volume):
    """Voxels where any channel is nonzero (the volumes are skull-stripped)."""
    return jnp.any(volume != 0, axis=-1)


def make_predictor(model, grid: TileGrid, *, fusion: Fusion = "majority_vote", stacked: bool = True,
                   group_size: int | None = None, mesh=None) -> Callable:
    """Jitted ``(params, volume (X, Y, Z, C)) -> (labels (X, Y, Z), scores (X, Y, Z, K))``.

    ``stacked``: params carry a leading network axis (the ensemble); False: one network for every tile
    (the generic network alone).
    """

    def net_probs(params, x):
        return jax.nn.softmax(model.apply({"params": params}, x, train=False), axis=-1)

    run = over_networks(net_probs, group_size, mesh, 2, shared=() if stacked else (0,))

    @jax.jit
    def predict(params, volume):
        volume = volume.astype(jnp.float32)
        x = gather_inputs(volume, grid)
        n = x.shape[0]
        if stacked:  # params padded to a multiple of the mesh: pad the inputs alike
            x = pad_networks(x, jax.tree_util.tree_leaves(params)[0].shape[0])
        probs = tile_outputs(run(params, x)[:n], grid)
        labels, score = fuse(probs, grid, fusion)
        return jnp.where(brain_mask(volume), labels, 0), score

    return predict


def make_loop_predictor(model, grid: TileGrid, *, fusion: Fusion = "majority_vote") -> Callable:
    """The same prediction with a Python loop over networks (one jitted call each), for benchmarks."""

    @jax.jit
    def one(params, x):
        return jax.nn.softmax(model.apply({"params": params}, x, train=False), axis=-1)

    gather = jax.jit(functools.partial(gather_inputs, grid=grid))

    @jax.jit
    def finish(volume, slot_out):
        labels, score = fuse(tile_outputs(slot_out, grid), grid, fusion)
        return jnp.where(brain_mask(volume), labels, 0), score

    def predict(params, volume):
        volume = jnp.asarray(volume, jnp.float32)
        inputs = gather(volume)
        outs = [one(jax.tree.map(lambda a: a[k], params), inputs[k]) for k in range(grid.n_networks)]
        return finish(volume, jnp.stack(outs))

    return predict

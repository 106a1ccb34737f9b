"""The tile-network ensemble: parameters of all networks stacked on a leading axis, one vmapped step.

A single network's step is written once (:func:`make_net_step`); the ensemble runs it for all
networks with ``jax.vmap``, in groups of ``group_size`` (``lax.map`` with ``batch_size``, so only one
group's activations are alive at a time: 75 networks fit one device as they fit many), with the
network axis sharded over the mesh axis ``tile`` (``shard_map``; each device runs its own networks,
no communication). The generic network of hierarchical specialisation is an ensemble of one.

Early stopping is per network, as when each network was trained on its own: a network whose
validation loss has not improved for ``patience`` epochs is frozen (``active`` False: its step
leaves parameters and optimiser state untouched) and its best parameters are kept.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxseg.data.augment import AugmentParams, augment_sample
from jaxseg.losses import generalised_jaccard

TILE_AXIS = "tile"


@flax.struct.dataclass
class EnsembleState:
    params: Any      # every leaf has a leading network axis
    opt_state: Any   # likewise
    step: jax.Array  # scalar


def stack(trees: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


def broadcast(tree, n: int) -> Any:
    """n copies of one network's parameters (hierarchical specialisation: the generic one everywhere)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


def init_stacked(model, key, n: int, sample_shape) -> Any:
    """Independent initialisation of n networks (the 'without HSL' ablation)."""
    x = jnp.zeros((1,) + tuple(sample_shape), jnp.float32)
    keys = jax.random.split(key, n)
    return jax.vmap(lambda k: model.init({"params": k}, x)["params"])(keys)


def init_state(params, optimizer) -> EnsembleState:
    return EnsembleState(params, jax.vmap(optimizer.init)(params), jnp.zeros((), jnp.int32))


def make_net_step(model, optimizer, aug: AugmentParams, smooth: float = 1.0, loss=None) -> Callable:
    """One network, one step: ``(params, opt_state, image, label, key, active) -> (params, opt_state, loss)``.

    image (B, X, Y, Z, C), label (B, X, Y, Z). Generalised Jaccard loss averaged over the batch. The update
    is applied only when ``active`` and the loss and gradient are finite. ``loss``: a per-sample loss
    ``(logits, labels) -> (B,)`` other than generalised Jaccard.
    """
    per_sample = loss or (lambda logits, labels: generalised_jaccard(logits, labels, smooth=smooth))

    def net_step(params, opt_state, image, label, key, active):
        k_aug, k_drop = jax.random.split(key)
        if not aug.is_identity:
            ones = jnp.ones(label.shape, jnp.float32)
            keys = jax.random.split(k_aug, image.shape[0])
            image, label, _ = jax.vmap(lambda k, x, y, m: augment_sample(k, x, y, m, aug))(keys, image, label, ones)

        def loss_fn(p):
            logits = model.apply({"params": p}, image, train=True, rngs={"dropout": k_drop})
            return jnp.mean(per_sample(logits, label))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        ok = active & jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        return keep(new_params, params), keep(new_opt, opt_state), loss

    return net_step


def make_net_eval(model, smooth: float = 1.0, loss=None) -> Callable:
    """One network's validation loss over its sub-volumes: ``(params, image, label) -> loss``."""
    per_sample = loss or (lambda logits, labels: generalised_jaccard(logits, labels, smooth=smooth))

    def net_eval(params, image, label):
        logits = model.apply({"params": params}, image, train=False)
        return jnp.mean(per_sample(logits, label))

    return net_eval


def over_networks(fn: Callable, group_size: int | None, mesh: Mesh | None, n_args: int,
                  shared: tuple[int, ...] = ()) -> Callable:
    """Run ``fn`` (one network's arguments -> outputs) for every network of a stacked batch.

    Arguments are stacked on a leading network axis except the positions in ``shared`` (same for every
    network). Groups of ``group_size`` networks are vmapped together, one group after another; with a
    mesh, the network axis is split over its ``tile`` axis first.
    """

    def local(*args):
        stacked = tuple(a for i, a in enumerate(args) if i not in shared)

        def one(xs):
            it = iter(xs)
            full = [args[i] if i in shared else next(it) for i in range(n_args)]
            return fn(*full)

        n = jax.tree.leaves(stacked)[0].shape[0]
        g = min(group_size or n, n)
        # One network at a time is a plain scan: lax.map's batch_size=1 still vmaps (a size-1 network
        # axis), which XLA:CPU's oneDNN convolutions run 70x slower than the unbatched network.
        return jax.lax.map(one, stacked) if g == 1 else jax.lax.map(one, stacked, batch_size=g)

    if mesh is None:
        return local
    specs = tuple(P() if i in shared else P(TILE_AXIS) for i in range(n_args))
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(TILE_AXIS), check_vma=False)


def tile_mesh(devices=None) -> Mesh:
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (TILE_AXIS,))


def padded_size(n: int, mesh: Mesh | None) -> int:
    """Networks are padded to a multiple of the tile-axis size so that every device holds as many."""
    d = 1 if mesh is None else mesh.shape[TILE_AXIS]
    return -(-n // d) * d


def pad_networks(tree, n_to: int) -> Any:
    """Pad the network axis by repeating network 0 (padding networks are trained and ignored)."""

    def pad(x):
        n = x.shape[0]
        if n == n_to:
            return x
        return jnp.concatenate([x, jnp.broadcast_to(x[:1], (n_to - n,) + x.shape[1:])])

    return jax.tree.map(pad, tree)


def shard_networks(tree, mesh: Mesh | None):
    if mesh is None:
        return tree
    spec = lambda x: NamedSharding(mesh, P(TILE_AXIS) if jnp.ndim(x) else P())  # noqa: E731
    return jax.tree.map(lambda x: jax.device_put(x, spec(x)), tree)


def ensemble_step(net_step: Callable, group_size: int | None = None, mesh: Mesh | None = None) -> Callable:
    """Jitted ``(state, image, label, keys, active) -> (state, losses)`` over all networks, state donated.

    image (N, B, X, Y, Z, C), label (N, B, X, Y, Z), keys (N, 2) uint32 key data, active (N,) bool.
    ``group_size`` 1 on one device: see :func:`_one_at_a_time`.
    """
    if group_size == 1 and (mesh is None or mesh.size == 1):
        return _one_at_a_time(net_step)
    run = over_networks(net_step, group_size, mesh, 6)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state: EnsembleState, image, label, keys, active):
        params, opt_state, losses = run(state.params, state.opt_state, image, label, keys, active)
        return EnsembleState(params, opt_state, state.step + 1), losses

    return step


def _one_at_a_time(net_step: Callable) -> Callable:
    """The ensemble step as one jitted single-network step per network, called from the host on the
    stacked state (updated in place, donated). A network's gradient vmapped or scanned over the network
    axis ran 50-100x slower than the network alone on XLA:CPU's oneDNN convolutions (grouped and
    in-loop weight-gradient convolutions), so on a CPU this is the fast form (benchmarks/dlb_ensemble.py)."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def one(params, opt_state, i, image, label, keys, active):
        take = lambda tree: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        p, o, loss = net_step(take(params), take(opt_state), image[i], label[i], keys[i], active[i])
        put = lambda tree, new: jax.tree.map(lambda a, b: a.at[i].set(b), tree, new)  # noqa: E731
        return put(params, p), put(opt_state, o), loss

    def step(state: EnsembleState, image, label, keys, active):
        params, opt_state, losses = state.params, state.opt_state, []
        for i in range(image.shape[0]):
            params, opt_state, loss = one(params, opt_state, i, image, label, keys, active)
            losses.append(loss)
        return EnsembleState(params, opt_state, state.step + 1), jnp.stack(losses)

    return step


def ensemble_eval(net_eval: Callable, group_size: int | None = None, mesh: Mesh | None = None) -> Callable:
    """Jitted ``(params, image, label) -> losses (N,)``: each network on its own validation sub-volumes."""
    return jax.jit(over_networks(net_eval, group_size, mesh, 3))


def step_keys(key, step: int, n: int):
    """Per-network keys for one step: fold_in(fold_in(key, step), network)."""
    k = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(n))


def select(mask, new, old):
    """Per network: ``new`` where ``mask`` else ``old`` (mask (N,) bool)."""

    def sel(a, b):
        m = jnp.reshape(mask, (-1,) + (1,) * (a.ndim - 1))
        return jnp.where(m, a, b)

    return jax.tree.map(sel, new, old)

"""DeepLesionBrain tiles: grid, mirror pairing, the vmapped/sharded ensemble step, fusion, mirrored inference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg.data.augment import NONE
from jaxseg.dlb.model import CompactUNet
from jaxseg.dlb import ensemble as ens
from jaxseg.dlb.grid import axis_starts, make_grid, reference_grid
from jaxseg.dlb.predict import fuse, gather_inputs, make_loop_predictor, make_predictor, tile_outputs


def test_reference_grid_starts_and_networks():
    g = reference_grid()
    assert g.starts == ((4, 24, 44, 64, 84), (4, 33, 62, 91, 120), (0, 20, 40, 60, 80))
    assert g.n_tiles == 125 and g.n_networks == 75
    assert g.index(1, 2, 3) == 25 * 1 + 5 * 2 + 3 and g.coords(38) == (1, 2, 3)
    # overlaps tile - stride are the paper's 76 / 67 (y and z swapped in its text)
    assert [96 - (s[1] - s[0]) for s in g.starts] == [76, 67, 76]


def test_pairing_is_an_involution_and_central_slab_maps_to_itself():
    g = reference_grid()
    nets, flips = g.pairing()
    for t in range(g.n_tiles):
        ix, iy, iz = g.coords(t)
        m = g.mirror(t)
        assert g.mirror(m) == t
        assert g.coords(m) == (4 - ix, iy, iz)
        assert (m == t) == (ix == 2)
        assert nets[t] == nets[m]                      # partners share a network
        assert flips[t] == (ix > 2)
    assert set(nets.tolist()) == set(range(75))
    # every tile is handled by exactly one (network, slot)
    handled = sorted(t for k in range(75) for t, _ in g.tiles_of(k))
    assert handled == list(range(125))


def test_coverage_counts_and_uncovered_voxels():
    g = reference_grid()
    cov = g.coverage()
    brute = np.zeros(g.shape, int)
    for t in range(g.n_tiles):
        brute[g.slices(t)] += 1
    np.testing.assert_array_equal(cov, brute)
    inside = np.zeros(g.shape, bool)
    inside[4:180, 4:216, 0:176] = True
    assert np.all(cov[inside] > 0) and np.all(cov[~inside] == 0)
    assert cov.max() == 5 * 4 * 5  # stride 29 in y: at most 4 of the 96-voxel tiles overlap there


def test_even_grid_and_errors():
    assert axis_starts(85, 32, 5) == (0, 13, 26, 39, 52)
    assert axis_starts(10, 4, 3) == (0, 3, 6)
    assert axis_starts(9, 4, 1) == (2,)
    with pytest.raises(ValueError, match="exceeds"):
        axis_starts(8, 9, 2)
    with pytest.raises(ValueError, match="gaps"):
        axis_starts(100, 4, 2, stride=10)
    with pytest.raises(ValueError, match="leave"):
        axis_starts(20, 8, 3, stride=8, offset=5)


# ------------------------------------------------------------------------ ensemble step

def tiny_model():
    return CompactUNet(num_classes=2, features=(4, 4, 8, 8, 16), groups=2, dropout=0.5)


def tiny_batch(n, b=1, s=8, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, b, s, s, s, 2)).astype(np.float32)
    label = (rng.random((n, b, s, s, s)) < 0.2).astype(np.int32)
    return jnp.asarray(image), jnp.asarray(label)


def setup(n):
    model = tiny_model()
    # SGD: linear in the gradient. Adam's g / sqrt(v) turns float round-off in near-zero gradients into
    # whole learning-rate steps, so vmapped and single steps may differ there by design of Adam.
    opt = optax.sgd(0.1, momentum=0.9)
    params = ens.init_stacked(model, jax.random.PRNGKey(0), n, (8, 8, 8, 2))
    return model, opt, params


@pytest.mark.parametrize("group_size", [2, 1])  # 1: one jitted network step at a time
@pytest.mark.slow
def test_vmapped_step_equals_separate_steps(group_size):
    n = 3
    model, opt, params = setup(n)
    net_step = ens.make_net_step(model, opt, NONE)
    image, label = tiny_batch(n, b=2)
    keys = ens.step_keys(jax.random.PRNGKey(1), 0, n)
    active = jnp.ones(n, bool)
    state = ens.init_state(jax.tree.map(jnp.copy, params), opt)  # the step donates its state
    # group size 2 over 3 networks: one vmapped group of 2, then the remainder
    step = ens.ensemble_step(net_step, group_size=group_size)
    new, losses = step(state, image, label, keys, active)
    single = jax.jit(net_step)
    for k in range(n):
        p, o, loss = single(ens.unstack(params, k), opt.init(ens.unstack(params, k)), image[k], label[k],
                            keys[k], jnp.bool_(True))
        np.testing.assert_allclose(losses[k], loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(ens.unstack(new.params, k)), jax.tree.leaves(p)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(new.step) == 1


@pytest.mark.slow
def test_inactive_network_is_unchanged():
    n = 2
    model, opt, params = setup(n)
    state = ens.init_state(params, opt)
    before = jax.tree.map(np.array, params)
    image, label = tiny_batch(n)
    step = ens.ensemble_step(ens.make_net_step(model, opt, NONE))
    new, _ = step(state, image, label, ens.step_keys(jax.random.PRNGKey(1), 0, n), jnp.array([True, False]))
    changed = [not np.array_equal(a[0], b[0]) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(before))]
    assert any(changed)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a[1]), b[1])


@pytest.mark.slow
def test_sharded_over_8_devices_equals_unsharded():
    assert jax.device_count() == 8, "tests run with 8 fake CPU devices (see conftest)"
    n = 5
    mesh = ens.tile_mesh()
    n_pad = ens.padded_size(n, mesh)
    assert n_pad == 8
    model, opt, params = setup(n)
    params = ens.pad_networks(params, n_pad)
    image, label = tiny_batch(n_pad)
    keys = ens.step_keys(jax.random.PRNGKey(2), 0, n_pad)
    active = jnp.ones(n_pad, bool)
    net_step = ens.make_net_step(model, opt, NONE)
    ref, ref_losses = ens.ensemble_step(net_step, group_size=4)(ens.init_state(jax.tree.map(jnp.copy, params), opt), image, label, keys,
                                                                active)
    state = ens.shard_networks(ens.init_state(params, opt), mesh)
    out, losses = ens.ensemble_step(net_step, group_size=1, mesh=mesh)(state, image, label, keys, active)
    assert len(jax.tree.leaves(out.params)[0].sharding.device_set) == 8
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ fusion

def test_fusions_on_hand_made_tile_outputs():
    g = make_grid((6, 6, 6), 4, 2)  # starts (0, 2) per axis: the centre 2^3 is covered by all 8 tiles
    probs = np.zeros((8, 4, 4, 4, 2), np.float32)
    lesion_tiles = {0, 3, 5}
    for t in range(8):
        p = 0.9 if t in lesion_tiles else 0.4  # the others say background with 0.6
        probs[t, ..., 1] = p
        probs[t, ..., 0] = 1 - p
    lab_mean, score_mean = fuse(jnp.asarray(probs), g, "mean_prob")
    lab_vote, score_vote = fuse(jnp.asarray(probs), g, "majority_vote")
    # independent: loop over voxels and their covering tiles
    for v in [(0, 0, 0), (3, 3, 3), (5, 5, 5), (0, 5, 2), (2, 2, 4)]:
        cover = [t for t in range(8) if all(s.start <= c < s.stop for s, c in zip(g.slices(t), v))]
        mean_lesion = np.mean([probs[t, 0, 0, 0, 1] for t in cover])
        votes = sum(t in lesion_tiles for t in cover)
        assert int(lab_mean[v]) == int(mean_lesion > 0.5), v
        np.testing.assert_allclose(score_mean[v][1], mean_lesion, rtol=1e-6)
        assert int(lab_vote[v]) == int(votes > len(cover) - votes), v  # a tie goes to background
        np.testing.assert_allclose(score_vote[v][1], votes / len(cover), rtol=1e-6)
    # at the centre the two fusions disagree: mean lesion probability 0.5875, but 3 votes against 5
    assert int(lab_mean[3, 3, 3]) == 1 and int(lab_vote[3, 3, 3]) == 0


def test_uncovered_voxels_are_background():
    g = make_grid((7, 6, 6), 4, 2, stride=(2, 2, 2), offset=(0, 0, 0))  # x = 6 is covered by no tile
    probs = jnp.ones((8, 4, 4, 4, 2)) * jnp.array([0.1, 0.9])
    for method in ("mean_prob", "majority_vote"):
        lab, _ = fuse(probs, g, method)
        assert np.all(np.asarray(lab[6]) == 0) and np.all(np.asarray(lab[:6]) == 1)


# --------------------------------------------------------------------- mirrored inference

@pytest.mark.slow
def test_mirrored_tile_equals_flipping_by_hand():
    g = make_grid((12, 8, 8), 8, 3)  # x starts (0, 2, 4); ix = 2 is fed flipped to network of ix = 0
    model, _, params = setup(g.n_networks)
    rng = np.random.default_rng(3)
    vol = jnp.asarray(rng.normal(size=(12, 8, 8, 2)).astype(np.float32))
    run = ens.over_networks(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x), -1), 4, None, 2)
    probs = tile_outputs(run(params, gather_inputs(vol, g)), g)
    t = g.index(2, 0, 0)
    k, flipped = g.network_of(t)
    assert flipped and k == g.index(0, 0, 0)
    x = jnp.flip(vol[g.slices(t)], 0)[None]
    by_hand = jnp.flip(jax.nn.softmax(model.apply({"params": ens.unstack(params, k)}, x), -1)[0], 0)
    # batched (vmapped, 2 slots) vs one-sample convolutions: float round-off only
    np.testing.assert_allclose(probs[t], by_hand, atol=3e-5)
    own = jax.nn.softmax(model.apply({"params": ens.unstack(params, k)}, vol[g.slices(k)][None]), -1)[0]
    np.testing.assert_allclose(probs[k], own, atol=3e-5)


@pytest.mark.slow
def test_prediction_is_flip_equivariant_and_loop_matches_vmapped():
    # with an even number of tiles per axis every tile has a partner in the same network, so the whole
    # prediction commutes with a left-right flip of the input, whatever the parameters
    g = make_grid((12, 8, 8), 8, 2, stride=(4, 0, 0), offset=(0, 0, 0))
    model, _, params = setup(g.n_networks)
    rng = np.random.default_rng(4)
    vol = jnp.asarray(rng.normal(size=(12, 8, 8, 2)).astype(np.float32))
    predict = make_predictor(model, g, group_size=2)
    lab, score = predict(params, vol)
    lab_f, score_f = predict(params, jnp.flip(vol, 0))
    np.testing.assert_allclose(jnp.flip(score_f, 0), score, atol=3e-5)
    np.testing.assert_array_equal(jnp.flip(lab_f, 0), lab)
    lab_loop, score_loop = make_loop_predictor(model, g)(params, vol)
    np.testing.assert_allclose(score_loop, score, atol=3e-5)
    # the generic network alone: shared parameters for every tile
    generic = ens.unstack(params, 0)
    lab_g, score_g = make_predictor(model, g, stacked=False)(generic, vol)
    lab_b, score_b = predict(ens.broadcast(generic, g.n_networks), vol)
    np.testing.assert_allclose(score_g, score_b, atol=3e-5)


@pytest.mark.slow
def test_brain_mask_zeroes_outside():
    g = make_grid((8, 8, 8), 8, 1)
    model, _, params = setup(g.n_networks)
    vol = np.zeros((8, 8, 8, 2), np.float32)
    vol[2:6, 2:6, 2:6] = 1.0
    predict = make_predictor(model, g, fusion="majority_vote")
    lab, _ = predict(params, jnp.asarray(vol))
    assert np.all(np.asarray(lab)[vol[..., 0] == 0] == 0)

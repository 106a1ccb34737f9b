"""Tests of jaxseg.losses.dro (Fidon et al. eq. 5-7, hardness weighted sampler helpers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.losses import (
    dro_dual,
    dro_objective,
    dro_weights,
    effective_sample_size,
    importance_weights,
    percentile_bound,
    sampling_probs,
)


@pytest.fixture
def x64():
    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_small_beta_gives_mean_and_uniform_weights(x64):
    rng = np.random.default_rng(0)
    losses = jnp.asarray(rng.random(10) * 2, jnp.float64)
    n = losses.shape[0]
    beta = 1e-6
    obj = float(dro_objective(losses, beta))
    np.testing.assert_allclose(obj - np.log(n) / beta, float(np.mean(losses)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(dro_weights(losses, beta)), np.full(n, 1 / n), atol=1e-6)
    # the dual at the uniform q is exactly the mean for any beta
    np.testing.assert_allclose(float(dro_dual(losses, jnp.full(n, 1 / n), 3.0)), float(np.mean(losses)), rtol=1e-12)


def test_large_beta_gives_max():
    rng = np.random.default_rng(1)
    losses = rng.random(10).astype(np.float32) * 2
    n = losses.size
    beta = 1e4
    obj = float(dro_objective(losses, beta))
    assert losses.max() - 1e-5 <= obj <= losses.max() + np.log(n) / beta + 1e-5
    q = np.asarray(dro_weights(losses, beta))
    np.testing.assert_allclose(q, np.eye(n)[np.argmax(losses)], atol=1e-6)
    assert np.isfinite(obj)


def test_objective_vs_numpy_and_batched():
    rng = np.random.default_rng(2)
    losses = rng.random((4, 7)) * 3
    beta = 5.0
    want = np.log(np.exp(beta * losses).sum(-1)) / beta
    np.testing.assert_allclose(np.asarray(dro_objective(losses, beta)), want, rtol=1e-5)
    alpha = 0.1
    want_b = np.log(np.exp(beta * losses).sum(-1) / (alpha * 7)) / beta
    np.testing.assert_allclose(np.asarray(percentile_bound(losses, alpha, beta)), want_b, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dro_weights(losses, beta)), np_softmax(beta * losses), rtol=1e-5)


def test_no_overflow_with_large_beta_losses():
    losses = np.array([50.0, 49.0, 10.0], np.float32)
    for beta in (100.0, 1e4):
        obj = float(dro_objective(losses, beta))
        bound = float(percentile_bound(losses, 0.05, beta))
        assert np.isfinite(obj) and np.isfinite(bound)
        assert obj >= 50.0 - 1e-4


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("beta", [1.0, 10.0, 100.0])
def test_percentile_bound_upper_bounds_empirical_quantile(alpha, beta):
    rng = np.random.default_rng(int(alpha * 1000 + beta))
    draws = 300
    n = 40
    # varied distributions: uniform, exponential, heavy tailed-ish, with ties
    l = np.concatenate(
        [
            rng.random((draws // 3, n)) * 2,
            rng.exponential(0.3, size=(draws // 3, n)),
            np.round(rng.lognormal(-1, 1, size=(draws // 3, n)), 1),
        ]
    ).astype(np.float32)
    bounds = np.asarray(percentile_bound(l, alpha, beta))
    assert bounds.shape == (draws // 3 * 3,)
    for li, b in zip(l, bounds):
        # Chernoff: the fraction of losses at or above the bound is at most alpha
        assert np.mean(li >= b) <= alpha
        q = np.quantile(li, 1 - alpha, method="inverted_cdf")
        assert b >= q - 1e-5


def test_dual_at_softmax_equals_objective_and_is_maximal():
    rng = np.random.default_rng(3)
    dual_many = jax.jit(jax.vmap(dro_dual, in_axes=(None, 0, None)))
    for beta in (0.5, 5.0, 100.0):
        for n in (2, 7, 7, 11):
            losses = rng.random(n) * 2
            q_star = np_softmax(beta * losses)
            dual_star = float(dro_dual(losses, q_star, beta))
            obj = float(dro_objective(losses, beta))
            np.testing.assert_allclose(dual_star + np.log(n) / beta, obj, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(dro_weights(losses, beta)), q_star, rtol=1e-4, atol=1e-7)
            # random simplex points (dense and sparse, plus the vertices) do no better
            qs = rng.dirichlet(np.full(n, 0.5), size=200)
            qs = np.concatenate([qs, np.eye(n)])
            vals = np.asarray(dual_many(losses, qs, beta))
            assert np.all(np.isfinite(vals))
            assert np.all(vals <= dual_star + 1e-5)
            # independent numpy dual
            with np.errstate(divide="ignore", invalid="ignore"):
                kl = np.where(qs > 0, qs * np.log(n * qs), 0.0).sum(-1)
            np.testing.assert_allclose(vals, qs @ losses - kl / beta, rtol=1e-4, atol=1e-5)


def test_dual_gradient_finite_at_zero_q():
    losses = jnp.array([0.3, 1.2, 0.7])
    q = jnp.array([0.0, 1.0, 0.0])
    g = jax.grad(lambda q: dro_dual(losses, q, 10.0))(q)
    assert np.all(np.isfinite(np.asarray(g)))


def test_gradient_of_objective_is_softmax_weighted_gradients(x64):
    rng = np.random.default_rng(4)
    n, d = 6, 4
    X = jnp.asarray(rng.normal(size=(n, 5, d)))
    y = jnp.asarray(rng.normal(size=(n, 5)))
    theta = jnp.asarray(rng.normal(size=d))

    def per_sample(th):
        r = X @ th - y
        return jnp.mean(jnp.log1p(r**2), axis=-1)  # (n,)

    for beta in (0.1, 3.0, 100.0):
        g = np.asarray(jax.grad(lambda th: dro_objective(per_sample(th), beta))(theta))
        L = np.asarray(per_sample(theta))
        J = np.asarray(jax.jacobian(per_sample)(theta))  # (n, d)
        want = np_softmax(beta * L) @ J
        np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-12)
        # and it differs from the ERM gradient
        assert beta < 1 or not np.allclose(g, J.mean(0))


def test_sampling_probs_numpy_and_jax():
    rng = np.random.default_rng(5)
    n = 50
    # nothing floored: matches the softmax
    table = 2.0 + 1e-3 * rng.normal(size=n)
    p = sampling_probs(table, 100.0)
    assert isinstance(p, np.ndarray) and p.dtype == np.float64
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(p, np_softmax(100.0 * table), rtol=1e-12)
    # heavily floored
    table = rng.random(n) * 2
    floor = 1e-4
    p = sampling_probs(table, 100.0, floor=floor)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    sm = np_softmax(100.0 * table)
    floored = sm < floor / n
    assert floored.sum() > n // 2
    eps = floor / n
    assert p.min() >= eps / (1 + floor) * (1 - 1e-12)
    np.testing.assert_allclose(p[floored], p[floored][0], rtol=1e-12)
    # independent reference (as the reference sampler: set to eps, renormalise)
    ref = sm.copy()
    ref[ref <= eps] = eps
    ref /= ref.sum()
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    # usable with numpy's sampler
    idx = np.random.default_rng(0).choice(n, size=4, replace=False, p=p)
    assert len(set(idx.tolist())) == 4
    # JAX backend (and jit) agrees
    pj = jax.jit(sampling_probs, static_argnums=(1,))(jnp.asarray(table, jnp.float32), 100.0)
    assert isinstance(pj, jax.Array)
    np.testing.assert_allclose(np.asarray(pj), ref, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(float(pj.sum()), 1.0, rtol=1e-5)


def test_importance_weights():
    rng = np.random.default_rng(6)
    l = rng.random(8).astype(np.float32)
    stale = (l + rng.normal(scale=0.01, size=8)).astype(np.float32)
    beta = 100.0
    w = np.asarray(importance_weights(l, stale, beta))
    want = np.clip(np.exp(beta * (l.astype(np.float64) - stale)), 0.1, 10.0)
    np.testing.assert_allclose(w, want, rtol=1e-4)
    assert np.all(w >= 0.1 - 1e-6) and np.all(w <= 10.0 + 1e-5)
    # huge differences: no overflow / nan, clipped to the range ends
    l2 = np.array([50.0, 0.0, 1.0, 1.0], np.float32)
    s2 = np.array([0.0, 50.0, 1.0, 1.0 + 1e-3], np.float32)
    w2 = np.asarray(importance_weights(l2, s2, beta))
    assert np.all(np.isfinite(w2))
    np.testing.assert_allclose(w2, [10.0, 0.1, 1.0, np.exp(-0.1)], rtol=1e-4)
    # custom range
    w3 = np.asarray(importance_weights(l2, s2, beta, w_min=0.5, w_max=2.0))
    np.testing.assert_allclose(w3, [2.0, 0.5, 1.0, np.exp(-0.1)], rtol=1e-4)
    # constant w.r.t. theta
    gl, gs = jax.grad(lambda a, b: importance_weights(a, b, beta).sum(), argnums=(0, 1))(
        jnp.asarray(l), jnp.asarray(stale)
    )
    assert np.all(np.asarray(gl) == 0) and np.all(np.asarray(gs) == 0)
    g = jax.grad(lambda a: jnp.mean(importance_weights(a, stale, beta) * a))(jnp.asarray(l))
    np.testing.assert_allclose(np.asarray(g), w / l.size, rtol=1e-5)
    # jit
    np.testing.assert_allclose(np.asarray(jax.jit(importance_weights)(l, stale, beta)), w, rtol=1e-6)


def test_effective_sample_size():
    for n in (1, 5, 17):
        np.testing.assert_allclose(effective_sample_size(np.full(n, 1 / n)), n, rtol=1e-12)
        np.testing.assert_allclose(float(effective_sample_size(jnp.full(n, 1 / n))), n, rtol=1e-5)
        np.testing.assert_allclose(effective_sample_size(np.eye(n)[0]), 1.0)
        np.testing.assert_allclose(float(effective_sample_size(jnp.eye(n)[n - 1])), 1.0)
    p = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(effective_sample_size(p), 1 / (0.25 + 0.0625 * 2))


def test_hardness_sampler_draws_a_rare_hard_stratum_more_and_more():
    """18 controls that train down to a loss of 0.3 and 2 rare cases that stay at 1.0: uniform sampling
    draws the rare stratum 10% of the time; hardness sampling (beta 10) draws it more often, and its
    share grows once the table has seen every case, as its loss stays high."""
    from jaxseg.data.pipeline import CaseSampler

    n, rare = 20, {18, 19}
    loss = np.where(np.isin(np.arange(n), list(rare)), 1.0, 0.3)
    shares = {}
    for mode in ("uniform", "hardness"):
        sampler = CaseSampler(n, mode=mode, seed=0, beta=10.0, init_loss=2.0)
        drawn = []
        for step in range(300):
            idx = sampler.draw(2, step)
            sampler.update(idx, loss[idx])
            drawn.append(np.isin(idx, list(rare)).mean())
        drawn = np.asarray(drawn)
        shares[mode] = (drawn[:10].mean(), drawn[100:].mean())  # first sweep, later
    assert abs(shares["uniform"][1] - 0.1) < 0.05
    first, later = shares["hardness"]
    assert first <= 0.2  # the initial table (2.0 everywhere) sends it to unvisited cases first
    assert later > 2 * shares["uniform"][1] and later > first + 0.2
    # the sampler's mass on the rare stratum is what the softmax of the table gives
    p = sampling_probs(sampler.table, 10.0, 1e-4)
    expected = 2 * np.exp(10 * 1.0) / (2 * np.exp(10 * 1.0) + 18 * np.exp(10 * 0.3))
    assert abs(p[list(rare)].sum() - expected) < 1e-6 and abs(later - expected) < 0.1

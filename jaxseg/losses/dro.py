"""Distributionally robust optimisation (Fidon et al. 2021, nnU-Net-DRO, section 2 and supplement).

Minimise a percentile of the per-volume loss instead of its mean:

* eq. 5 (Chernoff bound on the alpha-percentile):
  ``l_alpha <= (1/beta) log((1/(alpha n)) sum_i exp(beta L_i))`` -> :func:`percentile_bound`;
* eq. 6 (objective): ``(1/beta) logsumexp(beta L)`` -> :func:`dro_objective`;
* eq. 7 (DRO form): ``max_q sum_i q_i L_i - (1/beta) KL(q || 1/n)`` -> :func:`dro_dual`,
  maximised by ``q* = softmax(beta L)`` (:func:`dro_weights`), where
  ``eq6 = eq7(q*) + log(n)/beta``; hence ``grad eq6 = sum_i q*_i grad L_i``.

``losses`` is a vector over the last axis (leading axes are batch dimensions). The jnp
functions are jit-able. :func:`sampling_probs` and :func:`effective_sample_size` are
backend-agnostic: a NumPy array (or list) in gives a float64 NumPy array out (the host-side
hardness-weighted sampler), a JAX array / tracer in gives a JAX array out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

__all__ = [
    "percentile_bound",
    "dro_objective",
    "dro_weights",
    "dro_dual",
    "sampling_probs",
    "importance_weights",
    "effective_sample_size",
]


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def percentile_bound(losses, alpha, beta):
    """Eq. 5: ``(1/beta) log((1/(alpha n)) sum_i exp(beta L_i))``, via logsumexp.

    An upper bound on the empirical ``(1 - alpha)`` quantile of the losses (the value the loss
    exceeds with probability at most ``alpha``).
    """
    losses = _float(losses)
    n = losses.shape[-1]
    return (logsumexp(beta * losses, axis=-1) - jnp.log(alpha * n)) / beta


def dro_objective(losses, beta):
    """Eq. 6: ``(1/beta) logsumexp_i(beta L_i)``.

    beta -> 0: ``mean(L) + log(n)/beta``; beta -> inf: ``max(L)``. Its gradient is
    ``sum_i softmax(beta L)_i grad L_i``.
    """
    losses = _float(losses)
    return logsumexp(beta * losses, axis=-1) / beta


def dro_weights(losses, beta):
    """The inner maximiser of eq. 7, ``q* = softmax(beta L)``."""
    return jax.nn.softmax(beta * _float(losses), axis=-1)


def dro_dual(losses, q, beta):
    """Eq. 7's inner objective ``sum_i q_i L_i - (1/beta) KL(q || uniform)``.

    ``KL(q || 1/n) = sum_i q_i log(n q_i)`` with ``0 log 0 = 0`` (finite gradients at q_i = 0
    thanks to the double-where trick).
    """
    losses = _float(losses)
    q = _float(q)
    n = losses.shape[-1]
    pos = q > 0
    safe_q = jnp.where(pos, q, 1.0)
    kl = jnp.sum(jnp.where(pos, q * jnp.log(n * safe_q), 0.0), axis=-1)
    return jnp.sum(q * losses, axis=-1) - kl / beta


def _is_jax(x):
    return isinstance(x, jax.Array)


def sampling_probs(table, beta, floor: float = 1e-4):
    """Hardness-weighted sampling distribution over the per-case loss ``table``.

    ``p = softmax(beta * table)``; probabilities below ``floor / n`` are raised to ``floor / n``
    and ``p`` is renormalised (as the reference ``WeightedSampler.draw_samples``). After
    renormalisation a floored entry is ``floor/n / sum(p) >= floor/n / (1 + floor)``.

    Backend-agnostic: NumPy in (host sampler, ``np.random.Generator.choice(p=...)``) ->
    float64 NumPy out; JAX in -> JAX out (jit-able).
    """
    if _is_jax(table):
        z = beta * _float(table)
        p = jax.nn.softmax(z, axis=-1)
        n = z.shape[-1]
        p = jnp.maximum(p, floor / n)
        return p / jnp.sum(p, axis=-1, keepdims=True)
    z = beta * np.asarray(table, dtype=np.float64)
    n = z.shape[-1]
    z = z - np.max(z, axis=-1, keepdims=True)
    p = np.exp(z)
    p /= np.sum(p, axis=-1, keepdims=True)
    p = np.maximum(p, floor / n)
    return p / np.sum(p, axis=-1, keepdims=True)


def importance_weights(losses, stale_losses, beta, w_min: float = 0.1, w_max: float = 10.0):
    """``clip(exp(beta (l - L_stale)), w_min, w_max)``, constant w.r.t. theta.

    The exponent is clipped to ``[log w_min, log w_max]`` before ``exp`` (no overflow for any
    beta and loss difference) and everything is wrapped in ``stop_gradient``. Call it with the
    stale table entries *before* updating the table; the training loss is then
    ``mean_b(w_b * l_b)``.
    """
    losses = jax.lax.stop_gradient(_float(losses))
    stale = jax.lax.stop_gradient(_float(stale_losses))
    z = beta * (losses - stale)
    z = jnp.clip(z, np.log(w_min), np.log(w_max))
    return jax.lax.stop_gradient(jnp.exp(z))


def effective_sample_size(p):
    """Kish effective sample size ``1 / sum_i p_i^2`` of a probability vector (last axis).

    n for the uniform distribution, 1 for a one-hot one. Backend-agnostic like
    :func:`sampling_probs`.
    """
    if _is_jax(p):
        p = _float(p)
        return 1.0 / jnp.sum(p * p, axis=-1)
    p = np.asarray(p, dtype=np.float64)
    return 1.0 / np.sum(p * p, axis=-1)

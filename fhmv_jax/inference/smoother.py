"""Backward pass, smoothed marginals and per-factor two-slice marginals."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._types import Array, Float, Scalar
from ._ops import (
    UNROLL,
    Transitions,
    apply_along_axis,
    at_step,
    normalise,
    state_axes,
    time_varying,
)
from .filter import FilterPosterior, forward_filter


class SmootherPosterior(NamedTuple):
    """Forward-backward output.

    Attributes:
        marginal_loglik: log p(y_{1:T}).
        filtered_probs: [T, *shape] P(h_t | y_{1:t}).
        smoothed_probs: [T, *shape] P(h_t | y_{1:T}).
        pairwise: one [T-1, n_f, n_f] array per factor f:
            P(h^f_{t-1} = a, h^f_t = b | y_{1:T}) at index t - 1, other factors summed out.
    """

    marginal_loglik: Scalar
    filtered_probs: Float[Array, "T ..."]
    smoothed_probs: Float[Array, "T ..."]
    pairwise: tuple[Float[Array, "T1 n n"], ...]


def _contract_except(left: Array, right: Array, axis: int) -> Float[Array, "n n"]:
    """sum over every axis but ``axis`` of left[..., a, ...] * right[..., b, ...] -> [a, b] (one fused reduction)."""
    product = jnp.expand_dims(left, axis + 1) * jnp.expand_dims(right, axis)
    return jnp.sum(product, axis=tuple(a for a in range(product.ndim) if a not in (axis, axis + 1)))


def backward_step(
    alpha_prev: Array, weighted_next: Array, matrices: tuple[Array, ...]
) -> tuple[Array, Array, tuple[Float[Array, "n n"], ...]]:
    """One backward step: beta_hat_{t-1} and the two-slice marginals of every factor but the first.

    With r_t = b_t * beta_hat_t / c_t (``weighted_next``), beta_hat_{t-1} = P_t r_t and
    xi_t(h, h') = alpha_{t-1}(h) prod_g P_g(h_g, h'_g) r_t(h'). For factor f, move alpha
    forward along the factors before f and r backward along the factors after f; their
    contraction over every other axis, times P_f, is xi^f_t. The S x S xi is never formed.
    The first factor's marginal needs only r moved back along all the others (returned as
    ``message``), so it is contracted with alpha outside the scan, vectorised over time.

    Returns:
        (beta_hat_{t-1}, message: r_t moved back along factors 1..F-1, marginals of factors 1..F-1).
    """
    num = len(matrices)
    forward = [alpha_prev]
    for axis in range(num - 1):
        forward.append(apply_along_axis(forward[-1], matrices[axis], axis))
    backward = [weighted_next]
    for axis in range(num - 1, 0, -1):
        backward.append(apply_along_axis(backward[-1], matrices[axis], axis, transpose=True))
    backward.reverse()
    beta_prev = apply_along_axis(backward[0], matrices[0], 0, transpose=True)
    pairwise = tuple(matrices[f] * _contract_except(forward[f], backward[f], f) for f in range(1, num))
    return beta_prev, backward[0], pairwise


def _first_factor_pairwise(alpha_prev: Array, messages: Array, matrix: Array) -> Array:
    """xi^1_t(a, b) = P_1(a, b) sum_rest alpha_{t-1}(a, rest) message_t(b, rest), per step."""
    steps, n, rest = alpha_prev.shape[0], matrix.shape[-1], math.prod(alpha_prev.shape[2:])
    left = alpha_prev.reshape(steps, n, rest)
    right = messages.reshape(steps, n, rest)
    contraction = jnp.sum(left[:, :, None, :] * right[:, None, :, :], axis=-1)
    return (matrix[None] if matrix.ndim == 2 else matrix) * contraction


def backward_pass(transitions: Transitions, forward: FilterPosterior) -> tuple[Float[Array, "T ..."], tuple[Array, ...]]:
    """Scaled backward messages and per-factor two-slice marginals.

    beta_hat_T = 1;  beta_hat_{t-1} = P_t r_t with r_t = b_t * beta_hat_t / c_t, where
    beta_hat_t = p(y_{t+1:T} | h_t) / p(y_{t+1:T} | y_{1:t}).

    Args:
        transitions: one matrix per axis ([n, n] or [T, n, n]).
        forward: the forward filter's output.

    Returns:
        (betas [T, *shape], pairwise: per factor [T-1, n_f, n_f]).
    """
    scaled, normalisers = forward.scaled_likelihoods, forward.normalisers

    def _step(beta, inputs):
        alpha_prev, b_t, c_t, matrices_t = inputs
        previous, message, pairwise = backward_step(alpha_prev, b_t * beta / c_t, at_step(transitions, matrices_t))
        return previous, (previous, message, pairwise)

    last = jnp.ones_like(scaled[0])
    alpha_prev = forward.filtered_probs[:-1]
    step_inputs = (alpha_prev, scaled[1:], normalisers[1:], tuple(m[1:] for m in time_varying(transitions)))
    _, (earlier, messages, rest) = jax.lax.scan(_step, last, step_inputs, reverse=True, unroll=UNROLL)
    betas = jnp.concatenate([earlier, last[None]])
    first_matrix = transitions[0] if transitions[0].ndim == 2 else transitions[0][1:]
    return betas, (_first_factor_pairwise(alpha_prev, messages, first_matrix), *rest)


def smoother(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    log_likelihoods: Float[Array, "T ..."],
) -> SmootherPosterior:
    """Forward-backward smoothing over a factorial state tensor.

    Args:
        initial_probs: [*shape] law of h_1.
        transitions: one matrix per axis ([n, n] or [T, n, n]).
        log_likelihoods: [T, *shape] log p(y_t | h_t = h).

    Returns:
        A ``SmootherPosterior``; gamma_t = alpha_hat_t * beta_hat_t.
    """
    forward = forward_filter(initial_probs, transitions, log_likelihoods)
    betas, pairwise = backward_pass(transitions, forward)
    smoothed = normalise(forward.filtered_probs * betas, state_axes(betas.ndim - 1))
    return SmootherPosterior(forward.marginal_loglik, forward.filtered_probs, smoothed, pairwise)

"""Backward pass, smoothed marginals and per-factor two-slice marginals."""

from __future__ import annotations

import functools
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
    merge_invariant_axes,
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


def backward_pass(
    transitions: Transitions, forward: FilterPosterior, *, step_weights: Array | None = None
) -> tuple[Float[Array, "T ..."], tuple[Array, ...]]:
    """Scaled backward messages and per-factor two-slice marginals.

    beta_hat_T = 1;  beta_hat_{t-1} = P_t r_t with r_t = b_t * beta_hat_t / c_t, where
    beta_hat_t = p(y_{t+1:T} | h_t) / p(y_{t+1:T} | y_{1:t}).

    Args:
        transitions: one matrix per axis ([n, n] or [T, n, n]).
        forward: the forward filter's output.
        step_weights: optional [T-1] weights of the transitions into steps 1..T-1; when given,
            the marginals are weighted by them and those of time-invariant factors summed over
            time ([n, n]: the expected transition counts EM needs, with padding weighted 0).

    Returns:
        (betas [T, *shape], pairwise: per factor [T-1, n_f, n_f], or [n_f, n_f] when summed).
    """
    if step_weights is not None:
        return _expected_counts(transitions, forward, step_weights)
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


def _counts_from_gram(gram: Array, transitions: Transitions, axis: int) -> Float[Array, "n n"]:
    """sum_t xi^f_t for a time-invariant factor f from gram[h, k] = sum_t alpha_{t-1}(h) m_t(k), where m_t is
    r_t moved back along the time-varying axes: contract with every other time-invariant matrix and
    take the diagonal of the time-varying axes (one einsum)."""
    num = len(transitions)
    left = [chr(ord("a") + i) for i in range(num)]
    right = [chr(ord("A") + i) if m.ndim == 2 else left[i] for i, m in enumerate(transitions)]
    operands = [gram]
    subscripts = ["".join(left) + "".join(right)]
    for g, matrix in enumerate(transitions):
        if g != axis and matrix.ndim == 2:
            operands.append(matrix)
            subscripts.append(left[g] + right[g])
    contraction = jnp.einsum(",".join(subscripts) + "->" + left[axis] + right[axis], *operands)
    return transitions[axis] * contraction


def _axes_by_kind(transitions: Transitions) -> tuple[list[int], list[int]]:
    """(axes with a time-varying [T, n, n] matrix, axes with a time-invariant [n, n] one)."""
    return [a for a, m in enumerate(transitions) if m.ndim == 3], [a for a, m in enumerate(transitions) if m.ndim == 2]


def _expected_counts(
    transitions: Transitions, forward: FilterPosterior, step_weights: Array
) -> tuple[Float[Array, "T ..."], tuple[Array, ...]]:
    """``backward_pass`` with step weights: the scan runs the beta recursion, and the two-slice
    sums are formed afterwards, vectorised over time.

    With r_t = b_t * beta_hat_t / c_t, time-invariant factors get every summed marginal from the
    S x S matrix sum_t w_t alpha_{t-1} (x) m_t, m_t = r_t moved back along the time-varying axis
    (one matrix product). The time-varying factor (at most one: the Markov leverage) gets
    per-step marginals from r_t and alpha moved forward along the other axes by their Kronecker
    product (one more). The scan covers every step, t = 0 included (its m_0 and r_0 are unused),
    so that beta needs no concatenation and the inputs no slice; it applies the merged
    time-invariant matrices (``merge_invariant_axes``).
    """
    varying, invariant = _axes_by_kind(transitions)
    if len(varying) > 1:
        raise NotImplementedError("expected counts support at most one time-varying factor")
    scaled, normalisers = forward.scaled_likelihoods, forward.normalisers
    shape, size = scaled.shape[1:], math.prod(scaled.shape[1:])
    merged_shape, merged = merge_invariant_axes(transitions, shape)
    merged_varying, merged_invariant = _axes_by_kind(merged)

    def _step(beta, inputs):
        b_t, c_t, matrices_t = inputs
        matrices = at_step(merged, matrices_t)
        weighted = b_t * beta / c_t
        message = weighted
        for axis in merged_varying:
            message = apply_along_axis(message, matrices[axis], axis, transpose=True)
        previous = message
        for axis in merged_invariant:
            previous = apply_along_axis(previous, matrices[axis], axis, transpose=True)
        return previous, (beta, message, weighted) if varying else (beta, message)

    step_inputs = (scaled.reshape((-1,) + merged_shape), normalisers, time_varying(merged))
    _, outputs = jax.lax.scan(_step, jnp.ones(merged_shape, scaled.dtype), step_inputs, reverse=True, unroll=UNROLL)
    betas, messages, *weighted = (o.reshape(scaled.shape) for o in outputs)
    alpha = forward.filtered_probs[:-1] * step_weights.reshape((-1,) + (1,) * len(shape))
    steps = alpha.shape[0]
    gram = (alpha.reshape(steps, size).T @ messages[1:].reshape(steps, size)).reshape(shape + shape)
    counts = [None] * len(transitions)
    for axis in invariant:
        counts[axis] = _counts_from_gram(gram, transitions, axis)
    for axis in varying:
        others = functools.reduce(jnp.kron, [transitions[g] for g in invariant])
        left = jnp.moveaxis(alpha, axis + 1, -1).reshape(steps, size // shape[axis], shape[axis])
        right = jnp.moveaxis(weighted[0][1:], axis + 1, -1).reshape(steps, size // shape[axis], shape[axis])
        moved = jnp.swapaxes(jnp.swapaxes(left, 1, 2) @ others, 1, 2)
        counts[axis] = transitions[axis][1:] * jnp.einsum("tha,thb->tab", moved, right)
    return betas, tuple(counts)


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

"""Backward pass, smoothed marginals and per-factor two-slice marginals."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._types import Array, Float, Scalar
from ._ops import Transitions, at_step, normalise, propagate, state_axes, time_varying
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


def backward_filter(transitions: Transitions, forward: FilterPosterior) -> Float[Array, "T ..."]:
    """Scaled backward messages beta_hat_t = p(y_{t+1:T} | h_t) / p(y_{t+1:T} | y_{1:t}).

    beta_hat_T = 1;  beta_hat_{t-1} = P_t (b_t * beta_hat_t) / c_t.
    """
    scaled, normalisers = forward.scaled_likelihoods, forward.normalisers

    def _step(beta, inputs):
        b_t, c_t, matrices_t = inputs
        previous = propagate(b_t * beta / c_t, at_step(transitions, matrices_t), transpose=True)
        return previous, previous

    last = jnp.ones_like(scaled[0])
    step_inputs = (scaled[1:], normalisers[1:], tuple(m[1:] for m in time_varying(transitions)))
    _, earlier = jax.lax.scan(_step, last, step_inputs, reverse=True)
    return jnp.concatenate([earlier, last[None]])


def _factor_pairwise(
    axis: int, alpha_prev: Array, weighted_next: Array, matrices: tuple[Array, ...]
) -> Float[Array, "n n"]:
    """xi^f(a, b) = P_f(a, b) sum_{other factors} (alpha_{t-1} moved by the other factors)(a) * r_t(b)."""
    moved = propagate(alpha_prev, matrices, skip=axis)
    n = matrices[axis].shape[-1]
    left = jnp.moveaxis(moved, axis, 0).reshape(n, -1)
    right = jnp.moveaxis(weighted_next, axis, 0).reshape(n, -1)
    return matrices[axis] * (left @ right.T)


def two_slice_marginals(
    transitions: Transitions, forward: FilterPosterior, betas: Float[Array, "T ..."]
) -> tuple[Float[Array, "T1 n n"], ...]:
    """Per-factor two-slice marginals, vectorised over time; the S x S xi is never formed.

    With r_t = b_t * beta_hat_t / c_t, xi_t(h, h') = alpha_{t-1}(h) P_t(h, h') r_t(h'), and the
    Kronecker structure of P_t lets every factor's marginal be contracted from S-sized tensors.
    """
    alpha_prev = forward.filtered_probs[:-1]
    ndim = alpha_prev.ndim - 1
    weighted_next = forward.scaled_likelihoods[1:] * betas[1:] / forward.normalisers[1:].reshape((-1,) + (1,) * ndim)
    step_matrices = tuple(m[1:] if m.ndim == 3 else m for m in transitions)
    in_axes = tuple(0 if m.ndim == 3 else None for m in transitions)

    def _at_time(a, r, matrices):
        return tuple(_factor_pairwise(axis, a, r, matrices) for axis in range(ndim))

    return jax.vmap(_at_time, in_axes=(0, 0, in_axes))(alpha_prev, weighted_next, step_matrices)


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
    betas = backward_filter(transitions, forward)
    axes = state_axes(betas.ndim - 1)
    smoothed = normalise(forward.filtered_probs * betas, axes)
    pairwise = two_slice_marginals(transitions, forward, betas)
    return SmootherPosterior(forward.marginal_loglik, forward.filtered_probs, smoothed, pairwise)

"""Forward filtering over a factorial state tensor."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._types import Array, Float, Scalar
from ._ops import UNROLL, Transitions, at_step, merge_invariant_axes, propagate, scaled_likelihoods, time_varying


class FilterPosterior(NamedTuple):
    """Forward-filter output.

    Attributes:
        marginal_loglik: log p(y_{1:T}).
        filtered_probs: [T, *shape] P(h_t | y_{1:t}).
        scaled_likelihoods: [T, *shape] p(y_t | h_t) / exp(m_t), m_t = max_h log p(y_t | h).
        normalisers: [T] c_t / exp(m_t), where c_t = p(y_t | y_{1:t-1}).
    """

    marginal_loglik: Scalar
    filtered_probs: Float[Array, "T ..."]
    scaled_likelihoods: Float[Array, "T ..."]
    normalisers: Float[Array, " T"]


def forward_filter(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    log_likelihoods: Float[Array, "T ..."],
) -> FilterPosterior:
    """Scaled forward recursion (Rabiner 1989) with factor-wise transitions.

    alpha_1 ∝ pi * b_1;  alpha_t ∝ (alpha_{t-1} P_t) * b_t;  c_t is the normaliser and
    log p(y_{1:T}) = sum_t log c_t.

    Args:
        initial_probs: [*shape] law of h_1 over the joint state tensor.
        transitions: one matrix per axis ([n, n] or [T, n, n]; see ``_ops``).
        log_likelihoods: [T, *shape] log p(y_t | h_t = h).

    Returns:
        A ``FilterPosterior``.
    """
    scaled, shift = scaled_likelihoods(log_likelihoods)
    shape, merged = merge_invariant_axes(transitions, initial_probs.shape)
    next_step = tuple(jnp.roll(m, -1, axis=0) for m in time_varying(merged))
    _, filtered, normalisers = filter_scan(initial_probs.reshape(shape), merged, scaled.reshape((-1,) + shape), next_step)
    filtered = filtered.reshape(scaled.shape)
    marginal_loglik = jnp.sum(jnp.log(normalisers)) + jnp.sum(shift)
    return FilterPosterior(marginal_loglik, filtered, scaled, normalisers)


def filter_scan(
    predicted: Array, transitions: Transitions, scaled: Float[Array, "L ..."], next_matrices: tuple[Array, ...]
) -> tuple[Array, Float[Array, "L ..."], Float[Array, " L"]]:
    """The scaled forward recursion over L consecutive steps.

    Args:
        predicted: [*shape] P(h_t | y_{1:t-1}) at the first step.
        transitions: one matrix per axis; the time-varying ones are taken from ``next_matrices``.
        scaled: [L, *shape] scaled likelihoods of the steps.
        next_matrices: each time-varying matrix at the step after each step, [L, n, n].

    Returns:
        (the predicted law of the step after the last, filtered [L, *shape], normalisers [L]).
    """

    def _step(predicted, inputs):
        b_t, matrices_next = inputs
        joint = predicted * b_t
        normaliser = jnp.sum(joint)
        filtered = joint / normaliser
        return propagate(filtered, at_step(transitions, matrices_next)), (filtered, normaliser)

    predicted, (filtered, normalisers) = jax.lax.scan(_step, predicted, (scaled, next_matrices), unroll=UNROLL)
    return predicted, filtered, normalisers

"""Most likely joint state path (Viterbi) over a factorial state tensor."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._types import Array, Float, Int
from . import parallel
from ._ops import Transitions, at_step, dense, max_product_step, time_varying, unroll


def _column_log_probs(log_matrices: tuple[Array, ...], next_state: tuple[Array, ...]) -> Array:
    """log P(h, h') for every h and one fixed h': the outer sum of the factors' columns."""
    total = jnp.zeros(())
    ndim = len(log_matrices)
    for axis, (log_matrix, index) in enumerate(zip(log_matrices, next_state, strict=True)):
        shape = [1] * ndim
        shape[axis] = log_matrix.shape[0]
        total = total + dense(log_matrix)[:, index].reshape(shape)
    return total


def most_likely_states(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    log_likelihoods: Float[Array, "T ..."],
    *,
    method: str = "sequential",
    block_steps: int | None = None,
) -> Int[Array, "T F"]:
    """Viterbi path in log space, one factor's max-product at a time.

    delta_t(h') = max_h [delta_{t-1}(h) + log P_t(h, h')] + log b_t(h'); the maximisation over
    h = (h_1, ..., h_F) runs axis by axis, max_{h_F} ... max_{h_1}, each step an O(S * n_f)
    max-plus product. Backtracking recomputes argmax_h [delta_{t-1}(h) + log P_t(h, h'_t)] from
    the stored deltas (one S-vector per step) instead of storing F back-pointer tensors.

    Args:
        initial_probs: [*shape] law of h_1.
        transitions: one matrix per axis ([n, n] or [T, n, n], entry t from step t to t + 1).
        log_likelihoods: [T, *shape] log p(y_t | h_t).
        method: ``"sequential"``, ``"parallel"`` (``parallel.most_likely_states``, blocks of ``block_steps``) or
            ``"auto"`` (``parallel.auto_method`` of the joint state count).

    Returns:
        [T, F] the index of every factor's state along the path (with ties, the paths of the two methods may
        differ; their joint log-probabilities do not).
    """
    parallel.check_method(method)
    if method == "auto":
        method = parallel.auto_method(initial_probs.size, log_likelihoods.shape[0])
    if method == "parallel":
        return parallel.most_likely_states(initial_probs, transitions, log_likelihoods, block_steps=block_steps)
    shape = log_likelihoods.shape[1:]
    log_transitions = tuple(jnp.log(m) for m in transitions)
    dynamic = time_varying(log_transitions)

    def _forward(log_delta, inputs):
        ll_t, matrices_t = inputs
        log_delta = max_product_step(log_delta, at_step(log_transitions, matrices_t)) + ll_t
        log_delta = log_delta - jnp.max(log_delta)
        return log_delta, log_delta

    first = jnp.log(initial_probs) + log_likelihoods[0]
    first = first - jnp.max(first)
    steps_unroll = unroll(log_likelihoods.shape)
    _, later = jax.lax.scan(_forward, first, (log_likelihoods[1:], tuple(m[:-1] for m in dynamic)), unroll=steps_unroll)
    log_deltas = jnp.concatenate([first[None], later])

    def _backward(next_state, inputs):
        log_delta, matrices_next = inputs
        scores = log_delta + _column_log_probs(at_step(log_transitions, matrices_next), next_state)
        state = jnp.unravel_index(jnp.argmax(scores), shape)
        return state, jnp.stack(state)

    last = jnp.unravel_index(jnp.argmax(log_deltas[-1]), shape)
    steps = (log_deltas[:-1], tuple(m[:-1] for m in dynamic))
    _, earlier = jax.lax.scan(_backward, last, steps, reverse=True, unroll=steps_unroll)
    return jnp.concatenate([earlier, jnp.stack(last)[None]])

"""The inference core's primitives: factor-by-factor operations on the joint state tensor.

The joint transition of a factorial HMM is the Kronecker product of its factors'
matrices. A message over the joint state is kept as a tensor with one axis per factor,
and each factor's matrix is applied along its own axis, so one step costs
O(S * sum_f n_f) instead of O(S^2). Four steps compose every recursion of the package
(filter, smoother, E-step, Viterbi, streaming): ``predict`` (along the factor axes),
``condition`` (on a step's emissions), ``backward_step`` and ``max_product_step``.

``transitions`` is a tuple with one matrix per axis: [n, n] if time-invariant or
[T, n, n] if time-varying, where entry t maps the state at step t to the state at step
t + 1 (it is driven by the driver observed at t; the last entry only predicts beyond the
sequence), or a law [n] for a rank-one factor whose every row is that law (i.i.d. jumps:
the next state does not depend on the last). Along a rank-one axis a forward move is a sum
times the law and a backward move one contraction with the law, O(S) instead of O(S * n);
``blocked`` runs the recursions on the other axes only (see ``RankOne``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp

from .._types import Array, Float

Transitions = tuple[Array, ...]


UNROLL = 8
UNROLL_MIN_STEPS = 512
UNROLL_MIN_ELEMENTS = 2**16
"""A scan is unrolled ``UNROLL`` times when it runs at least ``UNROLL_MIN_STEPS`` steps or its inputs [L, *shape]
hold at least ``UNROLL_MIN_ELEMENTS`` numbers (a full block of a long sequence over many states): XLA's
per-iteration overhead dominates these small steps on CPU (a 1e5-step filter over 96 states: 0.535 s rolled,
0.27 s unrolled). Shorter scans stay rolled: an unrolled body costs compile time that their run does not repay
(default spec, 300 steps: first ``fit_em`` call 11 s unrolled, 8.8 s rolled; docs/benchmarks.md)."""


def unroll(steps_shape: tuple[int, ...]) -> int:
    """The unroll factor of a scan over inputs of shape [L, *shape] (``UNROLL_MIN_STEPS``, ``UNROLL_MIN_ELEMENTS``)."""
    return UNROLL if steps_shape[0] >= UNROLL_MIN_STEPS or math.prod(steps_shape) >= UNROLL_MIN_ELEMENTS else 1


DOT_STATES = 16
DOT_MESSAGE = 512
"""``apply_along_axis`` takes a dot product for matrices of at least ``DOT_STATES`` states on messages of at least
``DOT_MESSAGE`` elements (measured on XLA:CPU: 55 against 195 ms for a 5000-step filter over 1024 states)."""

MERGE_STATES = 8
MERGE_STATES_LARGE = 32
LARGE_STATES = 256
"""``merge_invariant_axes`` merges runs of time-invariant axes into at most ``MERGE_STATES`` states, or
``MERGE_STATES_LARGE`` when the other axes have more than ``LARGE_STATES`` states (then moved by dot products)."""


def _axis_shape(ndim: int, axis: int, sizes: tuple[int, int]) -> list[int]:
    shape = [1] * (ndim + 1)
    shape[axis], shape[axis + 1] = sizes
    return shape


def is_rank_one(matrix: Array) -> bool:
    """Whether a member of ``transitions`` is a law [n] standing for the rank-one matrix 1 law^T."""
    return matrix.ndim == 1


def dense(matrix: Array) -> Array:
    """A member of ``transitions`` as an [n, n] (or [T, n, n]) matrix (a law [n] becomes 1 law^T)."""
    return jnp.broadcast_to(matrix[None, :], matrix.shape * 2) if is_rank_one(matrix) else matrix


def _law_shape(ndim: int, axis: int, size: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = size
    return shape


def apply_along_axis(
    message: Array, matrix: Float[Array, "n n"], axis: int, *, transpose: bool = False
) -> Array:
    """out[..., j, ...] = sum_i message[..., i, ...] P[i, j] (or P[j, i] with ``transpose``).

    Written as a broadcast product and a sum, which XLA fuses into one loop; a dot product
    per factor costs several times more on these small tensors. Large matrices on large
    messages (``DOT_STATES``, e.g. the merged persistence chains of a 1024-state kept space)
    take a dot product: chains of fused sums over 8 states or more cost XLA:CPU several
    times that there. For a law [n] (rank one): the sum over the axis times the law, or
    (``transpose``) the contraction with the law, the same for every state of the axis.
    """
    if is_rank_one(matrix):
        law = matrix.reshape(_law_shape(message.ndim, axis, matrix.shape[0]))
        if transpose:
            return jnp.broadcast_to(jnp.sum(message * law, axis=axis, keepdims=True), message.shape)
        return jnp.sum(message, axis=axis, keepdims=True) * law
    matrix = matrix.T if transpose else matrix
    if matrix.shape[0] >= DOT_STATES and message.size >= DOT_MESSAGE:
        return jnp.moveaxis(jnp.tensordot(message, matrix, axes=([axis], [0])), -1, axis)
    expanded = jnp.expand_dims(message, axis + 1)
    return jnp.sum(expanded * matrix.reshape(_axis_shape(message.ndim, axis, matrix.shape)), axis=axis)


def propagate(message: Array, matrices: Sequence[Array], *, transpose: bool = False,
              order: Sequence[int] | None = None) -> Array:
    """Apply every factor's matrix along its axis (in ``order``, default axis order): one step of the factorial chain.

    Rank-one axes go first, reduced to size one (a sum, or the contraction with the law), so
    the other factors act on a tensor that many times smaller; the laws are broadcast back last.
    """
    order = range(len(matrices)) if order is None else order
    laws = [axis for axis in order if is_rank_one(matrices[axis])]
    if not laws:
        for axis in order:
            message = apply_along_axis(message, matrices[axis], axis, transpose=transpose)
        return message
    shape = message.shape
    for axis in laws:
        law = matrices[axis].reshape(_law_shape(message.ndim, axis, shape[axis]))
        message = jnp.sum(message * law if transpose else message, axis=axis, keepdims=True)
    for axis in order:
        if not is_rank_one(matrices[axis]):
            message = apply_along_axis(message, matrices[axis], axis, transpose=transpose)
    if not transpose:
        for axis in laws:
            message = message * matrices[axis].reshape(_law_shape(message.ndim, axis, shape[axis]))
    return jnp.broadcast_to(message, shape)


def predict(filtered: Array, matrices: Sequence[Array]) -> Array:
    """P(h_{t+1} | y_{1:t}) = sum_h P(h_t = h | y_{1:t}) P(h, h'), one [n, n] matrix per axis."""
    return propagate(filtered, matrices)


def condition(predicted: Array, scaled_likelihood: Array) -> tuple[Array, Float[Array, ""]]:
    """(P(h_t | y_{1:t}), c_t / exp(m_t)) from P(h_t | y_{1:t-1}) and p(y_t | h_t) / exp(m_t)."""
    joint = predicted * scaled_likelihood
    normaliser = jnp.sum(joint)
    return joint / normaliser, normaliser


def backward_step(beta: Array, scaled_likelihood: Array, normaliser: Array, matrices: Sequence[Array],
                  order: Sequence[int]) -> Array:
    """beta_hat_{t-1} = P_t r_t with r_t = b_t * beta_hat_t / c_t (the matrices applied along the axes in ``order``)."""
    return propagate(scaled_likelihood * beta / normaliser, matrices, transpose=True, order=order)


def max_product_step(log_delta: Array, log_matrices: Sequence[Array]) -> Array:
    """max_h [log_delta(h) + log P(h, h')], one factor's max-plus product at a time."""
    for axis, log_matrix in enumerate(log_matrices):
        log_delta = max_along_axis(log_delta, log_matrix, axis)
    return log_delta


class MergedAxes(NamedTuple):
    """The joint state tensor with runs of time-invariant axes merged (``merge_invariant_axes``).

    Attributes:
        shape: the merged shape (a message of the original shape reshapes to it).
        transitions: one matrix per merged axis, the Kronecker product of its members'.
        groups: the original axes of every merged axis, in order.
    """

    shape: tuple[int, ...]
    transitions: Transitions
    groups: tuple[tuple[int, ...], ...]


def merge_invariant_axes(transitions: Transitions, shape: tuple[int, ...], max_size: int = 8) -> MergedAxes:
    """Runs of consecutive time-invariant axes after the first, merged into one axis whose matrix
    is their Kronecker product (while it has at most ``max_size`` states); rank-one axes stay alone.

    The joint transition is unchanged; a scan step then applies fewer, larger matrices, which
    XLA:CPU runs faster (one [8, 8] product costs less than three [2, 2] ones).
    """
    groups: list[list[int]] = [[0]]
    run: list[int] = []

    def close_run():
        if run:
            groups.append(list(run))
            run.clear()

    for axis in range(1, len(shape)):
        if is_rank_one(transitions[axis]):
            close_run()
            groups.append([axis])
            continue
        if transitions[axis].ndim == 2 and (not run or math.prod(shape[a] for a in run) * shape[axis] <= max_size):
            run.append(axis)
            continue
        close_run()
        if transitions[axis].ndim == 2:
            run.append(axis)
        else:
            groups.append([axis])
    close_run()
    merged = tuple(functools.reduce(jnp.kron, [transitions[a] for a in group]) if len(group) > 1
                   else transitions[group[0]] for group in groups)
    return MergedAxes(tuple(math.prod(shape[a] for a in group) for group in groups), merged,
                      tuple(tuple(group) for group in groups))


def split_pairwise(merged_pairwise: Float[Array, "L n n"], group: tuple[int, ...], shape: tuple[int, ...]
                   ) -> tuple[Float[Array, "L m m"], ...]:
    """The per-step two-slice marginals of each original axis of a merged one (sums over its other members)."""
    if len(group) == 1:
        return (merged_pairwise,)
    sizes = tuple(shape[a] for a in group)
    tensor = merged_pairwise.reshape(merged_pairwise.shape[:1] + sizes + sizes)
    k = len(group)
    others = [tuple(1 + j for j in range(k) if j != i) for i in range(k)]
    return tuple(jnp.sum(tensor, axis=axes + tuple(k + a for a in axes)) for axes in others)


def max_along_axis(log_message: Array, log_matrix: Float[Array, "n n"], axis: int) -> Array:
    """out[..., j, ...] = max_i (log_message[..., i, ...] + log P[i, j]); for a log law [n] (rank one):
    max_i log_message + log law_j."""
    if is_rank_one(log_matrix):
        return jnp.max(log_message, axis=axis, keepdims=True) + log_matrix.reshape(
            _law_shape(log_message.ndim, axis, log_matrix.shape[0]))
    expanded = jnp.expand_dims(log_message, axis + 1)
    return jnp.max(expanded + log_matrix.reshape(_axis_shape(log_message.ndim, axis, log_matrix.shape)), axis=axis)


def time_varying(transitions: Transitions) -> tuple[Array, ...]:
    """The [T, n, n] members of ``transitions``, to be scanned over."""
    return tuple(m for m in transitions if m.ndim == 3)


def at_step(transitions: Transitions, step_slices: Sequence[Array]) -> tuple[Array, ...]:
    """``transitions`` with each time-varying member replaced by its slice at one step."""
    slices = iter(step_slices)
    return tuple(next(slices) if m.ndim == 3 else m for m in transitions)

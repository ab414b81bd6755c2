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
sequence).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax.numpy as jnp

from .._types import Array, Float

Transitions = tuple[Array, ...]


UNROLL = 8
"""Scan unroll factor: XLA's per-iteration overhead dominates these small steps on CPU."""


def _axis_shape(ndim: int, axis: int, sizes: tuple[int, int]) -> list[int]:
    shape = [1] * (ndim + 1)
    shape[axis], shape[axis + 1] = sizes
    return shape


def apply_along_axis(
    message: Array, matrix: Float[Array, "n n"], axis: int, *, transpose: bool = False
) -> Array:
    """out[..., j, ...] = sum_i message[..., i, ...] P[i, j] (or P[j, i] with ``transpose``).

    Written as a broadcast product and a sum, which XLA fuses into one loop; a dot product
    per factor costs several times more on these small tensors.
    """
    matrix = matrix.T if transpose else matrix
    expanded = jnp.expand_dims(message, axis + 1)
    return jnp.sum(expanded * matrix.reshape(_axis_shape(message.ndim, axis, matrix.shape)), axis=axis)


def propagate(message: Array, matrices: Sequence[Array], *, transpose: bool = False) -> Array:
    """Apply every factor's matrix along its axis: one step of the factorial chain."""
    for axis, matrix in enumerate(matrices):
        message = apply_along_axis(message, matrix, axis, transpose=transpose)
    return message


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
    message = scaled_likelihood * beta / normaliser
    for axis in order:
        message = apply_along_axis(message, matrices[axis], axis, transpose=True)
    return message


def max_product_step(log_delta: Array, log_matrices: Sequence[Array]) -> Array:
    """max_h [log_delta(h) + log P(h, h')], one factor's max-plus product at a time."""
    for axis, log_matrix in enumerate(log_matrices):
        log_delta = max_along_axis(log_delta, log_matrix, axis)
    return log_delta


def merge_invariant_axes(
    transitions: Transitions, shape: tuple[int, ...], max_size: int = 8
) -> tuple[tuple[int, ...], Transitions]:
    """Runs of consecutive time-invariant axes after the first, merged into one axis whose matrix
    is their Kronecker product (while it has at most ``max_size`` states).

    The joint transition is unchanged; a scan step then applies fewer, larger matrices, which
    XLA:CPU runs faster (one [8, 8] product costs less than three [2, 2] ones).

    Returns:
        (merged shape, merged transitions); a message of ``shape`` reshapes to the merged shape.
    """
    merged_shape, merged = [shape[0]], [transitions[0]]
    run: list[Array] = []

    def close_run():
        if run:
            merged.append(functools.reduce(jnp.kron, run))
            merged_shape.append(merged[-1].shape[-1])
            run.clear()

    for size, matrix in zip(shape[1:], transitions[1:], strict=True):
        if matrix.ndim == 2 and (not run or math.prod(m.shape[-1] for m in run) * size <= max_size):
            run.append(matrix)
            continue
        close_run()
        if matrix.ndim == 2:
            run.append(matrix)
        else:
            merged.append(matrix)
            merged_shape.append(size)
    close_run()
    return tuple(merged_shape), tuple(merged)


def max_along_axis(log_message: Array, log_matrix: Float[Array, "n n"], axis: int) -> Array:
    """out[..., j, ...] = max_i (log_message[..., i, ...] + log P[i, j])."""
    expanded = jnp.expand_dims(log_message, axis + 1)
    return jnp.max(expanded + log_matrix.reshape(_axis_shape(log_message.ndim, axis, log_matrix.shape)), axis=axis)


def time_varying(transitions: Transitions) -> tuple[Array, ...]:
    """The [T, n, n] members of ``transitions``, to be scanned over."""
    return tuple(m for m in transitions if m.ndim == 3)


def at_step(transitions: Transitions, step_slices: Sequence[Array]) -> tuple[Array, ...]:
    """``transitions`` with each time-varying member replaced by its slice at one step."""
    slices = iter(step_slices)
    return tuple(next(slices) if m.ndim == 3 else m for m in transitions)

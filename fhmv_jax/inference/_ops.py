"""Factor-by-factor operations on the joint state tensor.

The joint transition of a factorial HMM is the Kronecker product of its factors'
matrices. A message over the joint state is kept as a tensor with one axis per factor,
and each factor's matrix is applied along its own axis, so one step costs
O(S * sum_f n_f) instead of O(S^2).

``transitions`` is a tuple with one matrix per axis: [n, n] if time-invariant or
[T, n, n] if time-varying, where entry t maps the state at t - 1 to the state at t
(entry 0 is never used).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
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

    for size, matrix in zip(shape[1:], transitions[1:]):
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


def state_axes(ndim: int, leading: int = 1) -> tuple[int, ...]:
    """Axes of the state tensor in an array with ``leading`` batch/time axes."""
    return tuple(range(leading, leading + ndim))


def normalise(probs: Array, axes: tuple[int, ...]) -> Array:
    return probs / jnp.sum(probs, axis=axes, keepdims=True)


def scaled_likelihoods(log_likelihoods: Float[Array, "T ..."]) -> tuple[Array, Float[Array, " T"]]:
    """exp(log b_t - m_t) with m_t = max over states: in (0, 1], no overflow; returns (B, m)."""
    axes = state_axes(log_likelihoods.ndim - 1)
    shift = jax.lax.stop_gradient(jnp.max(log_likelihoods, axis=axes))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    return jnp.exp(log_likelihoods - shift.reshape((-1,) + (1,) * len(axes))), shift

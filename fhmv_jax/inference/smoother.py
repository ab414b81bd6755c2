"""The backward recursion of the sequential backend and the two-slice marginals of every factor.

With alpha_t the filtered law, c_t the normalisers and r_t = b_t * beta_hat_t / c_t, the
smoothed law is gamma_t = alpha_t * beta_hat_t and

    xi_t(h, h') = P(h_{t-1} = h, h_t = h' | y) = alpha_{t-1}(h) prod_f P^f_t(h_f, h'_f) r_t(h'),

whose per-factor marginals are contracted here without ever forming the S x S array.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .._types import Array, Float
from ._ops import UNROLL, Transitions, apply_along_axis, at_step, backward_step


def axes_by_kind(transitions: Transitions) -> tuple[list[int], list[int]]:
    """(axes with a time-varying [T, n, n] matrix, axes with a time-invariant [n, n] one)."""
    return [a for a, m in enumerate(transitions) if m.ndim == 3], [a for a, m in enumerate(transitions) if m.ndim == 2]


def backward_scan(
    beta: Array, transitions: Transitions, scaled: Array, normalisers: Array, incoming: tuple[Array, ...]
) -> tuple[Array, Float[Array, "L ..."]]:
    """beta_hat_{t-1} = P_t r_t over L steps in reverse (the scan stores only beta_hat).

    beta_hat_t = p(y_{t+1:T} | h_t) / p(y_{t+1:T} | y_{1:t}), starting from ones after the last step.

    Args:
        beta: [*shape] beta_hat of the step after the last.
        transitions: one matrix per axis; the time-varying ones are taken from ``incoming``.
        scaled, normalisers: the forward pass's [L, *shape] scaled likelihoods and [L] normalisers.
        incoming: each time-varying matrix from the step before each step, [L, n, n].

    Returns:
        (beta_hat before the first step, betas [L, *shape]).
    """
    varying, invariant = axes_by_kind(transitions)

    def _step(beta, inputs):
        b_t, c_t, matrices_t = inputs
        return backward_step(beta, b_t, c_t, at_step(transitions, matrices_t), varying + invariant), beta

    return jax.lax.scan(_step, beta, (scaled, normalisers, incoming), reverse=True, unroll=UNROLL)


def _contract_except(left: Array, right: Array, axis: int) -> Float[Array, "n n"]:
    """sum over every axis but ``axis`` of left[..., a, ...] * right[..., b, ...] -> [a, b] (one fused reduction)."""
    product = jnp.expand_dims(left, axis + 1) * jnp.expand_dims(right, axis)
    return jnp.sum(product, axis=tuple(a for a in range(product.ndim) if a not in (axis, axis + 1)))


def _step_pairwise(previous: Array, weighted: Array, matrices: Sequence[Array]) -> tuple[Array, ...]:
    """xi^f_t for every factor f at one step: alpha_{t-1} moved forward along the factors before f,
    r_t moved back along the factors after f, contracted over every other axis, times P^f_t."""
    num = len(matrices)
    forward = [previous]
    for axis in range(num - 1):
        forward.append(apply_along_axis(forward[-1], matrices[axis], axis))
    backward = [weighted]
    for axis in range(num - 1, 0, -1):
        backward.append(apply_along_axis(backward[-1], matrices[axis], axis, transpose=True))
    backward.reverse()
    return tuple(matrices[f] * _contract_except(forward[f], backward[f], f) for f in range(num))


def pairwise_marginals(
    previous: Float[Array, "L ..."], weighted: Float[Array, "L ..."], transitions: Transitions,
    incoming: tuple[Array, ...],
) -> tuple[Float[Array, "L n n"], ...]:
    """Per step and factor, xi^f_t(a, b) = P(h^f_{t-1} = a, h^f_t = b | y), vectorised over L steps.

    Args:
        previous: [L, *shape] alpha_{t-1} (zero where t has no predecessor).
        weighted: [L, *shape] r_t.
        transitions: one matrix per axis; the time-varying ones are taken from ``incoming`` [L, n, n].
    """
    return jax.vmap(lambda a, r, m: _step_pairwise(a, r, at_step(transitions, m)))(previous, weighted, incoming)


def moved_back_along_varying(weighted: Array, transitions: Transitions, incoming: tuple[Array, ...]) -> Array:
    """[L, *shape] r_t moved back along the time-varying axes by their per-step matrices."""
    messages = weighted
    for axis, per_step in zip(axes_by_kind(transitions)[0], incoming, strict=True):
        moved = jnp.einsum("t...j,tij->t...i", jnp.moveaxis(messages, axis + 1, -1), per_step)
        messages = jnp.moveaxis(moved, -1, axis + 1)
    return messages


def gram(previous: Float[Array, "L ..."], moved: Float[Array, "L ..."]) -> Float[Array, "S S"]:
    """sum_t alpha_{t-1}(h) m_t(k) over a block (``moved``: ``moved_back_along_varying``), one matrix product."""
    steps = previous.shape[0]
    return previous.reshape(steps, -1).T @ moved.reshape(steps, -1)


def invariant_counts(gram_matrix: Array, transitions: Transitions, shape: tuple[int, ...]) -> tuple[Array | None, ...]:
    """sum_t xi^f_t for every time-invariant factor f from the summed ``gram``: contract it with every other
    time-invariant matrix and take the diagonal of the time-varying axes (one einsum per factor);
    ``None`` for the time-varying factors."""
    tensor = gram_matrix.reshape(shape + shape)
    num = len(transitions)
    left = [chr(ord("a") + i) for i in range(num)]
    right = [chr(ord("A") + i) if m.ndim == 2 else left[i] for i, m in enumerate(transitions)]
    counts = []
    for axis, matrix in enumerate(transitions):
        if matrix.ndim == 3:
            counts.append(None)
            continue
        operands, subscripts = [tensor], ["".join(left) + "".join(right)]
        for g, other in enumerate(transitions):
            if g != axis and other.ndim == 2:
                operands.append(other)
                subscripts.append(left[g] + right[g])
        contraction = jnp.einsum(",".join(subscripts) + "->" + left[axis] + right[axis], *operands)
        counts.append(matrix * contraction)
    return tuple(counts)


def invariant_kronecker(transitions: Transitions) -> Array:
    """The Kronecker product of the time-invariant matrices (in axis order)."""
    return functools.reduce(jnp.kron, [m for m in transitions if m.ndim == 2])


def varying_pairwise(
    others: Array, axis: int, incoming: Float[Array, "L n n"], previous: Array, weighted: Array
) -> Float[Array, "L n n"]:
    """Per-step xi_t(a, b) of the one time-varying factor: alpha_{t-1} moved forward along the other
    (time-invariant) axes by ``others`` (their Kronecker product: one matrix product, faster here than one
    per axis), contracted with r_t over those axes, times P_t(a, b)."""
    steps, shape = previous.shape[0], previous.shape[1:]
    left = jnp.moveaxis(previous, axis + 1, -1).reshape(steps, math.prod(shape) // shape[axis], shape[axis])
    right = jnp.moveaxis(weighted, axis + 1, -1).reshape(steps, -1, shape[axis])
    moved = jnp.swapaxes(jnp.swapaxes(left, 1, 2) @ others, 1, 2)
    return incoming * jnp.einsum("tha,thb->tab", moved, right)

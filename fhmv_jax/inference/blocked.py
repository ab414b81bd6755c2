"""Forward-backward in blocks of time steps, for the expected statistics of EM.

EM needs only sums over time of the smoothed posterior: each factor's expected transition
counts and whatever the caller reduces from the likelihood terms (component moments). The
forward pass keeps only the filtered probabilities; the backward pass then runs over the
blocks in reverse order, recomputes each block's likelihoods from the caller's inputs, and
reduces the block's messages and likelihood terms before the next block. The scan outputs,
the likelihoods and everything derived from them exist for one block at a time (a few MB,
cache-resident) instead of as [T, S] arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._types import Array, Bool, Float, Scalar
from ._ops import (
    UNROLL,
    Transitions,
    apply_along_axis,
    at_step,
    merge_invariant_axes,
    time_varying,
)
from .filter import filter_scan

BLOCK_STATE_STEPS = 2**17
"""Steps x states per block by default (rounded down to a power of two in steps): 1024 steps for the
default 96-state model, whose [L, S] messages then stay in the per-core cache on CPU, and 8192 for a
16-state HMM (measured best, docs/benchmarks.md)."""

BLOCK_STEPS: int | None = None
"""Steps per block if set, overriding ``BLOCK_STATE_STEPS``."""

Likelihoods = Callable[[object], tuple[Array, Array]]
"""Maps the inputs of L consecutive steps (a pytree with leading axis L) to ([L, *shape] p(y_t | h_t) / exp(m_t),
[L] m_t), for per-step shifts m_t that keep the first in floating-point range (e.g. the step's largest log-density)."""


class ExpectedStatistics(NamedTuple):
    """Sums over time of the smoothed posterior.

    Attributes:
        log_likelihood: log p(y) of the valid steps.
        initial: [*shape] P(h_1 | y).
        smoothed: [T, *shape] P(h_t | y), zero on steps outside the mask (XLA drops it from a
            program that does not use it).
        counts: per factor axis, sum_t P(h^f_{t-1} = a, h^f_t = b | y) over valid t: [n, n] for a
            time-invariant factor, per step [T-1, n, n] (zero where t is not valid) for a time-varying one.
        sums: the caller's reductions, summed over blocks.
    """

    log_likelihood: Scalar
    initial: Float[Array, "..."]
    smoothed: Float[Array, "T ..."]
    counts: tuple[Array, ...]
    sums: object


def default_block_steps(num_states: int) -> int:
    """``BLOCK_STEPS`` if set, else the power of two nearest below ``BLOCK_STATE_STEPS / num_states``."""
    return BLOCK_STEPS or 1 << max((BLOCK_STATE_STEPS // num_states).bit_length() - 1, 0)


def block_layout(num_steps: int, block_steps: int) -> tuple[int, int]:
    """(number of blocks, steps per block): blocks of at most ``block_steps`` steps that cover
    ``num_steps`` with less than one padded step per block."""
    num_blocks = -(-num_steps // min(block_steps, num_steps))
    return num_blocks, -(-num_steps // num_blocks)


def _blocked(tree, num_blocks: int, size: int, mode: str = "edge"):
    """Arrays [T, ...] padded at the end (repeating the last row, or with zeros) and split into [num_blocks, size, ...]."""

    def split(a):
        padding = [(0, num_blocks * size - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
        return jnp.pad(a, padding, mode=mode).reshape((num_blocks, size) + a.shape[1:])

    return jax.tree.map(split, tree)


def _axes_by_kind(transitions: Transitions) -> tuple[list[int], list[int]]:
    """(axes with a time-varying [T, n, n] matrix, axes with a time-invariant [n, n] one)."""
    return [a for a, m in enumerate(transitions) if m.ndim == 3], [a for a, m in enumerate(transitions) if m.ndim == 2]


def _backward_scan(
    beta: Array, merged: Transitions, scaled: Array, normalisers: Array, matrices: tuple[Array, ...]
) -> tuple[Array, tuple[Array, Array, Array]]:
    """beta_hat_{t-1} = P_t r_t, r_t = b_t * beta_hat_t / c_t, over L steps in reverse (merged axes).

    The scan stores only beta_hat; r_t and m_t are recomputed from it, vectorised over the steps.

    Returns:
        (beta_hat before the first step, (beta_hat_t, r_t, m_t = r_t moved back along the
        time-varying axes), each [L, *shape]).
    """
    varying, invariant = _axes_by_kind(merged)

    def _step(beta, inputs):
        b_t, c_t, matrices_t = inputs
        step_matrices = at_step(merged, matrices_t)
        previous = b_t * beta / c_t
        for axis in varying + invariant:
            previous = apply_along_axis(previous, step_matrices[axis], axis, transpose=True)
        return previous, beta

    first, betas = jax.lax.scan(_step, beta, (scaled, normalisers, matrices), reverse=True, unroll=UNROLL)
    weighted = scaled * betas / normalisers.reshape((-1,) + (1,) * (scaled.ndim - 1))
    messages = weighted
    for axis, per_step in zip(varying, matrices):
        moved = jnp.einsum("t...j,tij->t...i", jnp.moveaxis(messages, axis + 1, -1), per_step)
        messages = jnp.moveaxis(moved, -1, axis + 1)
    return first, (betas, weighted, messages)


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


def _varying_pairwise(
    others: Array, axis: int, matrices: Float[Array, "L n n"], alpha_prev: Array, weighted: Array
) -> Float[Array, "L n n"]:
    """Per-step xi_t(a, b) of the time-varying factor: alpha_{t-1} moved forward along the other (time-invariant)
    axes by ``others``, their Kronecker product (one matrix product, faster here than one per axis), contracted
    with r_t over those axes, times P_t(a, b)."""
    steps, shape = alpha_prev.shape[0], alpha_prev.shape[1:]
    left = jnp.moveaxis(alpha_prev, axis + 1, -1).reshape(steps, -1, shape[axis])
    right = jnp.moveaxis(weighted, axis + 1, -1).reshape(steps, -1, shape[axis])
    moved = jnp.swapaxes(jnp.swapaxes(left, 1, 2) @ others, 1, 2)
    return matrices * jnp.einsum("tha,thb->tab", moved, right)


def _scaled_block(likelihoods: Likelihoods, inputs, valid: Array, shape: tuple[int, ...]) -> tuple[Array, Array]:
    """The block's scaled likelihoods in ``shape`` (1, uninformative, where ``valid`` is 0) and their shifts."""
    scaled, shift = likelihoods(inputs)
    keep = valid > 0
    scaled = jnp.where(keep.reshape((-1,) + (1,) * (scaled.ndim - 1)), scaled, 1.0)
    return scaled.reshape((-1,) + shape), jnp.where(keep, shift, 0.0)


class _Layout(NamedTuple):
    """Blocked inputs of a forward-backward pass (merged time-invariant axes; see ``merge_invariant_axes``)."""

    size: int
    initial: Array
    merged_shape: tuple[int, ...]
    merged: Transitions
    inputs: object
    valid: Float[Array, "N L"]
    now: tuple[Array, ...]
    following: tuple[Array, ...]

    @classmethod
    def of(cls, initial_probs, transitions, inputs, mask, block_steps) -> _Layout:
        num_blocks, size = block_layout(mask.shape[0], block_steps or default_block_steps(initial_probs.size))
        merged_shape, merged = merge_invariant_axes(transitions, initial_probs.shape)
        varying = time_varying(merged)
        return cls(
            size=size,
            initial=initial_probs.reshape(merged_shape),
            merged_shape=merged_shape,
            merged=merged,
            inputs=_blocked(inputs, num_blocks, size),
            valid=_blocked(mask.astype(initial_probs.dtype), num_blocks, size, mode="constant"),
            now=_blocked(varying, num_blocks, size),
            following=_blocked(tuple(jnp.roll(m, -1, axis=0) for m in varying), num_blocks, size),
        )


def _forward_blocks(layout: _Layout, likelihoods: Likelihoods) -> tuple[Scalar, Array, Array]:
    """(log-likelihood, filtered [N, L, *merged shape], normalisers [N, L]) block by block."""

    def forward_block(predicted, rows):
        block_inputs, block_valid, next_matrices = rows
        scaled, shift = _scaled_block(likelihoods, block_inputs, block_valid, layout.merged_shape)
        predicted, filtered, normalisers = filter_scan(predicted, layout.merged, scaled, next_matrices)
        return predicted, (filtered, normalisers, shift)

    rows = (layout.inputs, layout.valid, layout.following)
    _, (filtered, normalisers, shifts) = jax.lax.scan(forward_block, layout.initial, rows)
    return jnp.sum(jnp.log(normalisers)) + jnp.sum(shifts), filtered, normalisers


def blocked_log_likelihood(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    likelihoods: Likelihoods,
    inputs,
    mask: Bool[Array, " T"],
    *,
    block_steps: int | None = None,
) -> Scalar:
    """log p(y) of the valid steps by the forward filter, block by block (arguments as in ``expected_statistics``)."""
    layout = _Layout.of(initial_probs, transitions, inputs, mask, block_steps)
    return _forward_blocks(layout, likelihoods)[0]


def expected_statistics(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    likelihoods: Likelihoods,
    inputs,
    mask: Bool[Array, " T"],
    reduce: Callable[[object, Array], object] | None = None,
    *,
    block_steps: int | None = None,
) -> ExpectedStatistics:
    """Log-likelihood, smoothed marginals, expected transition counts and the caller's sums.

    Steps outside ``mask`` (padding, at the end) get b = 1 (uninformative) and weight 0,
    which leaves the posteriors of the valid steps exact.

    Args:
        initial_probs: [*shape] law of h_1.
        transitions: one matrix per axis ([n, n] or [T, n, n]); at most one time-varying.
        likelihoods: block inputs -> scaled likelihoods and their shifts (see ``Likelihoods``).
        inputs: a pytree of arrays with leading axis T, cut into blocks for ``likelihoods``
            and ``reduce`` (padded by repeating the last row).
        mask: [T] valid steps.
        reduce: (block inputs, [L, *shape] smoothed marginals, zero outside the mask) -> a pytree
            of sums over the block's steps.
        block_steps: at most this many steps per block (default ``default_block_steps``).
    """
    shape, dtype = initial_probs.shape, initial_probs.dtype
    num_steps, num_states = mask.shape[0], math.prod(shape)
    varying, invariant = _axes_by_kind(transitions)
    if len(varying) > 1:
        raise NotImplementedError("expected statistics support at most one time-varying factor")
    layout = _Layout.of(initial_probs, transitions, inputs, mask, block_steps)
    size, merged_shape, merged = layout.size, layout.merged_shape, layout.merged
    log_likelihood, filtered, normalisers = _forward_blocks(layout, likelihoods)
    before = jnp.concatenate([jnp.zeros_like(filtered[:1, 0]), filtered[:-1, -1]])
    others = functools.reduce(jnp.kron, [transitions[a] for a in invariant]) if varying else None

    def backward_block(carry, rows):
        beta, totals = carry
        block_inputs, block_valid, matrices, alpha, alpha_before, block_normalisers = rows
        scaled, _ = _scaled_block(likelihoods, block_inputs, block_valid, merged_shape)
        beta, (betas, weighted, messages) = _backward_scan(beta, merged, scaled, block_normalisers, matrices)
        steps_shape = (size,) + (1,) * len(merged_shape)
        smoothed = (alpha * betas * block_valid.reshape(steps_shape)).reshape((size,) + shape)
        alpha_prev = jnp.concatenate([alpha_before[None], alpha[:-1]]) * block_valid.reshape(steps_shape)
        gram = alpha_prev.reshape(size, num_states).T @ messages.reshape(size, num_states)
        sums = (gram, reduce(block_inputs, smoothed) if reduce else ())
        pairwise = tuple(
            _varying_pairwise(others, axis, matrices[0], alpha_prev.reshape((size,) + shape), weighted.reshape((size,) + shape))
            for axis in varying
        )
        return (beta, jax.tree.map(jnp.add, totals, sums)), (smoothed, smoothed[0], pairwise)

    rows = (layout.inputs, layout.valid, layout.now, filtered, before, normalisers)
    ones = jnp.ones(merged_shape, dtype)
    block_smoothed = jax.ShapeDtypeStruct((size,) + shape, dtype)
    reduced = jax.eval_shape(reduce, jax.tree.map(lambda a: a[0], layout.inputs), block_smoothed) if reduce else ()
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (jax.ShapeDtypeStruct(2 * (num_states,), dtype), reduced))
    (_, totals), (smoothed, firsts, pairwise) = jax.lax.scan(backward_block, (ones, zeros), rows, reverse=True)
    smoothed = smoothed.reshape((-1,) + shape)[:num_steps]
    pairwise = [p.reshape((-1,) + p.shape[2:])[1:num_steps] for p in pairwise]
    gram, sums = totals
    counts = [None] * len(transitions)
    for axis in invariant:
        counts[axis] = _counts_from_gram(gram.reshape(shape + shape), transitions, axis)
    for axis, per_step in zip(varying, pairwise):
        counts[axis] = per_step
    return ExpectedStatistics(log_likelihood, firsts[0], smoothed, tuple(counts), sums)

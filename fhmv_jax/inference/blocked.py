"""Forward-backward in blocks of time steps: the one driver of the filter, the smoother and the E-step.

The forward pass keeps only the filtered probabilities; the backward pass runs over the
blocks in reverse order, recomputes each block's likelihoods from the caller's inputs, and
hands the block's posterior (``BlockPosterior``) to the caller's reductions (summed over
blocks) and per-step read-outs (stacked). Likelihoods and everything derived from them exist
for one block at a time (a few MB, cache-resident) instead of as [T, S] arrays. One block
covering the sequence is the classic forward-backward smoother.

Sequences are padded at their end: steps outside ``mask`` get b = 1 (uninformative) and
weight 0, which leaves the posteriors of the valid steps exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._types import Array, Bool, Float, Scalar
from ._ops import Transitions, merge_invariant_axes, time_varying
from .filter import forward_scan
from .smoother import backward_scan, pairwise_marginals

BLOCK_STATE_STEPS = 2**17
"""Steps x states per block by default (rounded down to a power of two in steps): 1024 steps for the
default 96-state model, whose [L, S] messages then stay in the per-core cache on CPU, and 8192 for a
16-state HMM (measured best, docs/benchmarks.md)."""

Likelihoods = Callable[[object], tuple[Array, Array]]
"""Maps the inputs of L consecutive steps (a pytree with leading axis L) to ([L, *shape] p(y_t | h_t) / exp(m_t),
[L] m_t), for per-step shifts m_t that keep the first in floating-point range (e.g. the step's largest log-density)."""


class BlockPosterior(NamedTuple):
    """The posterior of the L steps of one block, in the joint state shape, zero on padded steps.

    Attributes:
        previous: [L, *shape] alpha_{t-1} = P(h_{t-1} | y_{1:t-1}) (zero at the first step of the sequence).
        weighted: [L, *shape] r_t = p(y_t | h_t) beta_hat_t / (c_t exp(m_t)), so that
            xi_t(h, h') = previous(h) P_t(h, h') r_t(h').
        smoothed: [L, *shape] gamma_t = P(h_t | y).
        incoming: each time-varying matrix from t - 1 to t, [L, n, n].
    """

    previous: Float[Array, "L ..."]
    weighted: Float[Array, "L ..."]
    smoothed: Float[Array, "L ..."]
    incoming: tuple[Array, ...]


Reduction = Callable[[object, BlockPosterior], object]
"""(the block's inputs, its ``BlockPosterior``) -> a pytree, summed over blocks or stacked over steps."""


class Posterior(NamedTuple):
    """What ``forward_backward`` returns.

    Attributes:
        log_likelihood: log p(y) of the valid steps.
        initial: [*shape] P(h_1 | y).
        sums: the ``reduce`` pytree summed over blocks.
        steps: the ``collect`` pytree, each leaf with a leading [T] axis.
    """

    log_likelihood: Scalar
    initial: Float[Array, "..."]
    sums: object
    steps: object


class SmootherPosterior(NamedTuple):
    """Forward-backward read-outs of one sequence.

    Attributes:
        log_likelihood: log p(y_{1:T}).
        smoothed: [T, *shape] P(h_t | y_{1:T}).
        pairwise: one [T-1, n_f, n_f] array per factor f: P(h^f_{t-1} = a, h^f_t = b | y_{1:T}) at
            index t - 1, other factors summed out.
    """

    log_likelihood: Scalar
    smoothed: Float[Array, "T ..."]
    pairwise: tuple[Float[Array, "T1 n n"], ...]


class FilterPosterior(NamedTuple):
    """Forward-filter read-outs of one sequence.

    Attributes:
        log_likelihood: log p(y_{1:T}).
        filtered: [T, *shape] P(h_t | y_{1:t}).
    """

    log_likelihood: Scalar
    filtered: Float[Array, "T ..."]


def default_block_steps(num_states: int) -> int:
    """The power of two nearest below ``BLOCK_STATE_STEPS / num_states``."""
    return 1 << max((BLOCK_STATE_STEPS // num_states).bit_length() - 1, 0)


def block_layout(num_steps: int, block_steps: int) -> tuple[int, int]:
    """(number of blocks, steps per block): blocks of at most ``block_steps`` steps that cover
    ``num_steps`` with less than one padded step per block."""
    num_blocks = -(-num_steps // min(block_steps, num_steps))
    return num_blocks, -(-num_steps // num_blocks)


def _blocked(tree, num_blocks: int, size: int, mode: str = "edge"):
    """Arrays [T, ...] padded at the end (repeating the last row, or with zeros), split into [num_blocks, size, ...]."""

    def split(a):
        padding = [(0, num_blocks * size - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
        return jnp.pad(a, padding, mode=mode).reshape((num_blocks, size) + a.shape[1:])

    return jax.tree.map(split, tree)


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
    incoming: tuple[Array, ...]
    outgoing: tuple[Array, ...]

    @classmethod
    def of(cls, initial_probs, transitions, inputs, mask, block_steps) -> _Layout:
        num_blocks, size = block_layout(mask.shape[0], block_steps or default_block_steps(initial_probs.size))
        merged_shape, merged, _ = merge_invariant_axes(transitions, initial_probs.shape)
        outgoing = time_varying(merged)
        return cls(
            size=size,
            initial=initial_probs.reshape(merged_shape),
            merged_shape=merged_shape,
            merged=merged,
            inputs=_blocked(inputs, num_blocks, size),
            valid=_blocked(mask.astype(initial_probs.dtype), num_blocks, size, mode="constant"),
            incoming=_blocked(tuple(jnp.roll(m, 1, axis=0) for m in outgoing), num_blocks, size),
            outgoing=_blocked(outgoing, num_blocks, size),
        )


class _Forward(NamedTuple):
    """The forward pass, block by block: log-likelihood, filtered [N, L, *merged shape], normalisers [N, L] and
    the scaled likelihoods [N, L, *merged shape] (only kept when the backward pass reuses them)."""

    log_likelihood: Scalar
    filtered: Array
    normalisers: Array
    scaled: Array | None


def _forward_blocks(layout: _Layout, likelihoods: Likelihoods, keep_likelihoods: bool = False) -> _Forward:
    def forward_block(predicted, rows):
        block_inputs, block_valid, outgoing = rows
        scaled, shift = _scaled_block(likelihoods, block_inputs, block_valid, layout.merged_shape)
        predicted, filtered, normalisers = forward_scan(predicted, layout.merged, scaled, outgoing)
        return predicted, (filtered, normalisers, shift, scaled if keep_likelihoods else None)

    rows = (layout.inputs, layout.valid, layout.outgoing)
    _, (filtered, normalisers, shifts, scaled) = jax.lax.scan(forward_block, layout.initial, rows)
    return _Forward(jnp.sum(jnp.log(normalisers)) + jnp.sum(shifts), filtered, normalisers, scaled)


def forward_filter(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    likelihoods: Likelihoods,
    inputs,
    mask: Bool[Array, " T"],
    *,
    block_steps: int | None = None,
) -> FilterPosterior:
    """log p(y) and the filtered laws of every step (arguments as in ``forward_backward``); a caller that
    uses only the log-likelihood stores nothing per step (XLA drops the unused laws)."""
    layout = _Layout.of(initial_probs, transitions, inputs, mask, block_steps)
    forward = _forward_blocks(layout, likelihoods)
    filtered = forward.filtered.reshape((-1,) + initial_probs.shape)[: mask.shape[0]]
    return FilterPosterior(forward.log_likelihood, filtered)


def forward_backward(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    likelihoods: Likelihoods,
    inputs,
    mask: Bool[Array, " T"],
    *,
    reduce: Reduction | None = None,
    collect: Reduction | None = None,
    block_steps: int | None = None,
    keep_likelihoods: bool = False,
) -> Posterior:
    """The forward pass, then the backward pass block by block in reverse, handing each block's
    posterior to ``reduce`` (summed over blocks) and ``collect`` (stacked over steps).

    Args:
        initial_probs: [*shape] law of h_1.
        transitions: one matrix per axis ([n, n] or [T, n, n], entry t from step t to t + 1).
        likelihoods: block inputs -> scaled likelihoods and their shifts (see ``Likelihoods``).
        inputs: a pytree of arrays with leading axis T, cut into blocks for ``likelihoods``,
            ``reduce`` and ``collect`` (padded by repeating the last row).
        mask: [T] valid steps (a prefix of the sequence).
        reduce, collect: (block inputs, ``BlockPosterior``) -> a pytree.
        block_steps: at most this many steps per block (default ``default_block_steps``).
        keep_likelihoods: store the forward pass's likelihoods for the backward pass (memory of one
            more [T, S] array) instead of recomputing them block by block.

    Returns:
        ``Posterior``.
    """
    shape = initial_probs.shape
    num_steps = mask.shape[0]
    layout = _Layout.of(initial_probs, transitions, inputs, mask, block_steps)
    size, merged_shape = layout.size, layout.merged_shape
    forward = _forward_blocks(layout, likelihoods, keep_likelihoods)
    filtered = forward.filtered
    before = jnp.concatenate([jnp.zeros_like(filtered[:1, 0]), filtered[:-1, -1]])
    steps_shape = (size,) + (1,) * len(merged_shape)

    def posterior_of(rows, beta):
        block_inputs, block_valid, incoming, alpha, alpha_before, block_normalisers, scaled = rows
        if scaled is None:
            scaled, _ = _scaled_block(likelihoods, block_inputs, block_valid, merged_shape)
        beta, betas = backward_scan(beta, layout.merged, scaled, block_normalisers, incoming)
        valid = block_valid.reshape(steps_shape)
        weighted = scaled * betas / block_normalisers.reshape(steps_shape)
        previous = jnp.concatenate([alpha_before[None], alpha[:-1]]) * valid
        posterior = BlockPosterior(*(a.reshape((size,) + shape) for a in (previous, weighted, alpha * betas * valid)),
                                   incoming)
        return beta, posterior

    def backward_block(carry, rows):
        beta, totals = carry
        beta, posterior = posterior_of(rows, beta)
        sums = reduce(rows[0], posterior) if reduce else ()
        steps = collect(rows[0], posterior) if collect else ()
        return (beta, jax.tree.map(jnp.add, totals, sums)), (posterior.smoothed[0], steps)

    rows = (layout.inputs, layout.valid, layout.incoming, filtered, before, forward.normalisers, forward.scaled)
    first_rows = jax.tree.map(lambda a: a[0], rows)
    ones = jnp.ones(merged_shape, initial_probs.dtype)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(lambda r: reduce(r[0], posterior_of(r, ones)[1]), first_rows) if reduce else ())
    (_, sums), (firsts, steps) = jax.lax.scan(backward_block, (ones, zeros), rows, reverse=True)
    steps = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:num_steps], steps)
    return Posterior(forward.log_likelihood, firsts[0], sums, steps)


def smoother(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    likelihoods: Likelihoods,
    inputs,
    mask: Bool[Array, " T"],
    *,
    block_steps: int | None = None,
) -> SmootherPosterior:
    """Smoothed laws and every factor's per-step two-slice marginals (arguments as in ``forward_backward``)."""

    def collect(_, posterior: BlockPosterior):
        pairwise = pairwise_marginals(posterior.previous, posterior.weighted, transitions, posterior.incoming)
        return posterior.smoothed, pairwise

    posterior = forward_backward(initial_probs, transitions, likelihoods, inputs, mask, collect=collect,
                                 block_steps=block_steps, keep_likelihoods=True)
    smoothed, pairwise = posterior.steps
    return SmootherPosterior(posterior.log_likelihood, smoothed, tuple(p[1:] for p in pairwise))

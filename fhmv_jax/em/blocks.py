"""Sums over time computed block by block.

The E- and M-steps reduce expressions over (t, g, k, v) that are never stored. Written as
whole-sequence expressions inside one jitted ECM step, XLA:CPU merges the identical
subexpressions of different passes (log b in the forward pass, the component sums, the
volatility loads) and then stores every shared [T, G, K, V] intermediate, which costs
several times the arithmetic. Evaluating a pass in a loop over blocks of time steps gives
it its own loop body: nothing is shared with the other passes, and what XLA stores within a
block stays small.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .._types import Array, Float
from ..model.fhmv import EmissionTerms

BLOCK_STEPS = 4096
"""Time steps per block."""


def sum_over_time_blocks(
    fn: Callable[[object, Float[Array, " L"]], object], inputs, *, block_steps: int | None = None
):
    """sum over blocks of ``fn(block_inputs, row_weights)``.

    Args:
        fn: maps the inputs of L consecutive steps and [L] row weights to a pytree of sums,
            in which every row must be weighted by its row weight.
        inputs: a pytree of arrays with a leading time axis T.
        block_steps: L (at most T); default ``BLOCK_STEPS``.

    Returns:
        The sums over all T steps, each counted once: the last block starts at T - L, and
        its rows already covered by the previous block get weight 0.
    """
    num_steps = jax.tree.leaves(inputs)[0].shape[0]
    size = min(block_steps or BLOCK_STEPS, num_steps)
    num_blocks = -(-num_steps // size)
    dtype = jnp.result_type(*jax.tree.leaves(inputs))

    def block(i):
        wanted = i * size
        start = jnp.minimum(wanted, num_steps - size)
        rows = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size), inputs)
        weights = (start + jnp.arange(size) >= wanted).astype(dtype)
        return fn(rows, weights)

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(block, 0))
    return jax.lax.fori_loop(0, num_blocks, lambda i, total: jax.tree.map(jnp.add, total, block(i)), zeros)


def sum_emission_blocks(fn: Callable, emission: EmissionTerms, *per_step: Array):
    """``sum_over_time_blocks`` of ``fn(emission_rows, *per_step_rows, row_weights)``, where
    ``emission_rows`` are the ``EmissionTerms`` of the block (a time-invariant [1, V] log-scale
    is passed whole)."""
    varying = emission.log_scale.shape[0] != 1

    def block(rows, weights):
        emission_rows, *others = rows
        if not varying:
            emission_rows = emission_rows._replace(log_scale=emission.log_scale)
        return fn(emission_rows, *others, weights)

    return sum_over_time_blocks(block, (emission if varying else emission._replace(log_scale=None), *per_step))

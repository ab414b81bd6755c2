"""Forward-backward in blocks of time steps: the one driver of the filter, the smoother and the E-step.

The forward pass keeps only the filtered probabilities; the backward pass runs over the
blocks in reverse order, recomputes each block's likelihoods from the caller's inputs, and
hands the block's posterior (``BlockPosterior``) to the caller's reductions (summed over
blocks) and per-step read-outs (stacked). Likelihoods and everything derived from them exist
for one block at a time (a few MB, cache-resident) instead of as [T, S] arrays. One block
covering the sequence is the classic forward-backward smoother.

Sequences are padded at their end: steps outside ``mask`` get b = 1 (uninformative) and
weight 0, which leaves the posteriors of the valid steps exact.

Rank-one factors (a law [n] in ``transitions``, e.g. i.i.d. jumps) are summed out of the
recursions. With P = P_kept (x) 1 law^T, every predicted law after the first step is (a law
over the kept axes) x law, and beta_hat does not depend on the rank-one axes; so the scans run
over the kept axes alone, with likelihoods b_bar_t = sum_J rho_t(J | kept) b_t (rho_t the law,
or at t = 1 the conditional of the initial law), and each block's full posteriors are rebuilt
from its likelihoods b_t afterwards, vectorised over the block's steps. Exact: with N_M i.i.d.
jump states the scans are N_M times smaller, and no step ever applies the jump matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._types import Array, Bool, Float, Scalar
from . import parallel
from ._ops import (
    LARGE_STATES,
    MERGE_STATES,
    MERGE_STATES_LARGE,
    MergedAxes,
    Transitions,
    is_rank_one,
    merge_invariant_axes,
    split_pairwise,
    time_varying,
)
from .filter import forward_scan
from .smoother import (
    axes_by_kind,
    backward_scan,
    gram,
    invariant_counts,
    invariant_kronecker,
    merged_pairwise,
    moved_back_along_varying,
    rank_one_pairwise,
    varying_pairwise,
)

BLOCK_STATE_STEPS = 2**17
"""Steps x states per block by default (rounded down to a power of two in steps): 1024 steps for the
default 96-state model, whose [L, S] messages then stay in the per-core cache on CPU, and 8192 for a
16-state HMM (measured best, docs/benchmarks.md)."""

PAIRWISE_STATES = 8
PAIRWISE_STATES_RANK_ONE = 16
"""Largest merged axes of the two-slice marginals of large state spaces (see ``_block_pairwise``)."""

GRAM_STATES = 256
"""Largest state count (after summing out rank-one axes) for which the time-invariant factors' expected
transition counts come from one S x S Gram matrix per block (one matrix product: fastest for small S);
larger state spaces contract every factor separately, O(S * sum_f n_f) per step instead of O(S^2)."""

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


FORWARD_SCANS = {"sequential": forward_scan, "parallel": parallel.forward_scan}


def resolve_method(method: str, initial_probs: Array, transitions: Transitions, num_steps: int) -> str:
    """``"sequential"`` or ``"parallel"``: ``method`` itself, or for ``"auto"`` ``parallel.auto_method`` of the
    scans' state count (the rank-one axes summed out)."""
    parallel.check_method(method)
    if method != "auto":
        return method
    kept = math.prod(n for n, m in zip(initial_probs.shape, transitions, strict=True) if not is_rank_one(m))
    return parallel.auto_method(kept, num_steps)


Reduction = Callable[[object, BlockPosterior], object]
"""(the block's inputs, its ``BlockPosterior``) -> a pytree, summed over blocks or stacked over steps."""


class Posterior(NamedTuple):
    """What ``forward_backward`` returns.

    Attributes:
        log_likelihood: log p(y) of the valid steps.
        initial: [*shape] P(h_1 | y).
        sums: the ``reduce`` pytree summed over blocks.
        steps: the ``collect`` pytree, each leaf with a leading [T] axis.
        pairwise_sums: with ``pairwise_sums``, per factor axis [n, n] sum_t P(h^f_{t-1} = a, h^f_t = b | y);
            else ().
        pairwise_steps: per axis of ``pairwise_steps``, [T, n, n] those two-slice marginals per step (index t:
            from t - 1 to t; zero at t = 0 and on padding).
    """

    log_likelihood: Scalar
    initial: Float[Array, "..."]
    sums: object
    steps: object
    pairwise_sums: tuple[Array, ...] = ()
    pairwise_steps: tuple[Array, ...] = ()


class RankOneSplit(NamedTuple):
    """The (merged) state axes split into rank-one ones (a law in ``transitions``) and the kept ones.

    Attributes:
        shape: the (merged) joint state shape.
        rank_one: the rank-one axes.
        kept: the other axes, in order.
    """

    shape: tuple[int, ...]
    rank_one: tuple[int, ...]
    kept: tuple[int, ...]

    @classmethod
    def of(cls, transitions: Transitions, shape: tuple[int, ...]) -> RankOneSplit:
        rank_one = tuple(a for a, m in enumerate(transitions) if is_rank_one(m))
        return cls(tuple(shape), rank_one, tuple(a for a in range(len(shape)) if a not in rank_one))

    @property
    def kept_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.kept)

    @property
    def lifted_shape(self) -> tuple[int, ...]:
        """The joint shape with size one along the rank-one axes."""
        return tuple(1 if a in self.rank_one else n for a, n in enumerate(self.shape))

    def lift(self, kept: Array) -> Array:
        """[L, *kept_shape] -> [L, *lifted_shape], broadcastable against the joint."""
        return kept.reshape((kept.shape[0],) + self.lifted_shape)

    def sum_out(self, full: Float[Array, "L ..."]) -> Array:
        """[L, *shape] summed over the rank-one axes: [L, *kept_shape]."""
        return jnp.sum(full, axis=tuple(1 + a for a in self.rank_one)).reshape((full.shape[0],) + self.kept_shape)

    def laws(self, transitions: Transitions) -> Array:
        """The product of the rank-one laws, shaped to broadcast against the joint (size one along kept axes)."""
        total = jnp.ones((1,) * len(self.shape), transitions[self.rank_one[0]].dtype)
        for a in self.rank_one:
            shape = [1] * len(self.shape)
            shape[a] = self.shape[a]
            total = total * transitions[a].reshape(shape)
        return total


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
        step_log_likelihoods: [T] log p(y_t | y_{1:t-1}) = log c_t + m_t (zero on padded steps); they sum to
            ``log_likelihood``.
    """

    log_likelihood: Scalar
    filtered: Float[Array, "T ..."]
    step_log_likelihoods: Float[Array, " T"]


def default_block_steps(num_states: int, method: str = "sequential") -> int:
    """The power of two nearest below ``BLOCK_STATE_STEPS / num_states`` (the parallel backend:
    ``parallel.default_block_steps``, by its [L, S, S] elements)."""
    if method == "parallel":
        return parallel.default_block_steps(num_states)
    return 1 << max((BLOCK_STATE_STEPS // num_states).bit_length() - 1, 0)


def block_layout(num_steps: int, block_steps: int) -> tuple[int, int]:
    """(number of blocks, steps per block): blocks of at most ``block_steps`` steps that cover
    ``num_steps`` with less than one padded step per block, and none when blocks of at least half
    that length divide the sequence (padding costs a copy of every per-step output)."""
    block_steps = min(block_steps, num_steps)
    num_blocks = -(-num_steps // block_steps)
    size = -(-num_steps // num_blocks)
    if num_blocks * size != num_steps:
        exact = [n for n in range(size - 1, block_steps // 2 - 1, -1) if n and num_steps % n == 0]
        if exact:
            return num_steps // exact[0], exact[0]
    return num_blocks, size


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
    """Blocked inputs of a forward-backward pass, on the merged axes (``merge_invariant_axes``: runs of
    time-invariant axes merged; rank-one axes stay alone), whose kept axes (``RankOneSplit``) the scans run over.

    Every array inside the pass has the merged shape (a reshape of the joint one): fewer axes, which XLA:CPU
    handles faster, and at most 8 of them, which its YNNPACK fusions require.

    ``conditional`` [*shape] is the law of the rank-one axes given the kept ones at the first step, ``laws``
    their law at every later step; ``first`` [N, L] flags the first step of the sequence (all three ``None``
    without rank-one axes)."""

    size: int
    merged: MergedAxes
    split: RankOneSplit
    initial: Array
    inputs: object
    valid: Float[Array, "N L"]
    incoming: tuple[Array, ...]
    outgoing: tuple[Array, ...]
    conditional: Array | None
    laws: Array | None
    first: Array | None

    @classmethod
    def of(cls, initial_probs, transitions, inputs, mask, block_steps, method: str = "sequential") -> _Layout:
        kept_states = math.prod(n for n, m in zip(initial_probs.shape, transitions, strict=True) if not is_rank_one(m))
        merged = merge_invariant_axes(transitions, initial_probs.shape,
                                      MERGE_STATES_LARGE if kept_states > LARGE_STATES else MERGE_STATES)
        split = RankOneSplit.of(merged.transitions, merged.shape)
        initial = initial_probs.reshape(merged.shape)
        conditional = laws = first = None
        if split.rank_one:
            kept_initial = split.sum_out(initial[None])
            lifted = split.lift(kept_initial)[0]
            conditional = jnp.where(lifted > 0, initial / jnp.where(lifted > 0, lifted, 1.0), 0.0)
            laws = split.laws(merged.transitions)
            initial = kept_initial[0]
        num_blocks, size = block_layout(mask.shape[0], block_steps or default_block_steps(
            kept_states if method == "parallel" else initial_probs.size, method))
        if split.rank_one:
            first = _blocked(jnp.arange(mask.shape[0]) == 0, num_blocks, size, mode="constant")
        outgoing = time_varying(merged.transitions)
        return cls(
            size=size,
            merged=merged,
            split=split,
            initial=initial,
            inputs=_blocked(inputs, num_blocks, size),
            valid=_blocked(mask.astype(initial_probs.dtype), num_blocks, size, mode="constant"),
            incoming=_blocked(tuple(jnp.roll(m, 1, axis=0) for m in outgoing), num_blocks, size),
            outgoing=_blocked(outgoing, num_blocks, size),
            conditional=conditional,
            laws=laws,
            first=first,
        )

    @property
    def kept_transitions(self) -> Transitions:
        return tuple(self.merged.transitions[a] for a in self.split.kept)

    def steps_shape(self, kept: bool) -> tuple[int, ...]:
        """[L, 1, ..., 1] to broadcast per-step values against [L, *kept shape] or [L, *merged shape]."""
        return (self.size,) + (1,) * len(self.split.kept if kept else self.split.shape)

    def _first_row_law(self, first: Array) -> Array:
        """[*shape] rho of a block's first step: the conditional of the initial law at the first step of the
        sequence, else the rank-one laws (the other steps' rho are the laws: no per-step select)."""
        return jnp.where(first[0], self.conditional, self.laws)

    def kept_likelihoods(self, scaled: Array, valid: Array, first: Array) -> Array:
        """[L, *kept shape] b_bar_t = sum over the rank-one axes of rho_t b_t (exactly 1 on padding)."""
        reduced = self.split.sum_out(scaled * self.laws[None])
        reduced = reduced.at[0].set(self.split.sum_out(scaled[:1] * self._first_row_law(first)[None])[0])
        return jnp.where(valid.reshape(self.steps_shape(True)) > 0, reduced, 1.0)

    def full_filtered(self, predicted: Array, scaled: Array, normalisers: Array, first: Array) -> Array:
        """[L, *shape] alpha_t = (predicted_t over the kept axes) rho_t b_t / c_t."""
        c = normalisers.reshape(self.steps_shape(False))
        full = self.split.lift(predicted) * self.laws[None] * scaled / c
        row = self.split.lift(predicted[:1]) * self._first_row_law(first)[None] * scaled[:1] / c[:1]
        return full.at[0].set(row[0])

    def last_filtered(self, predicted: Array, scaled: Array, normalisers: Array, first: Array) -> Array:
        """[*shape] alpha_t of a block's last step."""
        rho = jnp.where(first[-1], self.conditional, self.laws)
        return (self.split.lift(predicted[-1:]) * rho[None] * scaled[-1:] / normalisers[-1])[0]


class _Forward(NamedTuple):
    """The forward pass, block by block: log-likelihood, filtered [N, L, *kept shape], normalisers [N, L] c_t and
    shifts [N, L] m_t, the scaled likelihoods [N, L, *shape] (only kept when the backward pass reuses them).

    With rank-one axes ``filtered`` is not stored (the kept axes' filtered laws are predicted * b_bar / c, the
    same arithmetic as the scan's) and the pass keeps the kept axes' likelihoods b_bar and predicted laws
    [N, L, *kept shape], optionally the full filtered law of every step [N, L, *shape], and the full filtered law
    of the step before each block [N, *shape] (zero before the first), carried from block to block."""

    log_likelihood: Scalar
    filtered: Array | None
    normalisers: Array
    shifts: Array
    scaled: Array | None
    reduced: Array | None = None
    predicted: Array | None = None
    full_filtered: Array | None = None
    full_before: Array | None = None

    def kept_filtered(self) -> Array:
        """[N, L, *kept shape] the kept axes' filtered laws."""
        if self.filtered is not None:
            return self.filtered
        return self.predicted * self.reduced / self.normalisers.reshape(self.normalisers.shape + (1,) * (
            self.predicted.ndim - 2))


def _forward_blocks(layout: _Layout, likelihoods: Likelihoods, keep_likelihoods: bool = False,
                    full_filtered: bool = False, method: str = "sequential") -> _Forward:
    rank_one = bool(layout.split.rank_one)
    scan = FORWARD_SCANS[method]
    kept_transitions = layout.kept_transitions

    def forward_block(carry, rows):
        block_inputs, block_valid, outgoing, first = rows
        scaled, shift = _scaled_block(likelihoods, block_inputs, block_valid, layout.merged.shape)
        kept = scaled if keep_likelihoods else None
        if not rank_one:
            predicted, filtered, normalisers = scan(carry, kept_transitions, scaled, outgoing)
            return predicted, (filtered, normalisers, shift, kept)
        predicted, full_before = carry
        reduced = layout.kept_likelihoods(scaled, block_valid, first)
        predicted, _, normalisers, steps = scan(predicted, kept_transitions, reduced, outgoing,
                                                        with_predicted=True)
        full = layout.full_filtered(steps, scaled, normalisers, first) if full_filtered else None
        last = layout.last_filtered(steps, scaled, normalisers, first)
        return (predicted, last), (None, normalisers, shift, kept, reduced, steps, full, full_before)

    rows = (layout.inputs, layout.valid, layout.outgoing, layout.first)
    start = (layout.initial, jnp.zeros(layout.merged.shape, layout.initial.dtype)) if rank_one else layout.initial
    _, (filtered, normalisers, shifts, scaled, *rest) = jax.lax.scan(forward_block, start, rows)
    return _Forward(jnp.sum(jnp.log(normalisers)) + jnp.sum(shifts), filtered, normalisers, shifts, scaled, *rest)


def forward_filter(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    likelihoods: Likelihoods,
    inputs,
    mask: Bool[Array, " T"],
    *,
    block_steps: int | None = None,
    method: str = "sequential",
) -> FilterPosterior:
    """log p(y) and the filtered laws of every step (arguments as in ``forward_backward``); a caller that
    uses only the log-likelihood stores nothing per step (XLA drops the unused laws)."""
    method = resolve_method(method, initial_probs, transitions, mask.shape[0])
    layout = _Layout.of(initial_probs, transitions, inputs, mask, block_steps, method)
    forward = _forward_blocks(layout, likelihoods, full_filtered=True, method=method)
    filtered = forward.filtered if forward.full_filtered is None else forward.full_filtered
    num_steps = mask.shape[0]
    steps = (jnp.log(forward.normalisers) + forward.shifts).reshape(-1)[:num_steps]
    return FilterPosterior(forward.log_likelihood, filtered.reshape((-1,) + initial_probs.shape)[:num_steps],
                           jnp.where(mask, steps, 0.0))


class _KeptPosterior(NamedTuple):
    """A block's posterior over the kept axes, [L, *kept shape] each (``BlockPosterior``'s fields summed over the
    rank-one axes; the same arrays when there are none)."""

    previous: Array
    weighted: Array
    smoothed: Array


def _uses_gram(layout: _Layout, sums: bool, step_axes: tuple[int, ...]) -> bool:
    """Whether the kept axes' summed counts come from a Gram matrix: a small kept state space, at most one
    time-varying axis, and no per-step marginals wanted of a time-invariant kept axis."""
    varying, invariant = axes_by_kind(layout.kept_transitions)
    invariant_axes = {a for i in invariant for a in layout.merged.groups[layout.split.kept[i]]}
    return (sums and math.prod(layout.split.kept_shape) <= GRAM_STATES and len(varying) <= 1 and bool(invariant)
            and not invariant_axes & set(step_axes))


def _block_pairwise(layout: _Layout, transitions: Transitions, shape: tuple[int, ...], posterior: BlockPosterior,
                    kept: _KeptPosterior, sums: bool, step_axes: tuple[int, ...]) -> tuple[object, dict[int, Array]]:
    """A block's two-slice marginals: (what ``_pairwise_totals`` turns into per-axis sums, {axis: [L, n_f, n_f]}
    for every wanted axis). The kept axes' come from the kept posterior, the rank-one axes' from the full one
    (``posterior``, in the merged shape).

    Small kept state spaces use the layout's merged axes (a Gram matrix for the summed counts). Large ones
    regroup the original axes into runs of at most ``PAIRWISE_STATES`` (``PAIRWISE_STATES_RANK_ONE`` for the
    full tensors) and move the messages by dot products: the contraction of every merged axis costs S * n per
    step, so the scans' runs of 32 states would cost several times the moves here."""
    split = layout.split
    kept_transitions = layout.kept_transitions
    wanted = {a for a in range(len(shape)) if sums or a in step_axes}
    rank_one_axes = {a for m in split.rank_one for a in layout.merged.groups[m]}
    per_step: dict[int, Array] = {}
    totals: dict = {}
    large = math.prod(split.kept_shape) > LARGE_STATES
    if _uses_gram(layout, sums, step_axes):
        varying, _ = axes_by_kind(kept_transitions)
        moved = moved_back_along_varying(kept.weighted, kept_transitions, posterior.incoming)
        totals["gram"] = gram(kept.previous, moved)
        if varying:
            others = invariant_kronecker(kept_transitions)
            for index, matrices in zip(varying, posterior.incoming, strict=True):
                per_step |= _split_merged(layout, {split.kept[index]: varying_pairwise(
                    others, index, matrices, kept.previous, kept.weighted)}, shape)
    elif wanted - rank_one_axes:
        if large:
            axes = [a for a in range(len(shape)) if a not in rank_one_axes]
            regroup = merge_invariant_axes(tuple(transitions[a] for a in axes), tuple(shape[a] for a in axes),
                                           PAIRWISE_STATES)
            steps = kept.previous.shape[0]
            marginals = merged_pairwise(kept.previous.reshape((steps,) + regroup.shape),
                                        kept.weighted.reshape((steps,) + regroup.shape), regroup.transitions,
                                        posterior.incoming, dot=True)
            kept_shape = tuple(shape[a] for a in axes)
            for xi, group in zip(marginals, regroup.groups, strict=True):
                per_step |= {axes[i]: m for i, m in zip(group, split_pairwise(xi, group, kept_shape), strict=True)}
        else:
            marginals = merged_pairwise(kept.previous, kept.weighted, kept_transitions, posterior.incoming)
            per_step |= _split_merged(layout, dict(zip(split.kept, marginals, strict=True)), shape)
    for axis in sorted(rank_one_axes & wanted):
        if large:
            regroup = merge_invariant_axes(transitions, shape, PAIRWISE_STATES_RANK_ONE)
            index = next(m for m, group in enumerate(regroup.groups) if axis in group)
            steps = posterior.previous.shape[0]
            per_step[axis] = rank_one_pairwise(posterior.previous.reshape((steps,) + regroup.shape),
                                               posterior.weighted.reshape((steps,) + regroup.shape),
                                               regroup.transitions, posterior.incoming, index)
        else:
            index = next(m for m in split.rank_one if axis in layout.merged.groups[m])
            per_step[axis] = rank_one_pairwise(posterior.previous, posterior.weighted, layout.merged.transitions,
                                               posterior.incoming, index)
    per_step = {a: xi for a, xi in per_step.items() if a in wanted}
    if sums:
        totals["axes"] = {a: jnp.sum(xi, axis=0) for a, xi in per_step.items()}
    return totals, per_step


def _split_merged(layout: _Layout, per_merged: dict[int, Array], shape: tuple[int, ...]) -> dict[int, Array]:
    """{merged axis: [L, n, n]} -> {original axis: [L, n_f, n_f]} (``split_pairwise``)."""
    out = {}
    for m, xi in per_merged.items():
        group = layout.merged.groups[m]
        out |= dict(zip(group, split_pairwise(xi, group, shape), strict=True))
    return out


def _pairwise_totals(layout: _Layout, totals, shape: tuple[int, ...]) -> tuple[Array, ...]:
    """Every original axis's summed two-slice marginals from the blocks' summed ``_block_pairwise`` totals."""
    counts = dict(totals.get("axes", {}))
    if "gram" in totals:
        from_gram = invariant_counts(totals["gram"], layout.kept_transitions, layout.split.kept_shape)
        per_merged = {layout.split.kept[i]: c[None] for i, c in enumerate(from_gram) if c is not None}
        counts |= {a: c[0] for a, c in _split_merged(layout, per_merged, shape).items()}
    return tuple(counts[a] for a in range(len(shape)))


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
    pairwise_sums: bool = False,
    pairwise_steps: tuple[int, ...] = (),
    method: str = "sequential",
) -> Posterior:
    """The forward pass, then the backward pass block by block in reverse, handing each block's
    posterior to ``reduce`` (summed over blocks) and ``collect`` (stacked over steps).

    Args:
        initial_probs: [*shape] law of h_1.
        transitions: one matrix per axis ([n, n] or [T, n, n], entry t from step t to t + 1, or a law [n]
            for a rank-one factor).
        likelihoods: block inputs -> scaled likelihoods and their shifts (see ``Likelihoods``).
        inputs: a pytree of arrays with leading axis T, cut into blocks for ``likelihoods``,
            ``reduce`` and ``collect`` (padded by repeating the last row).
        mask: [T] valid steps (a prefix of the sequence).
        reduce, collect: (block inputs, ``BlockPosterior``) -> a pytree.
        block_steps: at most this many steps per block (default ``default_block_steps``: the blocks'
            full posteriors stay in cache, rank-one axes or not).
        keep_likelihoods: store the forward pass's likelihoods for the backward pass (memory of one
            more [T, S] array) instead of recomputing them block by block.
        pairwise_sums: also return every factor's expected transition counts (``Posterior.pairwise_sums``):
            from one Gram matrix per block over the kept axes when they have at most ``GRAM_STATES`` states,
            else factor by factor (O(S * sum_f n_f) per step).
        pairwise_steps: axes whose per-step two-slice marginals to return (``Posterior.pairwise_steps``).
        method: ``"sequential"`` (the scans of ``filter`` and ``smoother``), ``"parallel"`` (the associative
            scans of ``parallel`` within each block) or ``"auto"`` (``parallel.auto_method``); the same numbers
            up to rounding.

    Returns:
        ``Posterior``.
    """
    shape = initial_probs.shape
    num_steps = mask.shape[0]
    method = resolve_method(method, initial_probs, transitions, num_steps)
    layout = _Layout.of(initial_probs, transitions, inputs, mask, block_steps, method)
    split, size = layout.split, layout.size
    merged_shape = layout.merged.shape
    rank_one = bool(split.rank_one)
    pairwise_steps = tuple(pairwise_steps)
    forward = _forward_blocks(layout, likelihoods, keep_likelihoods, method=method)
    last = forward.filtered[:, -1] if forward.filtered is not None else (
        forward._replace(predicted=forward.predicted[:, -1:], reduced=forward.reduced[:, -1:],
                         normalisers=forward.normalisers[:, -1:]).kept_filtered()[:, 0])
    before = jnp.concatenate([jnp.zeros_like(last[:1]), last[:-1]])
    kept_steps, full_steps = layout.steps_shape(True), layout.steps_shape(False)

    def posterior_of(rows, beta):
        (block_inputs, block_valid, incoming, first, alpha, alpha_before, full_alpha_before, block_normalisers,
         scaled, reduced, predicted) = rows
        if scaled is None:
            scaled, _ = _scaled_block(likelihoods, block_inputs, block_valid, merged_shape)
        kept_scaled = reduced if rank_one else scaled
        if rank_one:  # the scan's arithmetic: (predicted * b_bar) / c
            alpha = predicted * reduced / block_normalisers.reshape(kept_steps)
        if method == "parallel":
            beta, betas = parallel.backward_scan(beta, layout.kept_transitions, kept_scaled, block_normalisers,
                                                 incoming, alpha)
        else:
            beta, betas = backward_scan(beta, layout.kept_transitions, kept_scaled, block_normalisers, incoming)
        valid = block_valid.reshape(kept_steps)
        kept = _KeptPosterior(
            previous=jnp.concatenate([alpha_before[None], alpha[:-1]]) * valid,
            weighted=kept_scaled * betas / block_normalisers.reshape(kept_steps),
            smoothed=alpha * betas * valid,
        )
        if not rank_one:
            return beta, BlockPosterior(*kept, incoming), kept
        full_valid = block_valid.reshape(full_steps)
        lifted_betas = split.lift(betas)
        full_alpha = layout.full_filtered(predicted, scaled, block_normalisers, first)
        posterior = BlockPosterior(
            previous=jnp.concatenate([full_alpha_before[None], full_alpha[:-1]]) * full_valid,
            weighted=scaled * lifted_betas / block_normalisers.reshape(full_steps),
            smoothed=full_alpha * lifted_betas * full_valid,
            incoming=incoming,
        )
        return beta, posterior, kept

    def in_joint_shape(posterior: BlockPosterior) -> BlockPosterior:
        return posterior._replace(**{name: getattr(posterior, name).reshape((size,) + shape)
                                     for name in ("previous", "weighted", "smoothed")})

    wants_pairwise = pairwise_sums or bool(pairwise_steps)

    def block_sums_and_steps(rows, beta):
        beta, posterior, kept = posterior_of(rows, beta)
        pair_totals, per_axis = (_block_pairwise(layout, transitions, shape, posterior, kept, pairwise_sums,
                                                 pairwise_steps) if wants_pairwise else ({}, {}))
        joint = in_joint_shape(posterior)
        sums = (reduce(rows[0], joint) if reduce else (), pair_totals)
        steps = (collect(rows[0], joint) if collect else (), tuple(per_axis[a] for a in pairwise_steps))
        return beta, posterior.smoothed[0], sums, steps

    def backward_block(carry, rows):
        beta, totals = carry
        beta, first_smoothed, sums, steps = block_sums_and_steps(rows, beta)
        return (beta, jax.tree.map(jnp.add, totals, sums)), (first_smoothed, steps)

    rows = (layout.inputs, layout.valid, layout.incoming, layout.first, forward.filtered, before, forward.full_before,
            forward.normalisers, forward.scaled, forward.reduced, forward.predicted)
    first_rows = jax.tree.map(lambda a: a[0], rows)
    ones = jnp.ones(split.kept_shape, initial_probs.dtype)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(lambda r: block_sums_and_steps(r, ones)[2], first_rows))
    (_, (sums, pair_totals)), (firsts, (steps, pair_steps)) = jax.lax.scan(backward_block, (ones, zeros), rows,
                                                                           reverse=True)
    steps, pair_steps = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:num_steps], (steps, pair_steps))
    counts = _pairwise_totals(layout, pair_totals, shape) if pairwise_sums else ()
    return Posterior(forward.log_likelihood, firsts[0].reshape(shape), sums, steps, counts, pair_steps)


def smoother(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    likelihoods: Likelihoods,
    inputs,
    mask: Bool[Array, " T"],
    *,
    block_steps: int | None = None,
    method: str = "sequential",
) -> SmootherPosterior:
    """Smoothed laws and every factor's per-step two-slice marginals (arguments as in ``forward_backward``)."""
    posterior = forward_backward(initial_probs, transitions, likelihoods, inputs, mask, method=method,
                                 collect=lambda _, block: block.smoothed, block_steps=block_steps,
                                 keep_likelihoods=True, pairwise_steps=tuple(range(len(transitions))))
    return SmootherPosterior(posterior.log_likelihood, posterior.steps, tuple(p[1:] for p in posterior.pairwise_steps))

"""The parallel-in-time backend: the forward, backward and max-product recursions as associative scans.

The sequential recursions cost O(T) steps in a row; an associative scan over the steps' S x S
elements costs O(log T) rounds of batched matrix products (Sarkka & Garcia-Fernandez 2021;
Hassan, Sarkka & Garcia-Fernandez 2021), which a GPU runs in parallel. The elements are built
from the same inputs as the sequential scans (the per-step joint transition, the Kronecker
product of the factors' matrices, time-varying ones included, times the step's scaled
likelihoods), each product is normalised by its largest entry so that it stays finite in
float32, and every quantity that the sequential backend returns is then formed step by step
with the core's own arithmetic: ``forward_scan`` and ``backward_scan`` here are drop-in
replacements of ``filter.forward_scan`` and ``smoother.backward_scan`` within one block of
``blocked``, which bounds the memory (L x S x S per block) at any sequence length.

References:
    S. Sarkka and A. F. Garcia-Fernandez, Temporal parallelization of Bayesian smoothers,
    IEEE TAC 66(1), 2021. S. S. Hassan, S. Sarkka and A. F. Garcia-Fernandez, Temporal
    parallelization of inference in hidden Markov models, IEEE TSP 69, 2021.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._types import Array, Float, Int
from ._ops import Transitions, at_step, backward_step, condition, dense, predict, time_varying

_HIGHEST = jax.lax.Precision.HIGHEST

METHODS = ("sequential", "parallel", "auto")

AUTO_MAX_STATES = 128
AUTO_MIN_STEPS = 256
"""``"auto"`` runs the parallel backend on an accelerator for at most ``AUTO_MAX_STATES`` states (each of its
products costs S^3 against the sequential step's S * sum_f n_f) and at least ``AUTO_MIN_STEPS`` steps; on CPU,
whose few cores gain nothing from the scan's O(log T) depth, always the sequential one."""


def check_method(method: str) -> None:
    """A ``ValueError`` for a method not in ``METHODS``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def auto_method(num_states: int, num_steps: int, backend: str | None = None) -> str:
    """What ``"auto"`` means for ``num_states`` states (of the scans) and ``num_steps`` steps on ``backend``
    (default: JAX's default backend)."""
    backend = jax.default_backend() if backend is None else backend
    wide = backend != "cpu" and num_states <= AUTO_MAX_STATES and num_steps >= AUTO_MIN_STEPS
    return "parallel" if wide else "sequential"


def joint_matrix(matrices: tuple[Array, ...]) -> Array:
    """The joint transition [S, S] (or per step [L, S, S]) of one matrix per axis ([n, n] or [L, n, n], or a
    rank-one law [n]): their Kronecker product in axis order, which matches a C-order flattening of the state."""
    matrices = tuple(dense(m) for m in matrices)
    steps = next((m.shape[:1] for m in matrices if m.ndim == 3), ())
    joint = jnp.ones(steps + (1, 1), matrices[0].dtype)
    for m in matrices:
        m = jnp.broadcast_to(m, steps + m.shape[-2:])
        n = m.shape[-1]
        size = joint.shape[-1]
        joint = (joint[..., :, None, :, None] * m[..., None, :, None, :]).reshape(steps + (size * n, size * n))
    return joint


def _normalised(matrix: Array) -> Array:
    """``matrix`` divided by its largest entry (per leading index), so that products stay finite."""
    peak = jnp.max(matrix, axis=(-2, -1), keepdims=True)
    return matrix / jnp.where(peak > 0, peak, 1.0)


def _forward_product(earlier: Array, later: Array) -> Array:
    return _normalised(jnp.matmul(earlier, later, precision=_HIGHEST))


def _backward_product(later: Array, earlier: Array) -> Array:
    return _normalised(jnp.matmul(earlier, later, precision=_HIGHEST))


def _steps_along_axes(messages: Float[Array, "L ..."], matrices: tuple[Array, ...]) -> Array:
    """[L, *shape] messages each moved one step forward by its own step's factor matrices ([n, n] or [L, n, n])."""
    def one(message, *per_step):
        return predict(message, per_step)

    axes = tuple(0 if m.ndim == 3 else None for m in matrices)
    return jax.vmap(one, in_axes=(0, *axes))(messages, *matrices)


def forward_scan(
    predicted: Array,
    transitions: Transitions,
    scaled: Float[Array, "L ..."],
    outgoing: tuple[Array, ...] | None = None,
    *,
    with_predicted: bool = False,
) -> tuple[Array, Float[Array, "L ..."], Float[Array, " L"]] | tuple[Array, Array, Array, Array]:
    """``filter.forward_scan`` by one associative scan over the L steps (same arguments and results).

    With b_t the scaled likelihoods, alpha_t is proportional to the first row of
    E_0 E_1 ... E_t, E_0 = 1 (pred_1 * b_1)^T and E_t = P_{t-1} diag(b_t): the prefix products
    give the filtered laws' directions, each normalised; the predicted laws pred_t = alpha_{t-1} P_{t-1},
    the normalisers c_t = sum pred_t b_t and alpha_t = pred_t b_t / c_t then follow step by step.
    """
    outgoing = time_varying(transitions) if outgoing is None else outgoing
    shape = predicted.shape
    steps = scaled.shape[0]
    flat = scaled.reshape(steps, -1)
    first = jnp.broadcast_to((predicted.reshape(-1) * flat[0])[None, None, :], (1,) + 2 * flat.shape[1:])
    into = joint_matrix(at_step(transitions, tuple(m[:-1] for m in outgoing)))
    later = jnp.broadcast_to(into, (steps - 1,) + into.shape[-2:]) * flat[1:, None, :]
    prefix = jax.lax.associative_scan(_forward_product, jnp.concatenate([first, later]))
    directions = prefix[:, 0, :] / jnp.sum(prefix[:, 0, :], axis=-1, keepdims=True)
    moved = _steps_along_axes(directions[:-1].reshape((steps - 1,) + shape),
                              at_step(transitions, tuple(m[:-1] for m in outgoing)))
    predicted_steps = jnp.concatenate([predicted[None], moved])
    filtered, normalisers = jax.vmap(condition)(predicted_steps, scaled)
    after = predict(filtered[-1], at_step(transitions, tuple(m[-1] for m in outgoing)))
    if with_predicted:
        return after, filtered, normalisers, predicted_steps
    return after, filtered, normalisers


def backward_scan(
    beta: Array, transitions: Transitions, scaled: Array, normalisers: Array, incoming: tuple[Array, ...],
    filtered: Float[Array, "L ..."],
) -> tuple[Array, Float[Array, "L ..."]]:
    """``smoother.backward_scan`` by one associative scan over the L steps (same arguments and results, and the
    block's filtered laws ``filtered``, which fix the scale of beta_hat).

    beta_hat_t is proportional to the first column of B_{t+1} ... B_{L-1} B_L with B_t = P_{t-1} diag(b_t / c_t)
    and B_L = beta_hat_{L-1} 1^T (the carried law): the suffix products give its direction v_t, and
    sum_h alpha_t(h) beta_hat_t(h) = 1 (the smoothed law sums to one) its scale.
    """
    steps = scaled.shape[0]
    shape = beta.shape
    weights = (scaled / normalisers.reshape((steps,) + (1,) * len(shape))).reshape(steps, -1)
    into = joint_matrix(at_step(transitions, tuple(m[1:] for m in incoming)))
    later = jnp.broadcast_to(into, (steps - 1,) + into.shape[-2:]) * weights[1:, None, :]
    last = jnp.broadcast_to(beta.reshape(-1, 1), (beta.size, beta.size))[None]
    suffix = jax.lax.associative_scan(_backward_product, jnp.concatenate([later, last]), reverse=True)
    directions = suffix[:, :, 0]
    scale = jnp.sum(filtered.reshape(steps, -1) * directions, axis=-1, keepdims=True)
    betas = jnp.concatenate([(directions[:-1] / scale[:-1]).reshape((steps - 1,) + shape), beta[None]])
    first_step = at_step(transitions, tuple(m[0] for m in incoming))
    return backward_step(betas[0], scaled[0], normalisers[0], first_step, range(len(transitions))), betas


def _max_plus(earlier: Array, later: Array) -> Array:
    """out[..., i, k] = max_j earlier[..., i, j] + later[..., j, k] minus its largest entry (per leading index),
    one middle index at a time (memory of the operands, not S times that)."""
    def over(j, out):
        return jnp.maximum(out, earlier[..., :, j, None] + later[..., None, j, :])

    start = jnp.full(earlier.shape[:-1] + later.shape[-1:], -jnp.inf, earlier.dtype)
    out = jax.lax.fori_loop(0, earlier.shape[-1], over, start)
    peak = jnp.max(out, axis=(-2, -1), keepdims=True)
    return out - jnp.where(jnp.isfinite(peak), peak, 0.0)


def _compose(later: Int[Array, "... S"], earlier: Int[Array, "... S"]) -> Array:
    """(earlier o later)(k) = earlier[later[k]]: the state two steps back of each state, by two back-pointer maps."""
    return jnp.take_along_axis(earlier, later, axis=-1)


def most_likely_states(
    initial_probs: Float[Array, "..."],
    transitions: Transitions,
    log_likelihoods: Float[Array, "T ..."],
    *,
    block_steps: int | None = None,
) -> Int[Array, "T F"]:
    """``viterbi.most_likely_states`` by max-plus associative scans (same arguments and result).

    Forward, block by block: delta_t, up to a constant, is the first row of D_0 (x) D_1 (x) ... (x) D_t
    in the max-plus semiring, D_0 = 1 (m + log b_1)^T (m: log pi, or the max-message carried from the
    previous block) and D_t = log P_{t-1} + 1 log b_t^T, each product shifted by its largest entry; each
    block also yields its back-pointers psi_t(k) = argmax_h delta_{t-1}(h) + log P_{t-1}(h, k). Backward:
    the back-pointers compose associatively, s_t = (psi_{t+1} o ... o psi_{T-1})(s_{T-1}), in one scan of
    [T, S] integer maps. Padded steps get log P = 0 into them and log b = 0, which carries
    argmax_h delta_{T-1}(h) through them unchanged.
    """
    shape = log_likelihoods.shape[1:]
    num_steps = log_likelihoods.shape[0]
    size = initial_probs.size
    block = min(block_steps or default_block_steps(size), num_steps)
    num_blocks = -(-num_steps // block)
    padded = num_blocks * block

    def blocked(a, mode="edge"):
        widths = [(0, padded - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
        return jnp.pad(a, widths, mode=mode).reshape((num_blocks, block) + a.shape[1:])

    scores = blocked(log_likelihoods.reshape(num_steps, size), mode="constant")
    outgoing = tuple(blocked(m) for m in time_varying(transitions))
    # the step after each step is a real one (its transition into it counts)
    leads_to_valid = blocked(jnp.arange(1, padded + 1) < num_steps, mode="constant")

    def forward(message, rows):
        ll, per_step, into_valid = rows
        log_p = jnp.log(joint_matrix(at_step(transitions, per_step)))
        log_p = jnp.where(into_valid[:, None, None], jnp.broadcast_to(log_p, (block, size, size)), 0.0)
        first = jnp.broadcast_to((message + ll[0])[None, None, :], (1, size, size))
        prefix = jax.lax.associative_scan(_max_plus, jnp.concatenate([first, log_p[:-1] + ll[1:, None, :]]))
        deltas = prefix[:, 0, :] - jnp.max(prefix[:, 0, :], axis=-1, keepdims=True)
        scores_next = deltas[:, :, None] + log_p
        pointers = jnp.argmax(scores_next, axis=1)
        out = jnp.max(scores_next[-1], axis=0)
        return out - jnp.max(out), (pointers, deltas[-1])

    start = jnp.log(initial_probs).reshape(size)
    _, (pointers, lasts) = jax.lax.scan(forward, start, (scores, outgoing, leads_to_valid))
    pointers = pointers.reshape(padded, size)
    last = jnp.argmax(lasts[-1])
    elements = jnp.concatenate([pointers[:-1], jnp.full((1, size), last, pointers.dtype)])
    maps = jax.lax.associative_scan(_compose, elements, reverse=True)
    states = maps[:num_steps, 0]
    return jnp.stack(jnp.unravel_index(states, shape), axis=-1)


ELEMENT_BUDGET = 2**22
ELEMENT_BUDGET_ACCELERATOR = 2**26
"""Entries L * S^2 of one block's elements: 32 MB in float64 on CPU; 256 MB in float32 on an accelerator, where
fewer, longer blocks mean fewer rounds of kernel launches."""


def default_block_steps(num_states: int, backend: str | None = None) -> int:
    """Steps per block of the parallel backend: the power of two nearest below ``ELEMENT_BUDGET / S^2`` (on CPU;
    ``ELEMENT_BUDGET_ACCELERATOR`` elsewhere), at least 16."""
    backend = jax.default_backend() if backend is None else backend
    budget = ELEMENT_BUDGET if backend == "cpu" else ELEMENT_BUDGET_ACCELERATOR
    return max(1 << max((budget // (num_states * num_states)).bit_length() - 1, 0), 16)

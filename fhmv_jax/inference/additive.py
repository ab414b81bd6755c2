"""The posterior covariance of an additive functional of the hidden states, sum_t g_t(h_t).

For the emission parameters of an HMM the observed information has this form (Louis' identity): with
E_t(h) = log p(y_t | h), the log-likelihood is the log-partition function of the posterior in E, so

    d^2 log p(y) / d theta^2 = sum_t E[d^2 E_t(h_t)] + Var[sum_t g_t(h_t) | y],   g_t(h) = dE_t(h) / d theta,

and the variance costs one forward recursion instead of one Hessian-vector product per coordinate. With
c_t = E[g_t(h_t) | y] and G~_{<t} = sum_{u<t} (g_u(h_u) - c_u),

    Var = sum_t (E[g_t g_t^T] - c_t c_t^T) + sum_t (X_t + X_t^T),   X_t = sum_h gamma_t(h) M_t(h) g_t(h)^T,

where M_t(h) = E[G~_{<t} | h_t = h, y] depends on the past only (given h_t the future is independent of it):

    M_1 = 0,   M_{t+1}(h') = sum_h alpha_t(h) P_t(h, h') (M_t(h) + g_t(h) - c_t) / sum_h alpha_t(h) P_t(h, h'),

alpha_t = P(h_t | y_{1:t}), gamma_t = P(h_t | y). Only centred sums are carried, so nothing grows with t.

Here the functional is block sparse along the first (regime) axis: g_t(h) for h = (g, ...) lives in block g of
the coordinates ([G, p] in all), as the gradient of an emission that depends on its regime's parameters only,
and it factors through a few quantities per step and regime: g_t(g, v) = J_t(g)^T a_t(g, v) with J_t(g) [z, p]
(z << p, e.g. the Jacobian of the quadratic forms the emissions depend on) and a_t(g, v) [z]. The M_t of L
steps are formed together and contracted first with a (over the states of a regime), then with J (one matrix
product per regime).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._types import Array, Float
from ._ops import Transitions, at_step, dense, propagate, time_varying

JOINT_STATES = 256
"""Largest state count whose M_t move by one product with the joint [S, S] transition matrix (``_moved``)."""


class BlockFactors(NamedTuple):
    """g_t(g, v) = J_t(g)^T a_t(g, v) for the L steps of a block.

    Attributes:
        jacobian: [L, G, z, p] J_t(g).
        slopes: [L, G, ..., z] a_t(h), h = (g, ...) in the state shape.
        sums: the block's share of a pytree the caller wants summed over blocks.
    """

    jacobian: Float[Array, "L G z p"]
    slopes: Float[Array, "L G ... z"]
    sums: object


BlockFunctional = Callable[[object, Array], BlockFactors]
"""Maps the inputs of L steps (a pytree with leading axis L) and their smoothed laws gamma [L, G, ...] to their
``BlockFactors``."""


class AdditiveCovariance(NamedTuple):
    """What ``additive_covariance`` returns.

    Attributes:
        covariance: [G p, G p] Var[sum_t g_t(h_t) | y] (coordinates in (block, p) order).
        mean: [G p] E[sum_t g_t(h_t) | y].
        sums: the functional's second output, summed over blocks.
    """

    covariance: Float[Array, "Q Q"]
    mean: Float[Array, " Q"]
    sums: object


def _embedded(g: Float[Array, "G ... p"]) -> Float[Array, "G ... G p"]:
    """g_t(h) as a vector of all G p coordinates: block g of state (g, ...), zero elsewhere."""
    G = g.shape[0]
    eye = jnp.eye(G, dtype=g.dtype).reshape((G,) + (1,) * (g.ndim - 2) + (G, 1))
    return g[..., None, :] * eye


def _moved(message: Float[Array, "*shape Q"], matrices: Transitions) -> Float[Array, "*shape Q"]:
    """sum_h message[h] P(h, h') for a message with Q trailing columns: one product with the joint matrix for up
    to ``JOINT_STATES`` states (an order of magnitude faster than factor by factor for hundreds of columns),
    else factor by factor."""
    shape = message.shape[:-1]
    if math.prod(shape) > JOINT_STATES:
        return propagate(message, matrices)
    joint = functools.reduce(jnp.kron, [dense(m) for m in matrices])
    return (joint.T @ message.reshape(joint.shape[0], -1)).reshape(message.shape)


def _past_means(start: Array, filtered: Array, transitions: Transitions, varying: tuple[Array, ...],
                g: Array, centre: Array) -> tuple[Array, Array]:
    """(M_t for the L steps of a block [L, *shape, G, p], M after its last step), from M at its first step; the
    predicted law sum_h alpha_t(h) P_t(h, h') moves as one more column of the same product."""
    G, p = centre.shape[1:]

    def step(past, inputs):
        alpha, slices, g_t, c_t = inputs
        centred = past + _embedded(g_t) - c_t.reshape((1,) * alpha.ndim + c_t.shape)
        weighted = (alpha[..., None, None] * centred).reshape(alpha.shape + (G * p,))
        moved = _moved(jnp.concatenate([weighted, alpha[..., None]], axis=-1), at_step(transitions, slices))
        predicted = moved[..., -1]
        following = moved[..., :-1].reshape(past.shape) / jnp.where(predicted > 0, predicted, 1.0)[..., None, None]
        return following, past

    last, pasts = jax.lax.scan(step, start, (filtered, varying, g, centre))
    return pasts, last


def additive_covariance(
    filtered: Float[Array, "T ..."],
    smoothed: Float[Array, "T ..."],
    transitions: Transitions,
    rows,
    functional: BlockFunctional,
    *,
    num_coordinates: int,
    block_steps: int = 64,
) -> AdditiveCovariance:
    """Var[sum_t g_t(h_t) | y] of one sequence by the forward recursion of the module docstring.

    Args:
        filtered: [T, G, ...] alpha_t = P(h_t | y_{1:t}).
        smoothed: [T, G, ...] gamma_t = P(h_t | y), zero on padded steps (which then count for nothing).
        transitions: one matrix per axis ([n, n], [T, n, n] with entry t from step t to t + 1, or a law [n]).
        rows: the per-step inputs of ``functional`` (leading axis T).
        functional: the factors of g over a block of steps (``BlockFunctional``).
        num_coordinates: p, the coordinates of one block.
        block_steps: L, steps per block (memory: L S G p numbers).
    """
    T = smoothed.shape[0]
    shape = smoothed.shape[1:]
    G, p = shape[0], num_coordinates
    L = min(block_steps, T)
    pad = -T % L

    def blocks(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((-1, L) + a.shape[1:])

    varying = tuple(blocks(m) for m in time_varying(transitions))
    inputs = (blocks(filtered), blocks(smoothed), varying, jax.tree_util.tree_map(blocks, rows))
    dtype = smoothed.dtype

    def block(carry, inputs):
        past, diagonal, outer, cross, mean, sums = carry
        alpha, gamma, slices, block_rows = inputs
        factors = functional(block_rows, gamma)
        slopes = factors.slopes.reshape(L, G, -1, factors.slopes.shape[-1])
        g = jnp.einsum("lgvz,lgzp->lgvp", slopes, factors.jacobian)
        weighted = gamma.reshape(L, G, -1)[..., None] * g
        centre = jnp.sum(weighted, axis=2)
        pasts, past = _past_means(past, alpha, transitions, slices, g.reshape(g.shape[:1] + shape + (p,)), centre)
        pasts = (gamma[..., None, None] * pasts).reshape(L, G, -1, G * p)
        cross = cross + jnp.einsum("lgqz,lgzp->gqp", jnp.einsum("lgvq,lgvz->lgqz", pasts, slopes), factors.jacobian)
        diagonal = diagonal + jnp.einsum("lgvp,lgvq->gpq", weighted, g)
        centre = centre.reshape(L, G * p)
        sums = jax.tree_util.tree_map(jnp.add, sums, factors.sums)
        return (past, diagonal, outer + centre.T @ centre, cross, mean + jnp.sum(centre, axis=0), sums), None

    first = jax.tree_util.tree_map(lambda a: a[0], inputs)
    zero_sums = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                       jax.eval_shape(lambda: functional(first[3], first[1]).sums))
    start = (jnp.zeros(shape + (G, p), dtype), jnp.zeros((G, p, p), dtype), jnp.zeros((G * p, G * p), dtype),
             jnp.zeros((G, G * p, p), dtype), jnp.zeros(G * p, dtype), zero_sums)
    (_, diagonal, outer, cross, mean, sums), _ = jax.lax.scan(block, start, inputs)
    cross = jnp.moveaxis(cross, 0, 1).reshape(G * p, G * p)
    covariance = jax.scipy.linalg.block_diag(*diagonal) - outer + cross + cross.T
    return AdditiveCovariance(covariance, mean, sums)

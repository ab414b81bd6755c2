"""E-step: posterior expectations of the complete-data statistics (MODEL.md section 4).

``e_step`` works on one sequence with a validity mask (padding at the end); callers vmap
it over sequences. Padded steps get uninformative emissions (log b = 0), which leaves the
posteriors of the valid steps exact, and are masked out of every statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma

from .._types import Array, Bool, Float, Scalar
from ..inference.blocked import Likelihoods, blocked_log_likelihood, expected_statistics
from ..model import emissions
from ..model.fhmv import ComponentTerms, chain_arrays, component_terms, log_scales
from ..model.params import FHMVParams, cholesky_factor, natural_parameters
from ..model.spec import ModelSpec


class StateMoments(NamedTuple):
    """Sums per volatility sub-state v, about the E-step's means mu_{g,k} (for time-invariant scales).

    From them follow the moments of any scales s_v (``SequenceStats.scale_weights`` etc. are their
    sums weighted by s_v^{-e}) and the volatility loads of new means and covariances.

    Attributes:
        counts: [V] sum_t P(vol. state v | y).
        weights: [V, G, K] sum_t tau_t(g, k, v) E[W].
        first: [V, G, K, D] sum_t tau E[W] (y_t - mu_{g,k}).
        second: [V, G, K, D, D] sum_t tau E[W] (y_t - mu)(y_t - mu)^T.
    """

    counts: Float[Array, " V"]
    weights: Float[Array, "V G K"]
    first: Float[Array, "V G K D"]
    second: Float[Array, "V G K D D"]


class SequenceStats(NamedTuple):
    """Expected statistics of one sequence.

    Attributes:
        log_likelihood: log p(y_{1:T}) of the valid steps.
        initial: per factor axis, [n_f] P(h^f_1 | y).
        transitions: per factor axis, [n_f, n_f] sum_t P(h^f_{t-1} = a, h^f_t = b | y).
        leverage_pairwise: [T-1, 2, 2] per-step two-slice marginals of the Markov leverage
            state (zeros on padding); ``None`` in other leverage modes.
        component_counts: [G, K] n_{g,k} = sum_{t,v} tau_t(g, k, v).
        scale_weights: [E, G, K] sum_t omega^e_t(g, k), omega^e = sum_v tau E[W] s^{-e}; the
            exponents e are (1,) without a scale mask and (1, 1/2, 0) with one.
        first_moments: [E, G, K, D] sum_t omega^e_t (y_t - mu_{g,k}).
        second_moments: [E, G, K, D, D] sum_t omega^e_t (y_t - mu)(y_t - mu)^T.
        dof_terms: [G, K] sum_{t,v} tau (E[log W] - E[W]).
        state_moments: the same sums per volatility sub-state (``StateMoments``) when the
            scales do not vary in time, else ``None``.
        state_counts: [T, V] sum_{g,k} tau = sum_g gamma (responsibilities sum to one): the
            weight of each volatility sub-state.
        regime_volatility: [T, G, V] gamma_t(g, v) = P(R_t = g, vol. state v | y) (zero on padding).
    """

    log_likelihood: Scalar
    initial: tuple[Array, ...]
    transitions: tuple[Array, ...]
    leverage_pairwise: Float[Array, "T1 2 2"] | None
    component_counts: Float[Array, "G K"]
    scale_weights: Float[Array, "E G K"]
    first_moments: Float[Array, "E G K D"]
    second_moments: Float[Array, "E G K D D"]
    dof_terms: Float[Array, "G K"]
    state_moments: StateMoments | None
    state_counts: Float[Array, "T V"]
    regime_volatility: Float[Array, "T G V"]


def scale_exponents(spec: ModelSpec) -> tuple[float, ...]:
    """Powers e of 1/s that multiply the covariance blocks: see ``emissions.mask_patterns``."""
    return (1.0,) if spec.scale_mask is None else (1.0, 0.5, 0.0)


def latent_weights(
    spec: ModelSpec, dof: Array | None, delta: Array, log_ratio: Array | None
) -> tuple[Array, Array]:
    """E[W] = (nu + D) / (nu + delta) and E[log W] = psi((nu + D) / 2) - log(nu / 2) - log(1 + delta / nu)."""
    if spec.gaussian:
        ones = jnp.ones_like(delta)
        return ones, jnp.zeros_like(delta)
    nu = dof[None, :, :, None]
    D = spec.num_features
    return (nu + D) / (nu + delta), digamma((nu + D) / 2) - jnp.log(nu / 2) - log_ratio


class BlockTerms(NamedTuple):
    """Emission terms of L steps, as expressions that XLA fuses into their consumers.

    Attributes:
        log_scale: [L, V] (or [1, V]) log s_t(v).
        components: the ``ComponentTerms``, [L, G, K, V].
        shift: [L] m_t, the largest weighted component log-density of the step.
        scaled_components: [L, G, K, V] w_{g,k} t_D(y_t; ...) / exp(m_t), in [0, 1].
        scaled: [L, G, V] b_t(g, v) / exp(m_t) = sum_k ``scaled_components``.
    """

    log_scale: Array
    components: ComponentTerms
    shift: Float[Array, " L"]
    scaled_components: Float[Array, "L G K V"]
    scaled: Float[Array, "L G V"]


def block_terms(
    spec: ModelSpec, params: FHMVParams, natural: dict, inv_chol: Array, y: Float[Array, "L D"], log_scale: Array
) -> BlockTerms:
    """``BlockTerms`` of L steps (``inv_chol``: U^{-1} of every component, computed once outside any loop)."""
    mahalanobis = emissions.mahalanobis_terms(y, params.means, inv_chol, spec.scale_mask)
    components = component_terms(spec, params, natural, mahalanobis, log_scale)
    shift = jax.lax.stop_gradient(jnp.max(components.weighted_log_dens, axis=(1, 2, 3)))
    scaled_components = jnp.exp(components.weighted_log_dens - shift[:, None, None, None])
    return BlockTerms(log_scale, components, shift, scaled_components, jnp.sum(scaled_components, axis=2))


def component_posteriors(
    spec: ModelSpec, natural: dict, terms: BlockTerms, gamma: Float[Array, "L G V"]
) -> tuple[Array, Array, Array]:
    """tau = gamma * rho, E[W] and E[log W], each [L, G, K, V], as elementwise expressions.

    Meant to be consumed by reductions inside jit, where XLA fuses them instead of storing
    them. rho = (w_k t_D / exp(m_t)) / (b / exp(m_t)) with the step's largest term m_t, so
    outliers never fall back to uniform responsibilities; a state whose scaled likelihood
    underflows has gamma = 0 in the filter as well.
    """
    usable = terms.scaled > 0
    weight = jnp.where(usable, gamma / jnp.where(usable, terms.scaled, 1.0), 0.0)
    tau = weight[:, :, None, :] * terms.scaled_components
    comp = terms.components
    expected_w, expected_log_w = latent_weights(spec, natural.get("dof"), comp.delta, comp.log_ratio)
    return tau, expected_w, expected_log_w


class ComponentSums(NamedTuple):
    """Sums over time of the per-(t, g, k, v) posteriors; moments about a reference point.

    The moment weights are indexed by w: the volatility sub-state v (omega^v = tau E[W]) when the
    scales do not vary in time, else the exponent e (omega^e = sum_v tau E[W] s^{-e}).

    Attributes:
        component_counts: [G, K] sum tau.
        dof_terms: [G, K] sum tau (E[log W] - E[W]).
        weights: [W, G, K] sum omega^w.
        first: [W, G, K, D] sum omega^w z_t.
        second: [W, G, K, D, D] sum omega^w z_t z_t^T.
        state_counts: [V] sum gamma.
    """

    component_counts: Float[Array, "G K"]
    dof_terms: Float[Array, "G K"]
    weights: Float[Array, "W G K"]
    first: Float[Array, "W G K D"]
    second: Float[Array, "W G K D D"]
    state_counts: Float[Array, " V"]


def _sum_over_last_axis(operands: tuple[Array, ...]) -> tuple[Array, ...]:
    """One variadic reduction: XLA computes the operands' shared terms once per element instead of
    storing them, which separate reductions would do for every (t, g, k, v)."""
    zeros = tuple(jnp.zeros((), a.dtype) for a in operands)
    last = operands[0].ndim - 1
    return jax.lax.reduce(operands, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (last,))


def component_sums(
    spec: ModelSpec, natural: dict, terms: BlockTerms, gamma: Float[Array, "L G V"], centred: Float[Array, "L D"]
) -> ComponentSums:
    """tau, E[W] and E[log W] of L steps summed into the ECM statistics (``centred``: observations minus a
    reference point; steps where gamma is zero carry no weight)."""
    tau, expected_w, expected_log_w = component_posteriors(spec, natural, terms, gamma)
    if terms.log_scale.shape[0] == 1:
        per_component, dof_terms = _sum_over_last_axis((tau, tau * (expected_log_w - expected_w)))
        omega = tau * expected_w
    else:
        scaled = tuple(tau * expected_w * jnp.exp(-e * terms.log_scale)[:, None, None, :] for e in scale_exponents(spec))
        *per_exponent, per_component, dof_terms = _sum_over_last_axis((*scaled, tau, tau * (expected_log_w - expected_w)))
        omega = jnp.stack(per_exponent, axis=-1)
    outer = centred[:, :, None] * centred[:, None, :]
    return ComponentSums(
        component_counts=jnp.sum(per_component, axis=0),
        dof_terms=jnp.sum(dof_terms, axis=0),
        weights=jnp.einsum("tgkw->wgk", omega),
        first=jnp.einsum("tgkw,td->wgkd", omega, centred),
        second=jnp.einsum("tgkw,tdf->wgkdf", omega, outer),
        state_counts=jnp.sum(gamma, axis=(0, 1)),
    )


def moments_about(
    weights: Array, first: Array, second: Array, offset: Float[Array, "G K D"]
) -> tuple[Array, Array, Array]:
    """Moments [W, G, K, ...] about a reference point re-expressed about reference + ``offset`` [G, K, D]."""
    offset = offset[None]
    first_about = first - weights[..., None] * offset
    second_about = (
        second
        - first[..., :, None] * offset[..., None, :]
        - offset[..., :, None] * first[..., None, :]
        + weights[..., None, None] * offset[..., :, None] * offset[..., None, :]
    )
    return weights, first_about, second_about


def _factor_marginals(joint: Array) -> tuple[Array, ...]:
    axes = tuple(range(joint.ndim))
    return tuple(jnp.sum(joint, axis=tuple(a for a in axes if a != axis)) for axis in axes)


class SequenceTerms(NamedTuple):
    """What the forward and backward passes over one sequence need from the model.

    Attributes:
        initial: [*state_shape] law of h_1.
        transitions: one matrix per factor axis.
        log_scale: [T, V] (or [1, V] when it does not vary in time) log s_t(v).
        inputs: per-step inputs of the blocks, leading axis T (y, and log s when it varies in time).
        terms_of: block inputs -> (y rows, ``BlockTerms`` of the rows).
        likelihoods: block inputs -> ([L, *state_shape] b / exp(m_t), [L] m_t), from ``terms_of``.
    """

    initial: Array
    transitions: tuple[Array, ...]
    log_scale: Array
    inputs: object
    terms_of: Callable[[object], tuple[Array, BlockTerms]]
    likelihoods: Likelihoods


def sequence_terms(spec: ModelSpec, params: FHMVParams, natural: dict, y: Array, x: Array | None) -> SequenceTerms:
    """The chain arrays of one sequence and its emission terms as functions of a block of steps."""
    initial, transitions = chain_arrays(spec, natural, x)
    log_scale = log_scales(spec, natural, x)
    inv_chol = emissions.inverse_cholesky(cholesky_factor(params.chol_raw))
    varying = log_scale.shape[0] != 1

    def terms_of(rows):
        y_rows, scale_rows = rows if varying else (rows, log_scale)
        return y_rows, block_terms(spec, params, natural, inv_chol, y_rows, scale_rows)

    def likelihoods(rows):
        y_rows, terms = terms_of(rows)
        return terms.scaled.reshape((y_rows.shape[0],) + spec.state_shape), terms.shift

    return SequenceTerms(initial, transitions, log_scale, (y, log_scale) if varying else y, terms_of, likelihoods)


def sequence_log_likelihood(
    spec: ModelSpec, params: FHMVParams, natural: dict, y: Array, x: Array | None, mask: Bool[Array, " T"]
) -> Scalar:
    """log p(y) of the valid steps of one sequence padded at its end."""
    terms = sequence_terms(spec, params, natural, y, x)
    return blocked_log_likelihood(
        terms.initial, terms.transitions, terms.likelihoods, terms.inputs, mask
    )


def e_step(
    spec: ModelSpec,
    params: FHMVParams,
    y: Float[Array, "T D"],
    x: Float[Array, " T"] | None,
    mask: Bool[Array, " T"],
) -> SequenceStats:
    """Forward-backward over one (possibly padded) sequence and the ECM statistics.

    Args:
        spec, params: the model.
        y: [T, D] observations; rows where ``mask`` is False are ignored but must be finite
            (``em_step`` zeroes them).
        x: [T] driver or ``None`` (finite on padding too).
        mask: [T] True on valid steps, which come first.

    Returns:
        ``SequenceStats``.
    """
    G = spec.num_regimes
    valid = mask.astype(y.dtype)
    natural = natural_parameters(spec, params)
    terms = sequence_terms(spec, params, natural, y, x)
    reference = jnp.sum(y * valid[:, None], axis=0) / jnp.sum(valid)

    def reduce(rows, smoothed):
        y_rows, block = terms.terms_of(rows)
        return component_sums(spec, natural, block, smoothed.reshape(y_rows.shape[0], G, -1), y_rows - reference[None, :])

    posterior = expected_statistics(
        terms.initial, terms.transitions, terms.likelihoods, terms.inputs, mask, reduce
    )
    sums = posterior.sums
    moments = moments_about(sums.weights, sums.first, sums.second, params.means - reference[None, None, :])
    state_moments = None
    if terms.log_scale.shape[0] == 1:
        state_moments = StateMoments(sums.state_counts, *moments)
        inverse_scales = jnp.exp(-jnp.asarray(scale_exponents(spec), y.dtype)[:, None] * terms.log_scale)
        moments = tuple(jnp.tensordot(inverse_scales, m, axes=1) for m in moments)
    n_e, first, second = moments

    gamma = posterior.smoothed.reshape(y.shape[0], G, -1)
    return SequenceStats(
        log_likelihood=posterior.log_likelihood,
        initial=_factor_marginals(posterior.initial / jnp.sum(posterior.initial)),
        transitions=tuple(jnp.sum(p, axis=0) if p.ndim == 3 else p for p in posterior.counts),
        leverage_pairwise=posterior.counts[-1] if spec.leverage == "markov" else None,
        component_counts=sums.component_counts,
        scale_weights=n_e,
        first_moments=first,
        second_moments=second,
        dof_terms=sums.dof_terms,
        state_moments=state_moments,
        state_counts=jnp.sum(gamma, axis=1),
        regime_volatility=gamma,
    )


def batch_e_step(spec: ModelSpec, params: FHMVParams, y: Array, x: Array | None, mask: Array) -> SequenceStats:
    """``e_step`` vmapped over a leading sequence axis: every field gains a leading [B]."""
    return jax.vmap(lambda yb, xb, mb: e_step(spec, params, yb, xb, mb))(y, x, mask)

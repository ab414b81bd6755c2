"""E-step: posterior expectations of the complete-data statistics (MODEL.md section 4).

``e_step`` works on one sequence with a validity mask (padding at the end); callers vmap
it over sequences. Padded steps get uninformative emissions (log b = 0), which leaves the
posteriors of the valid steps exact, and are masked out of every statistic.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma

from .._types import Array, Bool, Float, Scalar
from ..inference import FilterPosterior, backward_pass, forward_filter
from ..model.fhmv import EmissionTerms, chain_arrays, component_terms, emission_terms
from ..model.params import FHMVParams, natural_parameters
from ..model.spec import ModelSpec
from .blocks import sum_emission_blocks


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
        state_counts: [T, V] sum_{g,k} tau = sum_g gamma (responsibilities sum to one): the
            weight of each volatility sub-state.
        regime_volatility: [T, G, V] gamma_t(g, v) = P(R_t = g, vol. state v | y) (zero on padding).
        emission: the ``EmissionTerms`` of the E-step's model, from which tau and E[W] are
            recomputed (never stored per (t, g, k, v)).
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
    state_counts: Float[Array, "T V"]
    regime_volatility: Float[Array, "T G V"]
    emission: EmissionTerms


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


def component_posteriors(
    spec: ModelSpec, params: FHMVParams, natural: dict, emission: EmissionTerms, gamma: Float[Array, "T G V"]
) -> tuple[Array, Array, Array]:
    """tau = gamma * rho, E[W] and E[log W], each [T, G, K, V], as elementwise expressions.

    Meant to be consumed by reductions inside jit, where XLA fuses them instead of storing
    them; rho = exp(log w + log t_D - log b) is computed in log space, so outliers never fall
    back to uniform responsibilities.
    """
    comp = component_terms(spec, params, natural, emission.mahalanobis, emission.log_scale)
    tau = gamma[:, :, None, :] * jnp.exp(comp.weighted_log_dens - emission.log_emissions[:, :, None, :])
    expected_w, expected_log_w = latent_weights(spec, natural.get("dof"), comp.delta, comp.log_ratio)
    return tau, expected_w, expected_log_w


class ComponentSums(NamedTuple):
    """Sums over time of the per-(t, g, k, v) posteriors; moments about a reference point.

    Attributes:
        component_counts: [G, K] sum tau.
        dof_terms: [G, K] sum tau (E[log W] - E[W]).
        scale_weights: [E, G, K] sum omega^e, omega^e_t(g, k) = sum_v tau E[W] s^{-e}.
        first_moments: [E, G, K, D] sum omega^e z_t.
        second_moments: [E, G, K, D, D] sum omega^e z_t z_t^T.
    """

    component_counts: Float[Array, "G K"]
    dof_terms: Float[Array, "G K"]
    scale_weights: Float[Array, "E G K"]
    first_moments: Float[Array, "E G K D"]
    second_moments: Float[Array, "E G K D D"]


def _sum_over_last_axis(operands: tuple[Array, ...]) -> tuple[Array, ...]:
    """One variadic reduction: XLA computes the operands' shared terms once per element instead of
    storing them, which separate reductions would do for every (t, g, k, v)."""
    zeros = tuple(jnp.zeros((), a.dtype) for a in operands)
    last = operands[0].ndim - 1
    return jax.lax.reduce(operands, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (last,))


def component_sums(
    spec: ModelSpec,
    params: FHMVParams,
    natural: dict,
    emission: EmissionTerms,
    gamma: Float[Array, "T G V"],
    centred: Float[Array, "T D"],
) -> ComponentSums:
    """tau, E[W] and E[log W] summed into the ECM statistics (``centred``: observations minus a
    reference point; steps where gamma is zero carry no weight), block by block over time."""

    def block(emission_rows, gamma_rows, centred_rows, weights):
        tau, expected_w, expected_log_w = component_posteriors(
            spec, params, natural, emission_rows, gamma_rows * weights[:, None, None]
        )
        scaled = tuple(
            tau * expected_w * jnp.exp(-e * emission_rows.log_scale)[:, None, None, :] for e in scale_exponents(spec)
        )
        *per_exponent, per_component, dof_terms = _sum_over_last_axis(
            (*scaled, tau, tau * (expected_log_w - expected_w))
        )
        omega = jnp.stack(per_exponent)
        outer = centred_rows[:, :, None] * centred_rows[:, None, :]
        return ComponentSums(
            component_counts=jnp.sum(per_component, axis=0),
            dof_terms=jnp.sum(dof_terms, axis=0),
            scale_weights=jnp.sum(omega, axis=1),
            first_moments=jnp.einsum("etgk,td->egkd", omega, centred_rows),
            second_moments=jnp.einsum("etgk,tdf->egkdf", omega, outer),
        )

    return sum_emission_blocks(block, emission, gamma, centred)


def _factor_marginals(joint: Array) -> tuple[Array, ...]:
    axes = tuple(range(joint.ndim))
    return tuple(jnp.sum(joint, axis=tuple(a for a in axes if a != axis)) for axis in axes)


def padded_forward(
    spec: ModelSpec, params: FHMVParams, natural: dict, y: Array, x: Array | None, mask: Bool[Array, " T"]
) -> tuple[tuple[Array, ...], EmissionTerms, FilterPosterior]:
    """Forward filter over a sequence padded at its end: padded steps get log b = 0 (uninformative),
    which leaves the log-likelihood and the posteriors of the valid steps exact.

    Returns:
        (transitions, emission terms with the padded log b zeroed, the forward posterior).
    """
    initial, transitions = chain_arrays(spec, natural, x)
    emission = emission_terms(spec, params, natural, y, x)
    emission = emission._replace(log_emissions=emission.log_emissions * mask.astype(y.dtype)[:, None, None])
    log_b = emission.log_emissions.reshape((y.shape[0],) + spec.state_shape)
    return transitions, emission, forward_filter(initial, transitions, log_b)


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
    T = y.shape[0]
    G = spec.num_regimes
    valid = mask.astype(y.dtype)
    natural = natural_parameters(spec, params)
    transitions, emission, forward = padded_forward(spec, params, natural, y, x, mask)
    betas, pairwise = backward_pass(transitions, forward, step_weights=valid[1:])
    smoothed = forward.filtered_probs * betas  # alpha_hat_t * beta_hat_t sums to one over the states
    gamma = smoothed.reshape(T, G, -1) * valid[:, None, None]
    reference = jnp.sum(y * valid[:, None], axis=0) / jnp.sum(valid)
    sums = component_sums(spec, params, natural, emission, gamma, y - reference[None, :])
    shifted_means = params.means - reference[None, None, :]
    n_e, first_raw, second_raw = sums.scale_weights, sums.first_moments, sums.second_moments
    first = first_raw - n_e[..., None] * shifted_means[None]
    second = (
        second_raw
        - first_raw[..., :, None] * shifted_means[None, :, :, None, :]
        - shifted_means[None, :, :, :, None] * first_raw[..., None, :]
        + n_e[..., None, None] * shifted_means[None, :, :, :, None] * shifted_means[None, :, :, None, :]
    )

    return SequenceStats(
        log_likelihood=forward.marginal_loglik,
        initial=_factor_marginals(smoothed[0] / jnp.sum(smoothed[0])),
        transitions=tuple(jnp.sum(p, axis=0) if p.ndim == 3 else p for p in pairwise),
        leverage_pairwise=pairwise[-1] if spec.leverage == "markov" else None,
        component_counts=sums.component_counts,
        scale_weights=n_e,
        first_moments=first,
        second_moments=second,
        dof_terms=sums.dof_terms,
        state_counts=jnp.sum(gamma, axis=1),
        regime_volatility=gamma,
        emission=emission,
    )


def batch_e_step(spec: ModelSpec, params: FHMVParams, y: Array, x: Array | None, mask: Array) -> SequenceStats:
    """``e_step`` vmapped over a leading sequence axis: every field gains a leading [B]."""
    return jax.vmap(lambda yb, xb, mb: e_step(spec, params, yb, xb, mb))(y, x, mask)

"""E-step: the complete expected statistics of ECM (MODEL.md section 4).

``e_step`` works on one sequence with a validity mask (padding at the end); callers vmap
it over sequences. Padded steps get uninformative emissions (b = 1), which leaves the
posteriors of the valid steps exact, and are masked out of every statistic. The statistics
are everything the M-step reads: it never sees the data again.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma

from .._types import Array, Bool, Float, Scalar
from ..inference import BlockPosterior, forward_backward
from ..inference.smoother import axes_by_kind
from ..model.emissions import BlockTerms, StudentTMixture, moments_about
from ..model.fhmv import FHMV, sequence_inputs


class ComponentStats(NamedTuple):
    """Sums over time of the mixture posteriors, for the weight, mean, covariance and dof updates.

    The moment weights omega^e = sum_v tau E[W] s^{-e} carry the powers e of 1/s that multiply the
    covariance blocks (``scale_exponents``): (1,) without a scale mask and (1, 1/2, 0) with one.

    Attributes:
        counts: [G, K] n_{g,k} = sum_{t,v} tau_t(g, k, v).
        scale_weights: [E, G, K] sum_t omega^e_t(g, k).
        first: [E, G, K, D] sum_t omega^e_t (y_t - mu_{g,k}).
        second: [E, G, K, D, D] sum_t omega^e_t (y_t - mu)(y_t - mu)^T.
        dof_terms: [G, K] sum_{t,v} tau (E[log W] - E[W]).
    """

    counts: Float[Array, "G K"]
    scale_weights: Float[Array, "E G K"]
    first: Float[Array, "E G K D"]
    second: Float[Array, "E G K D D"]
    dof_terms: Float[Array, "G K"]


class StateMoments(NamedTuple):
    """The volatility update's statistics when the scales do not vary in time: sums per volatility
    sub-state v, about the E-step's means mu_{g,k}.

    From them follow the emission moments of any scales s_v (``ComponentStats`` are their sums
    weighted by s_v^{-e}) and the loads sum_t tau E[W] delta'(y_t) of new means and covariances.

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


class StepMoments(NamedTuple):
    """The volatility update's statistics when the scales vary in time (predictable leverage).

    Its loads under the new means and covariances, sum_{g,k} tau E[W] (y_t - mu')^T Q'_e (y_t - mu')
    per step and sub-state, are not sums of any fixed moments: per step, the weights and the
    observation itself are the sufficient statistics.

    Attributes:
        counts: [T, V] sum_g gamma_t(g, v), the weight of each volatility sub-state.
        weights: [T, G, K, V] tau_t(g, k, v) E[W] (zero on padding).
        observations: [T, D] y_t.
        driver: [T] x_t, which sets the leverage path log L_t.
    """

    counts: Float[Array, "T V"]
    weights: Float[Array, "T G K V"]
    observations: Float[Array, "T D"]
    driver: Float[Array, " T"]


class LeverageStats(NamedTuple):
    """The Markov-leverage regression's statistics: per step, the state's two-slice marginals and
    the driver they regress on.

    Attributes:
        pairwise: [T-1, 2, 2] P(V_{t-1} = i, V_t = j | y) (zero on padding).
        driver: [T-1] x_{t-1}.
    """

    pairwise: Float[Array, "T1 2 2"]
    driver: Float[Array, " T1"]


class SequenceStats(NamedTuple):
    """Expected statistics of one sequence.

    Attributes:
        log_likelihood: log p(y_{1:T}) of the valid steps.
        initial: per factor axis, [n_f] P(h^f_1 | y).
        transitions: per factor axis, [n_f, n_f] sum_t P(h^f_{t-1} = a, h^f_t = b | y).
        components: the mixture statistics (``ComponentStats``).
        volatility: ``StateMoments`` when the scales do not vary in time, else ``StepMoments``.
        leverage: the Markov-leverage statistics (``None`` in other leverage modes).
    """

    log_likelihood: Scalar
    initial: tuple[Array, ...]
    transitions: tuple[Array, ...]
    components: ComponentStats
    volatility: StateMoments | StepMoments
    leverage: LeverageStats | None


def scale_exponents(mixture: StudentTMixture) -> tuple[float, ...]:
    """Powers e of 1/s that multiply the covariance blocks: see ``emissions.mask_patterns``."""
    return (1.0,) if mixture.scale_mask is None else (1.0, 0.5, 0.0)


def latent_weights(mixture: StudentTMixture, delta: Array, log_ratio: Array | None) -> tuple[Array, Array]:
    """E[W] = (nu + D) / (nu + delta) and E[log W] = psi((nu + D) / 2) - log(nu / 2) - log(1 + delta / nu)."""
    if mixture.gaussian:
        ones = jnp.ones_like(delta)
        return ones, jnp.zeros_like(delta)
    nu = mixture.dof()[None, :, :, None]
    D = mixture.num_features
    return (nu + D) / (nu + delta), digamma((nu + D) / 2) - jnp.log(nu / 2) - log_ratio


def component_posteriors(
    mixture: StudentTMixture, terms: BlockTerms, gamma: Float[Array, "L G V"]
) -> tuple[Array, Array, Array]:
    """tau = gamma * rho, E[W] and E[log W], each [L, G, K, V], as elementwise expressions.

    Meant to be consumed by reductions inside jit, where XLA fuses them instead of storing
    them. rho = (w_k t_D / exp(m_t)) / (b / exp(m_t)) with the step's largest term m_t, so
    outliers never fall back to uniform responsibilities; a state whose scaled likelihood
    underflows has gamma = 0 in the filter as well. With one component rho = 1 and tau = gamma.
    """
    if terms.scaled_components.shape[2] == 1:
        tau = gamma[:, :, None, :]
    else:
        usable = terms.scaled > 0
        weight = jnp.where(usable, gamma / jnp.where(usable, terms.scaled, 1.0), 0.0)
        tau = weight[:, :, None, :] * terms.scaled_components
    comp = terms.components
    expected_w, expected_log_w = latent_weights(mixture, comp.delta, comp.log_ratio)
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
    return jax.lax.reduce(operands, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), (last,))


def _inverse_scale_power(terms: BlockTerms, exponent: float) -> Array:
    """s^{-e} for e in (1, 1/2, 0) from the terms' 1 / s (no exp per step and state)."""
    inv_scale = jnp.exp(-terms.log_scale) if terms.inv_scale is None else terms.inv_scale
    if exponent == 1.0:
        return inv_scale
    return jnp.sqrt(inv_scale) if exponent == 0.5 else jnp.ones_like(inv_scale)


def component_sums(
    mixture: StudentTMixture, terms: BlockTerms, gamma: Float[Array, "L G V"], centred: Float[Array, "L D"]
) -> ComponentSums:
    """tau, E[W] and E[log W] of L steps summed into the ECM statistics (``centred``: observations minus a
    reference point; steps where gamma is zero carry no weight)."""
    tau, expected_w, expected_log_w = component_posteriors(mixture, terms, gamma)
    if terms.log_scale.shape[0] == 1:
        per_component, dof_terms = _sum_over_last_axis((tau, tau * (expected_log_w - expected_w)))
        omega = tau * expected_w
    else:
        scaled = tuple(tau * expected_w * _inverse_scale_power(terms, e)[:, None, None, :]
                       for e in scale_exponents(mixture))
        *per_exponent, per_component, dof_terms = _sum_over_last_axis(
            (*scaled, tau, tau * (expected_log_w - expected_w)))
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


def _factor_marginals(joint: Array) -> tuple[Array, ...]:
    axes = tuple(range(joint.ndim))
    return tuple(jnp.sum(joint, axis=tuple(a for a in axes if a != axis)) for axis in axes)


def e_step(
    model: FHMV,
    y: Float[Array, "T D"],
    x: Float[Array, " T"] | None,
    mask: Bool[Array, " T"],
    *,
    block_steps: int | None = None,
    method: str = "sequential",
) -> SequenceStats:
    """Forward-backward over one (possibly padded) sequence and the ECM statistics.

    Every factor's expected transition counts come from the inference core (``forward_backward``'s
    ``pairwise_sums``: a Gram matrix per block for small state spaces, per-factor contractions
    otherwise); the time-varying (Markov leverage) factor's per step as well. An i.i.d. jump chain
    comes as its law (``inference_transitions``), so the recursions run over the other factors only.

    Args:
        model: the model of the E-step.
        y: [T, D] observations; rows where ``mask`` is False are ignored but must be finite
            (``em_step`` zeroes them).
        x: [T] driver or ``None`` (finite on padding too).
        mask: [T] True on valid steps, which come first.
        block_steps: steps per block of the forward-backward pass (default: by the state count).
        method: the inference backend (``inference.forward_backward``).

    Returns:
        ``SequenceStats``.
    """
    G = model.spec.num_regimes
    mixture = model.emission
    valid = mask.astype(y.dtype)
    inputs = sequence_inputs(model, y, x)
    transitions = inputs.transitions
    varying, _ = axes_by_kind(transitions)
    if len(varying) > 1:
        raise NotImplementedError("expected statistics support at most one time-varying factor")
    scales_vary = inputs.log_scale.shape[0] != 1
    reference = jnp.sum(y * valid[:, None], axis=0) / jnp.sum(valid)

    def reduce(rows, posterior: BlockPosterior):
        y_rows, terms = inputs.emissions.terms(rows)
        gamma = posterior.smoothed.reshape(y_rows.shape[0], G, -1)
        return component_sums(mixture, terms, gamma, y_rows - reference[None, :])

    # one Gaussian component per regime: tau = gamma and E[W] = 1, so the step weights are the smoothed laws
    # themselves (one [T, G, V] array instead of two: at 10240 states and 5000 steps each costs 0.4 GB)
    smoothed_only = mixture.gaussian and model.spec.num_components == 1

    def collect(rows, posterior: BlockPosterior):
        if not scales_vary:
            return ()
        gamma = posterior.smoothed.reshape(posterior.smoothed.shape[0], G, -1)
        if smoothed_only:
            return gamma
        y_rows, terms = inputs.emissions.terms(rows)
        tau, expected_w, _ = component_posteriors(mixture, terms, gamma)
        return jnp.sum(gamma, axis=1), tau * expected_w

    posterior = forward_backward(inputs.initial, transitions, inputs.emissions.likelihoods, inputs.rows, mask,
                                 reduce=reduce, collect=collect, block_steps=block_steps, pairwise_sums=True,
                                 pairwise_steps=tuple(varying), method=method)
    sums, step_weights = posterior.sums, posterior.steps
    counts = posterior.pairwise_sums

    moments = moments_about(sums.weights, sums.first, sums.second, mixture.means - reference[None, None, :])
    if scales_vary:
        if smoothed_only:
            step_weights = (jnp.sum(step_weights, axis=1), step_weights[:, :, None, :])
        volatility = StepMoments(*step_weights, y, x)
    else:
        volatility = StateMoments(sums.state_counts, *moments)
        inverse_scales = jnp.exp(-jnp.asarray(scale_exponents(mixture), y.dtype)[:, None] * inputs.log_scale)
        moments = tuple(jnp.tensordot(inverse_scales, m, axes=1) for m in moments)
    leverage = None
    if model.spec.leverage == "markov":
        leverage = LeverageStats(posterior.pairwise_steps[0][1:], x[:-1])
    return SequenceStats(
        log_likelihood=posterior.log_likelihood,
        initial=_factor_marginals(posterior.initial / jnp.sum(posterior.initial)),
        transitions=tuple(counts),
        components=ComponentStats(sums.component_counts, *moments, sums.dof_terms),
        volatility=volatility,
        leverage=leverage,
    )


def batch_e_step(
    model: FHMV, y: Array, x: Array | None, mask: Array, *, block_steps: int | None = None,
    method: str = "sequential",
) -> SequenceStats:
    """``e_step`` vmapped over a leading sequence axis: every field gains a leading [B].

    A sequence whose mask is all False (a zero-length sequence that pads a batch to a multiple of a chunk or of
    the devices: ``sharding.pad_sequences``) contributes exactly zero to every field. ``e_step`` zeroes its
    per-step fields, but its sums are not zero there: the reference point of the moments is 0 / 0, the initial
    laws are normalised by zero and log p(y) is a rounding residue, so these are selected away (``jnp.where``,
    which passes no NaN on).
    """
    stats = jax.vmap(lambda yb, xb, mb: e_step(model, yb, xb, mb, block_steps=block_steps, method=method))(
        y, x, mask)
    present = jnp.any(mask, axis=1)

    def zeroed(tree):
        return jax.tree.map(lambda a: jnp.where(present.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.zeros_like(a)),
                            tree)

    per_step = isinstance(stats.volatility, StepMoments)
    return stats._replace(log_likelihood=zeroed(stats.log_likelihood), initial=zeroed(stats.initial),
                          transitions=zeroed(stats.transitions), components=zeroed(stats.components),
                          volatility=stats.volatility if per_step else zeroed(stats.volatility))

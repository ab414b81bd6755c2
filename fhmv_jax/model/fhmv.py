"""The FHMV model: an Equinox module holding a spec and unconstrained parameters.

The model turns its parameters into inference arrays in one place (``inference_inputs``):
the law of h_1 over the joint state tensor, one transition matrix per factor and the
emission log-densities; the routines in ``fhmv_jax.inference`` take those arrays.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import inference
from .._checks import check_observations
from .._types import Array, Float, Int, PRNGKeyArray, Scalar
from . import emissions, factors
from .params import FHMVParams, cholesky_factor, natural_parameters, params_from_natural
from .spec import ModelSpec


class Factors(NamedTuple):
    """One array per factor of the latent state; ``None`` where the spec has no such factor.

    For marginals, the trailing axes index the factor's states (persistence adds a chain
    axis before them); for paths, entries are state indices.
    """

    regime: Array
    persistence: Array | None
    jump: Array | None
    leverage: Array | None


class FilterResult(NamedTuple):
    """Filtered (no look-ahead) posteriors.

    Attributes:
        log_likelihood: log p(y_{1:T}).
        marginals: P(factor_t | y_{1:t}): regime [T, G], persistence [T, N, 2], jump [T, N_M],
            leverage [T, 2].
        joint: [T, *spec.state_shape] P(h_t | y_{1:t}).
    """

    log_likelihood: Scalar
    marginals: Factors
    joint: Float[Array, "T ..."]


class SmoothResult(NamedTuple):
    """Smoothed posteriors.

    Attributes:
        log_likelihood: log p(y_{1:T}).
        marginals: P(factor_t | y_{1:T}), shaped as in ``FilterResult``.
        pairwise: P(factor_{t-1} = a, factor_t = b | y_{1:T}) at index t - 1: regime
            [T-1, G, G], persistence [T-1, N, 2, 2], jump [T-1, N_M, N_M], leverage [T-1, 2, 2].
        joint: [T, *spec.state_shape] P(h_t | y_{1:T}).
    """

    log_likelihood: Scalar
    marginals: Factors
    pairwise: Factors
    joint: Float[Array, "T ..."]


class Sample(NamedTuple):
    """A draw from the model.

    Attributes:
        observations: [T, D] y.
        states: the factor paths (regime [T], persistence [T, N], jump [T], leverage [T]).
        components: [T] the mixture component of each observation.
        log_scale: [T] log s_t of each observation.
        driver: [T] x used by the leverage factor (``None`` for leverage ``"none"``).
    """

    observations: Float[Array, "T D"]
    states: Factors
    components: Int[Array, " T"]
    log_scale: Float[Array, " T"]
    driver: Float[Array, " T"] | None


class InferenceInputs(NamedTuple):
    """Arrays the inference routines consume.

    Attributes:
        initial_probs: [*state_shape] law of h_1 (a product of the factors' laws).
        transitions: one matrix per factor axis, [n, n] or [T, n, n].
        log_likelihoods: [T, *state_shape] log p(y_t | h_t).
    """

    initial_probs: Float[Array, "..."]
    transitions: tuple[Array, ...]
    log_likelihoods: Float[Array, "T ..."]


def _outer(vectors) -> Array:
    total = vectors[0]
    for v in vectors[1:]:
        total = total[..., None] * v.reshape((1,) * total.ndim + v.shape)
    return total


def _factor_laws(spec: ModelSpec, natural: dict) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """Per-factor initial laws and time-invariant transitions, in axis order (leverage excluded)."""
    dtype = natural["means"].dtype
    half = jnp.full((2,), 0.5, dtype)
    laws, matrices = [natural["initial_regime"]], [natural["regime_transition"]]
    for p in natural.get("persistence_stay", ()):
        laws.append(half)
        matrices.append(factors.persistence_matrix(p))
    if spec.has_jumps:
        laws.append(factors.jump_stationary_law(natural["jump_transition"]))
        matrices.append(natural["jump_transition"])
    return tuple(laws), tuple(matrices)


def log_scales(spec: ModelSpec, natural: dict, x: Array | None) -> Float[Array, "T V"]:
    """log s_t(v) for every step and volatility sub-state ([1, V] when it does not vary in time)."""
    static = factors.log_volatility_scales(spec, natural)[None, :]
    if spec.leverage != "predictable":
        return static
    log_leverage = factors.predictable_log_leverage(x, natural["l1"], natural.get("theta_l"), spec.num_leverage_lags)
    return static + log_leverage[:, None]


class EmissionTerms(NamedTuple):
    """Emission quantities shared by inference and the E-step (nothing per (t, g, k, v) is stored).

    Attributes:
        log_scale: [T, V] (or [1, V]) log s_t(v) per volatility sub-state.
        mahalanobis: quadratic forms of y_t - mu_{g,k}, each [T, G, K].
        log_emissions: [T, G, V] log b_t(g, v) = LSE_k (log w_{g,k} + log t_D(y_t; ...)).
    """

    log_scale: Float[Array, "T V"]
    mahalanobis: emissions.MahalanobisTerms
    log_emissions: Float[Array, "T G V"]


class ComponentTerms(NamedTuple):
    """Per (t, g, k, v) quantities, cheap to recompute inside fused reductions.

    Attributes:
        weighted_log_dens: log w_{g,k} + log t_D(y_t; mu_{g,k}, s_t(v) Sigma_{g,k}, nu_{g,k}).
        delta: delta(s_t(v)), the scaled Mahalanobis distance.
        log_ratio: log(1 + delta / nu) (``None`` when gaussian).
    """

    weighted_log_dens: Float[Array, "T G K V"]
    delta: Float[Array, "T G K V"]
    log_ratio: Float[Array, "T G K V"] | None


def component_terms(
    spec: ModelSpec, params: FHMVParams, natural: dict, mahalanobis: emissions.MahalanobisTerms, log_scale: Array
) -> ComponentTerms:
    """Elementwise component log-densities; see ``emissions``."""
    chol = cholesky_factor(params.chol_raw)
    dof = natural.get("dof")
    delta = emissions.scaled_mahalanobis(mahalanobis, log_scale)
    normalisers = emissions.component_log_normalisers(spec, chol, dof)
    component, log_ratio = emissions.component_log_densities(spec, normalisers, dof, delta, log_scale)
    weighted = component + jax.nn.log_softmax(params.log_weights, axis=-1)[None, :, :, None]
    return ComponentTerms(weighted, delta, log_ratio)


def emission_terms(spec: ModelSpec, params: FHMVParams, natural: dict, y: Array, x: Array | None) -> EmissionTerms:
    """log b_t(g, v) = LSE_k of the weighted component densities (one fused reduction)."""
    return emission_terms_at_scale(spec, params, natural, y, log_scales(spec, natural, x))


def emission_terms_at_scale(
    spec: ModelSpec, params: FHMVParams, natural: dict, y: Array, log_scale: Float[Array, "T V"]
) -> EmissionTerms:
    """``emission_terms`` for given log s_t(v) ([T, V] or [1, V]), e.g. one step of a streaming filter."""
    chol = cholesky_factor(params.chol_raw)
    mahalanobis = emissions.mahalanobis_terms(y, params.means, emissions.inverse_cholesky(chol), spec.scale_mask)
    weighted = component_terms(spec, params, natural, mahalanobis, log_scale).weighted_log_dens
    return EmissionTerms(log_scale, mahalanobis, emissions.log_sum_exp(weighted, axis=2))


def initial_law(spec: ModelSpec, natural: dict) -> Float[Array, "*state"]:
    """The law of h_1 over the joint state tensor (a product of the factors' laws)."""
    laws, _ = _factor_laws(spec, natural)
    if spec.leverage == "markov":
        laws = laws + (jnp.full((2,), 0.5, natural["means"].dtype),)
    return _outer(laws)


def step_transitions(spec: ModelSpec, natural: dict, x_prev: Float[Array, ""] | None) -> tuple[Array, ...]:
    """One [n, n] transition matrix per factor axis for a single step t - 1 -> t, given the driver x_{t-1}."""
    _, matrices = _factor_laws(spec, natural)
    if spec.leverage == "markov":
        matrices = matrices + (factors.leverage_transition(natural["leverage_logits"], x_prev),)
    return matrices


def chain_arrays(spec: ModelSpec, natural: dict, x: Array | None) -> tuple[Array, tuple[Array, ...]]:
    """The law of h_1 over the joint state tensor and one transition matrix per factor axis."""
    _, matrices = _factor_laws(spec, natural)
    if spec.leverage == "markov":
        matrices = matrices + (factors.markov_leverage_transitions(natural["leverage_logits"], x),)
    return initial_law(spec, natural), matrices


def inference_inputs(spec: ModelSpec, params: FHMVParams, y: Array, x: Array | None) -> InferenceInputs:
    """The one place where parameters become inference arrays."""
    natural = natural_parameters(spec, params)
    initial, transitions = chain_arrays(spec, natural, x)
    log_b = emission_terms(spec, params, natural, y, x).log_emissions
    return InferenceInputs(initial, transitions, log_b.reshape((y.shape[0],) + spec.state_shape))


def _split_factors(spec: ModelSpec, per_axis: list[Array], stack_axis: int) -> Factors:
    """Group per-axis arrays into ``Factors`` (chains stacked along ``stack_axis``)."""
    n = spec.num_chains
    rest = per_axis[1 + n :]
    jump = rest.pop(0) if spec.has_jumps else None
    leverage = rest.pop(0) if spec.leverage == "markov" else None
    persistence = jnp.stack(per_axis[1 : 1 + n], axis=stack_axis) if n else None
    return Factors(per_axis[0], persistence, jump, leverage)


def _marginals(spec: ModelSpec, joint: Float[Array, "T ..."]) -> Factors:
    axes = tuple(range(1, joint.ndim))
    per_axis = [jnp.sum(joint, axis=tuple(a for a in axes if a != axis)) for axis in axes]
    return _split_factors(spec, per_axis, stack_axis=1)


@eqx.filter_jit
def _log_likelihood(model: FHMV, y: Array, x: Array | None) -> Scalar:
    arrays = inference_inputs(model.spec, model.params, y, x)
    return inference.forward_filter(*arrays).marginal_loglik


@eqx.filter_jit
def _filter(model: FHMV, y: Array, x: Array | None) -> FilterResult:
    posterior = inference.forward_filter(*inference_inputs(model.spec, model.params, y, x))
    joint = posterior.filtered_probs
    return FilterResult(posterior.marginal_loglik, _marginals(model.spec, joint), joint)


@eqx.filter_jit
def _smooth(model: FHMV, y: Array, x: Array | None) -> SmoothResult:
    posterior = inference.smoother(*inference_inputs(model.spec, model.params, y, x))
    joint = posterior.smoothed_probs
    pairwise = _split_factors(model.spec, list(posterior.pairwise), stack_axis=1)
    return SmoothResult(posterior.marginal_loglik, _marginals(model.spec, joint), pairwise, joint)


@eqx.filter_jit
def _viterbi(model: FHMV, y: Array, x: Array | None) -> Factors:
    path = inference.most_likely_states(*inference_inputs(model.spec, model.params, y, x))
    return _split_factors(model.spec, list(path.T), stack_axis=1)


@eqx.filter_jit
def _sample(model: FHMV, key: PRNGKeyArray, x: Array | None, num_steps: int) -> Sample:
    spec, params = model.spec, model.params
    natural = natural_parameters(spec, params)
    dtype = params.dtype
    laws, matrices = _factor_laws(spec, natural)
    static_log_scale = factors.log_volatility_scales(spec, natural)
    chol = cholesky_factor(params.chol_raw)
    mask = jnp.ones(spec.num_features, dtype) if spec.scale_mask is None else jnp.asarray(spec.scale_mask, dtype)
    num_lags = spec.num_leverage_lags if spec.leverage == "predictable" else 1
    if spec.leverage == "predictable":
        lag_weights = factors.leverage_lag_weights(natural["l1"], natural.get("theta_l"), num_lags)

    def _draw_state(key, t, state, x_prev):
        keys = jax.random.split(key, len(laws) + 1)
        new = []
        for k, law, matrix, s in zip(keys, laws, matrices, state):
            probs = jnp.where(t == 0, law, matrix[s])
            new.append(jax.random.categorical(k, jnp.log(probs)).astype(jnp.int32))
        if spec.leverage == "markov":
            row = factors.leverage_transition(natural["leverage_logits"], x_prev)[state[-1]]
            probs = jnp.where(t == 0, jnp.full(2, 0.5, dtype), row)
            new.append(jax.random.categorical(keys[-1], jnp.log(probs)).astype(jnp.int32))
        return tuple(new)

    def _step(carry, inputs):
        state, recent_g, x_prev = carry
        key, t, x_given = inputs
        k_state, k_comp, k_normal, k_gamma = jax.random.split(key, 4)
        state = _draw_state(k_state, t, state, x_prev)
        regime = state[0]
        volatility = jnp.ravel_multi_index(state[1:], spec.volatility_shape, mode="clip") if state[1:] else 0
        log_l = factors.log_leverage(lag_weights, recent_g) if spec.leverage == "predictable" else 0.0
        log_scale = static_log_scale[volatility] + log_l
        component = jax.random.categorical(k_comp, params.log_weights[regime])
        z = chol[regime, component] @ jax.random.normal(k_normal, (spec.num_features,), dtype)
        if not spec.gaussian:
            nu = natural["dof"][regime, component]
            z = z * jax.lax.rsqrt(jax.random.gamma(k_gamma, nu / 2, dtype=dtype) / (nu / 2))
        y_t = params.means[regime, component] + jnp.exp(0.5 * log_scale * mask) * z
        x_t = y_t[spec.driver_feature] if x is None and spec.needs_driver else x_given
        if spec.leverage == "predictable":
            recent_g = factors.push_shock(recent_g, x_t, log_l)
        return (state, recent_g, x_t), (y_t, jnp.stack(state), component, log_scale, x_t)

    num_axes = len(spec.state_shape)
    start = (tuple(jnp.zeros((), jnp.int32) for _ in range(num_axes)), jnp.zeros(num_lags, dtype), jnp.zeros((), dtype))
    x_steps = jnp.zeros(num_steps, dtype) if x is None else x
    keys = jax.random.split(key, num_steps)
    _, (y, states, components, log_scale, driver) = jax.lax.scan(
        _step, start, (keys, jnp.arange(num_steps), x_steps)
    )
    paths = _split_factors(spec, list(states.T), stack_axis=1)
    return Sample(y, paths, components, log_scale, driver if spec.needs_driver else None)


class FHMV(eqx.Module):
    """Factorial hidden Markov volatility model with Student-t mixture emissions (MODEL.md).

    Attributes:
        spec: static sizes and modes.
        params: unconstrained parameters (any real values are a valid model).

    Build one with ``FHMV.from_natural_parameters`` or ``fhmv_jax.init_model``. Methods take
    y of shape [T, D] and, for leverage modes that need it, the driver x of shape [T].
    """

    spec: ModelSpec = eqx.field(static=True)
    params: FHMVParams

    def __check_init__(self):
        p, s = self.params, self.spec
        expected = (s.num_regimes, s.num_components, s.num_features)
        if p.means.shape != expected:
            raise ValueError(f"params.means has shape {p.means.shape}, the spec implies {expected}")
        if (p.dof_raw is None) != s.gaussian:
            raise ValueError("params.dof_raw must be present exactly when the spec is not gaussian")

    @classmethod
    def from_natural_parameters(cls, spec: ModelSpec, *, dtype=None, **natural) -> FHMV:
        """Build a model from constrained values keyed as ``natural_parameters()`` returns them.

        Raises:
            ValueError: a missing or unused key, a wrong shape, or an invalid value (a
                probability row not summing to one, c1 <= 1, dof outside its bounds, a
                covariance that is not positive definite, ...).
        """
        return cls(spec, params_from_natural(spec, natural, dtype=dtype))

    def natural_parameters(self) -> dict[str, Array]:
        """Constrained parameter values; keys the spec does not use are absent (ARCHITECTURE.md)."""
        return natural_parameters(self.spec, self.params)

    def astype(self, dtype) -> FHMV:
        """The same model with parameters cast to ``dtype`` (e.g. float32 for GPUs)."""
        return jax.tree_util.tree_map(lambda a: a.astype(dtype), self)

    def _inputs(self, y, x):
        return check_observations(self.spec, y, x, dtype=self.params.dtype)

    def log_likelihood(self, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None) -> Scalar:
        """log p(y_{1:T}) by the scaled forward filter; differentiable in the parameters."""
        return _log_likelihood(self, *self._inputs(y, x))

    def filter(self, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None) -> FilterResult:
        """Filtered probabilities P(. | y_{1:t}) of the joint state and of every factor."""
        return _filter(self, *self._inputs(y, x))

    def smooth(self, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None) -> SmoothResult:
        """Smoothed marginals P(. | y_{1:T}) and per-factor two-slice marginals."""
        return _smooth(self, *self._inputs(y, x))

    def viterbi(self, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None) -> Factors:
        """The most likely joint state path, reported per factor (``.regime`` is [T])."""
        return _viterbi(self, *self._inputs(y, x))

    def sample(self, key: PRNGKeyArray, num_steps: int, x: Float[Array, " T"] | None = None) -> Sample:
        """Draw states and observations for ``num_steps`` steps.

        The driver is ``x`` if given, else (when the leverage mode needs one) the sampled
        feature ``spec.driver_feature``, fed back step by step.
        """
        num_steps = operator.index(num_steps)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if self.spec.needs_driver and x is None and self.spec.driver_feature is None:
            raise ValueError(
                f"leverage={self.spec.leverage!r} needs a driver: pass x (shape [num_steps]) or set ModelSpec.driver_feature"
            )
        if x is not None:
            x = jnp.asarray(x, dtype=self.params.dtype)
            if x.shape != (num_steps,):
                raise ValueError(f"driver x must have shape ({num_steps},), got {x.shape}")
        return _sample(self, key, x, num_steps)

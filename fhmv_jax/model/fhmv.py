"""The FHMV model: an Equinox module composing one parameter block per factor.

The model turns its parameters into the inputs of the inference core in one place
(``sequence_inputs``): the law of h_1 over the joint state tensor, one transition matrix per
factor axis (time-varying where the driver moves it), the volatility log-scales (the leverage
path included) and the emission terms of any block of steps. The read-outs (filter, smoother,
Viterbi), streaming, the E-step and the sampler all start there.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from .. import inference
from .._compile import fast_jit, llvm_o2
from .._types import Array, Bool, Float, Int, PRNGKeyArray, Scalar
from .emissions import BlockTerms, StudentTMixture, inverse_cholesky, log_sum_exp
from .factors import (
    LEVERAGE_BLOCKS,
    AbstractChainFactor,
    AbstractLeverage,
    AbstractVolatilityFactor,
    JumpChain,
    MarkovLeverage,
    NoLeverage,
    PersistenceChains,
    PredictableLeverage,
    RegimeChain,
    log_leverage,
    push_shock,
)
from .inputs import check_observations
from .params import AbstractBlock, Shape
from .spec import ModelSpec

_SLOT_BLOCKS: dict[str, tuple[type[AbstractBlock], ...]] = {
    "regime": (RegimeChain,),
    "emission": (StudentTMixture,),
    "persistence": (PersistenceChains,),
    "jump": (JumpChain,),
    "leverage": (NoLeverage, PredictableLeverage, MarkovLeverage),
}
"""Every block type each slot of an ``FHMV`` may hold, in field order (the model file's array order)."""


def block_classes(spec: ModelSpec) -> dict[str, type[AbstractBlock] | None]:
    """The block type of every slot under ``spec`` (``None``: the slot is empty)."""
    return {
        "regime": RegimeChain,
        "emission": StudentTMixture,
        "persistence": PersistenceChains if spec.num_chains >= 1 else None,
        "jump": JumpChain if spec.has_jumps else None,
        "leverage": LEVERAGE_BLOCKS[spec.leverage],
    }


def natural_shapes(spec: ModelSpec) -> dict[str, Shape]:
    """Natural-parameter keys a spec uses, with their shapes (ARCHITECTURE.md)."""
    return {key: shape for block in block_classes(spec).values() if block is not None
            for key, shape in block.natural_shapes(spec).items()}


def natural_bounds(spec: ModelSpec) -> dict[str, tuple[float, float]]:
    """The open interval (low, high) of every bounded natural key the spec uses (``AbstractBlock.natural_bounds``)."""
    shapes = natural_shapes(spec)
    return {key: bounds for block in block_classes(spec).values() if block is not None
            for key, bounds in block.natural_bounds(spec).items() if key in shapes}


def raw_layout(spec: ModelSpec) -> dict[str, Shape | None]:
    """The shape under ``spec`` of every array any block may store, ``None`` for those this spec leaves unused."""
    layout: dict[str, Shape | None] = {}
    for candidates in _SLOT_BLOCKS.values():
        for cls in candidates:
            layout |= {name: None for name in cls.raw_shapes(spec) if name not in layout}
    for cls in block_classes(spec).values():
        if cls is not None:
            layout |= cls.raw_shapes(spec)
    return layout


def _check_natural(spec: ModelSpec, values: dict) -> dict[str, np.ndarray]:
    """The natural values as float64 arrays, after checking keys, shapes and finiteness."""
    expected = natural_shapes(spec)
    missing = sorted(set(expected) - set(values))
    unknown = sorted(set(values) - set(expected))
    if missing:
        raise ValueError(f"missing natural parameters for this spec: {missing}")
    if unknown:
        raise ValueError(f"natural parameters not used by this spec: {unknown} (spec uses {sorted(expected)})")
    arrays = {}
    for key, shape in expected.items():
        array = np.asarray(values[key], dtype=np.float64)
        if array.shape != shape:
            raise ValueError(f"natural parameter {key!r} has shape {array.shape}, expected {shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"natural parameter {key!r} has non-finite values")
        arrays[key] = array
    return arrays


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


class FHMV(eqx.Module):
    """Factorial hidden Markov volatility model with Student-t mixture emissions (MODEL.md).

    Attributes:
        spec: static sizes and modes.
        regime: the regime chain (``RegimeChain``).
        emission: each regime's mixture (``StudentTMixture``).
        persistence: the persistence chains (``PersistenceChains``; ``None`` when N = 0).
        jump: the jump chain (``JumpChain``; ``None`` when N_M = 1).
        leverage: ``NoLeverage``, ``PredictableLeverage`` or ``MarkovLeverage``.

    Every block stores unconstrained values, so any real arrays are a valid model. Build one
    with ``FHMV.from_natural_parameters`` or ``fhmv_jax.init_model``. Methods take y of shape
    [T, D] and, for leverage modes that need it, the driver x of shape [T].
    """

    spec: ModelSpec = eqx.field(static=True)
    regime: RegimeChain
    emission: StudentTMixture
    persistence: PersistenceChains | None
    jump: JumpChain | None
    leverage: AbstractLeverage

    def __check_init__(self):
        for slot, cls in block_classes(self.spec).items():
            block = getattr(self, slot)
            if cls is None:
                if block is not None:
                    raise ValueError(f"the spec has no {slot} factor, but {slot} holds a {type(block).__name__}")
                continue
            if not isinstance(block, cls):
                raise ValueError(f"{slot} must be a {cls.__name__} for this spec, got {type(block).__name__}")
            for name, value in cls.static_fields(self.spec).items():
                if getattr(block, name) != value:
                    raise ValueError(f"{slot}.{name} is {getattr(block, name)!r}, the spec implies {value!r}")
            block.check_shapes(self.spec, slot)

    def blocks(self) -> dict[str, AbstractBlock]:
        """The parameter blocks in use, by slot, in field order."""
        return {slot: getattr(self, slot) for slot, cls in block_classes(self.spec).items() if cls is not None}

    @property
    def chain_factors(self) -> tuple[AbstractChainFactor, ...]:
        """The factors with state axes, in axis order."""
        return tuple(b for b in (self.regime, self.persistence, self.jump, self.leverage) if b is not None)

    @property
    def volatility_factors(self) -> tuple[AbstractVolatilityFactor, ...]:
        """The factors that rescale the emissions, in axis order."""
        return tuple(b for b in (self.persistence, self.jump, self.leverage) if b is not None)

    @property
    def dtype(self):
        return self.emission.means.dtype

    @classmethod
    def from_natural_parameters(cls, spec: ModelSpec, *, dtype=None, **natural) -> FHMV:
        """Build a model from constrained values keyed as ``natural_parameters()`` returns them.

        Raises:
            ValueError: a missing or unused key, a wrong shape, or an invalid value (a
                probability row not summing to one, c1 <= 1, dof outside its bounds, a
                covariance that is not positive definite, ...).
        """
        values = _check_natural(spec, natural)
        blocks = {
            slot: None if block is None else block.from_natural(
                spec, {k: values[k] for k in block.natural_shapes(spec)}, dtype)
            for slot, block in block_classes(spec).items()
        }
        return cls(spec, **blocks)

    @classmethod
    def from_raw_arrays(cls, spec: ModelSpec, arrays: dict[str, Array | None]) -> FHMV:
        """The model of stored unconstrained arrays (every name of ``raw_layout(spec)``)."""
        blocks = {slot: None if block is None else block.from_raw(spec, arrays)
                  for slot, block in block_classes(spec).items()}
        return cls(spec, **blocks)

    def raw_arrays(self) -> dict[str, Array | None]:
        """Every array of ``raw_layout(spec)`` by name, ``None`` where unused."""
        arrays = dict.fromkeys(raw_layout(self.spec))
        for block in self.blocks().values():
            arrays |= block.raw_arrays()
        return arrays

    def free_arrays(self) -> dict[str, Array]:
        """The arrays of ``raw_arrays()`` that hold free parameters: used by the spec and not held fixed."""
        fixed = {name for block in self.blocks().values() for name in block.fixed_fields()}
        return {name: a for name, a in self.raw_arrays().items() if a is not None and name not in fixed}

    def natural_parameters(self) -> dict[str, Array]:
        """Constrained parameter values; keys the spec does not use are absent (ARCHITECTURE.md). One compiled
        program per spec and dtype, not a compilation of every operation."""
        return _natural_parameters(self)

    @property
    def num_free_parameters(self) -> int:
        """The number of free scalar parameters (ties and implied values respected), e.g. for BIC."""
        return sum(block.num_free_parameters for block in self.blocks().values())

    def astype(self, dtype) -> FHMV:
        """The same model with parameters cast to ``dtype`` (e.g. float32 for GPUs)."""
        return jax.tree_util.tree_map(lambda a: a.astype(dtype), self)

    def permuted_regimes(self, order) -> FHMV:
        """The same model with regime ``i`` being the old regime ``order[i]`` (likelihoods unchanged)."""
        order = np.asarray(order)
        return eqx.tree_at(lambda m: (m.regime, m.emission), self,
                           (self.regime.permuted(order), self.emission.permuted(order)))

    def magnitudes(self) -> dict[str, Array]:
        """The volatility magnitudes (c_1, theta_c, m_1, theta_m, l_1, theta_l) in use, unconstrained, by field name."""
        return {k: v for factor in self.volatility_factors for k, v in factor.magnitudes().items()}

    def with_magnitudes(self, values: dict[str, Array]) -> FHMV:
        """The model with the named magnitudes (as ``magnitudes()`` returns them) replaced."""

        def updated(factor):
            return None if factor is None else factor.replace(**{k: values[k] for k in factor.magnitudes()})

        return eqx.tree_at(lambda m: (m.persistence, m.jump, m.leverage), self,
                           (updated(self.persistence), updated(self.jump), updated(self.leverage)),
                           is_leaf=lambda node: node is None)

    def _inputs(self, y, x, method):
        inference.check_method(method)
        return (*check_observations(self.spec, y, x, dtype=self.dtype), method)

    def log_likelihood(self, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None, *,
                       method: str = "auto") -> Scalar:
        """log p(y_{1:T}) by the scaled forward filter; differentiable in the parameters.

        ``method`` (here and in ``filter``, ``smooth``, ``viterbi``): ``"sequential"`` (scans over time),
        ``"parallel"`` (associative scans, O(log T) depth: for accelerators) or ``"auto"`` (parallel on an
        accelerator for up to ``inference.parallel.AUTO_MAX_STATES`` states, else sequential); the same numbers
        up to rounding.
        """
        return _log_likelihood(self, *self._inputs(y, x, method))

    def filter(self, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None, *,
               method: str = "auto") -> FilterResult:
        """Filtered probabilities P(. | y_{1:t}) of the joint state and of every factor."""
        return _filter(self, *self._inputs(y, x, method))

    def smooth(self, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None, *,
               method: str = "auto") -> SmoothResult:
        """Smoothed marginals P(. | y_{1:T}) and per-factor two-slice marginals."""
        return _smooth(self, *self._inputs(y, x, method))

    def viterbi(self, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None, *,
                method: str = "auto") -> Factors:
        """The most likely joint state path, reported per factor (``.regime`` is [T])."""
        return _viterbi(self, *self._inputs(y, x, method))

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
                f"leverage={self.spec.leverage!r} needs a driver: pass x (shape [num_steps]) or set"
                " ModelSpec.driver_feature"
            )
        if x is not None:
            x = jnp.asarray(x, dtype=self.dtype)
            if x.shape != (num_steps,):
                raise ValueError(f"driver x must have shape ({num_steps},), got {x.shape}")
        return _sample(self, key, x, num_steps)


# ----------------------------------------------------------------------------------------
# parameters -> inference inputs


@eqx.filter_jit
def _natural_parameters(model: FHMV) -> dict[str, Array]:
    return {k: v for block in model.blocks().values() for k, v in block.natural().items()}


def _outer(vectors) -> Array:
    """The outer product of vectors, computed on flat arrays (element order and arithmetic those of the nested
    product) and shaped at the end: no fused operation sees the joint tensor's many axes, which XLA:CPU's
    YNNPACK fusions reject (``fast_jit``) beyond about eight."""
    total = vectors[0]
    for v in vectors[1:]:
        total = (total.reshape(-1)[:, None] * v[None, :]).reshape(-1)
    return total.reshape(tuple(v.shape[0] for v in vectors))


def initial_law(model: FHMV) -> Float[Array, "*state"]:
    """The law of h_1 over the joint state tensor (a product of the factors' laws)."""
    return _outer([law for factor in model.chain_factors for law in factor.initial_laws()])


def transition_matrices(model: FHMV, x: Float[Array, " T"] | None) -> tuple[Array, ...]:
    """One matrix per factor axis: [n, n], or [T, n, n] (entry t from step t to t + 1, driven by x_t)."""
    return tuple(m for factor in model.chain_factors for m in factor.transition_matrices(x))


def inference_transitions(model: FHMV, x: Float[Array, " T"] | None) -> tuple[Array, ...]:
    """``transition_matrices`` as the inference core takes them: an i.i.d. jump chain (every row pi_M) as its
    law pi_M [N_M], which the core sums out of its recursions (``inference.blocked``: with N_M = N = 10 jump
    states the scans run over 1024 instead of 10240 states)."""
    matrices = transition_matrices(model, x)
    if model.jump is None or model.jump.mode != "iid":
        return matrices
    axis = 1 + model.spec.num_chains
    return matrices[:axis] + (matrices[axis][0],) + matrices[axis + 1:]


def volatility_log_scales(model: FHMV) -> Float[Array, " V"]:
    """log C(e) + log M(J) (+ V log l_1 for Markov leverage) per volatility sub-state, flattened."""
    per_axis = [values for factor in model.volatility_factors for values in factor.axis_log_scales()]
    total = jnp.zeros((1,), model.dtype)
    for values in per_axis:  # the outer sum on flat arrays (see ``_outer``)
        total = (total[:, None] + values[None, :]).reshape(-1)
    return total


def initial_shocks(model: FHMV) -> Float[Array, " L"]:
    """The leverage shocks carried into the first step (zeros)."""
    return jnp.zeros(model.leverage.num_shocks, model.dtype)


def log_scales(model: FHMV, x: Float[Array, " T"] | None, shocks: Array) -> tuple[Array, Array]:
    """(log s_t(v) per step and volatility sub-state, [T, V] or [1, V] when it does not vary in time;
    the leverage shocks after the last step), continuing from ``shocks``."""
    static = volatility_log_scales(model)[None, :]
    shocks, path = model.leverage.log_leverage_path(x, shocks)
    return (static if path is None else static + path[:, None]), shocks


class Emissions(eqx.Module):
    """The emission terms of any block of steps of one sequence.

    Attributes:
        mixture: the model's ``StudentTMixture``.
        inv_chol: [G, K, D, D] U^{-1} of every component (computed once, outside every loop).
        log_scale: [1, V] the time-invariant log-scales log C(e) + log M(J) (+ V log l_1).
        state_shape: the joint state shape (static).
        varying: whether the rows carry a leverage path log L_t added to ``log_scale`` (static). The
            [L, V] log-scales of a block are formed in the block, never as a [T, V] array.
    """

    mixture: StudentTMixture
    inv_chol: Array
    log_scale: Array
    state_shape: tuple[int, ...] = eqx.field(static=True)
    varying: bool = eqx.field(static=True, default=False)

    def scales(self, rows) -> tuple[Float[Array, "L D"], Array, Array | None]:
        """(y of the rows, log s [L, V] (or [1, V]), 1 / s or ``None`` for exp(-log s)); with a leverage path,
        1 / s = exp(-log C M) exp(-log L_t), an outer product (no exp per step and state)."""
        if not self.varying:
            return rows, self.log_scale, None
        y, path = rows
        return y, self.log_scale + path[:, None], jnp.exp(-self.log_scale) * jnp.exp(-path)[:, None]

    def terms(self, rows) -> tuple[Float[Array, "L D"], BlockTerms]:
        """(y of the rows, their ``BlockTerms``)."""
        y, log_scale, inv_scale = self.scales(rows)
        return y, self.mixture.block_terms(self.inv_chol, y, log_scale, inv_scale)

    def likelihoods(self, rows) -> tuple[Float[Array, "L ..."], Float[Array, " L"]]:
        """([L, *state_shape] p(y_t | h_t) / exp(m_t), [L] m_t), m_t the step's largest component term."""
        y, terms = self.terms(rows)
        return terms.scaled.reshape((y.shape[0],) + self.state_shape), terms.shift

    def log_densities(self, rows) -> Float[Array, "L ..."]:
        """[L, *state_shape] log p(y_t | h_t) = LSE_k (log w + log t_D), finite however unlikely the state."""
        y, terms = self.terms(rows)
        return log_sum_exp(terms.components.weighted_log_dens, axis=2).reshape((y.shape[0],) + self.state_shape)


class SequenceInputs(NamedTuple):
    """What the inference core needs of one sequence.

    Attributes:
        initial: [*state_shape] the law of h_1 (or of the step after the carried state).
        transitions: one matrix per factor axis, or the law of an i.i.d. jump chain (``inference_transitions``).
        log_scale: [T, V] or [1, V] log s_t(v) (computed only where used: the E-step and the read-outs form
            each block's from ``rows``).
        rows: the per-step inputs of ``emissions`` (leading axis T): y, and the leverage path log L_t [T]
            when the scales vary in time.
        emissions: the emission terms of any block of rows.
        shocks: the leverage shocks after the last step.
    """

    initial: Float[Array, "..."]
    transitions: tuple[Array, ...]
    log_scale: Array
    rows: object
    emissions: Emissions
    shocks: Array


def sequence_inputs(
    model: FHMV, y: Float[Array, "T D"], x: Float[Array, " T"] | None, *, predicted: Array | None = None,
    shocks: Array | None = None,
) -> SequenceInputs:
    """The one place where parameters become inference inputs.

    Args:
        model: the model.
        y: [T, D] observations; x: [T] driver or ``None``.
        predicted: the law of the first step (default: the law of h_1).
        shocks: the leverage shocks before the first step (default: none yet).
    """
    static = volatility_log_scales(model)[None, :]
    shocks, path = model.leverage.log_leverage_path(x, initial_shocks(model) if shocks is None else shocks)
    emissions = Emissions(model.emission, inverse_cholesky(model.emission.cholesky()), static, model.spec.state_shape,
                          varying=path is not None)
    return SequenceInputs(
        initial=initial_law(model) if predicted is None else predicted,
        transitions=inference_transitions(model, x),
        log_scale=static if path is None else static + path[:, None],
        rows=y if path is None else (y, path),
        emissions=emissions,
        shocks=shocks,
    )


# ----------------------------------------------------------------------------------------
# read-outs


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


def _all_steps(y: Array) -> Bool[Array, " T"]:
    return jnp.ones(y.shape[0], bool)


def sequence_filter(
    model: FHMV, y: Array, x: Array | None, mask: Bool[Array, " T"], *, block_steps: int | None = None,
    method: str = "sequential",
) -> inference.FilterPosterior:
    """The blocked forward filter of the valid steps (``mask``, a prefix) of one sequence (``method``: the
    inference backend, see ``inference.forward_backward``)."""
    s = sequence_inputs(model, y, x)
    return inference.forward_filter(s.initial, s.transitions, s.emissions.likelihoods, s.rows, mask,
                                    block_steps=block_steps, method=method)


def sequence_log_likelihood(
    model: FHMV, y: Array, x: Array | None, mask: Bool[Array, " T"], *, block_steps: int | None = None,
    method: str = "sequential",
) -> Scalar:
    """log p(y) of the valid steps (``mask``, a prefix) of one sequence."""
    return sequence_filter(model, y, x, mask, block_steps=block_steps, method=method).log_likelihood


def _expected_log_densities(emissions: Emissions, rows, smoothed: Array) -> Scalar:
    """sum_t sum_h gamma_t(h) log p(y_t | h_t = h) over one block."""
    return jnp.sum(smoothed * emissions.log_densities(rows))


def _counts_per_entry(matrix: Array, counts: Array) -> Array:
    """counts / matrix where the matrix is positive, else 0: d/dA of sum counts * log A."""
    positive = matrix > 0
    return jnp.where(positive, counts / jnp.where(positive, matrix, 1.0), 0.0)


def log_likelihood_and_score(
    model: FHMV, y: Array, x: Array | None, mask: Bool[Array, " T"], *, block_steps: int | None = None,
    method: str = "sequential",
) -> tuple[Scalar, FHMV]:
    """log p(y) of the valid steps of one sequence and its gradient with respect to every array of ``model``, from
    one forward-backward pass (Fisher's identity: the score is the posterior mean of the complete-data score).

    With gamma_t, xi_t the smoothed one- and two-slice marginals, the gradient of log p(y) with respect to the
    inference inputs is gamma_1 / pi for the initial law, sum_t xi_t / A (per step for a time-varying matrix; the
    column sums for a rank-one law) for the transitions, and the gradient of sum_t sum_h gamma_t(h) log b_t(h)
    (formed block by block) for the emission terms and the leverage path; one pull-back through
    ``sequence_inputs`` turns these into the model's gradient.

    Returns:
        (log p(y), the gradient: an ``FHMV`` whose arrays hold d log p(y) / d array).
    """
    inputs, pull_back = jax.vjp(lambda m: sequence_inputs(m, y, x), model)
    emissions = inputs.emissions
    varying = tuple(a for a, m in enumerate(inputs.transitions) if m.ndim == 3)

    def emission_score(rows, block: inference.BlockPosterior) -> Emissions:
        return jax.grad(_expected_log_densities)(emissions, rows, block.smoothed)

    def path_score(rows, block: inference.BlockPosterior) -> Array:
        observed, path = rows
        return jax.grad(lambda p: _expected_log_densities(emissions, (observed, p), block.smoothed))(path)

    posterior = inference.forward_backward(
        inputs.initial, inputs.transitions, emissions.likelihoods, inputs.rows, mask, reduce=emission_score,
        collect=path_score if emissions.varying else None, block_steps=block_steps, pairwise_sums=True,
        pairwise_steps=varying, method=method)

    def transition_cotangent(axis: int, matrix: Array) -> Array:
        if matrix.ndim == 3:  # entry t moves from step t to t + 1; pairwise_steps[t] from t - 1 to t
            per_step = posterior.pairwise_steps[varying.index(axis)]
            return _counts_per_entry(matrix, jnp.concatenate([per_step[1:], jnp.zeros_like(per_step[:1])]))
        counts = posterior.pairwise_sums[axis]
        return _counts_per_entry(matrix, jnp.sum(counts, axis=0) if matrix.ndim == 1 else counts)

    rows = (jnp.zeros_like(y), posterior.steps) if emissions.varying else jnp.zeros_like(y)
    cotangent = SequenceInputs(
        initial=_counts_per_entry(inputs.initial, posterior.initial),
        transitions=tuple(transition_cotangent(a, m) for a, m in enumerate(inputs.transitions)),
        log_scale=jnp.zeros_like(inputs.log_scale),
        rows=rows,
        emissions=posterior.sums,
        shocks=jnp.zeros_like(inputs.shocks),
    )
    (score,) = pull_back(cotangent)
    return posterior.log_likelihood, score


def scored_log_likelihood(
    model: FHMV, y: Array, x: Array | None, mask: Bool[Array, " T"], *, block_steps: int | None = None,
    method: str = "sequential",
) -> Scalar:
    """``sequence_log_likelihood`` whose derivative with respect to ``model`` is ``log_likelihood_and_score``'s
    (one forward-backward pass instead of reverse-mode differentiation through the filter's scans: several times
    faster, and faster to compile). Meant for first derivatives with respect to ``model`` (``jax.grad``,
    ``jax.vjp``: ``check_score``, ``fit_gradient``); a derivative with respect to y or x raises a ``ValueError``.
    The diagnostics' Hessians differentiate ``sequence_log_likelihood``."""
    return _scored_log_likelihood(model, y, x, mask, block_steps, method)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _scored_log_likelihood(model, y, x, mask, block_steps, method) -> Scalar:
    return sequence_log_likelihood(model, y, x, mask, block_steps=block_steps, method=method)


def _scored_directional(block_steps, method, primals, tangents):
    model, y, x, mask = primals
    if not all(isinstance(t, SymbolicZero) for t in jax.tree.leaves(tangents[1:])):
        raise ValueError("scored_log_likelihood differentiates the model only, not the observations or the driver")
    value, score = log_likelihood_and_score(model, y, x, mask, block_steps=block_steps, method=method)
    pairs = zip(jax.tree.leaves(score), jax.tree.leaves(tangents[0]), strict=True)
    return value, sum((jnp.vdot(g, t) for g, t in pairs if not isinstance(t, SymbolicZero)),
                      jnp.zeros((), value.dtype))


_scored_log_likelihood.defjvp(_scored_directional, symbolic_zeros=True)


@eqx.filter_jit
def _log_likelihood(model: FHMV, y: Array, x: Array | None, method: str) -> Scalar:
    return sequence_log_likelihood(model, y, x, _all_steps(y), method=method)


@eqx.filter_jit
def _filter(model: FHMV, y: Array, x: Array | None, method: str) -> FilterResult:
    posterior = sequence_filter(model, y, x, _all_steps(y), method=method)
    return FilterResult(posterior.log_likelihood, _marginals(model.spec, posterior.filtered), posterior.filtered)


def smoother(model: FHMV, y: Array, x: Array | None, mask: Bool[Array, " T"], *,
             method: str = "sequential") -> inference.SmootherPosterior:
    """The forward-backward posterior of one sequence whose valid steps are ``mask`` (a prefix)."""
    s = sequence_inputs(model, y, x)
    return inference.smoother(s.initial, s.transitions, s.emissions.likelihoods, s.rows, mask, method=method)


@eqx.filter_jit
def _smooth(model: FHMV, y: Array, x: Array | None, method: str) -> SmoothResult:
    posterior = smoother(model, y, x, _all_steps(y), method=method)
    joint = posterior.smoothed
    pairwise = _split_factors(model.spec, list(posterior.pairwise), stack_axis=1)
    return SmoothResult(posterior.log_likelihood, _marginals(model.spec, joint), pairwise, joint)


@eqx.filter_jit
def _viterbi(model: FHMV, y: Array, x: Array | None, method: str) -> Factors:
    s = sequence_inputs(model, y, x)
    path = inference.most_likely_states(s.initial, s.transitions, s.emissions.log_densities(s.rows), method=method)
    return _split_factors(model.spec, list(path.T), stack_axis=1)


def _sample_steps(model: FHMV, key: PRNGKeyArray, x: Array | None, num_steps: int) -> Sample:
    spec, mixture, dtype = model.spec, model.emission, model.dtype
    invariant = [f for f in model.chain_factors if not isinstance(f, MarkovLeverage)]
    laws = [law for f in invariant for law in f.initial_laws()]
    matrices = [m for f in invariant for m in f.step_matrices(None)]
    varying = model.leverage if isinstance(model.leverage, MarkovLeverage) else None
    static_log_scale = volatility_log_scales(model)
    chol = mixture.cholesky()
    dof = mixture.dof()
    mask = jnp.ones(spec.num_features, dtype) if spec.scale_mask is None else jnp.asarray(spec.scale_mask, dtype)
    lag_weights = model.leverage.lag_weights() if isinstance(model.leverage, PredictableLeverage) else None

    def _draw_state(key, t, state, x_prev):
        keys = jax.random.split(key, len(laws) + 1)
        new = []
        for k, law, matrix, s in zip(keys, laws, matrices, state, strict=False):
            probs = jnp.where(t == 0, law, matrix[s])
            new.append(jax.random.categorical(k, jnp.log(probs)).astype(jnp.int32))
        if varying is not None:
            row = varying.step_matrices(x_prev)[0][state[-1]]
            probs = jnp.where(t == 0, varying.initial_laws()[0], row)
            new.append(jax.random.categorical(keys[-1], jnp.log(probs)).astype(jnp.int32))
        return tuple(new)

    def _step(carry, inputs):
        state, recent_g, x_prev = carry
        key, t, x_given = inputs
        k_state, k_comp, k_normal, k_gamma = jax.random.split(key, 4)
        state = _draw_state(k_state, t, state, x_prev)
        regime = state[0]
        volatility = jnp.ravel_multi_index(state[1:], spec.volatility_shape, mode="clip") if state[1:] else 0
        log_l = 0.0 if lag_weights is None else log_leverage(lag_weights, recent_g)
        log_scale = static_log_scale[volatility] + log_l
        component = jax.random.categorical(k_comp, mixture.log_weights[regime])
        z = chol[regime, component] @ jax.random.normal(k_normal, (spec.num_features,), dtype)
        if dof is not None:
            nu = dof[regime, component]
            z = z * jax.lax.rsqrt(jax.random.gamma(k_gamma, nu / 2, dtype=dtype) / (nu / 2))
        y_t = mixture.means[regime, component] + jnp.exp(0.5 * log_scale * mask) * z
        x_t = y_t[spec.driver_feature] if x is None and spec.needs_driver else x_given
        if lag_weights is not None:
            recent_g = push_shock(recent_g, x_t, log_l)
        return (state, recent_g, x_t), (y_t, jnp.stack(state), component, log_scale, x_t)

    num_axes = len(spec.state_shape)
    start = (tuple(jnp.zeros((), jnp.int32) for _ in range(num_axes)), initial_shocks(model), jnp.zeros((), dtype))
    x_steps = jnp.zeros(num_steps, dtype) if x is None else x
    keys = jax.random.split(key, num_steps)
    _, (y, states, components, log_scale, driver) = jax.lax.scan(
        _step, start, (keys, jnp.arange(num_steps), x_steps)
    )
    paths = _split_factors(spec, list(states.T), stack_axis=1)
    return Sample(y, paths, components, log_scale, driver if spec.needs_driver else None)


_sample = fast_jit(_sample_steps, options=llvm_o2)

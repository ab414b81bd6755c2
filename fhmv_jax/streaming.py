"""Online (streaming) filtering: one observation at a time, O(S) work per step.

The state after t observations carries P(h_{t+1} | y_{1:t}) and whatever the leverage
factor needs, so a live feed can be filtered step by step (``stream_step``) or block by
block (``stream_filter``), saved in between (the state is a pytree of arrays) and continued;
either way the results equal the batch filter ``FHMV.filter`` on the whole sequence.

Example:
    state = init_stream(model)
    for y_t in feed:
        state, out = stream_step(model, state, y_t)
        out.regime_probs  # P(R_t | y_{1:t})
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import _check_feature_count, _missing_driver, _non_finite_rows, check_observations
from ._types import Array, Float, Int, Scalar
from .inference._ops import propagate, scaled_likelihoods
from .model import factors
from .model.fhmv import FHMV, emission_terms_at_scale, initial_law, step_transitions
from .model.params import FHMVParams, natural_parameters
from .model.spec import ModelSpec


class StreamState(NamedTuple):
    """What the streaming filter carries from one observation to the next.

    Attributes:
        predicted: [*spec.state_shape] P(h_{t+1} | y_{1:t}), the law of the joint state at the
            next observation (the law of h_1 before any step). With Markov leverage the driver
            x_t has already been used to move it to t + 1, so no driver needs to be kept.
        recent_shocks: [N_L] the last N_L leverage shocks g_t, newest first, from which log L_{t+1}
            is computed (predictable leverage); a [1] zero otherwise.
        log_likelihood: log p(y_{1:t}) (0 before any step).
        num_steps: int32 t, the number of observations filtered so far.
    """

    predicted: Float[Array, "*state"]
    recent_shocks: Float[Array, " L"]
    log_likelihood: Scalar
    num_steps: Int[Array, ""]


class StreamOutput(NamedTuple):
    """Read-outs of one step (stacked over a leading [T] axis by ``stream_filter``).

    Attributes:
        regime_probs: [G] P(R_t | y_{1:t}).
        filtered: [*spec.state_shape] P(h_t | y_{1:t}).
        log_normaliser: log p(y_t | y_{1:t-1}).
    """

    regime_probs: Float[Array, " G"]
    filtered: Float[Array, "*state"]
    log_normaliser: Scalar


def init_stream(model: FHMV) -> StreamState:
    """The state before any observation.

    Args:
        model: the model to filter with.

    Returns:
        A ``StreamState`` with ``predicted`` the law of h_1.
    """
    spec, dtype = model.spec, model.params.dtype
    num_lags = spec.num_leverage_lags if spec.leverage == "predictable" else 1
    return StreamState(
        initial_law(spec, natural_parameters(spec, model.params)),
        jnp.zeros(num_lags, dtype),
        jnp.zeros((), dtype),
        jnp.zeros((), jnp.int32),
    )


def _log_leverage_path(spec: ModelSpec, natural: dict, shocks: Array, x: Array) -> tuple[Array, Array]:
    """log L_t for each step of a block from the carried shocks (a scan over x alone), and the shocks after it."""
    lag_weights = factors.leverage_lag_weights(natural["l1"], natural.get("theta_l"), spec.num_leverage_lags)

    def _shock_step(recent, x_t):
        log_l = factors.log_leverage(lag_weights, recent)
        return factors.push_shock(recent, x_t, log_l), log_l

    return jax.lax.scan(_shock_step, shocks, x)


@functools.partial(jax.jit, static_argnums=0)
def _stream_filter(spec: ModelSpec, params: FHMVParams, state: StreamState, y: Array, x: Array | None):
    """Filter a block: emissions for every row at once (parameter work done once, outside any scan),
    then a scan that only conditions and propagates the message."""
    natural = natural_parameters(spec, params)
    log_scale = factors.log_volatility_scales(spec, natural)[None, :]
    shocks = state.recent_shocks
    if spec.leverage == "predictable":
        shocks, log_l = _log_leverage_path(spec, natural, shocks, x)
        log_scale = log_scale + log_l[:, None]
    log_b = emission_terms_at_scale(spec, params, natural, y, log_scale).log_emissions
    scaled, shift = scaled_likelihoods(log_b.reshape((y.shape[0],) + spec.state_shape))

    def _filter_step(predicted, inputs):
        b_t, shift_t, x_t = inputs
        joint = predicted * b_t
        normaliser = jnp.sum(joint)
        filtered = joint / normaliser
        return propagate(filtered, step_transitions(spec, natural, x_t)), (filtered, jnp.log(normaliser) + shift_t)

    predicted, (filtered, log_normalisers) = jax.lax.scan(_filter_step, state.predicted, (scaled, shift, x))
    regime_probs = jnp.sum(filtered, axis=tuple(range(2, filtered.ndim)))
    new_state = StreamState(
        predicted, shocks, state.log_likelihood + jnp.sum(log_normalisers), state.num_steps + y.shape[0]
    )
    return new_state, StreamOutput(regime_probs, filtered, log_normalisers)


@functools.partial(jax.jit, static_argnums=0)
def _stream_step(spec: ModelSpec, params: FHMVParams, state: StreamState, y_t: Array, x_t: Array | None):
    """``_stream_filter`` on a block of one row, outputs without the block axis."""
    new_state, out = _stream_filter(spec, params, state, y_t[None], None if x_t is None else x_t[None])
    return new_state, jax.tree_util.tree_map(lambda a: a[0], out)


def _check_state(model: FHMV, state: StreamState) -> None:
    spec = model.spec
    if not isinstance(state, StreamState):
        raise TypeError(f"state must be a StreamState (from init_stream), got {type(state).__name__}")
    if tuple(state.predicted.shape) != spec.state_shape:
        raise ValueError(
            f"state.predicted has shape {tuple(state.predicted.shape)} but the model's state shape is "
            f"{spec.state_shape}: the state belongs to a different spec"
        )
    expected_lags = spec.num_leverage_lags if spec.leverage == "predictable" else 1
    if tuple(state.recent_shocks.shape) != (expected_lags,):
        raise ValueError(
            f"state.recent_shocks has shape {tuple(state.recent_shocks.shape)}, expected ({expected_lags},): "
            "the state belongs to a different spec"
        )


def _observation_row(spec: ModelSpec, dtype, y_t, x_t) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate one observation [D] and its driver (a scalar) on the host, as ``check_observations`` does a block."""
    y_t = np.asarray(y_t, dtype=dtype)
    if y_t.ndim != 1:
        raise ValueError(f"y_t must be one observation of shape [D], got shape {y_t.shape}")
    _check_feature_count(spec, y_t.shape[0])
    _non_finite_rows("y_t", y_t[None])
    if not spec.needs_driver:
        return y_t, None
    if x_t is None:
        if spec.driver_feature is None:
            raise _missing_driver(spec)
        return y_t, np.asarray(y_t[spec.driver_feature])
    x_t = np.asarray(x_t, dtype=dtype)
    if x_t.ndim != 0:
        raise ValueError(f"driver x_t must be a scalar, got shape {x_t.shape}")
    _non_finite_rows("x_t", x_t[None])
    return y_t, x_t


def stream_step(
    model: FHMV, state: StreamState, y_t: Float[Array, " D"], x_t: Float[Array, ""] | None = None
) -> tuple[StreamState, StreamOutput]:
    """Filter one more observation.

    Inputs are validated here, outside the compiled step, which is traced once per model
    spec and dtype and reused for every later call.

    Args:
        model: the model.
        state: the state after y_{1:t-1} (``init_stream`` for the first observation).
        y_t: [D] the observation at t (standardised model input).
        x_t: the driver at t (a scalar); defaults to ``y_t[spec.driver_feature]`` where the
            spec names one; ignored for leverage ``"none"``.

    Returns:
        (the state after y_{1:t}, the ``StreamOutput`` of step t).

    Raises:
        ValueError: a wrong shape or feature count, NaN or inf, a missing driver, or a state
            built for a different spec.
        TypeError: ``state`` is not a ``StreamState``.
    """
    _check_state(model, state)
    return _stream_step(model.spec, model.params, state, *_observation_row(model.spec, model.params.dtype, y_t, x_t))


def stream_filter(
    model: FHMV, state: StreamState, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None
) -> tuple[StreamState, StreamOutput]:
    """Filter a block of observations (one ``lax.scan`` of the step ``stream_step`` takes).

    Args:
        model: the model.
        state: the state before the block (``init_stream`` at the start of a sequence).
        y: [T, D] observations.
        x: optional [T] driver, as for ``FHMV.filter``.

    Returns:
        (the state after the block, ``StreamOutput`` with a leading [T] axis on every field).

    Raises:
        ValueError, TypeError: as ``stream_step``.
    """
    _check_state(model, state)
    y, x = check_observations(model.spec, y, x, dtype=model.params.dtype)
    return _stream_filter(model.spec, model.params, state, y, x)

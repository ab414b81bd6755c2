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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._types import Array, Float, Int, Scalar
from ..inference import forward_scan
from .fhmv import FHMV, initial_law, initial_shocks, sequence_inputs
from .inputs import check_observation_row, check_observations


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
    return StreamState(initial_law(model), initial_shocks(model), jnp.zeros((), model.dtype), jnp.zeros((), jnp.int32))


@jax.jit
def _stream_filter(model: FHMV, state: StreamState, y: Array, x: Array | None) -> tuple[StreamState, StreamOutput]:
    """The forward scan over a block, continued from the carried law and leverage shocks."""
    s = sequence_inputs(model, y, x, predicted=state.predicted, shocks=state.recent_shocks)
    scaled, shift = s.emissions.likelihoods(s.rows)
    predicted, filtered, normalisers = forward_scan(s.initial, s.transitions, scaled)
    log_normalisers = jnp.log(normalisers) + shift
    regime_probs = jnp.sum(filtered, axis=tuple(range(2, filtered.ndim)))
    new_state = StreamState(predicted, s.shocks, state.log_likelihood + jnp.sum(log_normalisers),
                            state.num_steps + y.shape[0])
    return new_state, StreamOutput(regime_probs, filtered, log_normalisers)


@jax.jit
def _stream_step(model: FHMV, state: StreamState, y_t: Array, x_t: Array | None) -> tuple[StreamState, StreamOutput]:
    """``_stream_filter`` on a block of one row, outputs without the block axis (``jax.jit``: the model is a
    pytree of arrays, and jit's dispatch costs less per call than a filtered one)."""
    new_state, out = _stream_filter(model, state, y_t[None], None if x_t is None else x_t[None])
    return new_state, StreamOutput(*(a[0] for a in out))


def _check_state(model: FHMV, state: StreamState) -> None:
    spec = model.spec
    if not isinstance(state, StreamState):
        raise TypeError(f"state must be a StreamState (from init_stream), got {type(state).__name__}")
    if tuple(state.predicted.shape) != spec.state_shape:
        raise ValueError(
            f"state.predicted has shape {tuple(state.predicted.shape)} but the model's state shape is "
            f"{spec.state_shape}: the state belongs to a different spec"
        )
    expected = (model.leverage.num_shocks,)
    if tuple(state.recent_shocks.shape) != expected:
        raise ValueError(
            f"state.recent_shocks has shape {tuple(state.recent_shocks.shape)}, expected {expected}: "
            "the state belongs to a different spec"
        )


def stream_step(
    model: FHMV, state: StreamState, y_t: Float[Array, " D"], x_t: Float[Array, ""] | None = None
) -> tuple[StreamState, StreamOutput]:
    """Filter one more observation.

    Inputs are validated here, outside the compiled step (``stream_filter``'s, on a block of one
    row), which is traced once per model spec and dtype and reused for every later call.

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
    return _stream_step(model, state, *check_observation_row(model.spec, y_t, x_t, dtype=model.dtype))


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
    y, x = check_observations(model.spec, y, x, dtype=model.dtype)
    return _stream_filter(model, state, y, x)

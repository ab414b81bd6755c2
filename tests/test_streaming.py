"""The streaming filter against the batch filter and brute-force path enumeration."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import brute_force, random_natural, reference_initial

from fhmv_jax import FHMV, ModelSpec, StreamState, init_stream, stream_filter, stream_step
from fhmv_jax.model import example_model, streaming

SPECS = {
    **TINY_SPECS,
    "no-chains-driver-feature": ModelSpec(
        num_features=2, num_regimes=3, num_chains=0, num_jump_states=1, num_components=2, driver_feature=1
    ),
}
"""Every leverage mode, gaussian and t, N = 0, 1, 2 chains, a scale mask and a driver feature."""
T_SHORT = 60


def _model_and_data(spec, rng, T):
    natural = random_natural(spec, rng)
    y = rng.normal(size=(T, spec.num_features)) * 1.5
    x = rng.normal(size=T) if spec.needs_driver and spec.driver_feature is None else None
    return FHMV.from_natural_parameters(spec, **natural), natural, y, x


def _step_through(model, state, y, x):
    """stream_step over every row; outputs stacked as numpy arrays."""
    outputs = []
    for t in range(y.shape[0]):
        state, out = stream_step(model, state, y[t], None if x is None else x[t])
        outputs.append(out)
    return state, jax.tree.map(lambda *leaves: np.stack(leaves), *outputs)


def _assert_matches_batch(model, y, x, state, outputs, atol):
    batch = model.filter(y, x)
    T = y.shape[0]
    np.testing.assert_allclose(outputs.filtered, batch.joint, rtol=0, atol=atol)
    np.testing.assert_allclose(outputs.regime_probs, batch.marginals.regime, rtol=0, atol=atol)
    np.testing.assert_allclose(state.log_likelihood, batch.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(np.sum(outputs.log_normaliser), batch.log_likelihood, rtol=1e-12)
    assert int(state.num_steps) == T


def test_default_model_matches_batch_filter_over_2000_steps():
    model = example_model(jax.random.key(0))
    sample = model.sample(jax.random.key(1), 2_000)
    y, x = np.asarray(sample.observations), np.asarray(sample.driver)
    start = init_stream(model)
    state, outputs = stream_filter(model, start, y, x)
    _assert_matches_batch(model, y, x, state, outputs, atol=1e-10)
    stepped_state, stepped = _step_through(model, start, y, x)
    _assert_matches_batch(model, y, x, stepped_state, stepped, atol=1e-10)


@pytest.mark.parametrize("name", list(SPECS))
def test_small_specs_match_batch_filter(rng, name):
    model, _, y, x = _model_and_data(SPECS[name], rng, T_SHORT)
    start = init_stream(model)
    _assert_matches_batch(model, y, x, *stream_filter(model, start, y, x), atol=1e-12)
    _assert_matches_batch(model, y, x, *_step_through(model, start, y, x), atol=1e-12)


@pytest.mark.parametrize("name", list(SPECS))
def test_small_specs_match_brute_force(rng, name):
    spec = SPECS[name]
    model, natural, y, x = _model_and_data(spec, rng, 3)
    driver = y[:, spec.driver_feature] if x is None and spec.driver_feature is not None else x
    reference = brute_force(spec, natural, y, driver)
    start = init_stream(model)
    np.testing.assert_allclose(np.asarray(start.predicted).reshape(-1), reference_initial(spec, natural, x), atol=1e-14)
    state, outputs = _step_through(model, start, y, x)
    np.testing.assert_allclose(outputs.filtered.reshape(3, -1), reference["filtered"], atol=1e-12)
    np.testing.assert_allclose(state.log_likelihood, reference["loglik"], rtol=1e-12)


def _save_and_load(state, path):
    """Round-trip a state through an .npz file (no pickling)."""
    np.savez(path, *state)
    with np.load(path, allow_pickle=False) as saved:
        return StreamState(*(jnp.asarray(saved[f"arr_{i}"]) for i in range(len(state))))


@pytest.mark.parametrize("name", ["markov", "predictable", "family-mask-gaussian", "none"])
def test_blocks_and_saved_state_continue_one_pass(rng, tmp_path, name):
    """Blocks of 28, 4 single steps (from a state saved to disk) and 28 equal one pass of 60."""
    model, _, y, x = _model_and_data(SPECS[name], rng, T_SHORT)
    whole_state, whole = stream_filter(model, init_stream(model), y, x)

    def part(a, b):
        return y[a:b], None if x is None else x[a:b]

    state, first = stream_filter(model, init_stream(model), *part(0, 28))
    state, middle = _step_through(model, _save_and_load(state, tmp_path / "state.npz"), *part(28, 32))
    state, last = stream_filter(model, state, *part(32, 60))
    for field in whole._fields:
        joined = np.concatenate([getattr(first, field), getattr(middle, field), getattr(last, field)])
        np.testing.assert_allclose(joined, getattr(whole, field), rtol=1e-13, atol=1e-15)
    for got, want in zip(state, whole_state, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_compiled_step_is_not_retraced(rng, monkeypatch):
    """A spec used by no other test, so the first call must trace and no later call may."""
    spec = ModelSpec(num_features=3, num_regimes=2, num_chains=1, num_jump_states=1, num_components=1, driver_feature=2)
    model, _, y, _ = _model_and_data(spec, rng, 8)
    traced = eqx.debug.assert_max_traces(streaming.sequence_inputs, max_traces=3)
    monkeypatch.setattr(streaming, "sequence_inputs", traced)
    state = init_stream(model)
    for t, x_t in enumerate([None, 0.3, np.float64(-1.2), jnp.asarray(0.5), None]):
        state, _ = stream_step(model, state, y[t], x_t)
    assert eqx.debug.get_num_traces(traced) == 1
    state, _ = stream_filter(model, state, y[:4])
    stream_filter(model, state, y[4:])
    assert eqx.debug.get_num_traces(traced) == 2


def test_bad_inputs_raise(rng):
    model, _, y, x = _model_and_data(SPECS["markov"], rng, 5)
    state = init_stream(model)
    bad_y = y[0].copy()
    bad_y[1] = np.nan
    cases = [
        (lambda: stream_step(model, state, y[0, :1], x[0]), "features"),
        (lambda: stream_step(model, state, y[:2], x[0]), r"shape \[D\]"),
        (lambda: stream_step(model, state, bad_y, x[0]), "y_t has NaN or inf"),
        (lambda: stream_step(model, state, y[0], np.inf), "x_t has NaN or inf"),
        (lambda: stream_step(model, state, y[0], x[:2]), "scalar"),
        (lambda: stream_step(model, state, y[0]), "needs a driver"),
        (lambda: stream_step(model, state._replace(predicted=state.predicted[:1]), y[0], x[0]), "different spec"),
        (lambda: stream_filter(model, state, np.where(np.arange(5)[:, None] == 3, np.inf, y), x), "y has NaN"),
        (lambda: stream_filter(model, state, y, x[:4]), "driver x must have shape"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="StreamState"):
        stream_step(model, tuple(state), y[0], x[0])
    predictable, _, _, _ = _model_and_data(SPECS["predictable"], rng, 1)
    with pytest.raises(ValueError, match="recent_shocks"):
        stream_step(predictable, init_stream(predictable)._replace(recent_shocks=jnp.zeros(5)), y[0], x[0])

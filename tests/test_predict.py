"""Regime read-outs against brute-force enumeration and the model's own posteriors."""

import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import brute_force, random_natural

from fhmv_jax import FHMV
from fhmv_jax.eval import predict_regimes

SPEC = TINY_SPECS["markov"]


@pytest.fixture
def problem(rng):
    """A model and 50 steps of data whose second half can be swapped for other data."""
    natural = random_natural(SPEC, rng, separation=2.0)
    model = FHMV.from_natural_parameters(SPEC, **natural)
    y, x = rng.normal(size=(50, SPEC.num_features)) * 1.5, rng.normal(size=50)
    return model, natural, y, x


def _regime_marginals(joint_flat):
    return joint_flat.reshape((joint_flat.shape[0],) + SPEC.state_shape).sum(axis=(2, 3, 4))


def test_methods_match_brute_force(problem):
    model, natural, y, x = problem
    y, x = y[:4], x[:4]
    reference = brute_force(SPEC, natural, y, x)
    filtered = predict_regimes(model, y, x)
    np.testing.assert_allclose(filtered.probabilities, _regime_marginals(reference["filtered"]), atol=1e-12)
    np.testing.assert_array_equal(filtered.regimes, np.argmax(_regime_marginals(reference["filtered"]), axis=1))
    smoothed = predict_regimes(model, y, x, method="smooth")
    np.testing.assert_allclose(smoothed.probabilities, _regime_marginals(reference["smoothed"]), atol=1e-12)
    viterbi = predict_regimes(model, y, x, method="viterbi")
    np.testing.assert_array_equal(viterbi.regimes, np.unravel_index(reference["viterbi"], SPEC.state_shape)[0])
    np.testing.assert_allclose(viterbi.probabilities, smoothed.probabilities, rtol=0, atol=0)


def test_methods_read_the_model_posteriors(problem):
    model, _, y, x = problem
    filtered = predict_regimes(model, y, x)
    assert filtered.method == "filter"
    np.testing.assert_allclose(filtered.probabilities, model.filter(y, x).marginals.regime, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(filtered.regimes, np.argmax(filtered.probabilities, axis=1))
    np.testing.assert_array_equal(filtered.confidence, np.max(filtered.probabilities, axis=1))
    smoothed = predict_regimes(model, y, x, method="smooth")
    np.testing.assert_allclose(smoothed.probabilities, model.smooth(y, x).marginals.regime, rtol=0, atol=1e-15)
    viterbi = predict_regimes(model, y, x, method="viterbi")
    np.testing.assert_array_equal(viterbi.regimes, model.viterbi(y, x).regime)
    np.testing.assert_array_equal(viterbi.confidence, smoothed.probabilities[np.arange(50), viterbi.regimes])


def test_filtered_read_out_has_no_look_ahead(problem, rng):
    model, _, y, x = problem
    changed = y.copy()
    changed[30:] = rng.normal(size=(20, SPEC.num_features)) * 3.0
    before, after = predict_regimes(model, y, x), predict_regimes(model, changed, x)
    np.testing.assert_allclose(after.probabilities[:30], before.probabilities[:30], rtol=0, atol=1e-14)
    assert np.max(np.abs(after.probabilities[30:] - before.probabilities[30:])) > 1e-3
    smoothed_before = predict_regimes(model, y, x, method="smooth").probabilities
    smoothed_after = predict_regimes(model, changed, x, method="smooth").probabilities
    assert np.max(np.abs(smoothed_after[:30] - smoothed_before[:30])) > 1e-3


@pytest.mark.parametrize("method", ["filter", "smooth", "viterbi"])
def test_ambiguity_flag_and_names(problem, method):
    model, _, y, x = problem
    confidence = predict_regimes(model, y, x, method=method).confidence
    threshold = float(np.median(confidence))
    prediction = predict_regimes(
        model, y, x, method=method, regime_names=["calm", "stress"], ambiguity_threshold=threshold
    )
    np.testing.assert_array_equal(prediction.ambiguous, confidence < threshold)
    assert 0 < prediction.ambiguous.sum() < 50
    np.testing.assert_array_equal(prediction.names, np.where(prediction.regimes == 0, "calm", "stress"))
    default = predict_regimes(model, y, x, method=method)
    np.testing.assert_array_equal(default.names, np.where(default.regimes == 0, "R0", "R1"))
    assert not default.ambiguous[confidence >= 0.6].any() and default.ambiguous[confidence < 0.6].all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "kalman"}, "method must be one of"),
        ({"regime_names": ["a", "b", "c"]}, "2 names"),
        ({"regime_names": "ab"}, "2 names"),
        ({"regime_names": ["a", 1]}, "strings"),
        ({"ambiguity_threshold": 0.0}, r"\(0, 1\]"),
        ({"ambiguity_threshold": 1.5}, r"\(0, 1\]"),
        ({"ambiguity_threshold": float("nan")}, r"\(0, 1\]"),
    ],
)
def test_bad_arguments_raise(problem, kwargs, message):
    model, _, y, x = problem
    with pytest.raises(ValueError, match=message):
        predict_regimes(model, y, x, **kwargs)


def test_bad_observations_raise(problem):
    model, _, y, x = problem
    with pytest.raises(ValueError, match="features"):
        predict_regimes(model, y[:, :1], x)
    with pytest.raises(ValueError, match="needs a driver"):
        predict_regimes(model, y)

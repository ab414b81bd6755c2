"""Bad inputs raise clear errors before any computation."""

import jax
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural

from fhmv_jax import FHMV


@pytest.fixture
def model(rng):
    spec = TINY_SPECS["markov"]
    return FHMV.from_natural_parameters(spec, **random_natural(spec, rng))


@pytest.mark.parametrize("method", ["log_likelihood", "filter", "smooth", "viterbi"])
@pytest.mark.parametrize(
    ("y", "x", "message"),
    [
        (np.zeros(10), np.zeros(10), r"\[T, D\] array"),
        (np.zeros((2, 10, 2)), np.zeros(10), r"\[T, D\] array"),
        (np.zeros((10, 3)), np.zeros(10), "has 3 features but the model expects num_features=2"),
        (np.zeros((0, 2)), np.zeros(0), "at least 1"),
        (np.where(np.arange(20).reshape(10, 2) == 7, np.nan, 0.0), np.zeros(10), r"NaN or inf values in 1 row\(s\): 3"),
        (np.where(np.arange(20).reshape(10, 2) == 8, np.inf, 0.0), np.zeros(10), r"y has NaN or inf.*: 4"),
        (np.zeros((10, 2)), np.r_[np.zeros(9), np.nan], r"x has NaN or inf.*: 9"),
        (np.zeros((10, 2)), np.zeros(9), r"driver x must have shape \(10,\)"),
        (np.zeros((10, 2)), None, "needs a driver"),
    ],
)
def test_bad_observations_raise(model, method, y, x, message):
    with pytest.raises(ValueError, match=message):
        getattr(model, method)(y, x)


def test_bad_sample_requests_raise(model):
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        model.sample(jax.random.key(0), 0, x=np.zeros(0))
    with pytest.raises(ValueError, match="needs a driver"):
        model.sample(jax.random.key(0), 5)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        model.sample(jax.random.key(0), 5, x=np.zeros(4))


def test_leverage_none_ignores_driver(rng):
    spec = TINY_SPECS["none"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y = rng.normal(size=(8, 2))
    assert model.log_likelihood(y) == model.log_likelihood(y, np.ones(8))

"""Information criteria (issue 16, item 3): the log-likelihood of a ragged batch, the free-parameter count
(itself checked against the rank of the natural parameters' Jacobian in ``test_spec_params``) and the
textbook formulas."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural

from fhmv_jax import FHMV, information_criteria
from fhmv_jax.diagnostics import criteria

LENGTHS = (40, 27)


def test_criteria_of_a_ragged_batch_are_the_textbook_formulas(rng):
    spec = TINY_SPECS["predictable"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y, x = rng.normal(size=(2, 40, spec.num_features)), rng.normal(size=(2, 40))
    y[1, LENGTHS[1]:] = np.nan
    got = information_criteria(model, y, x, lengths=LENGTHS)
    log_likelihood = sum(float(model.log_likelihood(jnp.asarray(y[b, :n]), jnp.asarray(x[b, :n])))
                         for b, n in enumerate(LENGTHS))
    k, n = model.num_free_parameters, sum(LENGTHS)
    assert (got.num_parameters, got.num_observations) == (k, n)
    np.testing.assert_allclose(got.log_likelihood, log_likelihood, rtol=1e-12)
    np.testing.assert_allclose([got.aic, got.bic, got.hqic],
                               [-2 * log_likelihood + 2 * k, -2 * log_likelihood + k * math.log(n),
                                -2 * log_likelihood + 2 * k * math.log(math.log(n))], rtol=1e-12)
    assert got.to_dict()["bic"] == got.bic


def test_bad_input_is_refused_with_its_reason(rng):
    spec = TINY_SPECS["none"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y = rng.normal(size=(30, spec.num_features))
    y[4, 1] = np.inf
    with pytest.raises(ValueError, match="inf"):
        information_criteria(model, y)
    with pytest.raises(ValueError, match="features"):
        information_criteria(model, y[:, :1])
    with pytest.raises(ValueError, match="at least 3"):
        criteria(-10.0, 4, 2)

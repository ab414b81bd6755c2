"""jax.grad of the log-likelihood against central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural
from jax.flatten_util import ravel_pytree

from fhmv_jax import FHMV


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_gradient_matches_finite_differences(rng, name):
    spec = TINY_SPECS[name]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y, x = rng.normal(size=(60, spec.num_features)) * 1.3, rng.normal(size=60)
    x_arg = x if spec.needs_driver else None
    flat, unravel = ravel_pytree(model)

    def loglik(vector):
        return unravel(vector).log_likelihood(y, x_arg)

    grad = jax.grad(loglik)(flat)
    assert np.all(np.isfinite(grad))
    # every coordinate that the model uses moves the likelihood (Cholesky upper triangles do not)
    step = 1e-6
    for index in rng.choice(flat.size, size=min(flat.size, 25), replace=False):
        e = jnp.zeros_like(flat).at[index].set(step)
        numeric = (loglik(flat + e) - loglik(flat - e)) / (2 * step)
        np.testing.assert_allclose(grad[index], numeric, rtol=1e-5, atol=1e-6)
    for _ in range(3):
        direction = jnp.asarray(rng.normal(size=flat.shape))
        numeric = (loglik(flat + step * direction) - loglik(flat - step * direction)) / (2 * step)
        np.testing.assert_allclose(grad @ direction, numeric, rtol=1e-5)


def test_gradient_reaches_every_factor_parameter(rng):
    spec = TINY_SPECS["markov"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y, x = rng.normal(size=(40, 2)) * 2, rng.normal(size=40)
    grads = jax.grad(lambda m: m.log_likelihood(y, x))(model)
    for name, grad in {**grads.persistence.raw_arrays(), **grads.jump.raw_arrays(), **grads.leverage.raw_arrays(),
                       "dof_raw": grads.emission.dof_raw}.items():
        if grad is not None:
            assert np.any(np.asarray(grad) != 0), name

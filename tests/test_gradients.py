"""jax.grad of the log-likelihood against central finite differences."""

import equinox as eqx
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
    y, x = rng.normal(size=(30, spec.num_features)) * 1.3, rng.normal(size=30)
    x_arg = x if spec.needs_driver else None
    flat, unravel = ravel_pytree(model.params)

    def loglik(vector):
        return eqx.tree_at(lambda m: m.params, model, unravel(vector)).log_likelihood(y, x_arg)

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
    for field in ("c1_raw", "m1_raw", "l1_raw", "persistence_raw", "jump_q_raw", "jump_back_raw", "leverage_raw", "dof_raw"):
        assert np.any(np.asarray(getattr(grads.params, field)) != 0), field

"""jax.grad of the log-likelihood against central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural
from jax.flatten_util import ravel_pytree

from fhmv_jax import FHMV
from fhmv_jax.model.fhmv import scored_log_likelihood, sequence_log_likelihood


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


@pytest.mark.parametrize(("name", "method"), [(name, "sequential") for name in TINY_SPECS] + [("markov", "parallel")])
def test_score_by_forward_backward_is_the_autodiff_gradient(rng, name, method):
    """``scored_log_likelihood``'s gradient (Fisher's identity, one forward-backward pass of the backend
    ``method``) against reverse-mode differentiation through the sequential filter (the gradient does not depend
    on the backend; differentiating the associative scan compiles for twice as long, and test_parallel checks
    it), on blocks of 16 steps: a full sequence, a ragged one and an empty one."""
    spec = TINY_SPECS[name]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y = jnp.asarray(rng.normal(size=(3, 60, spec.num_features)) * 1.3)
    x = jnp.asarray(rng.normal(size=(3, 60))) if spec.needs_driver else None
    mask = jnp.arange(60)[None, :] < jnp.array([60, 37, 0])[:, None]

    @jax.jit
    def gradients(model):
        def per_sequence(log_likelihood, via):
            def one(yb, xb, mb):
                return jax.value_and_grad(lambda m: log_likelihood(m, yb, xb, mb, block_steps=16, method=via))(model)
            return jax.vmap(one)(y, x, mask)
        return per_sequence(sequence_log_likelihood, "sequential"), per_sequence(scored_log_likelihood, method)

    (values, autodiff), (scored_values, scored) = gradients(model)
    if method == "sequential":  # the same forward pass, another program
        np.testing.assert_allclose(scored_values, values, rtol=1e-13)
    else:  # as test_parallel bounds it (the empty sequence: rounding around 0)
        np.testing.assert_allclose(scored_values, values, rtol=1e-9, atol=1e-9 * np.max(np.abs(values)))
    for reference, got in zip(jax.tree.leaves(autodiff), jax.tree.leaves(scored), strict=True):
        for b in (0, 1):
            np.testing.assert_allclose(got[b], reference[b], rtol=0, atol=1e-10 * (1 + np.max(np.abs(reference[b]))))
        assert np.all(got[2] == 0)  # no valid step: no score
    assert any(np.any(g[:2] != 0) for g in jax.tree.leaves(scored))


def test_the_scored_log_likelihood_refuses_derivatives_in_the_data(rng):
    spec = TINY_SPECS["none"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y, mask = jnp.asarray(rng.normal(size=(20, 2))), jnp.ones(20, bool)
    with pytest.raises(ValueError, match="differentiates the model only"):
        jax.grad(lambda yy: scored_log_likelihood(model, yy, None, mask))(y)

"""The M-step's iterative updates (issue 14): they cannot stall, their derivatives are exact, Q is finite
wherever the parameters are valid, and the zero-mean option keeps the means at zero."""

import importlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural
from jax.flatten_util import ravel_pytree

from fhmv_jax import FHMV, ModelSpec, fit_em, init_model
from fhmv_jax.em.stats import batch_e_step

m_step_module = importlib.import_module("fhmv_jax.em.m_step")


def _saddle(values):
    """A smooth function whose start (0, 0) is a saddle with a gradient: -H has eigenvalues (-2, 2)."""
    a, b = values["a"], values["b"]
    return -(b**2) + a**2 - 0.25 * a**4 + 0.1 * a + 0.3 * b


def test_newton_ascent_rises_from_an_indefinite_hessian_to_the_maximum():
    start = {"a": jnp.zeros(()), "b": jnp.zeros(())}
    ascent = jax.jit(m_step_module.newton_ascent, static_argnums=0)(_saddle, start)
    a, b = float(ascent.params["a"]), float(ascent.params["b"])
    # the maxima solve 2a - a^3 + 0.1 = 0 (a ~ 1.46, the higher one) and b = 0.15
    assert abs(2 * a - a**3 + 0.1) < 1e-9 and abs(b - 0.15) < 1e-9 and a > 1
    assert not bool(ascent.stalled) and float(ascent.gradient_norm) < 1e-6


def test_newton_ascent_says_when_it_stalls():
    def broken(values):
        return jnp.where(jnp.abs(values["a"]) > 0, jnp.nan, 0.0) + values["a"]

    ascent = m_step_module.newton_ascent(broken, {"a": jnp.zeros(())})
    assert bool(ascent.stalled) and float(ascent.params["a"]) == 0.0


@pytest.fixture(scope="module")
def predictable_problem():
    """The volatility CM-step of a tiny predictable-leverage spec with a scale mask, on a ragged batch."""
    spec = TINY_SPECS["family-mask-gaussian"]
    rng = np.random.default_rng(3)
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    mask = jnp.asarray(np.arange(40)[None, :] < np.array([[40], [33]]))
    y = jnp.where(mask[..., None], jnp.asarray(rng.normal(size=(2, 40, spec.num_features))), 0.0)
    x = jnp.where(mask, jnp.asarray(rng.normal(size=(2, 40))), 0.0)
    stats = batch_e_step(model, y, x, mask)
    prior = m_step_module.CovariancePrior(jnp.asarray(1e-2), jnp.asarray(1e-2))
    summed = jax.tree.map(lambda a: jnp.sum(a, axis=0), stats.components)
    return model, stats, summed.counts, prior


def test_the_closed_form_derivatives_through_the_leverage_path_are_autodiff(predictable_problem):
    model, stats, counts, prior = predictable_problem
    problem = m_step_module.scale_problem(model, model, stats.volatility, counts, prior)
    assert problem.derivatives is not None
    flat, unravel = ravel_pytree(problem.start)
    flat = flat + 0.3 * jnp.sin(jnp.arange(flat.shape[0]))  # away from kappa = 0

    def objective(v):
        return problem.objective(unravel(v))

    grad, hess = eqx.filter_jit(problem.derivatives)(flat)
    np.testing.assert_allclose(grad, jax.jit(jax.grad(objective))(flat), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(hess, jax.jit(jax.hessian(objective))(flat), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("raw", [-30.0, -5.0, 5.0, 30.0])
def test_q_is_finite_wherever_the_parameters_are_valid(predictable_problem, raw):
    """Magnitudes at extreme but finite values (theta near 0 or 1, c1 - 1 and l1 tiny or huge): Q and its
    derivatives stay finite (a NaN there would be read as a rejection and silently stall the update)."""
    model, stats, counts, prior = predictable_problem
    problem = m_step_module.scale_problem(model, model, stats.volatility, counts, prior)
    flat, unravel = ravel_pytree(problem.start)
    flat = jnp.full_like(flat, raw)
    value = eqx.filter_jit(problem.objective)(unravel(flat))
    grad, hess = eqx.filter_jit(problem.derivatives)(flat)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))


def test_zero_mean_keeps_the_means_at_zero(rng):
    spec = ModelSpec(num_features=1, num_regimes=1, num_chains=1, num_jump_states=2, num_components=1,
                     leverage="predictable", num_leverage_lags=3, jump_mode="iid", gaussian=True, driver_feature=0,
                     zero_mean=True)
    y = rng.standard_t(5, size=(200, 1)) + 0.5
    start = init_model(jax.random.key(0), spec, y)
    fit = fit_em(start, y, max_iters=5)
    assert np.all(np.asarray(fit.model.emission.means) == 0) and np.all(np.asarray(start.emission.means) == 0)
    # p, c1, q, m1, l1, theta_l and the variance; the mean is not free
    assert "means" not in fit.score and fit.model.num_free_parameters == 7
    with pytest.raises(ValueError, match="zero_mean"):
        FHMV.from_natural_parameters(spec, **{**start.natural_parameters(), "means": np.ones((1, 1, 1))})


def test_zero_mean_is_a_flag_that_applies_to_every_feature():
    spec = ModelSpec(num_features=3, zero_mean=True)
    assert spec.zero_mean and ModelSpec(num_features=3).num_features == 3
    with pytest.raises(ValueError, match="zero_mean must be True or False"):
        ModelSpec(zero_mean="yes")

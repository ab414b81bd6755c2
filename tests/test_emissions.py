"""Emission log-densities against scipy.stats, including the volatility scale and the feature mask."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural, reference_log_emissions
from scipy import stats

from fhmv_jax import FHMV, ModelSpec
from fhmv_jax.model import emissions, sequence_inputs


@pytest.mark.parametrize("forms", ["_whitened_forms", "_expanded_forms"])
@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("mask", [None, (True, False, True, False)])
def test_component_density_matches_scipy(rng, gaussian, mask, forms):
    spec = ModelSpec(num_features=4, num_regimes=2, num_components=3, gaussian=gaussian, scale_mask=mask)
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    natural = model.natural_parameters()
    y = rng.standard_t(4, size=(7, 4)) * 2
    log_scale = jnp.asarray(rng.normal(size=(7, 5)))
    inv_chol = emissions.inverse_cholesky(model.emission.cholesky())
    terms = getattr(emissions, forms)(jnp.asarray(y), natural["means"], inv_chol, spec.scale_mask)
    got, delta, log_ratio = model.emission.component_terms(terms, log_scale)
    if not gaussian:
        np.testing.assert_allclose(log_ratio, np.log1p(delta / natural["dof"][None, :, :, None]), rtol=1e-12)
    a = np.ones(4) if mask is None else np.asarray(mask, float)
    for t, g, k, v in np.ndindex(7, 2, 3, 5):
        lam = np.diag(np.exp(log_scale[t, v]) ** (a / 2))
        cov = lam @ np.asarray(natural["covariances"][g, k]) @ lam
        mean = np.asarray(natural["means"][g, k])
        if gaussian:
            want = stats.multivariate_normal(mean, cov).logpdf(y[t])
        else:
            want = stats.multivariate_t(mean, cov, df=float(natural["dof"][g, k])).logpdf(y[t])
        want = want + np.log(natural["weights"][g, k])
        np.testing.assert_allclose(got[t, g, k, v], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask", [None, (True, False, True, False)])
def test_weighted_forms_from_moments_are_the_weighted_sums_of_the_forms(rng, mask):
    """sum_t w_t(g, k, f) form_f(y_t) from the moments about other centres, at other means and factors, against
    ||U^{-1} z_a||^2, <U^{-1} z_a, U^{-1} z_r>, ||U^{-1} z_r||^2 step by step (signed weights)."""
    T, G, K, D = 9, 2, 3, 4
    r = emissions.num_forms(mask)
    y, centres, means = rng.normal(size=(T, D)), rng.normal(size=(G, K, D)), rng.normal(size=(G, K, D))
    weights = rng.normal(size=(T, G, K, r))
    chol = np.tril(rng.normal(size=(G, K, D, D)), -1) + np.eye(D) * rng.uniform(0.5, 2, size=(G, K, 1, D))
    inv_chol = np.linalg.inv(chol)
    moments = emissions.form_moments(jnp.asarray(y), jnp.asarray(weights), jnp.asarray(centres))
    got = emissions.weighted_forms(moments, jnp.asarray(centres), jnp.asarray(means), jnp.asarray(inv_chol), mask)
    a = np.ones(D) if mask is None else np.asarray(mask, float)
    want = np.zeros((G, K, r))
    for t, g, k in np.ndindex(T, G, K):
        z = y[t] - means[g, k]
        scaled, rest = inv_chol[g, k] @ (a * z), inv_chol[g, k] @ ((1 - a) * z)
        forms = [scaled @ scaled] if mask is None else [scaled @ scaled, scaled @ rest, rest @ rest]
        want[g, k] += weights[t, g, k] * np.asarray(forms)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_joint_state_emissions_match_scipy(rng, name):
    """The full emission path (factor scales, leverage, mixture) against an independent build."""
    spec = TINY_SPECS[name]
    natural = random_natural(spec, rng)
    model = FHMV.from_natural_parameters(spec, **natural)
    y = rng.normal(size=(6, spec.num_features)) * 1.5
    x = rng.normal(size=6)
    inputs = sequence_inputs(model, jnp.asarray(y), jnp.asarray(x) if spec.needs_driver else None)
    got = np.asarray(inputs.emissions.log_densities(inputs.rows)).reshape(6, -1)
    np.testing.assert_allclose(got, reference_log_emissions(spec, natural, y, x), rtol=1e-10, atol=1e-10)
    scaled, shift = inputs.emissions.likelihoods(inputs.rows)
    got = np.log(np.asarray(scaled)).reshape(6, -1) + np.asarray(shift)[:, None]
    np.testing.assert_allclose(got, reference_log_emissions(spec, natural, y, x), rtol=1e-10, atol=1e-10)


def test_heavy_outliers_stay_finite(rng):
    spec = ModelSpec(num_features=3, num_regimes=2, num_chains=1, leverage="none")
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y = rng.normal(size=(20, 3))
    y[5] = 1e6
    y[9] = -1e8
    assert np.isfinite(model.log_likelihood(y))
    probs = model.filter(y).marginals.regime
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)

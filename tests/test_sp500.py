"""The published FHMV on real returns (S&P 500, the ``arch`` sample): ``fit_em`` reaches the maximum.

Before issue 14 the volatility magnitudes never left their starting values here (the M-step's
Newton step was rejected every iteration) and EM stopped 250 nats below the maximum while
reporting convergence. Now ``fit_em`` must end within 0.5 nats of a direct L-BFGS maximisation of
``log_likelihood`` started from the fit (an independent optimiser on the exact gradient,
``experiments/compare_garch.py``), for N = 2 and N = 4 chains. With tol = 2e-5 it stops only once
a Newton step is predicted to gain at most 0.1 nats (T = 5030); the default 1e-4 allows 0.5 and
was measured 0.40 and 0.49 nats short (docs/benchmarks.md), too close to the bound for a test.
"""

import jax
import numpy as np
import pytest
from compare_garch import direct_maximum, published_spec

import fhmv_jax
from fhmv_jax.data import sp500_prices


@pytest.fixture(scope="module")
def returns():
    return 100 * np.diff(np.log(sp500_prices()[1]))[:, None]


@pytest.mark.parametrize("num_chains", [2, 4])
def test_the_published_model_is_fitted_to_its_maximum(returns, num_chains):
    spec = published_spec(num_chains)
    start = fhmv_jax.init_model(jax.random.key(0), spec, returns)
    fit = fhmv_jax.fit_em(start, returns, max_iters=1000, tol=2e-5)
    natural, initial = fit.model.natural_parameters(), start.natural_parameters()
    for name in ("c1", "m1", "l1", "theta_l"):
        assert abs(float(natural[name]) - float(initial[name])) > 0.05, name
    assert fit.converged and not fit.stalled
    best, _ = direct_maximum(fit.model, returns)
    assert best - fit.log_likelihoods[-1] < 0.5, (best, fit.log_likelihoods[-1])
    assert fit.log_likelihoods[-1] > -6760

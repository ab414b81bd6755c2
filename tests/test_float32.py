"""float32, the GPU default: E-step statistics against float64, and short float32 fits (docs/float32.md).

The float64 references run on the float32-rounded data and parameters, so that the comparison measures the
arithmetic of the E-step, not the rounding of its inputs. fit_em warns when it runs float32 on a CPU; the fits
here expect that warning and the ConvergenceWarning of a fit stopped after a few iterations, nothing else.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural

from fhmv_jax import FHMV, fit_em
from fhmv_jax.em.fit import ConvergenceWarning
from fhmv_jax.em.stats import ComponentStats, SequenceStats, StateMoments, StepMoments, e_step
from fhmv_jax.model.examples import example_model
from fhmv_jax.model.inputs import check_sequences

RTOL = 1e-4
"""|a32 - a64| <= RTOL (|a64| + scale) for every entry of every statistic (``_scales``); measured: 9e-6 at most."""

DECREASE_RTOL = 1e-5
"""The most a float32 objective history may fall between recorded iterations, relative to the objective: a
float32 log-likelihood is accurate to about 2e-7 relative at any length, and the largest fall measured in long
float32 fits, near convergence, was 2e-6 (docs/float32.md). fit_em itself raises only beyond 1e-4
(``loop._decrease_tolerance``)."""

_E_STEP = eqx.filter_jit(e_step)


def _tiny_data(name, num_steps):
    """A tiny spec's model with random parameters and a sample of it driven by Gaussian noise."""
    spec = TINY_SPECS[name]
    rng = np.random.default_rng(17)
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng, separation=2.0))
    x = rng.normal(scale=0.7, size=num_steps)
    y = np.asarray(model.sample(jax.random.key(5), num_steps, x=jnp.asarray(x)).observations)
    return model, y, x


def _default_data(num_steps):
    """The default spec's example model and a sample of it (driver: its feature ``driver_feature``)."""
    model = example_model(jax.random.key(0))
    y = np.asarray(model.sample(jax.random.key(1), num_steps).observations)
    return model, y, None


def _cauchy_schwarz(weights, second):
    """Scales of the first [..., D] and second [..., D, D] moments sum_t w z_t and sum_t w z_t z_t^T (w >= 0):
    sqrt(sum w sum w z_d^2) and sqrt(sum w z_d^2 sum w z_f^2), their largest possible sizes. Their rounding
    comes from terms of that size, whatever the cancellation between them (a mean near the data's)."""
    diagonal = np.diagonal(second, axis1=-2, axis2=-1)
    return np.sqrt(weights[..., None] * diagonal), np.sqrt(diagonal[..., :, None] * diagonal[..., None, :])


def _scales(stats: SequenceStats, num_steps: int) -> SequenceStats:
    """Per statistic, the scale of its rounding error (in units of RTOL), from the float64 statistics.

    log p(y) = sum_t log c_t: every step's log-normaliser carries a few eps of (1 + |log c_t|), so its error
    grows with T + |log p|. Probabilities (initial laws, per-step weights and two-slice laws) have scale 1;
    expected counts (transitions, component counts and weights, dof terms, sub-state counts) are sums of T
    such probabilities (times E[W] <= 1 + D / nu), so their errors grow with T, not with the entry: a rare
    transition's count is as uncertain as a frequent one's. Moments about the means get their Cauchy-Schwarz
    bounds (``_cauchy_schwarz``). The data (observations, driver) are copied: exact, scale 0.
    """
    T = float(num_steps)
    components = stats.components
    first, second = _cauchy_schwarz(np.asarray(components.scale_weights), np.asarray(components.second))
    component_scales = ComponentStats(T, T, first, second, T)
    volatility = stats.volatility
    if isinstance(volatility, StateMoments):
        first, second = _cauchy_schwarz(np.asarray(volatility.weights), np.asarray(volatility.second))
        volatility_scales = StateMoments(T, T, first, second)
    else:
        volatility_scales = StepMoments(1.0, 1.0, 0.0, 0.0)
    leverage = None if stats.leverage is None else type(stats.leverage)(1.0, 0.0)
    return SequenceStats(T, tuple(1.0 for _ in stats.initial), tuple(T for _ in stats.transitions),
                         component_scales, volatility_scales, leverage)


def _relative_errors(stats32: SequenceStats, stats64: SequenceStats, num_steps: int) -> dict[str, float]:
    """{field path: max |a32 - a64| / (|a64| + scale)} over every statistic."""
    scales = _scales(stats64, num_steps)
    errors = {}
    for (path, a32), a64, scale in zip(jax.tree_util.tree_leaves_with_path(stats32), jax.tree.leaves(stats64),
                                       jax.tree.leaves(scales), strict=True):
        a32, a64 = np.asarray(a32, np.float64), np.asarray(a64)
        assert a32.shape == a64.shape and np.all(np.isfinite(a32)), jax.tree_util.keystr(path)
        errors[jax.tree_util.keystr(path)] = float(np.max(np.abs(a32 - a64) / (np.abs(a64) + scale)))
    return errors


CASES = {"markov": lambda: _tiny_data("markov", 400), "predictable": lambda: _tiny_data("predictable", 400),
         "default": lambda: _default_data(200)}


@pytest.mark.parametrize("case,method", [("markov", "sequential"), ("markov", "parallel"),
                                         ("predictable", "sequential"), ("default", "sequential")])
def test_float32_e_step_statistics_match_float64(case, method):
    model, y, x = CASES[case]()
    model32 = model.astype(jnp.float32)
    y32, x32, mask = check_sequences(model.spec, y, x, dtype=np.float32)
    y32, x32, mask = y32[0], None if x32 is None else x32[0], jnp.asarray(mask[0])
    stats32 = _E_STEP(model32, jnp.asarray(y32), None if x32 is None else jnp.asarray(x32), mask, method=method)
    stats64 = _E_STEP(model32.astype(jnp.float64), jnp.asarray(y32, jnp.float64),
                      None if x32 is None else jnp.asarray(x32, jnp.float64), mask, method=method)
    assert stats32.log_likelihood.dtype == jnp.float32
    errors = _relative_errors(stats32, stats64, y.shape[0])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, (worst, errors)


def _fit_float32(model, y, x, **kwargs):
    """fit_em on float32 copies, expecting its float32-on-CPU warning and a ConvergenceWarning at most."""
    with pytest.warns(UserWarning) as record:
        fit = fit_em(model.astype(jnp.float32), np.asarray(y, np.float32),
                     None if x is None else np.asarray(x, np.float32), **kwargs)
    assert any("float32 on the CPU" in str(w.message) for w in record)
    unexpected = [w for w in record if "float32 on the CPU" not in str(w.message)
                  and not issubclass(w.category, ConvergenceWarning)]
    assert not unexpected, [str(w.message) for w in unexpected]
    return fit


def _assert_finite_and_monotone(fit):
    assert fit.model.dtype == jnp.float32
    assert np.all(np.isfinite(fit.objectives)) and np.all(np.isfinite(fit.log_likelihoods))
    for value in jax.tree.leaves(fit.model.natural_parameters()):
        assert np.all(np.isfinite(value))
    assert np.all(np.diff(fit.objectives) >= -DECREASE_RTOL * np.abs(fit.objectives[1:])), fit.objectives
    assert fit.objectives[-1] > fit.objectives[0]


def test_a_short_float32_fit_of_the_default_spec_is_finite_and_monotone():
    _, y, _ = _default_data(500)
    start = example_model(jax.random.key(3))  # other means and covariances: the ECM steps have work to do
    fit = _fit_float32(start, y, None, max_iters=6, tol=0.0)
    _assert_finite_and_monotone(fit)
    assert fit.num_iters >= 4


def test_a_short_float32_fit_with_the_parallel_backend_is_finite_and_monotone():
    truth, y, x = _tiny_data("markov", 300)
    start = FHMV.from_natural_parameters(truth.spec, **random_natural(truth.spec, np.random.default_rng(2)))
    fit = _fit_float32(start, y, x, max_iters=6, tol=0.0, inference="parallel")
    _assert_finite_and_monotone(fit)
    assert fit.num_iters >= 4

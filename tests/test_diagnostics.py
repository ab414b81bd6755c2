"""Information criteria (issue 16, item 3): the log-likelihood of a ragged batch, the free-parameter count
(itself checked against the rank of the natural parameters' Jacobian in ``test_spec_params``) and the
textbook formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural

from fhmv_jax import FHMV, FitResult, ModelSpec, diagnostics, fit_em, fit_gradient, information_criteria
from fhmv_jax.diagnostics import criteria
from fhmv_jax.model.fhmv import sequence_log_likelihood

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


# ----------------------------------------------------------------------------------------
# scores, Hessian and standard errors (issue 16, items 1-2)

STEPS = 40


def _tiny(name, rng, steps=STEPS):
    spec = TINY_SPECS[name]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y = rng.normal(size=(steps, spec.num_features))
    x = None if spec.leverage == "none" else rng.normal(size=steps)
    return model, y, x


def _flat(arrays):
    return np.concatenate([np.ravel(arrays[k]) for k in sorted(arrays)])


@pytest.mark.parametrize("name", ["none", "predictable", "markov"])
def test_hessian_is_the_finite_difference_of_the_gradient(name, rng):
    model, y, x = _tiny(name, rng)
    layout = diagnostics.free_layout(model)
    theta = np.asarray(layout.ravel(model.free_arrays()))
    got = diagnostics.hessian(model, y, x, chunk_size=16)
    h = 1e-5
    columns = []
    for j in range(theta.size):
        step = np.zeros_like(theta)
        step[j] = h
        plus, minus = (diagnostics.model_at(model, layout, jnp.asarray(theta + s)) for s in (step, -step))
        columns.append((_flat(diagnostics.score(plus, y, x).gradient) - _flat(diagnostics.score(minus, y, x).gradient))
                       / (2 * h))
    reference = np.asarray(columns).T
    assert got.shape == (theta.size, theta.size)
    np.testing.assert_allclose(got, 0.5 * (reference + reference.T), rtol=0, atol=1e-6 * np.abs(reference).max())


def test_hessian_of_a_ragged_batch_equals_autodiff(rng):
    """The emission block by Louis' identity (``fhmv_jax.information``) and the rest by Hessian-vector products,
    against Hessian-vector products along every coordinate (forward-over-reverse autodiff of the whole
    log-likelihood) to rounding, with a scale mask, Gaussian components and family jumps (the other modes: the
    finite differences above; the covariance recursion alone: ``test_additive``)."""
    model, y, x = _tiny("family-mask-gaussian", rng)
    short = LENGTHS[1]
    y = np.stack([y, np.where(np.arange(STEPS)[:, None] < short, y[::-1], np.nan)])
    got = diagnostics.hessian(model, y, np.stack([x, x[::-1]]), lengths=(STEPS, short))
    problem = diagnostics._Problem.of(model, y, np.stack([x, x[::-1]]), (STEPS, short), "hessian")
    _, products = problem.hessian_products(np.eye(problem.layout.size), 16, False)
    np.testing.assert_allclose(got, 0.5 * (products + products.T), rtol=0, atol=1e-11 * np.abs(products).max())


def test_per_step_scores_opg_and_delta_method_match_one_step_at_a_time(rng):
    """Per-step scores against reverse-mode gradients of log p(y_1:t) - log p(y_1:t-1) (prefix masks); the OPG
    covariance against those outer products; the delta method against a finite-difference Jacobian."""
    model, y, x = _tiny("markov", rng)
    layout = diagnostics.free_layout(model)
    theta = layout.ravel(model.free_arrays())

    @jax.jit
    def prefix_gradient(theta, steps):
        mask = jnp.arange(STEPS) < steps
        return jax.grad(lambda t: sequence_log_likelihood(diagnostics.model_at(model, layout, t), jnp.asarray(y),
                                                          jnp.asarray(x), mask))(theta)

    prefixes = np.asarray([prefix_gradient(theta, t) for t in range(STEPS + 1)])
    reference = np.diff(prefixes, axis=0)
    got = diagnostics.score(model, y, x, per_observation=True, chunk_size=16)
    assert got.per_observation.shape == (STEPS, layout.size) and len(got.labels) == layout.size
    np.testing.assert_allclose(got.per_observation, reference, rtol=0, atol=1e-9 * np.abs(reference).max())
    np.testing.assert_allclose(_flat(got.gradient), prefixes[-1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.log_likelihood, float(model.log_likelihood(y, x)), rtol=1e-12)

    errors = diagnostics.standard_errors(model, y, x, kind="opg", chunk_size=16)
    assert errors.positive_definite and errors.num_identified == model.num_free_parameters - 1
    assert set(errors.flagged) == {"initial_regime[0]", "initial_regime[1]"}, "one sequence start: pi is held"
    outer = reference.T @ reference
    covariance = errors.raw_covariance
    np.testing.assert_allclose(covariance @ outer @ covariance, covariance, rtol=0,
                               atol=1e-7 * np.abs(covariance).max())

    natural = jax.jit(lambda t: diagnostics.natural_layout(model).ravel(
        diagnostics.model_at(model, layout, t).natural_parameters()))
    h = 1e-6
    jacobian = np.asarray([(natural(theta.at[j].add(h)) - natural(theta.at[j].add(-h))) / (2 * h)
                           for j in range(layout.size)]).T
    delta = jacobian @ covariance @ jacobian.T
    np.testing.assert_allclose(errors.covariance, delta, rtol=0, atol=1e-6 * np.abs(delta).max())
    finite = ~np.isnan(errors.standard_errors())
    np.testing.assert_allclose(errors.standard_errors()[finite], np.sqrt(np.diagonal(delta))[finite], rtol=1e-5)
    assert np.isnan(errors.natural["leverage_logits"][..., 0]).all(), "fixed logits have no standard error"
    assert finite.sum() == len(errors.labels) - 4 - 2


GAUSSIAN_HMM = ModelSpec(num_features=2, num_regimes=2, num_chains=0, num_jump_states=1, num_components=1,
                         leverage="none", gaussian=True)


def _gaussian_hmm(shift: float = 0.0, stay: float = 0.95) -> FHMV:
    return FHMV.from_natural_parameters(
        GAUSSIAN_HMM, initial_regime=np.array([0.5, 0.5]),
        regime_transition=np.array([[stay, 1 - stay], [0.1, 0.9]]), weights=np.ones((2, 1)),
        means=np.array([[[-1.0, 0.5]], [[1.0, -0.5]]]) + shift,
        covariances=np.array([[[[1.0, 0.3], [0.3, 0.8]]], [[[0.6, -0.2], [-0.2, 1.2]]]]))


def test_standard_errors_at_a_maximum(rng):
    """A fitted two-regime Gaussian HMM: a tiny Newton gain, a positive definite information, the three kinds
    alike (the model is the truth), the truth inside the Wald intervals, and the table consistent."""
    truth = _gaussian_hmm()
    y = truth.sample(jax.random.PRNGKey(3), 1500).observations
    fit = fit_em(truth, y, max_iters=200, tol=1e-9, covariance_ridge=0.0, covariance_prior_count=0.0)
    assert fit.converged
    errors = {kind: diagnostics.standard_errors(fit, y, kind=kind) for kind in diagnostics.KINDS}
    hessian = errors["hessian"]
    assert hessian.positive_definite and hessian.information_eigenvalues[0] > 0
    assert set(hessian.flagged) == {"initial_regime[0]", "initial_regime[1]"}, "pi from one sequence start"
    assert hessian.num_identified == truth.num_free_parameters - 1
    assert hessian.newton_gain < 1e-9 and np.isfinite(hessian.condition_number)
    se = {kind: e.standard_errors() for kind, e in errors.items()}
    free = ~np.isnan(se["hessian"])
    assert free.sum() == len(hessian.labels) - 2 - 2, "pi is flagged, the weights (K = 1) are fixed"
    for kind in ("opg", "sandwich"):
        np.testing.assert_allclose(se[kind][free], se["hessian"][free], rtol=0.35)
    truth_flat = np.asarray(diagnostics.natural_layout(truth).ravel(truth.natural_parameters()))
    z = (hessian.estimates - truth_flat)[free] / se["hessian"][free]
    assert np.all(np.abs(z) < 4), dict(zip(np.array(hessian.labels)[free], z, strict=True))
    rows = hessian.table()
    assert [r["parameter"] for r in rows] == list(hessian.labels)
    row = rows[hessian.labels.index("means[1,0,0]")]
    assert row["low"] < row["estimate"] < row["high"]
    np.testing.assert_allclose(row["high"] - row["low"], 2 * 1.959964 * row["se"], rtol=1e-6)
    switch = rows[hessian.labels.index("regime_transition[0,1]")]
    p, logit = switch["estimate"], lambda v: np.log(v / (1 - v))
    assert 0 < switch["low"] < p < switch["high"] < 1
    np.testing.assert_allclose([logit(switch["low"]), logit(switch["high"])],
                               logit(p) + np.array([-1, 1]) * 1.959964 * switch["se"] / (p * (1 - p)), rtol=1e-6)

    steps = np.array([-1.0, 0.0, 1.0])
    profile = diagnostics.profile_log_likelihood(fit, y, parameter="means[1,0,0]",
                                                 values=row["estimate"] + steps * row["se"])
    drop = fit.log_likelihoods[-1] - profile.log_likelihoods
    assert abs(drop[1]) < 1e-6, "at the estimate the profile is the maximum"
    np.testing.assert_allclose(drop[[0, 2]], 0.5, atol=0.05, err_msg="one Hessian SE away the drop is about z^2 / 2")
    with pytest.raises(ValueError, match="one unconstrained coordinate"):
        diagnostics.profile_log_likelihood(fit, y, parameter="regime_transition[0,1]", values=[0.1])


def test_parameters_at_bounds_and_empty_components_are_flagged_not_estimated(rng):
    model, y, x = _tiny("none", rng)
    natural = {k: np.array(v) for k, v in model.natural_parameters().items()}
    natural["dof"][0, 0] = model.spec.dof_bounds[1]
    natural["means"][1, 1] = 50.0
    model = FHMV.from_natural_parameters(model.spec, **natural)
    with pytest.warns(UserWarning, match="not positive definite"):
        errors = diagnostics.standard_errors(model, y, x, kind="hessian", chunk_size=16)
    assert "upper bound" in errors.flagged["dof[0,0]"]
    component = [label for label, reason in errors.flagged.items() if "expected observations" in reason]
    assert sorted(component) == sorted(["weights[1,1]", "means[1,1,0]", "means[1,1,1]", "dof[1,1]"] + [
        f"covariances[1,1,{i},{j}]" for i in range(2) for j in range(2)])
    assert errors.num_identified == model.num_free_parameters - 8 - 1, "and pi, from one sequence start"
    assert np.isnan(errors.natural["dof"][0, 0]) and np.isnan(errors.natural["means"][1, 1]).all()


def test_bad_requests_are_refused_with_their_reason(rng):
    model, y, x = _tiny("none", rng)
    with pytest.raises(ValueError, match="kind must be one of"):
        diagnostics.standard_errors(model, y, x, kind="bootstrap")
    with pytest.raises(ValueError, match="chunk_size"):
        diagnostics.score(model, y, x, per_observation=True, chunk_size=0)
    y[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        diagnostics.standard_errors(model, y, x)
    with pytest.raises(ValueError, match="features"):
        diagnostics.score(model, y[:, :1], x)
    unconverged = FitResult(model, np.zeros(2), False, 1, np.zeros(2), np.zeros(1), np.zeros(1))
    with pytest.warns(UserWarning, match="did not converge"), pytest.raises(ValueError, match="NaN"):
        diagnostics.score(unconverged, y, x)


# ----------------------------------------------------------------------------------------
# gradient fitting (issue 16, item 4)


def test_lbfgs_reaches_the_em_optimum_monotonically():
    y = _gaussian_hmm().sample(jax.random.PRNGKey(5), 800).observations
    em = fit_em(_gaussian_hmm(), y, max_iters=500, tol=1e-11)
    start = _gaussian_hmm(shift=0.3, stay=0.8)
    fit = fit_gradient(start, y, num_steps=300, tol=1e-10)
    assert fit.converged and fit.num_iters == len(fit.objectives) - 1 < 300
    assert np.all(np.diff(fit.objectives) >= -1e-12 * np.abs(fit.objectives[1:])), "L-BFGS steps are Wolfe steps"
    assert abs(fit.objectives[-1] - em.objectives[-1]) / len(y) < 1e-6
    assert abs(fit.log_likelihoods[-1] - em.log_likelihoods[-1]) / len(y) < 1e-6
    assert fit.remaining_gain < 1e-10


def test_adam_on_minibatches_of_sequences_improves_the_fit():
    truth = _gaussian_hmm()
    y = np.stack([truth.sample(jax.random.PRNGKey(k), 150).observations for k in range(6)])
    start = _gaussian_hmm(shift=0.3, stay=0.8)
    seen = []
    fit = fit_gradient(start, y, lengths=[150, 150, 120, 150, 100, 150], batch_size=2, num_steps=40,
                       key=jax.random.PRNGKey(0), callback=seen.append)
    assert not fit.converged and fit.num_iters == 40 == len(seen)
    assert fit.objectives[-1] > fit.objectives[0] + 10.0
    np.testing.assert_allclose(fit.log_likelihoods[-1],
                               information_criteria(fit.model, y, lengths=[150, 150, 120, 150, 100, 150])
                               .log_likelihood, rtol=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        fit_gradient(start, y, batch_size=7, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="PRNG key"):
        fit_gradient(start, y, batch_size=2)
    with pytest.raises(ValueError, match="num_steps"):
        fit_gradient(start, y, num_steps=0)

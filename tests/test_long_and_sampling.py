"""Long sequences stay finite and normalised; sampling and filtering agree with each other."""

import jax
import numpy as np
import pytest
from helpers import random_natural

from fhmv_jax import FHMV, ModelSpec
from fhmv_jax.model import example_model


def test_default_spec_on_20000_steps():
    """Long sequences stay finite and normalised (the sample of the default-spec recovery test in test_em)."""
    model = example_model(jax.random.key(0))
    sample = model.sample(jax.random.key(1), 20_000)
    y = np.asarray(sample.observations)
    filtered = model.filter(y)
    assert np.isfinite(filtered.log_likelihood)
    np.testing.assert_allclose(np.asarray(filtered.joint).reshape(len(y), -1).sum(-1), 1.0, rtol=1e-10)
    smoothed = model.smooth(y)
    assert np.isfinite(smoothed.log_likelihood)
    np.testing.assert_allclose(smoothed.marginals.regime.sum(-1), 1.0, rtol=1e-10)
    np.testing.assert_allclose(smoothed.pairwise.regime.sum((-1, -2)), 1.0, rtol=1e-8)
    assert model.viterbi(y).regime.shape == (20_000,)


def _separated_model(spec, rng):
    natural = random_natural(spec, rng, separation=4.0)
    G = spec.num_regimes
    natural["regime_transition"] = np.full((G, G), 0.05 / (G - 1)) + np.eye(G) * (0.95 - 0.05 / (G - 1))
    return FHMV.from_natural_parameters(spec, **natural), natural


@pytest.mark.parametrize("leverage", ["markov", "predictable", "none"])
def test_sample_then_filter_recovers_regimes(rng, leverage):
    spec = ModelSpec(num_features=4, num_regimes=3, num_chains=1, leverage=leverage, driver_feature=0,
                     num_leverage_lags=5)
    model, _ = _separated_model(spec, rng)
    sample = model.sample(jax.random.key(3), 3000)
    filtered = np.asarray(model.filter(sample.observations).marginals.regime).argmax(-1)
    smoothed = np.asarray(model.smooth(sample.observations).marginals.regime).argmax(-1)
    truth = np.asarray(sample.states.regime)
    assert np.mean(filtered == truth) > 0.9
    assert np.mean(smoothed == truth) >= np.mean(filtered == truth) - 0.01
    assert np.mean(np.asarray(model.viterbi(sample.observations).regime) == truth) > 0.9


def test_sample_follows_the_factor_chains(rng):
    """Empirical transition frequencies of every sampled factor match its matrix."""
    spec = ModelSpec(num_features=2, num_regimes=3, num_chains=1, leverage="markov")
    model, natural = _separated_model(spec, rng)
    x = np.zeros(40_000)
    sample = model.sample(jax.random.key(5), 40_000, x=x)
    chains = [
        (np.asarray(sample.states.regime), natural["regime_transition"]),
        (np.asarray(sample.states.persistence[:, 0]),
         np.array([[1, 0], [0, 1]]) * (2 * natural["persistence_stay"][0] - 1) + (1 - natural["persistence_stay"][0])),
        (np.asarray(sample.states.jump), natural["jump_transition"]),
    ]
    a = natural["leverage_logits"][0]
    lev = np.exp(a) / np.exp(a).sum(1, keepdims=True)
    chains.append((np.asarray(sample.states.leverage), lev))
    for path, matrix in chains:
        n = matrix.shape[0]
        counts = np.zeros((n, n))
        np.add.at(counts, (path[:-1], path[1:]), 1)
        empirical = counts / counts.sum(1, keepdims=True)
        np.testing.assert_allclose(empirical, matrix, atol=0.03)


def test_sampled_scale_matches_factor_states(rng):
    spec = ModelSpec(num_features=2, num_regimes=2, num_chains=2, leverage="markov")
    model, natural = _separated_model(spec, rng)
    sample = model.sample(jax.random.key(2), 200, x=np.zeros(200))
    c1, theta = natural["c1"], natural["theta_c"]
    c = np.array([c1, 1 + theta * (c1 - 1)])
    e = np.asarray(sample.states.persistence)
    want = ((e * np.log(c)).sum(1) + np.log(natural["m1"]) * np.asarray(sample.states.jump)
            + np.log(natural["l1"]) * np.asarray(sample.states.leverage))
    np.testing.assert_allclose(sample.log_scale, want, rtol=1e-12)


def test_sampling_inside_a_callers_jit_and_vmap_draws_the_same_numbers(rng):
    """At top level the sampler compiles with its own compiler options, which JAX refuses on a nested jit: inside a
    caller's ``jit`` or ``vmap`` it must run, and draw what the top-level call draws."""
    spec = ModelSpec(num_features=2, num_regimes=2, num_chains=2, leverage="markov")
    model, _ = _separated_model(spec, rng)
    x = np.linspace(-1.0, 1.0, 30)
    keys = jax.random.split(jax.random.key(4), 2)
    top = [np.asarray(model.sample(k, 30, x=x).observations) for k in keys]
    nested = np.asarray(jax.jit(lambda k: model.sample(k, 30, x=x).observations)(keys[0]))
    mapped = np.asarray(jax.vmap(lambda k: model.sample(k, 30, x=x).observations)(keys))
    np.testing.assert_array_equal(nested, top[0])
    np.testing.assert_array_equal(mapped, np.stack(top))


def test_student_t_sample_moments(rng):
    """One regime, one component, nu = 6: sample covariance is nu / (nu - 2) Sigma."""
    spec = ModelSpec(num_features=2, num_regimes=1, num_chains=0, num_jump_states=1, num_components=1, leverage="none")
    natural = random_natural(spec, rng)
    natural["dof"] = np.array([[6.0]])
    model = FHMV.from_natural_parameters(spec, **natural)
    y = np.asarray(model.sample(jax.random.key(9), 200_000).observations)
    np.testing.assert_allclose(y.mean(0), natural["means"][0, 0], atol=0.02)
    np.testing.assert_allclose(np.cov(y.T), natural["covariances"][0, 0] * 6 / 4, rtol=0.06)

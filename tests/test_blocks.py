"""The blocked E-step and the helpers that keep the ECM step lean on CPU."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural
from scipy.special import logsumexp

import fhmv_jax
from fhmv_jax.em.m_step import CovariancePrior, m_step, state_loads, step_loads
from fhmv_jax.em.stats import StepMoments, batch_e_step, component_posteriors, e_step
from fhmv_jax.inference import blocked
from fhmv_jax.inference._ops import merge_invariant_axes, propagate
from fhmv_jax.model import sequence_inputs
from fhmv_jax.model.emissions import inverse_cholesky, log_sum_exp


@pytest.mark.parametrize("num_steps, block_steps", [(10, 4), (12, 4), (3, 4), (7, 1), (100000, 1024)])
def test_block_layout_covers_every_step_with_little_padding(num_steps, block_steps):
    num_blocks, size = blocked.block_layout(num_steps, block_steps)
    assert size <= block_steps
    assert num_steps <= num_blocks * size < num_steps + num_blocks


def test_default_block_steps_scale_inversely_with_the_states():
    assert [blocked.default_block_steps(s) for s in (96, 16, 1, 10**6)] == [1024, 8192, 2**17, 1]


def test_log_sum_exp_matches_scipy(rng):
    values = rng.normal(scale=50.0, size=(5, 3, 4, 2))
    for axis in range(values.ndim):
        np.testing.assert_allclose(log_sum_exp(jnp.asarray(values), axis), logsumexp(values, axis=axis), rtol=1e-13)


@pytest.mark.parametrize("name", ["markov", "family-mask-gaussian", "iid-untied"])
def test_merged_axes_propagate_like_the_factors(rng, name):
    spec = TINY_SPECS[name]
    model = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    x = jnp.asarray(rng.normal(size=6))
    inputs = sequence_inputs(model, jnp.zeros((6, spec.num_features)), x)
    shape, merged = merge_invariant_axes(inputs.transitions, spec.state_shape)
    assert len(merged) < len(inputs.transitions)
    message = jnp.asarray(rng.uniform(size=spec.state_shape))
    step = [m if m.ndim == 2 else m[3] for m in inputs.transitions]
    step_merged = [m if m.ndim == 2 else m[3] for m in merged]
    for transpose in (False, True):
        want = propagate(message, step, transpose=transpose)
        got = propagate(message.reshape(shape), step_merged, transpose=transpose).reshape(spec.state_shape)
        np.testing.assert_allclose(got, want, rtol=1e-13)


@pytest.mark.parametrize("name", ["markov", "predictable", "family-mask-gaussian"])
def test_small_blocks_give_the_same_ecm_step(rng, name):
    spec = TINY_SPECS[name]
    model = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    lengths = [40, 23]
    ys = np.zeros((2, 40, spec.num_features))
    xs = np.zeros((2, 40))
    for b, n in enumerate(lengths):
        sample = model.sample(jax.random.key(b), n, x=jnp.asarray(rng.normal(scale=0.5, size=n)))
        ys[b, :n], xs[b, :n] = sample.observations, sample.driver
    mask = np.arange(40)[None, :] < np.asarray(lengths)[:, None]
    y, x, mask = jnp.asarray(ys), jnp.asarray(xs), jnp.asarray(mask)

    def step(block_steps):
        stats = eqx.filter_jit(lambda m: batch_e_step(m, y, x, mask, block_steps=block_steps))(model)
        return stats, eqx.filter_jit(lambda m, s: m_step(m, s, CovariancePrior()))(model, stats)

    whole_stats, whole = step(10**6)
    blocked_stats, blocked_step = step(7)
    for got, want in zip(jax.tree.leaves(blocked_stats), jax.tree.leaves(whole_stats), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    for got, want in zip(jax.tree.leaves(blocked_step), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("spec", [TINY_SPECS["markov"], dataclasses.replace(TINY_SPECS["family-mask-gaussian"],
                                                                           leverage="markov", gaussian=False)])
def test_volatility_loads_from_state_moments_equal_the_loads_from_data(rng, spec):
    """The scale update's loads sum_t tau E[W] delta'(y_t) under new means and covariances, from the
    per-sub-state moments, equal those summed step by step from the smoothed posterior and the observations."""
    old = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    new = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    sample = old.sample(jax.random.key(3), 60, x=jnp.asarray(rng.normal(scale=0.5, size=60)))
    y, x = sample.observations, sample.driver
    stats = eqx.filter_jit(lambda m: e_step(m, y, x, jnp.ones(60, bool)))(old)
    inputs = sequence_inputs(old, y, x)
    _, terms = inputs.emissions.terms(inputs.rows)
    gamma = old.smooth(y, x).joint.reshape(60, spec.num_regimes, -1)
    tau, expected_w, _ = component_posteriors(old.emission, terms, gamma)
    per_step = StepMoments(jnp.sum(gamma, axis=1), tau * expected_w, y, x)
    inv_chol = inverse_cholesky(new.emission.cholesky())
    from_moments = state_loads(new.emission, stats.volatility, new.emission.means - old.emission.means, inv_chol)
    from_data = step_loads(new.emission, per_step, inv_chol)
    assert len(from_moments) == len(from_data) == (1 if spec.scale_mask is None else 2)
    for got, want in zip(from_moments, from_data, strict=True):
        np.testing.assert_allclose(got, np.sum(want, axis=0), rtol=1e-10)

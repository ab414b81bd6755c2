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
    shape, merged, _ = merge_invariant_axes(inputs.transitions, spec.state_shape)
    assert len(merged) < len(inputs.transitions)
    message = jnp.asarray(rng.uniform(size=spec.state_shape))
    step = [m if m.ndim <= 2 else m[3] for m in inputs.transitions]
    step_merged = [m if m.ndim <= 2 else m[3] for m in merged]
    for transpose in (False, True):
        want = propagate(message, step, transpose=transpose)
        got = propagate(message.reshape(shape), step_merged, transpose=transpose).reshape(spec.state_shape)
        np.testing.assert_allclose(got, want, rtol=1e-13)


_STATS = eqx.filter_jit(batch_e_step)
_M_STEP = eqx.filter_jit(m_step)
NEWTON_RTOL = 1e-8
"""The M-step's iterative updates (``newton_ascent``) stop once Newton's predicted gain is below 1e3 eps |Q|,
after taking that last step: with quadratic convergence their results are the maximisers of Q to about
sqrt(1e3 eps |Q| / curvature) before that step and far less after it. 1e-8 leaves a margin of 1e4 over the
1e-12 differences seen between block sizes (the old fixed-step line search gave 5e-9 on an AMD CPU)."""


def _closed_form(model):
    """The parameters the M-step updates in closed form."""
    return model.regime, model.emission, model.persistence.persistence_raw


@pytest.mark.parametrize("name", ["markov", "family-mask-gaussian"])
def test_small_blocks_give_the_same_ecm_step(rng, name):
    """Blocks of 7 steps against one block, on a ragged batch: Markov leverage, and predictable leverage with
    a scale mask and Gaussian components (time-varying scales)."""
    spec = TINY_SPECS[name]
    model = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    lengths = np.array([60, 53])
    mask = jnp.asarray(np.arange(60)[None, :] < lengths[:, None])
    y = jnp.where(mask[..., None], jnp.asarray(rng.normal(size=(2, 60, spec.num_features)) * 1.5), 0.0)
    x = jnp.where(mask, jnp.asarray(rng.normal(scale=0.5, size=(2, 60))), 0.0)

    whole_stats = _STATS(model, y, x, mask, block_steps=10**6)
    blocked_stats = _STATS(model, y, x, mask, block_steps=7)
    for got, want in zip(jax.tree.leaves(blocked_stats), jax.tree.leaves(whole_stats), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    whole, blocked_step = (_M_STEP(model, stats, CovariancePrior())[0] for stats in (whole_stats, blocked_stats))
    closed = (jax.tree.leaves(_closed_form(m)) for m in (blocked_step, whole))
    for got, want in zip(*closed, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    for got, want in zip(jax.tree.leaves(blocked_step), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=NEWTON_RTOL, atol=NEWTON_RTOL)


@eqx.filter_jit
def _loads_both_ways(old, new, y, x):
    """The volatility loads of ``new``'s means and covariances, from ``old``'s E-step state moments and step by
    step from ``old``'s smoothed posterior."""
    stats = e_step(old, y, x, jnp.ones(y.shape[0], bool))
    inputs = sequence_inputs(old, y, x)
    _, terms = inputs.emissions.terms(inputs.rows)
    gamma = old.smooth(y, x).joint.reshape(y.shape[0], old.spec.num_regimes, -1)
    tau, expected_w, _ = component_posteriors(old.emission, terms, gamma)
    per_step = jax.tree.map(lambda a: a[None], StepMoments(jnp.sum(gamma, axis=1), tau * expected_w, y, x))
    inv_chol = inverse_cholesky(new.emission.cholesky())
    from_moments = state_loads(new.emission, stats.volatility, new.emission.means - old.emission.means, inv_chol)
    loads = step_loads(new.emission, per_step, inv_chol)
    return from_moments, loads.summed(jnp.ones(loads.forms.shape[:3], loads.forms.dtype))


@pytest.mark.parametrize("spec", [TINY_SPECS["markov"], dataclasses.replace(TINY_SPECS["family-mask-gaussian"],
                                                                           leverage="markov", gaussian=False)])
def test_volatility_loads_from_state_moments_equal_the_loads_from_data(rng, spec):
    """The scale update's loads sum_t tau E[W] delta'(y_t) per component, under new means and covariances, from the
    per-sub-state moments, equal those summed step by step from the smoothed posterior and the observations."""
    old = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    new = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y, x = jnp.asarray(rng.normal(size=(60, spec.num_features)) * 1.5), jnp.asarray(rng.normal(scale=0.5, size=60))
    from_moments, from_data = _loads_both_ways(old, new, y, x)
    assert len(from_moments) == len(from_data) == (1 if spec.scale_mask is None else 3)
    for got, want in zip(from_moments, from_data, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10)

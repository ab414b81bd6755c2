"""The blocked E-step and the helpers that keep the ECM step lean on CPU."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural
from scipy.special import logsumexp

import fhmv_jax
from fhmv_jax.em.m_step import CovariancePrior, m_step
from fhmv_jax.em.stats import batch_e_step, e_step
from fhmv_jax.inference import blocked
from fhmv_jax.inference._ops import merge_invariant_axes, propagate
from fhmv_jax.model.emissions import inverse_cholesky, log_sum_exp
from fhmv_jax.model.params import cholesky_factor

m_step_module = importlib.import_module("fhmv_jax.em.m_step")


@pytest.mark.parametrize("num_steps, block_steps", [(10, 4), (12, 4), (3, 4), (7, 1), (100000, 1024)])
def test_block_layout_covers_every_step_with_little_padding(num_steps, block_steps):
    num_blocks, size = blocked.block_layout(num_steps, block_steps)
    assert size <= block_steps
    assert num_steps <= num_blocks * size < num_steps + num_blocks


def test_default_block_steps_scale_inversely_with_the_states(monkeypatch):
    assert [blocked.default_block_steps(s) for s in (96, 16, 1, 10**6)] == [1024, 8192, 2**17, 1]
    monkeypatch.setattr(blocked, "BLOCK_STEPS", 7)
    assert blocked.default_block_steps(96) == 7


def test_log_sum_exp_matches_scipy(rng):
    values = rng.normal(scale=50.0, size=(5, 3, 4, 2))
    for axis in range(values.ndim):
        np.testing.assert_allclose(log_sum_exp(jnp.asarray(values), axis), logsumexp(values, axis=axis), rtol=1e-13)


@pytest.mark.parametrize("name", ["markov", "family-mask-gaussian", "iid-untied"])
def test_merged_axes_propagate_like_the_factors(rng, name):
    spec = TINY_SPECS[name]
    model = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    x = jnp.asarray(rng.normal(size=6))
    arrays = fhmv_jax.model.inference_inputs(spec, model.params, jnp.zeros((6, spec.num_features)), x)
    shape, merged = merge_invariant_axes(arrays.transitions, spec.state_shape)
    assert len(merged) < len(arrays.transitions)
    message = jnp.asarray(rng.uniform(size=spec.state_shape))
    step = [m if m.ndim == 2 else m[3] for m in arrays.transitions]
    step_merged = [m if m.ndim == 2 else m[3] for m in merged]
    for transpose in (False, True):
        want = propagate(message, step, transpose=transpose)
        got = propagate(message.reshape(shape), step_merged, transpose=transpose).reshape(spec.state_shape)
        np.testing.assert_allclose(got, want, rtol=1e-13)


@pytest.mark.parametrize("name", ["markov", "predictable", "family-mask-gaussian"])
def test_small_blocks_give_the_same_ecm_step(rng, monkeypatch, name):
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

    def step():
        stats = jax.jit(lambda p: batch_e_step(spec, p, y, x, mask))(model.params)
        return stats, jax.jit(lambda p, s: m_step(spec, p, s, y, x, CovariancePrior()))(model.params, stats)

    monkeypatch.setattr(blocked, "BLOCK_STEPS", 10**6)
    whole_stats, whole = step()
    monkeypatch.setattr(blocked, "BLOCK_STEPS", 7)
    blocked_stats, blocked_step = step()
    fields = ("log_likelihood", "component_counts", "scale_weights", "first_moments", "second_moments", "dof_terms",
              "transitions", "initial", "leverage_pairwise", "state_moments", "regime_volatility")
    for field in fields:
        for got, want in zip(jax.tree.leaves(getattr(blocked_stats, field)), jax.tree.leaves(getattr(whole_stats, field))):
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    for got, want in zip(jax.tree.leaves(blocked_step), jax.tree.leaves(whole)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("spec", [TINY_SPECS["markov"], dataclasses.replace(TINY_SPECS["family-mask-gaussian"],
                                                                           leverage="markov", gaussian=False)])
def test_volatility_loads_from_state_moments_equal_the_loads_from_data(rng, spec):
    """The scale update's loads sum_t tau E[W] delta'(y_t) under new means and covariances, from the
    per-sub-state moments, equal those recomputed step by step from the observations."""
    old = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    new = fhmv_jax.FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    sample = old.sample(jax.random.key(3), 60, x=jnp.asarray(rng.normal(scale=0.5, size=60)))
    y, x = sample.observations, sample.driver
    stats = jax.jit(lambda p: e_step(spec, p, y, x, jnp.ones(60, bool)))(old.params)
    inv_chol = inverse_cholesky(cholesky_factor(new.params.chol_raw))
    from_moments = m_step_module._state_loads(spec, stats.state_moments, new.params.means - old.params.means, inv_chol)
    from_data = m_step_module._step_loads(spec, old.params, new.params.means, inv_chol, y, x, stats.regime_volatility)
    assert len(from_moments) == len(from_data) == (1 if spec.scale_mask is None else 2)
    for got, want in zip(from_moments, from_data):
        np.testing.assert_allclose(got, np.sum(want, axis=0), rtol=1e-10)

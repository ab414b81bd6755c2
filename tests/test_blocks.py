"""Block-wise sums over time and the helpers that keep the ECM step lean on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural
from scipy.special import logsumexp

import fhmv_jax
from fhmv_jax.em import blocks
from fhmv_jax.em.m_step import CovariancePrior, m_step
from fhmv_jax.em.stats import batch_e_step
from fhmv_jax.inference._ops import merge_invariant_axes, propagate
from fhmv_jax.model.emissions import log_sum_exp


@pytest.mark.parametrize("num_steps, block_steps", [(10, 4), (12, 4), (3, 4), (7, 1)])
def test_block_sums_count_every_step_once(rng, num_steps, block_steps):
    values = rng.normal(size=(num_steps, 3))
    other = rng.normal(size=num_steps)

    def fn(rows, weights):
        a, b = rows
        return {"a": jnp.sum(a * weights[:, None], axis=0), "ab": jnp.sum(a[:, 0] * b * weights)}

    got = blocks.sum_over_time_blocks(fn, (jnp.asarray(values), jnp.asarray(other)), block_steps=block_steps)
    np.testing.assert_allclose(got["a"], values.sum(0), rtol=1e-12)
    np.testing.assert_allclose(got["ab"], np.sum(values[:, 0] * other), rtol=1e-12)


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

    whole_stats, whole = step()
    monkeypatch.setattr(blocks, "BLOCK_STEPS", 7)
    blocked_stats, blocked = step()
    for field in ("component_counts", "scale_weights", "first_moments", "second_moments", "dof_terms"):
        np.testing.assert_allclose(getattr(blocked_stats, field), getattr(whole_stats, field), rtol=1e-11, atol=1e-12)
    for got, want in zip(jax.tree.leaves(blocked), jax.tree.leaves(whole)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)

"""The inference core with a rank-one factor (i.i.d. jumps passed as their law): against brute-force path
enumeration on small published-model specs, and against the same core given the dense jump matrix on
state spaces large enough for the per-factor two-slice contractions (more than ``LARGE_STATES`` kept states)."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import brute_force, random_natural
from test_inference import _check_blocked_posteriors, _factor_list, _per_factor_marginals, _per_factor_pairwise

import fhmv_jax
from fhmv_jax import FHMV, inference
from fhmv_jax.em import e_step
from fhmv_jax.inference import blocked
from fhmv_jax.inference._ops import dense, propagate
from fhmv_jax.model import sequence_inputs

PUBLISHED = {
    # MODEL.md section 7 (D = 1, G = 1, K = 1, Gaussian, iid jumps, predictable leverage) with N_M = 3
    "published": fhmv_jax.ModelSpec(
        num_features=1, num_regimes=1, num_chains=2, num_jump_states=3, num_components=1, leverage="predictable",
        num_leverage_lags=3, jump_mode="iid", gaussian=True, driver_feature=0,
    ),
    # a rank-one axis next to a time-varying one, Student-t mixtures, two regimes
    "iid-markov": fhmv_jax.ModelSpec(
        num_features=2, num_regimes=2, num_chains=1, num_jump_states=3, num_components=2, leverage="markov",
        jump_mode="iid",
    ),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_rank_one_against_brute_force(rng, name):
    spec = PUBLISHED[name]
    T = 4 if spec.num_states**4 <= 70000 else 3
    natural = random_natural(spec, rng)
    model = FHMV.from_natural_parameters(spec, **natural)
    inputs = sequence_inputs(model, jnp.zeros((T, spec.num_features)), jnp.zeros(T))
    assert inputs.transitions[1 + spec.num_chains].ndim == 1, "the iid jump chain reaches the core as its law"
    y = rng.normal(size=(T, spec.num_features)) * 1.5
    x = rng.normal(size=T)
    ref = brute_force(spec, natural, y, x)

    np.testing.assert_allclose(model.log_likelihood(y, x), ref["loglik"], rtol=1e-12)
    filtered = model.filter(y, x)
    np.testing.assert_allclose(np.asarray(filtered.joint).reshape(T, -1), ref["filtered"], atol=1e-12)
    smoothed = model.smooth(y, x)
    np.testing.assert_allclose(np.asarray(smoothed.joint).reshape(T, -1), ref["smoothed"], atol=1e-12)
    for got, want in zip(_factor_list(smoothed.pairwise), _per_factor_pairwise(spec, ref["pairwise"]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)
    for got, want in zip(_factor_list(smoothed.marginals), _per_factor_marginals(spec, ref["smoothed"]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)
    _check_blocked_posteriors(spec, model, y, x, ref, rng)
    path = model.viterbi(y, x)
    want_path = np.stack(np.unravel_index(ref["viterbi"], spec.state_shape), axis=1)
    np.testing.assert_array_equal(np.stack(_factor_list(path), axis=1).reshape(T, -1), want_path)


def test_rank_one_propagate_is_the_dense_product(rng):
    law = jnp.asarray(rng.dirichlet(np.ones(4)))
    matrices = (jnp.asarray(rng.dirichlet(np.ones(3), size=3)), law, jnp.asarray(rng.dirichlet(np.ones(2), size=2)))
    message = jnp.asarray(rng.uniform(size=(3, 4, 2)))
    for transpose in (False, True):
        want = propagate(message, tuple(dense(m) for m in matrices), transpose=transpose)
        np.testing.assert_allclose(propagate(message, matrices, transpose=transpose), want, rtol=1e-13)


@eqx.filter_jit
def _posteriors(model, y, x, mask, dense_jump):
    s = sequence_inputs(model, y, x)
    axis = 1 + model.spec.num_chains
    transitions = s.transitions
    if dense_jump:
        transitions = transitions[:axis] + (dense(transitions[axis]),) + transitions[axis + 1:]
    varying = tuple(a for a, m in enumerate(transitions) if m.ndim == 3)
    posterior = inference.forward_backward(
        s.initial, transitions, s.emissions.likelihoods, s.rows, mask, block_steps=7, pairwise_sums=True,
        pairwise_steps=varying, collect=lambda _, block: block.smoothed,
    )
    smoothed = inference.smoother(s.initial, transitions, s.emissions.likelihoods, s.rows, mask, block_steps=7)
    filtered = inference.forward_filter(s.initial, transitions, s.emissions.likelihoods, s.rows, mask, block_steps=7)
    return posterior, smoothed, filtered


@pytest.mark.parametrize("leverage", ["predictable", "markov"])
def test_large_state_spaces_rank_one_against_dense(rng, leverage):
    """Past ``LARGE_STATES`` kept states (here 512) the core regroups the axes for its per-factor
    contractions; with the law or with the dense jump matrix it must give the same posteriors and counts."""
    spec = fhmv_jax.ModelSpec(num_features=1, num_regimes=1, num_chains=9 if leverage == "predictable" else 8,
                              num_jump_states=2, num_components=1, leverage=leverage, num_leverage_lags=4,
                              jump_mode="iid", gaussian=True, driver_feature=0)
    assert spec.num_states // 2 > blocked.LARGE_STATES
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    T, padding = 40, 3
    y = jnp.asarray(rng.normal(size=(T + padding, 1)) * 1.5)
    x = y[:, 0]
    mask = jnp.asarray(np.arange(T + padding) < T)
    (law, law_smoothed, law_filtered), (full, full_smoothed, full_filtered) = (
        _posteriors(model, y, x, mask, dense_jump) for dense_jump in (False, True))
    np.testing.assert_allclose(law.log_likelihood, full.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(law.initial, full.initial, atol=1e-13)
    np.testing.assert_allclose(law.steps, full.steps, atol=1e-13)
    for got, want in zip(law.pairwise_sums, full.pairwise_sums, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    for got, want in zip(law.pairwise_steps, full.pairwise_steps, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-13)
    for got, want in zip(law_smoothed.pairwise, full_smoothed.pairwise, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-13)
        np.testing.assert_array_equal(got[T - 1:], 0.0)
    np.testing.assert_allclose(law_filtered.filtered, full_filtered.filtered, atol=1e-13)
    # the counts are the sums of the per-step two-slice marginals
    for total, per_step in zip(law.pairwise_sums, law_smoothed.pairwise, strict=True):
        np.testing.assert_allclose(total, np.sum(per_step, axis=0), rtol=1e-11)
    stats = e_step(model, y, x, mask)
    for got, want in zip(stats.transitions, full.pairwise_sums, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)

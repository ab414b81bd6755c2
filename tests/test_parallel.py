"""The parallel-in-time backend against the sequential one on the default spec (the tiny specs are checked
against path enumeration in test_inference.py), and its bad inputs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural

from fhmv_jax import FHMV, inference
from fhmv_jax.model import sequence_inputs
from fhmv_jax.model.examples import example_model

T = 3000


@pytest.fixture(scope="module")
def default_case():
    model = example_model(jax.random.key(0))
    y = model.sample(jax.random.key(1), T).observations
    return model, y


def _path_log_prob(initial, transitions, log_densities, path):
    """log p(h_{1:T} = path, y) for a path [T, F] of per-axis states (a law [n] is a rank-one factor)."""
    total = jnp.log(initial[tuple(path[0])]) + jnp.sum(log_densities[(jnp.arange(path.shape[0]), *path.T)])
    for axis, matrix in enumerate(transitions):
        before, after = path[:-1, axis], path[1:, axis]
        if matrix.ndim == 1:
            total += jnp.sum(jnp.log(matrix[after]))
        elif matrix.ndim == 2:
            total += jnp.sum(jnp.log(matrix[before, after]))
        else:
            total += jnp.sum(jnp.log(matrix[jnp.arange(path.shape[0] - 1), before, after]))
    return total


@eqx.filter_jit
def _viterbi_log_probs(model, y, method, block_steps):
    """The joint log-probability of the Viterbi path, blocks of ``block_steps`` steps for the parallel backend."""
    s = sequence_inputs(model, y, y[:, model.spec.driver_feature])
    log_densities = s.emissions.log_densities(s.rows)
    path = inference.most_likely_states(s.initial, s.transitions, log_densities, method=method,
                                        block_steps=block_steps)
    return _path_log_prob(s.initial, s.transitions, log_densities, path)


def test_default_spec_parallel_equals_sequential(default_case):
    """T = 3000 of the 96-state default spec (Markov leverage: time-varying transitions)
    in several blocks: log-likelihood to 1e-9 relative, filtered, smoothed and two-slice marginals to 1e-9,
    Viterbi paths of equal joint log-probability."""
    model, y = default_case
    sequential, parallel = (model.smooth(y, method=m) for m in ("sequential", "parallel"))
    np.testing.assert_allclose(parallel.log_likelihood, sequential.log_likelihood, rtol=1e-9)
    np.testing.assert_allclose(parallel.joint, sequential.joint, atol=1e-9)
    for got, want in zip(jax.tree.leaves(parallel.pairwise), jax.tree.leaves(sequential.pairwise), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-9)
    filtered = model.filter(y, method="parallel")
    np.testing.assert_allclose(filtered.log_likelihood, sequential.log_likelihood, rtol=1e-9)
    np.testing.assert_allclose(filtered.joint, model.filter(y, method="sequential").joint, atol=1e-9)
    want = _viterbi_log_probs(model, y, "sequential", None)
    np.testing.assert_allclose(_viterbi_log_probs(model, y, "parallel", 512), want, rtol=1e-12)


def test_auto_method_and_bad_methods(default_case):
    model, y = default_case
    assert inference.auto_method(16, 10**6, backend="cpu") == "sequential"
    assert inference.auto_method(16, 10**6, backend="gpu") == "parallel"
    assert inference.auto_method(4096, 10**6, backend="gpu") == "sequential"
    assert inference.auto_method(16, 10, backend="gpu") == "sequential"
    for call in (model.log_likelihood, model.filter, model.smooth, model.viterbi):
        with pytest.raises(ValueError, match="method must be one of"):
            call(y[:10], method="scan")


def test_parallel_gradient_equals_sequential(rng):
    """The log-likelihood is differentiable through the associative scans, with the sequential gradient."""
    spec = TINY_SPECS["markov"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y, x = rng.normal(size=(60, 2)), rng.normal(size=60)
    grads = [eqx.filter_grad(lambda m, method=method: m.log_likelihood(y, x, method=method))(model)
             for method in ("sequential", "parallel")]
    for want, got in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(want))))

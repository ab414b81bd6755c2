"""Filter, smoother, two-slice marginals and Viterbi against brute-force path enumeration."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import brute_force, path_log_prob, random_natural

from fhmv_jax import FHMV, inference
from fhmv_jax.em import e_step
from fhmv_jax.model import sequence_inputs


def _per_factor_pairwise(spec, full_pairwise):
    """Sum the brute-force S x S two-slice marginals down to each factor's n x n."""
    shape = spec.state_shape
    T1 = full_pairwise.shape[0]
    tensor = full_pairwise.reshape((T1,) + shape + shape)
    F = len(shape)
    out = []
    for f in range(F):
        keep = (1 + f, 1 + F + f)
        axes = tuple(a for a in range(1, 1 + 2 * F) if a not in keep)
        out.append(tensor.sum(axis=axes))
    return out


def _per_factor_marginals(spec, joint):
    T = joint.shape[0]
    tensor = joint.reshape((T,) + spec.state_shape)
    F = len(spec.state_shape)
    return [tensor.sum(axis=tuple(a for a in range(1, F + 1) if a != f + 1)) for f in range(F)]


def _factor_list(factors):
    """Flatten a ``Factors`` of per-factor arrays into axis order (chains split out)."""
    out = [np.asarray(factors.regime)]
    if factors.persistence is not None:
        out += [np.asarray(factors.persistence)[:, n] for n in range(factors.persistence.shape[1])]
    out += [np.asarray(a) for a in (factors.jump, factors.leverage) if a is not None]
    return out


@eqx.filter_jit
def _blocked_posteriors(model, y, x, mask, method):
    """The smoother's and the E-step's posteriors in blocks of 2 steps."""
    inputs = sequence_inputs(model, y, x)
    posterior = inference.smoother(inputs.initial, inputs.transitions, inputs.emissions.likelihoods, inputs.rows,
                                   mask, block_steps=2, method=method)
    return posterior, e_step(model, y, x, mask, block_steps=2, method=method)


def _check_blocked_posteriors(spec, model, y, x, ref, rng, method="sequential", padding=3):
    """The smoother and the E-step in blocks of 2 steps, on the sequence followed by garbage padding steps."""
    T = y.shape[0]
    y_pad = jnp.asarray(np.concatenate([y, rng.normal(size=(padding, y.shape[1])) * 50]))
    x_pad = jnp.asarray(np.concatenate([x, rng.normal(size=padding)])) if spec.needs_driver else None
    mask = jnp.asarray(np.arange(T + padding) < T)
    posterior, stats = _blocked_posteriors(model, y_pad, x_pad, mask, method)
    np.testing.assert_allclose(posterior.log_likelihood, ref["loglik"], rtol=1e-12)
    smoothed = np.asarray(posterior.smoothed).reshape(T + padding, -1)
    np.testing.assert_allclose(smoothed[:T], ref["smoothed"], atol=1e-12)
    np.testing.assert_array_equal(smoothed[T:], 0.0)
    for got, want in zip(posterior.pairwise, _per_factor_pairwise(spec, ref["pairwise"]), strict=True):
        np.testing.assert_allclose(got[: T - 1], want, atol=1e-12)
        np.testing.assert_array_equal(got[T - 1 :], 0.0)

    np.testing.assert_allclose(stats.log_likelihood, ref["loglik"], rtol=1e-12)
    marginals = _per_factor_marginals(spec, ref["smoothed"])
    pairwise = _per_factor_pairwise(spec, ref["pairwise"])
    for got, want in zip(stats.initial, marginals, strict=True):
        np.testing.assert_allclose(got, want[0], atol=1e-12)
    for got, want in zip(stats.transitions, pairwise, strict=True):
        np.testing.assert_allclose(got, want.sum(axis=0), atol=1e-12)
    if spec.leverage == "markov":
        assert stats.leverage.pairwise.shape == (T + padding - 1, 2, 2)
        np.testing.assert_allclose(stats.leverage.pairwise[: T - 1], pairwise[-1], atol=1e-12)
        np.testing.assert_array_equal(stats.leverage.pairwise[T - 1 :], 0.0)


@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("name", list(TINY_SPECS))
@pytest.mark.parametrize("T", [1, 4])
def test_against_brute_force(rng, name, T, method):
    """Both inference backends (``method``) against path enumeration: every read-out, the blocked smoother and
    E-step with padding, and the Viterbi path (the parallel one: its joint log-probability is the maximum)."""
    spec = TINY_SPECS[name]
    if spec.num_states ** T > 70000:
        T = 3
    natural = random_natural(spec, rng)
    model = FHMV.from_natural_parameters(spec, **natural)
    y = rng.normal(size=(T, spec.num_features)) * 1.5
    x = rng.normal(size=T)
    x_arg = x if spec.needs_driver else None
    ref = brute_force(spec, natural, y, x)

    np.testing.assert_allclose(model.log_likelihood(y, x_arg, method=method), ref["loglik"], rtol=1e-12)

    filtered = model.filter(y, x_arg, method=method)
    np.testing.assert_allclose(filtered.log_likelihood, ref["loglik"], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(filtered.joint).reshape(T, -1), ref["filtered"], atol=1e-12)
    for got, want in zip(_factor_list(filtered.marginals), _per_factor_marginals(spec, ref["filtered"]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)

    smoothed = model.smooth(y, x_arg, method=method)
    np.testing.assert_allclose(np.asarray(smoothed.joint).reshape(T, -1), ref["smoothed"], atol=1e-12)
    for got, want in zip(_factor_list(smoothed.marginals), _per_factor_marginals(spec, ref["smoothed"]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)
    for got, want in zip(_factor_list(smoothed.pairwise), _per_factor_pairwise(spec, ref["pairwise"]), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-12)

    _check_blocked_posteriors(spec, model, y, x, ref, rng, method)

    path = model.viterbi(y, x_arg, method=method)
    got_path = np.stack(_factor_list(path) if T > 1 else [a.reshape(1) for a in _factor_list(path)], axis=1)
    flat = np.ravel_multi_index(tuple(got_path.reshape(T, -1).T), spec.state_shape)
    np.testing.assert_allclose(path_log_prob(spec, natural, y, x, flat), ref["viterbi_log_prob"], rtol=1e-12)
    if method == "sequential":
        np.testing.assert_array_equal(flat, ref["viterbi"])


def test_pairwise_is_consistent_with_marginals(rng):
    """Summing a two-slice marginal over either end gives the smoothed marginal there."""
    spec = TINY_SPECS["markov"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y, x = rng.normal(size=(60, 2)), rng.normal(size=60)
    result = model.smooth(y, x)
    for pair, marg in zip(_factor_list(result.pairwise), _factor_list(result.marginals), strict=True):
        np.testing.assert_allclose(pair.sum(-1), marg[:-1], atol=1e-10)
        np.testing.assert_allclose(pair.sum(-2), marg[1:], atol=1e-10)

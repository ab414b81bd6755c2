"""The posterior covariance of an additive functional (``inference.additive``) against enumeration of every path
of a tiny factorial HMM: a time-varying axis, a rank-one (i.i.d.) axis, blocks that do not divide the sequence,
and a padded last step."""

import functools
import itertools

import jax.numpy as jnp
import numpy as np

from fhmv_jax.inference.additive import BlockFactors, additive_covariance

SHAPE = (2, 3, 2)
STEPS, VALID, BLOCK = 6, 5, 4
G, Z, P = SHAPE[0], 2, 3


def _stochastic(rng, *shape):
    matrix = rng.uniform(0.2, 1.0, size=shape)
    return matrix / matrix.sum(axis=-1, keepdims=True)


def _joint(transitions, t):
    """The dense joint matrix from step t to t + 1."""
    dense = [m[t] if m.ndim == 3 else (np.broadcast_to(m, (m.size, m.size)) if m.ndim == 1 else m)
             for m in transitions]
    return functools.reduce(np.kron, dense)


def test_additive_covariance_equals_enumeration_of_every_path():
    rng = np.random.default_rng(5)
    S = int(np.prod(SHAPE))
    transitions = (_stochastic(rng, 2, 2), _stochastic(rng, STEPS, 3, 3), _stochastic(rng, 2))
    initial = _stochastic(rng, S)
    likelihoods = rng.uniform(0.05, 1.0, size=(STEPS, S))
    jacobian = rng.normal(size=(STEPS, G, Z, P))
    slopes = rng.normal(size=(STEPS,) + SHAPE + (Z,))
    g = np.einsum("tgvz,tgzp->tgvp", slopes.reshape(STEPS, G, -1, Z), jacobian)

    filtered = np.zeros((STEPS, S))
    predicted = initial
    for t in range(STEPS):
        joint = predicted * (likelihoods[t] if t < VALID else 1.0)
        filtered[t] = joint / joint.sum()
        predicted = filtered[t] @ _joint(transitions, t)

    paths = np.array(list(itertools.product(range(S), repeat=VALID)))
    weights = initial[paths[:, 0]] * np.prod(likelihoods[np.arange(VALID), paths], axis=1)
    for t in range(1, VALID):
        weights = weights * _joint(transitions, t - 1)[paths[:, t - 1], paths[:, t]]
    weights = weights / weights.sum()
    totals = np.zeros((len(paths), G, P))
    for t in range(VALID):
        regime, rest = np.divmod(paths[:, t], S // G)
        totals[np.arange(len(paths)), regime] += g[t, regime, rest]
    totals = totals.reshape(len(paths), G * P)
    mean = weights @ totals
    covariance = (weights[:, None] * (totals - mean)).T @ (totals - mean)
    smoothed = np.zeros((STEPS, S))
    for t in range(VALID):
        np.add.at(smoothed[t], paths[:, t], weights)

    def functional(rows, gamma):
        return BlockFactors(rows[0], rows[1], jnp.sum(gamma))

    got = additive_covariance(jnp.asarray(filtered.reshape((STEPS,) + SHAPE)),
                              jnp.asarray(smoothed.reshape((STEPS,) + SHAPE)),
                              tuple(jnp.asarray(m) for m in transitions), (jnp.asarray(jacobian), jnp.asarray(slopes)),
                              functional, num_coordinates=P, block_steps=BLOCK)
    np.testing.assert_allclose(np.asarray(got.mean), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got.covariance), covariance, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(got.sums), VALID, rtol=1e-12)

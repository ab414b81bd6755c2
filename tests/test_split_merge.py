"""Split-merge moves and the Gaussian-HMM initialisation: moments, chain laws, and the repair
of the local optimum they exist for (a bimodal regime covered by two fast-switching regimes)."""

import jax
import numpy as np
import pytest

from fhmv_jax import FHMV, ModelSpec, fit_em, init_model
from fhmv_jax.em import merge_split_candidate
from fhmv_jax.em.split_merge import _TRANSITION_FLOOR, Component, collapse, split_component, stationary_law
from fhmv_jax.eval import align_to_labels

SPEC = ModelSpec(num_features=2, num_regimes=3, num_chains=0, num_jump_states=1, num_components=2,
                 leverage="none", gaussian=True)


def _mixture_moments(weights, means, covariances):
    """Mean and covariance of a Gaussian mixture through E[y y^T] (a route independent of ``collapse``)."""
    weights = np.asarray(weights) / np.sum(weights)
    mean = np.einsum("k,kd->d", weights, means)
    second = np.einsum("k,kde->de", weights, covariances + means[:, :, None] * means[:, None, :])
    return mean, second - np.outer(mean, mean)


def _truth() -> FHMV:
    """Regime 0 bimodal along x (modes +-3, alternating every step); regimes 1 and 2 unimodal at y = +-6."""
    A = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    means = np.array([[[3.0, 0.0], [-3.0, 0.0]], [[0.0, 6.0], [0.3, 6.0]], [[0.0, -6.0], [0.3, -6.0]]])
    return FHMV.from_natural_parameters(SPEC, initial_regime=np.full(3, 1 / 3), regime_transition=A,
                                        weights=np.full((3, 2), 0.5), means=means,
                                        covariances=np.broadcast_to(0.5 * np.eye(2), (3, 2, 2, 2)).copy())


def _data():
    sample = _truth().sample(jax.random.key(3), 1500)
    return np.asarray(sample.observations), np.asarray(sample.states.regime)


def _accuracy(model, y, labels):
    regimes = np.asarray(model.smooth(y).marginals.regime).argmax(-1)
    return float(np.mean(align_to_labels(labels, regimes, 3).relabel(regimes) == labels))


def _components(rng, n):
    factors = rng.normal(size=(n, 3, 3))
    return [Component(w, m, f @ f.T + np.eye(3), 5.0) for w, m, f in
            zip(rng.uniform(0.2, 1.0, n), rng.normal(size=(n, 3)), factors, strict=True)]


def test_collapse_and_split_preserve_mixture_moments(rng):
    parts = _components(rng, 3)
    single = collapse(parts)
    mean, cov = _mixture_moments([c.weight for c in parts], np.stack([c.mean for c in parts]),
                                 np.stack([c.covariance for c in parts]))
    np.testing.assert_allclose(single.mean, mean, atol=1e-12)
    np.testing.assert_allclose(single.covariance, cov, atol=1e-12)
    assert single.weight == pytest.approx(sum(c.weight for c in parts))

    halves = split_component(single)
    mean, cov = _mixture_moments([0.5, 0.5], np.stack([h.mean for h in halves]),
                                 np.stack([h.covariance for h in halves]))
    np.testing.assert_allclose(mean, single.mean, atol=1e-12)
    np.testing.assert_allclose(cov, single.covariance, atol=1e-12)
    assert not np.allclose(halves[0].mean, halves[1].mean)
    assert all(np.linalg.eigvalsh(h.covariance).min() > 0 for h in halves)


def test_candidate_lumps_and_duplicates_the_chain_and_keeps_moments():
    truth = _truth()
    natural = {k: np.asarray(v) for k, v in truth.natural_parameters().items()}
    A = natural["regime_transition"]
    A = A + np.array([[0.0, 0.02, -0.02], [0.03, -0.03, 0.0], [0.0, -0.04, 0.04]])
    truth = FHMV.from_natural_parameters(SPEC, **(natural | {"regime_transition": A}))
    pi = np.linalg.matrix_power(A.T, 2000)[:, 0]
    candidate = merge_split_candidate(truth, (1, 2), 0)
    new = {k: np.asarray(v) for k, v in candidate.natural_parameters().items()}

    np.testing.assert_allclose(new["regime_transition"].sum(1), 1.0, atol=1e-12)
    assert new["regime_transition"].min() >= _TRANSITION_FLOOR / 3
    unfloored = (new["regime_transition"] - _TRANSITION_FLOOR / 3) / (1 - _TRANSITION_FLOOR)
    np.testing.assert_allclose(stationary_law(unfloored), [pi[0] / 2, pi[1] + pi[2], pi[0] / 2], atol=1e-9)
    np.testing.assert_allclose(new["initial_regime"].sum(), 1.0, atol=1e-12)

    def moments(values, regimes, scales):
        w = np.concatenate([s * values["weights"][g] for g, s in zip(regimes, scales, strict=True)])
        return _mixture_moments(w, np.concatenate([values["means"][g] for g in regimes]),
                                np.concatenate([values["covariances"][g] for g in regimes]))

    for got, want in zip(moments(new, [1], [1.0]), moments(natural, [1, 2], [pi[1], pi[2]]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-9)
    for got, want in zip(moments(new, [0, 2], [0.5, 0.5]), moments(natural, [0], [1.0]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-9)
    with pytest.raises(ValueError, match="three different regimes"):
        merge_split_candidate(truth, (1, 2), 2)


def test_split_merge_leaves_the_bimodal_local_optimum():
    y, labels = _data()
    trapped = merge_split_candidate(_truth(), (1, 2), 0)
    plain = fit_em(trapped, y, max_iters=60)
    repaired = fit_em(trapped, y, max_iters=60, split_merge_rounds=2)
    reference = fit_em(_truth(), y, max_iters=60)

    def accuracy(fit):
        return _accuracy(fit.model, y, labels)

    assert accuracy(plain) < 0.8 and plain.objectives[-1] < reference.objectives[-1] - 100
    move = repaired.split_merges[0]
    assert move.objective_after > move.objective_before
    # both stop at tol = 1e-4 (0.15 nats per iteration at T = 1500) while EM still creeps along the bimodal
    # regime's components: level to a couple of nats, against the > 100 nats of the trapped fit
    assert repaired.objectives[-1] >= reference.objectives[-1] - 2.0
    assert accuracy(repaired) > 0.97
    assert len(repaired.log_likelihoods) == repaired.num_iters + 1 + len(repaired.split_merges)
    move = repaired.split_merges[0]
    history = repaired.objectives
    np.testing.assert_allclose(history[move.iteration], move.objective_before, rtol=1e-12)
    for segment in (history[: move.iteration + 1], history[move.iteration + 1 :]):
        assert np.all(np.diff(segment) >= -1e-9 * np.abs(segment[1:]))


def test_hmm_initialisation_joins_the_alternating_modes():
    y, labels = _data()
    start = init_model(jax.random.key(0), SPEC, y, method="hmm")
    assert _accuracy(start, y, labels) > 0.95


def test_hmm_initialisation_of_a_ragged_batch_with_an_empty_regime(rng):
    lengths = np.array([300, 180])
    y = np.zeros((2, 300, 2))
    for b, n in enumerate(lengths):
        y[b, :n] = rng.normal(size=(n, 2)) + np.where(rng.random((n, 1)) < 0.5, 4.0, -4.0)
    y[1, 180:] = np.nan
    start = init_model(jax.random.key(1), ModelSpec(num_features=2, num_regimes=4, num_chains=1, driver_feature=0), y,
                       lengths=lengths, method="hmm")
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(start.natural_parameters()))
    with pytest.raises(ValueError, match="init method"):
        init_model(jax.random.key(1), SPEC, y[0], method="spectral")
    with pytest.raises(ValueError, match="at least 3 regimes"):
        fit_em(init_model(jax.random.key(1), ModelSpec(num_features=2, num_regimes=2, leverage="none"), y[0]), y[0],
               split_merge_rounds=1)

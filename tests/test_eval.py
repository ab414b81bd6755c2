"""Regime alignment, classification scores, the supervised oracle and the dashboard."""

import numpy as np
import pytest

from fhmv_jax.eval import (
    align_to_labels,
    align_to_reference,
    confusion_matrix,
    oracle_readout,
    regime_scores,
    reorder_regimes,
    supervised_reference,
)
from fhmv_jax.eval.plots import DashboardData, training_dashboard

NAMES = ("ST", "VT", "RC", "RHA")


def test_confusion_matrix_counts_pairs(rng):
    true, pred = rng.integers(0, 4, 500), rng.integers(0, 3, 500)
    expected = np.zeros((4, 3), int)
    for t, p in zip(true, pred, strict=True):
        expected[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(true, pred, 4, 3), expected)
    with pytest.raises(ValueError, match="predictions must lie in"):
        confusion_matrix(true, pred + 1, 4, 3)
    with pytest.raises(ValueError, match="differ in length"):
        confusion_matrix(true, pred[:-1], 4, 3)


def test_alignment_recovers_a_permutation_despite_noise(rng):
    truth = rng.integers(0, 4, 2000)
    permutation = np.array([2, 0, 3, 1])  # fitted regime of each true label
    fitted = permutation[truth]
    flip = rng.random(2000) < 0.2
    fitted[flip] = rng.integers(0, 4, flip.sum())
    alignment = align_to_labels(truth, fitted, 4, names=NAMES)
    np.testing.assert_array_equal(alignment.mapping[permutation], np.arange(4))
    assert alignment.names == tuple(NAMES[m] for m in alignment.mapping)
    relabelled = alignment.relabel(fitted)
    assert np.mean(relabelled == truth) == pytest.approx(np.mean(fitted == permutation[truth]))
    probs = np.eye(4)[fitted]
    np.testing.assert_array_equal(alignment.reorder(probs).argmax(-1), relabelled)


def test_alignment_with_fewer_fitted_regimes_than_labels_leaves_labels_unmatched():
    truth = np.array([0, 0, 1, 1, 2, 2, 2, 3, 3])
    fitted = np.array([1, 1, 0, 0, 0, 0, 0, 1, 0])   # fitted 0 mostly RC (2), fitted 1 mostly ST (0)
    alignment = align_to_labels(truth, fitted, 2, names=NAMES)
    np.testing.assert_array_equal(alignment.mapping, [2, 0])
    assert alignment.names == ("RC", "ST")
    assert alignment.reference_names == NAMES and alignment.num_reference == 4
    np.testing.assert_array_equal(alignment.relabel(fitted), [0, 0, 2, 2, 2, 2, 2, 0, 2])
    probs = np.array([[0.7, 0.3], [0.1, 0.9]])
    np.testing.assert_array_equal(alignment.reorder(probs), [[0.3, 0.0, 0.7, 0.0], [0.9, 0.0, 0.1, 0.0]])
    dof = np.array([[5.0, 6.0], [7.0, 8.0]])
    np.testing.assert_array_equal(alignment.per_reference(dof), [[7, 8], [np.nan] * 2, [5, 6], [np.nan] * 2])
    scores = regime_scores(truth, alignment.relabel(fitted), alignment.num_reference)
    assert scores.accuracy == pytest.approx(5 / 9) and scores.confusion.shape == (4, 4)
    assert np.isnan(scores.precision[[1, 3]]).all()   # unmatched labels are never predicted
    with pytest.raises(ValueError, match="3 regime names for 4"):
        align_to_labels(truth, fitted, 2, names=NAMES[:3], num_labels=4)
    with pytest.raises(ValueError, match=r"probabilities must be \[\.\.\., 2\]"):
        alignment.reorder(np.ones((3, 4)))


def test_alignment_with_more_fitted_regimes_than_labels_names_the_extras():
    truth = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    fitted = np.array([3, 3, 3, 0, 0, 0, 1, 2])   # 3 is label 0, 0 is label 1; 1 and 2 are left over
    alignment = align_to_labels(truth, fitted, 4, names=("calm", "storm"))
    np.testing.assert_array_equal(alignment.mapping, [1, 2, 3, 0])
    assert alignment.names == ("storm", "extra 1", "extra 2", "calm")
    assert alignment.reference_names == ("calm", "storm", "extra 1", "extra 2") and alignment.num_reference == 4
    relabelled = alignment.relabel(fitted)
    np.testing.assert_array_equal(relabelled, [0, 0, 0, 1, 1, 1, 2, 3])
    probs = np.array([[0.1, 0.2, 0.3, 0.4]])
    np.testing.assert_array_equal(alignment.reorder(probs), [[0.4, 0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(alignment.per_reference(np.arange(4.0)), [3.0, 0.0, 1.0, 2.0])
    scores = regime_scores(truth, relabelled, alignment.num_reference)   # extras never match a true label
    assert scores.accuracy == pytest.approx(6 / 8)
    as_dict = scores.to_dict(alignment.reference_names)
    assert as_dict["precision"]["extra 1"] == 0.0 and as_dict["recall"]["extra 1"] is None
    assert np.asarray(as_dict["confusion_matrix"])[:, 2:].sum() == 2
    with pytest.raises(ValueError, match="clash"):
        align_to_labels(truth, fitted, 4, names=("calm", "extra 1"))


def test_align_to_reference_matches_permuted_posteriors(rng):
    reference = rng.dirichlet(np.ones(4) * 0.3, size=300)
    order = np.array([3, 1, 0, 2])
    fitted = reference[:, order] + 0.05 * rng.random((300, 4))
    alignment = align_to_reference(fitted / fitted.sum(1, keepdims=True), reference, NAMES)
    np.testing.assert_array_equal(alignment.mapping, order)


def test_regime_scores_against_a_loop(rng):
    true, pred = rng.integers(0, 3, 400), rng.integers(0, 3, 400)
    scores = regime_scores(true, pred, 3)
    assert scores.accuracy == pytest.approx(np.mean(true == pred))
    for g in range(3):
        hits = np.sum((true == g) & (pred == g))
        assert scores.precision[g] == pytest.approx(hits / np.sum(pred == g))
        assert scores.recall[g] == pytest.approx(hits / np.sum(true == g))
    missing = regime_scores(np.array([0, 0, 1]), np.array([0, 0, 0]), 3)
    as_dict = missing.to_dict(("a", "b", "c"))
    assert as_dict["recall"]["c"] is None and as_dict["precision"]["b"] is None and as_dict["recall"]["b"] == 0.0


def _gaussian_hmm_data(rng, num_steps):
    means = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    A = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    labels = np.zeros(num_steps, int)
    for t in range(1, num_steps):
        labels[t] = rng.choice(3, p=A[labels[t - 1]])
    return means[labels] + rng.normal(size=(num_steps, 2)), labels, means, A


def test_supervised_reference_is_the_labelled_moments(rng):
    y, labels, _, _ = _gaussian_hmm_data(rng, 3000)
    natural = supervised_reference(y, labels, 3).natural_parameters()
    for g in range(3):
        rows = y[labels == g]
        np.testing.assert_allclose(natural["means"][g, 0], rows.mean(0), rtol=1e-10)
        np.testing.assert_allclose(natural["covariances"][g, 0], np.cov(rows.T) + 1e-6 * np.eye(2), rtol=1e-8)
        counts = np.array([np.sum((labels[:-1] == g) & (labels[1:] == h)) for h in range(3)]) + 1.0
        np.testing.assert_allclose(natural["regime_transition"][g], counts / counts.sum(), rtol=1e-10)


def test_oracle_classifies_separated_data_well(rng):
    y, labels, _, _ = _gaussian_hmm_data(rng, 3000)
    readout = oracle_readout(y[:2000], labels[:2000], y[2000:], 3)
    assert np.mean(readout.filtered == labels[2000:]) > 0.95
    assert np.mean(readout.smoothed == labels[2000:]) >= np.mean(readout.filtered == labels[2000:]) - 0.01


def test_dashboard_writes_a_png_and_keeps_no_temporary(tmp_path, rng):
    truth, pred = rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    data = DashboardData(
        log_likelihoods=np.cumsum(rng.random(8)),
        split_merge_iterations=[4],
        names=NAMES,
        confusion=confusion_matrix(truth, pred, 4),
        true_regimes=truth,
        predicted_regimes=pred,
        probabilities=rng.dirichlet(np.ones(4), 100),
        factor_parameters={"c1": 2.0, "p": 0.98},
        dof=rng.uniform(3, 30, (4, 2)),
        title="test",
    )
    path = training_dashboard(tmp_path / "dash.png", data)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dash.png"]


def test_reorder_regimes_permutes_every_regime_parameter(rng):
    import jax

    from fhmv_jax.model.examples import example_model

    model = example_model(jax.random.key(0))
    sample = model.sample(jax.random.key(7), 120)
    order = np.array([2, 0, 5, 1, 4, 3])
    reordered = reorder_regimes(model, order)
    y = sample.observations
    assert float(reordered.log_likelihood(y)) == pytest.approx(float(model.log_likelihood(y)), rel=1e-12)
    np.testing.assert_allclose(
        reordered.filter(y).marginals.regime, model.filter(y).marginals.regime[:, order], atol=1e-12
    )
    natural, original = reordered.natural_parameters(), model.natural_parameters()
    np.testing.assert_allclose(natural["regime_transition"], original["regime_transition"][order][:, order])
    np.testing.assert_allclose(natural["dof"], original["dof"][order])
    with pytest.raises(ValueError, match="permutation"):
        reorder_regimes(model, [0, 0, 1, 2, 3, 4])

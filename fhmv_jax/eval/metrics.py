"""Classification scores for regime read-outs and a supervised reference (the oracle)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..model.fhmv import FHMV
from ..model.spec import ModelSpec
from .regimes import confusion_matrix


class RegimeScores(NamedTuple):
    """Scores of predicted against true regime labels (both already in the same naming).

    Attributes:
        accuracy: fraction of steps labelled correctly.
        confusion: [G, G] counts, rows true labels, columns predictions.
        precision: [G] correct / predicted per label (NaN where a label is never predicted).
        recall: [G] correct / true per label (NaN where a label never occurs).
    """

    accuracy: float
    confusion: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    def to_dict(self, names) -> dict:
        """JSON-able scores, per-regime values keyed by name (NaN becomes ``None``)."""

        def per_name(values):
            return {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, values, strict=True)}

        return {
            "accuracy": self.accuracy,
            "confusion_matrix": self.confusion.tolist(),
            "precision": per_name(self.precision),
            "recall": per_name(self.recall),
        }


def regime_scores(true_labels, predicted, num_regimes: int) -> RegimeScores:
    """Accuracy, confusion matrix and per-label precision and recall."""
    confusion = confusion_matrix(true_labels, predicted, num_regimes)
    correct = np.diag(confusion).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = correct / confusion.sum(axis=0)
        recall = correct / confusion.sum(axis=1)
    return RegimeScores(float(correct.sum() / max(confusion.sum(), 1)), confusion, precision, recall)


class OracleReadout(NamedTuple):
    """Regime read-outs of the supervised reference on held-out data.

    Attributes:
        model: the reference, a Gaussian HMM with one component per regime.
        filtered: [T] argmax P(R_t | y_{1:t}).
        smoothed: [T] argmax P(R_t | y_{1:T}).
    """

    model: FHMV
    filtered: np.ndarray
    smoothed: np.ndarray


def supervised_reference(y_train, labels_train, num_regimes: int, ridge: float = 1e-6) -> FHMV:
    """The model labels would give: one Gaussian per regime and the empirical chain.

    Means and covariances are the per-label sample moments (plus ``ridge`` on the diagonal;
    a label with too few rows to estimate a covariance gets the pooled one), the transition
    matrix and initial law are the empirical transition and label frequencies, with one
    pseudo-count per entry so no transition has probability zero.

    Args:
        y_train: [T, D] training observations.
        labels_train: [T] true labels in [0, num_regimes).
        num_regimes: G.
    """
    y, labels = np.asarray(y_train, dtype=float), np.asarray(labels_train)
    num_steps, num_features = y.shape
    if labels.shape != (num_steps,):
        raise ValueError(f"labels must have shape ({num_steps},), got {labels.shape}")
    pooled = np.cov(y, rowvar=False) + ridge * np.eye(num_features)
    means = np.zeros((num_regimes, 1, num_features))
    covariances = np.broadcast_to(pooled, (num_regimes, 1, num_features, num_features)).copy()
    for g in range(num_regimes):
        rows = y[labels == g]
        if len(rows):
            means[g, 0] = rows.mean(axis=0)
        if len(rows) > num_features:
            covariances[g, 0] = np.cov(rows, rowvar=False) + ridge * np.eye(num_features)
    transitions = confusion_matrix(labels[:-1], labels[1:], num_regimes) + 1.0
    frequencies = np.bincount(labels, minlength=num_regimes) + 1.0
    spec = ModelSpec(
        num_features=num_features,
        num_regimes=num_regimes,
        num_chains=0,
        num_jump_states=1,
        num_components=1,
        leverage="none",
        gaussian=True,
    )
    return FHMV.from_natural_parameters(
        spec,
        initial_regime=frequencies / frequencies.sum(),
        regime_transition=transitions / transitions.sum(axis=1, keepdims=True),
        weights=np.ones((num_regimes, 1)),
        means=means,
        covariances=covariances,
    )


def oracle_readout(y_train, labels_train, y_test, num_regimes: int) -> OracleReadout:
    """Fit the supervised reference on training labels and read regimes on test data."""
    model = supervised_reference(y_train, labels_train, num_regimes)
    filtered = np.asarray(model.filter(y_test).marginals.regime).argmax(-1)
    smoothed = np.asarray(model.smooth(y_test).marginals.regime).argmax(-1)
    return OracleReadout(model, filtered, smoothed)

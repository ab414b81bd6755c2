"""Read-outs: per-step regime probabilities, labels, names and an ambiguity flag; the expected volatility scale."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from .._types import Array, Float
from ..data.features import FeatureCarry, FeatureTransform, Standardizer, TransformedRows
from ..io import SavedModel
from ..model.fhmv import FHMV, sequence_inputs
from ..model.inputs import check_observations

METHODS = ("filter", "smooth", "viterbi")


class RegimePrediction(NamedTuple):
    """Regimes read off a model for every step of a sequence (numpy arrays).

    Attributes:
        probabilities: [T, G] P(R_t | y_{1:t}) for ``"filter"`` (no look-ahead: what was known
            at t), P(R_t | y_{1:T}) for ``"smooth"`` and ``"viterbi"``.
        regimes: [T] int, the most probable regime per step, or the regime on the most likely
            joint state path for ``"viterbi"``.
        names: [T] str, the name of each step's regime.
        confidence: [T] the probability of the reported regime (the top probability, except for
            ``"viterbi"``, whose path may pass through a regime that is not the most probable
            one at a step).
        ambiguous: [T] bool, ``confidence < ambiguity_threshold``.
        method: the method used.
    """

    probabilities: np.ndarray
    regimes: np.ndarray
    names: np.ndarray
    confidence: np.ndarray
    ambiguous: np.ndarray
    method: str


def _regime_names(regime_names: Sequence[str] | None, num_regimes: int) -> np.ndarray:
    if regime_names is None:
        return np.array([f"R{g}" for g in range(num_regimes)])
    if isinstance(regime_names, str) or len(regime_names) != num_regimes:
        raise ValueError(f"regime_names must be {num_regimes} names (one per regime), got {regime_names!r}")
    if not all(isinstance(name, str) for name in regime_names):
        raise ValueError(f"regime_names must be strings, got {regime_names!r}")
    return np.array(regime_names)


def predict_regimes(
    model: FHMV,
    y: Float[Array, "T D"],
    x: Float[Array, " T"] | None = None,
    *,
    method: str = "filter",
    regime_names: Sequence[str] | None = None,
    ambiguity_threshold: float = 0.6,
) -> RegimePrediction:
    """Read the market regime off a sequence of (standardised) observations.

    Args:
        model: a fitted model.
        y: [T, D] observations, already standardised as the model's input.
        x: optional [T] driver, as for ``FHMV.filter``.
        method: ``"filter"`` (P(R_t | y_{1:t}), no look-ahead: use it for anything evaluated
            out of sample), ``"smooth"`` (P(R_t | y_{1:T}), uses the whole sequence) or
            ``"viterbi"`` (regimes from the most likely joint path ``FHMV.viterbi``,
            probabilities from smoothing).
        regime_names: G names, one per regime (default ``"R0"``, ``"R1"``, ...).
        ambiguity_threshold: in (0, 1]; steps whose confidence is below it are flagged.

    Returns:
        A ``RegimePrediction``.

    Raises:
        ValueError: an unknown method, the wrong number of names, a threshold outside
            (0, 1], or bad observations (as ``FHMV.filter``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    threshold = float(ambiguity_threshold)
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"ambiguity_threshold must be in (0, 1], got {ambiguity_threshold!r}")
    names = _regime_names(regime_names, model.spec.num_regimes)
    if method == "filter":
        probabilities = np.asarray(model.filter(y, x).marginals.regime)
        regimes = np.argmax(probabilities, axis=1)
    else:
        probabilities = np.asarray(model.smooth(y, x).marginals.regime)
        regimes = np.argmax(probabilities, axis=1) if method == "smooth" else np.asarray(model.viterbi(y, x).regime)
    confidence = np.take_along_axis(probabilities, regimes[:, None], axis=1)[:, 0]
    return RegimePrediction(probabilities, regimes, names[regimes], confidence, confidence < threshold, method)


def volatility_scale(
    model: FHMV, y: Float[Array, "T D"], x: Float[Array, " T"] | None = None, *, method: str = "smooth"
) -> np.ndarray:
    """The expected volatility scale E[s_t | y] of every step (MODEL.md sections 2 and 6).

    E[s_t | y] = sum_h P(h_t = h | y) s_t(h), with s_t(h) = C(e) M(J) L_t the factor scale of
    the joint state h (1 in the baseline state; the regime covariances carry the level).

    Args:
        model: a fitted model.
        y: [T, D] observations, standardised as the model's input; x: optional [T] driver.
        method: ``"smooth"`` (P(h_t | y_{1:T}), offline) or ``"filter"`` (P(h_t | y_{1:t}), no look-ahead).

    Returns:
        [T] E[s_t | y] (all ones for a spec without volatility factors).
    """
    if method not in ("filter", "smooth"):
        raise ValueError(f"method must be 'filter' or 'smooth', got {method!r}")
    posterior = model.filter(y, x) if method == "filter" else model.smooth(y, x)
    joint = np.asarray(posterior.joint)
    per_volatility = joint.reshape(joint.shape[0], model.spec.num_regimes, -1).sum(axis=1)
    log_scale = np.asarray(sequence_inputs(model, *check_observations(model.spec, y, x, dtype=model.dtype)).log_scale)
    return np.sum(per_volatility * np.exp(log_scale), axis=-1)


def model_inputs(metadata: dict, raw, carry: FeatureCarry | None = None) -> TransformedRows:
    """Raw rows -> standardised model inputs, with the feature transform stored in a model file.

    Args:
        metadata: a ``SavedModel.metadata`` holding ``feature_transform``, ``standardizer``
            and ``feature_carry`` (the transform's state after the training rows).
        raw: [T, D] raw rows that follow the rows behind ``carry``.
        carry: the transform's state before ``raw`` (default: the stored one, i.e. ``raw``
            continues the training data).

    Returns:
        ``TransformedRows``: y [T, D] standardised and the carry after ``raw`` (pass it to
        the next call to continue a live stream exactly).
    """
    missing = [k for k in ("feature_transform", "standardizer", "feature_carry") if k not in metadata]
    if missing:
        raise ValueError(f"the model file lacks the feature metadata {missing}; it was not saved by the main job")
    transform = FeatureTransform.from_dict(metadata["feature_transform"])
    carry = FeatureCarry.from_dict(metadata["feature_carry"]) if carry is None else carry
    rows = transform.apply(raw, carry)
    return TransformedRows(Standardizer.from_dict(metadata["standardizer"]).transform(rows.features), rows.carry)


def predict_raw(saved: SavedModel, raw, *, carry: FeatureCarry | None = None, **options) -> RegimePrediction:
    """``predict_regimes`` on raw rows, with the model file's feature transform and regime names.

    Args:
        saved: ``fhmv_jax.load(path)``.
        raw: [T, D] raw rows (see ``model_inputs``).
        carry: the feature transform's state before ``raw`` (default: after the training rows).
        **options: ``method``, ``ambiguity_threshold`` (see ``predict_regimes``).
    """
    y = model_inputs(saved.metadata, raw, carry).features
    return predict_regimes(saved.model, y, regime_names=saved.metadata.get("regime_names"), **options)

"""Naming fitted regimes: Hungarian matching to labels or to a reference model, or a rule on the fitted means.

A fitted model's G regimes are unlabelled (any permutation fits equally well). Accuracy is
only meaningful after an alignment, and that alignment must be fitted on training data
only. ``RegimeAlignment.mapping[g]`` is the reference label given to fitted regime g.

The matching is one to one, and G need not be the number L of reference labels (a model-size
sweep fits G = 2, 3, ... regimes to the same labelled data):

* G < L: each fitted regime gets a distinct label; the L - G labels left over have no fitted
  regime (``reorder`` gives them probability 0, a classifier never predicts them).
* G > L: every label gets a fitted regime, and the G - L fitted regimes left over keep names of
  their own, ``"extra 1"``, ``"extra 2"``, ... (in fitted-regime order), at reference indices
  L, L + 1, ... after the labels. They are never a true label, so a step read as an extra
  regime counts as an error, but they stay in confusion matrices, scores and plots.

Scores and plots over the alignment's reference index range use ``num_reference`` =
max(G, L) slots named ``reference_names``: the L label names, then the extras.

Without labels, ``name_by_rule`` names the regimes of a model fitted on the market features
of DATA.md (it needs LM, Abs, Vol and T) from their fitted means (MODEL.md section 6).
Each feature's regime means m_g (in feature units, component-weighted) become z-scores
across the G regimes, z_f(g) = (m_g - mean) / sd (0 where all regimes agree), with the
trend feature taken as |T|. The names are then given in this order, each to the regime with
the highest score among those not yet named:

    HPEM (high-pressure extreme move)   z_LM - z_Abs           highest liquidation, lowest absorption
    RHA  (reversal, high absorption)    z_LM + z_Abs           high liquidation, highest absorption
    ST   (stable trend)                 z_|T| - z_Vol          clearest trend, lowest volatility
    VT   (volatile trend)               z_Vol + z_LM           highest volatility and liquidation
    RC   (range-bound, consolidation)   z_Abs - z_LM - z_|T|   absorption without liquidation or trend
    AMB  (ambiguous)                    -sum_f |z_f|           the weakest signals

With fewer than six regimes only the first G names are given (a 2-regime fit gets HPEM and
RHA); regimes beyond six keep the neutral names R6, R7, ... z-scores do not change when a
feature is rescaled, but |T| needs T's own zero: pass means in the units of the causal
features, before standardisation (``Standardizer.inverse_transform``). On the simulated
market the rule recovers the true names from the per-regime feature means, and on the
default fit of that market (the main job, seed 42, with the labels withheld) it gives the names the
Hungarian matching to the labels gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..model.fhmv import FHMV


class RegimeAlignment(NamedTuple):
    """A one-to-one naming of fitted regimes (G fitted regimes, L reference labels; module docstring).

    Attributes:
        mapping: [G] reference index of each fitted regime: a label in [0, L), or L + k for the
            k-th fitted regime left without a label (only when G > L).
        names: [G] the reference name of each fitted regime.
        reference_names: [max(G, L)] the name of each reference index: the L label names, then
            ``"extra 1"``, ``"extra 2"``, ... for the fitted regimes left without a label.
    """

    mapping: np.ndarray
    names: tuple[str, ...]
    reference_names: tuple[str, ...]

    @property
    def num_reference(self) -> int:
        """max(G, L): the number of reference indices (labels, then extra fitted regimes)."""
        return len(self.reference_names)

    def relabel(self, fitted_regimes) -> np.ndarray:
        """Fitted regime indices (any shape) -> reference indices in [0, max(G, L))."""
        return self.mapping[np.asarray(fitted_regimes)]

    def reorder(self, probabilities) -> np.ndarray:
        """[..., G] probabilities over fitted regimes -> [..., max(G, L)] over reference indices.

        Labels without a fitted regime get probability 0, so rows still sum to one.
        """
        probabilities = np.asarray(probabilities)
        num_fitted = len(self.mapping)
        if probabilities.shape[-1:] != (num_fitted,):
            raise ValueError(f"probabilities must be [..., {num_fitted}] (one per fitted regime), "
                             f"got shape {probabilities.shape}")
        out = np.zeros((*probabilities.shape[:-1], self.num_reference), dtype=probabilities.dtype)
        out[..., self.mapping] = probabilities
        return out

    def per_reference(self, values, fill=np.nan) -> np.ndarray:
        """[G, ...] values per fitted regime (e.g. degrees of freedom) -> [max(G, L), ...] per reference index.

        Labels without a fitted regime get ``fill`` (NaN by default: they have no fitted value).
        """
        values = np.asarray(values)
        num_fitted = len(self.mapping)
        if values.shape[:1] != (num_fitted,):
            raise ValueError(f"values must be [{num_fitted}, ...] (one row per fitted regime), "
                             f"got shape {values.shape}")
        dtype = np.result_type(values.dtype, np.asarray(fill).dtype)
        out = np.full((self.num_reference, *values.shape[1:]), fill, dtype=dtype)
        out[self.mapping] = values
        return out


def confusion_matrix(true_labels, predicted, num_true: int, num_predicted: int | None = None) -> np.ndarray:
    """[num_true, num_predicted] counts of (true label, predicted label) pairs."""
    true_labels, predicted = np.asarray(true_labels).ravel(), np.asarray(predicted).ravel()
    if true_labels.shape != predicted.shape:
        raise ValueError(f"labels and predictions differ in length: {true_labels.size} vs {predicted.size}")
    num_predicted = num_true if num_predicted is None else num_predicted
    for name, values, size in (("true labels", true_labels, num_true), ("predictions", predicted, num_predicted)):
        if values.size and (values.min() < 0 or values.max() >= size):
            raise ValueError(f"{name} must lie in [0, {size}), got range [{values.min()}, {values.max()}]")
    counts = np.zeros((num_true, num_predicted), dtype=np.int64)
    np.add.at(counts, (true_labels, predicted), 1)
    return counts


def _assignment(score: np.ndarray) -> np.ndarray:
    """mapping[g] = reference index maximising the total score[g, mapping[g]] (one to one).

    With more fitted regimes (rows) than reference indices (columns), the rows left over get
    the indices after the columns, in row order (the "extra" regimes of the module docstring).
    """
    from scipy.optimize import linear_sum_assignment  # imported here: scipy.optimize takes about 0.3 s

    num_fitted, num_reference = score.shape
    rows, cols = linear_sum_assignment(score, maximize=True)
    mapping = np.full(num_fitted, -1, dtype=np.int64)
    mapping[rows] = cols
    unmatched = mapping < 0
    mapping[unmatched] = num_reference + np.arange(np.count_nonzero(unmatched))
    return mapping


EXTRA_NAME = "extra {}"
"""The name of the k-th (from 1) fitted regime left without a reference label."""


def _named(mapping: np.ndarray, names: Sequence[str] | None, num_reference: int) -> RegimeAlignment:
    names = tuple(f"R{i}" for i in range(num_reference)) if names is None else tuple(names)
    if len(names) != num_reference:
        raise ValueError(f"got {len(names)} regime names for {num_reference} reference regimes")
    num_extra = max(len(mapping) - num_reference, 0)
    extras = tuple(EXTRA_NAME.format(k + 1) for k in range(num_extra))
    clash = set(extras) & set(names)
    if clash:
        raise ValueError(f"reference names {sorted(clash)} clash with the names of extra fitted regimes")
    reference_names = names + extras
    return RegimeAlignment(mapping, tuple(reference_names[m] for m in mapping), reference_names)


def align_to_labels(
    true_labels, fitted_regimes, num_fitted: int, names: Sequence[str] | None = None, num_labels: int | None = None
) -> RegimeAlignment:
    """Hungarian matching that maximises agreement between fitted regimes and true labels.

    One to one: with fewer fitted regimes than labels some labels go unmatched, with more the
    fitted regimes left over are named ``"extra 1"``, ... (module docstring).

    Args:
        true_labels: [T] reference labels (training rows only).
        fitted_regimes: [T] the fitted model's regime per step (e.g. smoothed argmax).
        num_fitted: G of the fitted model.
        names: one name per reference label.
        num_labels: number of reference labels (default ``len(names)`` or ``num_fitted``).
    """
    num_labels = num_labels or (len(names) if names is not None else num_fitted)
    counts = confusion_matrix(true_labels, fitted_regimes, num_labels, num_fitted)
    return _named(_assignment(counts.T.astype(float)), names, num_labels)


def align_to_reference(fitted_probs, reference_probs, names: Sequence[str]) -> RegimeAlignment:
    """Match a fitted model's regimes to a reference model's on the same data.

    The score of (fitted g, reference r) is sum_t P_fit(R_t = g) P_ref(R_t = r): the expected
    number of steps both models give to that pair. Used to keep regime names stable when a
    model is refitted (the raw order of a refit's regimes is arbitrary).

    Args:
        fitted_probs: [T, G] the new model's regime probabilities.
        reference_probs: [T, G_ref] the reference model's, already in reference-name order.
        names: [G_ref] reference names.
    """
    fitted_probs, reference_probs = np.asarray(fitted_probs), np.asarray(reference_probs)
    if fitted_probs.shape[0] != reference_probs.shape[0]:
        raise ValueError(f"probabilities cover {fitted_probs.shape[0]} vs {reference_probs.shape[0]} steps")
    return _named(_assignment(fitted_probs.T @ reference_probs), names, reference_probs.shape[1])


def reorder_regimes(model: FHMV, order) -> FHMV:
    """The same model with regime ``i`` being the old regime ``order[i]`` (likelihoods unchanged).

    Used to put a refitted model's regimes in a reference order before it is named, so
    regime names stay attached to the same market behaviour across refits.
    """
    order = np.asarray(order)
    num_regimes = model.spec.num_regimes
    if sorted(order.tolist()) != list(range(num_regimes)):
        raise ValueError(f"order must be a permutation of the {num_regimes} regimes, got {order.tolist()}")
    return model.permuted_regimes(order)


NAMING_FEATURES = ("LM", "Abs", "Vol", "T")
"""The features ``name_by_rule`` needs (DATA.md names)."""

RULE_NAMES = ("HPEM", "RHA", "ST", "VT", "RC", "AMB")
"""The names ``name_by_rule`` gives, in the order it gives them."""


def regime_means(model: FHMV) -> np.ndarray:
    """[G, D] fitted regime means sum_k w_{g,k} mu_{g,k}, in the model's input units (zeros without means)."""
    natural = model.natural_parameters()
    spec = model.spec
    if "means" not in natural:
        return np.zeros((spec.num_regimes, spec.num_features))
    weights, means = np.asarray(natural["weights"]), np.asarray(natural["means"])
    return np.einsum("gk,gkd->gd", weights, means)


def _z_scores(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    if spread <= 1e-12 * max(1.0, np.abs(values).max()):
        return np.zeros_like(values)
    return (values - values.mean()) / spread


def name_by_rule(means, feature_names: Sequence[str]) -> tuple[str, ...] | None:
    """Name unlabelled regimes by the documented rule on their fitted means (module docstring).

    Args:
        means: [G, D] regime means in feature units (``regime_means`` of the model, mapped
            back through the Standardizer).
        feature_names: [D] names; the rule needs ``NAMING_FEATURES``.

    Returns:
        G names, one per fitted regime, or ``None`` when the rule does not apply (a needed
        feature is missing, or G < 2: one regime has nothing to be told apart from).
    """
    means = np.asarray(means, dtype=np.float64)
    names = list(feature_names)
    if means.ndim != 2 or means.shape[1] != len(names):
        raise ValueError(f"means must be [G, {len(names)}] for features {names}, got shape {means.shape}")
    num_regimes = means.shape[0]
    if num_regimes < 2 or not set(NAMING_FEATURES) <= set(names):
        return None
    z = {f: _z_scores(means[:, names.index(f)]) for f in ("LM", "Abs", "Vol")}
    z["|T|"] = _z_scores(np.abs(means[:, names.index("T")]))
    scores = {
        "HPEM": z["LM"] - z["Abs"],
        "RHA": z["LM"] + z["Abs"],
        "ST": z["|T|"] - z["Vol"],
        "VT": z["Vol"] + z["LM"],
        "RC": z["Abs"] - z["LM"] - z["|T|"],
        "AMB": -sum(np.abs(v) for v in z.values()),
    }
    given = [f"R{g}" for g in range(num_regimes)]
    free = list(range(num_regimes))
    for name in RULE_NAMES[:num_regimes]:
        chosen = max(free, key=lambda g, score=scores[name]: score[g])
        given[chosen] = name
        free.remove(chosen)
    return tuple(given)

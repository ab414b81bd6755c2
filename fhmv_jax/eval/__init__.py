"""Evaluation: read-outs, regime naming (alignment or rule), classification scores, the oracle, the dashboards."""

from .metrics import OracleReadout, RegimeScores, oracle_readout, regime_scores, supervised_reference
from .predict import RegimePrediction, model_inputs, predict_raw, predict_regimes, volatility_scale
from .regimes import (
    NAMING_FEATURES,
    RULE_NAMES,
    RegimeAlignment,
    align_to_labels,
    align_to_reference,
    confusion_matrix,
    name_by_rule,
    regime_means,
    reorder_regimes,
)

__all__ = [
    "NAMING_FEATURES",
    "RULE_NAMES",
    "OracleReadout",
    "RegimeAlignment",
    "RegimePrediction",
    "RegimeScores",
    "align_to_labels",
    "align_to_reference",
    "confusion_matrix",
    "model_inputs",
    "name_by_rule",
    "oracle_readout",
    "predict_raw",
    "predict_regimes",
    "regime_means",
    "regime_scores",
    "reorder_regimes",
    "supervised_reference",
    "volatility_scale",
]

"""Evaluation: regime read-outs, regime naming by alignment, classification scores, the oracle, the dashboard."""

from .metrics import OracleReadout, RegimeScores, oracle_readout, regime_scores, supervised_reference
from .predict import RegimePrediction, model_inputs, predict_raw, predict_regimes
from .regimes import RegimeAlignment, align_to_labels, align_to_reference, confusion_matrix, reorder_regimes

__all__ = [
    "OracleReadout",
    "RegimeAlignment",
    "RegimePrediction",
    "RegimeScores",
    "align_to_labels",
    "align_to_reference",
    "confusion_matrix",
    "model_inputs",
    "oracle_readout",
    "predict_raw",
    "predict_regimes",
    "regime_scores",
    "reorder_regimes",
    "supervised_reference",
]

"""Evaluation: regime naming by alignment, classification scores, the oracle, the dashboard."""

from .metrics import OracleReadout, RegimeScores, oracle_readout, regime_scores, supervised_reference
from .regimes import RegimeAlignment, align_to_labels, align_to_reference, confusion_matrix, reorder_regimes

__all__ = [
    "OracleReadout",
    "RegimeAlignment",
    "RegimeScores",
    "align_to_labels",
    "align_to_reference",
    "confusion_matrix",
    "oracle_readout",
    "regime_scores",
    "reorder_regimes",
    "supervised_reference",
]

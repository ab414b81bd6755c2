"""Data: the simulated market of DATA.md, CSV loading and feature processing."""

from .features import FeatureCarry, FeatureTransform, Standardizer, TransformedRows, ewma, log_returns
from .loaders import load_csv
from .synthetic import (
    DEFAULT_FREQUENCIES,
    FEATURE_NAMES,
    REGIME_NAMES,
    MarketData,
    regime_transition_matrix,
    simulate_market,
)

__all__ = [
    "DEFAULT_FREQUENCIES",
    "FEATURE_NAMES",
    "REGIME_NAMES",
    "FeatureCarry",
    "FeatureTransform",
    "MarketData",
    "Standardizer",
    "TransformedRows",
    "ewma",
    "load_csv",
    "log_returns",
    "regime_transition_matrix",
    "simulate_market",
]

"""Data: the simulated market of DATA.md, CSV loading (features, daily returns), sample data, feature processing."""

from .features import FeatureCarry, FeatureTransform, Standardizer, TransformedRows, ewma, log_returns
from .loaders import RETURN_FEATURE, ReturnSeries, load_csv, load_returns
from .samples import sp500_prices
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
    "RETURN_FEATURE",
    "FeatureCarry",
    "FeatureTransform",
    "MarketData",
    "ReturnSeries",
    "Standardizer",
    "TransformedRows",
    "ewma",
    "load_csv",
    "load_returns",
    "log_returns",
    "regime_transition_matrix",
    "simulate_market",
    "sp500_prices",
]

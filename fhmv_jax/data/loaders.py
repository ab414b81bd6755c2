"""Reading market features from CSV files (no pandas needed)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

from .synthetic import FEATURE_NAMES, REGIME_NAMES, MarketData


def _column(header: list[str], name: str, path) -> int:
    if name not in header:
        raise ValueError(f"{path}: no column {name!r}; columns are {header}")
    return header.index(name)


def load_csv(
    path: str | os.PathLike,
    feature_names: Sequence[str] = FEATURE_NAMES,
    *,
    timestamp_column: str | None = "timestamp",
    regime_column: str | None = None,
    regime_names: Sequence[str] = REGIME_NAMES,
) -> MarketData:
    """Read one row per step from a CSV file with a header line.

    Args:
        path: the file.
        feature_names: the feature columns, in model order.
        timestamp_column: ISO timestamps (``None``: steps are numbered hours from 1970).
        regime_column: optional true regime names (each one of ``regime_names``).
        regime_names: the names regime labels may take.

    Returns:
        ``MarketData`` (``regimes`` is ``None`` without a regime column).

    Raises:
        ValueError: a missing file or column, an empty or non-numeric cell (row and column
            named), an unknown regime name, fewer than 2 rows.
    """
    if not os.path.isfile(path):
        raise ValueError(f"no such data file: {path}")
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        rows = [row for row in reader if row]
    feature_columns = [_column(header, name, path) for name in feature_names]
    if len(rows) < 2:
        raise ValueError(f"{path}: {len(rows)} data row(s); at least 2 are needed")
    features = np.empty((len(rows), len(feature_columns)))
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {i + 2}: {len(row)} cells but the header has {len(header)}")
        for j, c in enumerate(feature_columns):
            try:
                features[i, j] = float(row[c])
            except ValueError:
                raise ValueError(f"{path}, line {i + 2}, column {header[c]!r}: not a number: {row[c]!r}") from None
    if timestamp_column is None:
        timestamps = np.arange(len(rows)).astype("datetime64[h]")
    else:
        c = _column(header, timestamp_column, path)
        try:
            timestamps = np.array([row[c] for row in rows], dtype="datetime64[h]")
        except ValueError as error:
            raise ValueError(f"{path}, column {timestamp_column!r}: unreadable timestamp ({error})") from None
    regimes = None
    if regime_column is not None:
        c = _column(header, regime_column, path)
        unknown = sorted({row[c] for row in rows} - set(regime_names))
        if unknown:
            raise ValueError(
                f"{path}, column {regime_column!r}: unknown regime name(s) {unknown}; expected {list(regime_names)}"
            )
        regimes = np.array([list(regime_names).index(row[c]) for row in rows])
    return MarketData(features, regimes, timestamps, tuple(feature_names), tuple(regime_names))

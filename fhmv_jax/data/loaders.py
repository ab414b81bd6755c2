"""Reading data from CSV files: market features (``load_csv``, plain csv) and daily returns
(``load_returns``, pandas for the dates)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import NamedTuple

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


RETURN_FEATURE = "r"
"""The name of the one feature of a returns series."""


class ReturnSeries(NamedTuple):
    """A daily returns series read by ``load_returns``.

    Attributes:
        dates: [T] datetime64[D], the date of each return, increasing.
        returns: [T] percent log returns 100 (log p_t - log p_{t-1}), or the file's returns as they are.
        prices: [T] the price on each of ``dates`` (``None`` for a return column).
        start: the date of the first price, which only supplies p_0 (``None`` for a return column).
        notes: what was done to or found in the file without being an error (rows sorted,
            small gaps), one line each.
    """

    dates: np.ndarray
    returns: np.ndarray
    prices: np.ndarray | None
    start: np.datetime64 | None
    notes: tuple[str, ...]


def _rows(lines: np.ndarray, dates: np.ndarray, where: np.ndarray, limit: int = 5) -> str:
    """'line 7 (2001-09-11), ...' for the first ``limit`` flagged rows, and how many more."""
    flagged = np.flatnonzero(where)
    text = ", ".join(f"line {lines[i]} ({dates[i]})" for i in flagged[:limit])
    return text + (f" and {flagged.size - limit} more" if flagged.size > limit else "")


def _missing_business_days(dates: np.ndarray) -> np.ndarray:
    """[T - 1] business days (Monday to Friday) strictly between consecutive dates."""
    return np.maximum(np.busday_count(dates[:-1], dates[1:]) - 1, 0)


def load_returns(
    path: str | os.PathLike,
    *,
    date_column: str = "date",
    price_column: str | None = None,
    return_column: str | None = None,
    sort_dates: bool = True,
    max_gap_days: int | None = 5,
    min_returns: int = 2,
) -> ReturnSeries:
    """Read a daily series (one row per date) from a CSV file with a header line.

    Give exactly one of ``price_column`` (positive prices, turned into percent log returns
    r_t = 100 (log p_t - log p_{t-1}); the first date only supplies p_0) and
    ``return_column`` (returns used as they are).

    Checks, in this order: the columns exist; every date parses and is a plain date (no
    time of day); no date repeats; every value is a number; the dates increase (otherwise
    the rows are sorted and ``notes`` says so, or, with ``sort_dates=False``, refused);
    prices are positive; no more than ``max_gap_days`` business days are missing between
    two consecutive dates (smaller gaps, such as holidays, are counted in ``notes``); at
    least ``min_returns`` returns remain.

    Args:
        path: the file.
        date_column: the dates, in any format ``pandas.to_datetime`` reads.
        price_column, return_column: exactly one of them.
        sort_dates: sort rows that are out of date order (True) or refuse them (False).
        max_gap_days: the most business days (Monday to Friday) that may be missing between
            two consecutive dates; ``None``: no limit.
        min_returns: the fewest returns accepted.

    Returns:
        ``ReturnSeries``.

    Raises:
        ValueError: anything above that fails, naming the file lines and dates concerned.
    """
    import pandas as pd

    if (price_column is None) == (return_column is None):
        raise ValueError(
            f"give exactly one of price_column and return_column, got price_column={price_column!r}, "
            f"return_column={return_column!r}"
        )
    if not os.path.isfile(path):
        raise ValueError(f"no such data file: {path}")
    value_column = price_column if price_column is not None else return_column
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for name in (date_column, value_column):
        if name not in frame.columns:
            raise ValueError(f"{path}: no column {name!r}; columns are {list(frame.columns)}")
    lines = np.arange(len(frame)) + 2
    text_dates = frame[date_column].str.strip().to_numpy()
    parsed = pd.to_datetime(pd.Series(text_dates), errors="coerce", format="mixed")
    unreadable = parsed.isna().to_numpy()
    if unreadable.any():
        where = _rows(lines, text_dates, unreadable)
        raise ValueError(f"{path}, column {date_column!r}: unreadable date(s) at {where}")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)
    timed = (parsed != parsed.dt.normalize()).to_numpy()
    if timed.any():
        raise ValueError(
            f"{path}, column {date_column!r}: a daily series is expected, but there are times of day at "
            f"{_rows(lines, text_dates, timed)}"
        )
    dates = parsed.to_numpy().astype("datetime64[D]")
    repeated = pd.Series(dates).duplicated(keep=False).to_numpy()
    if repeated.any():
        raise ValueError(f"{path}: duplicate dates at {_rows(lines, dates, repeated, limit=6)}; keep one row per date")
    values = pd.to_numeric(frame[value_column].str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    missing = ~np.isfinite(values)
    if missing.any():
        raise ValueError(
            f"{path}, column {value_column!r}: missing or non-numeric value(s) at {_rows(lines, dates, missing)};"
            " drop or fill those rows"
        )
    notes = []
    backwards = np.flatnonzero(np.diff(dates) < np.timedelta64(0, "D"))
    if backwards.size:
        first = backwards[0]
        where = f"line {lines[first + 1]} ({dates[first + 1]}) follows line {lines[first]} ({dates[first]})"
        if not sort_dates:
            raise ValueError(f"{path}: dates are not in increasing order: {where}; sort the file or set sort_dates")
        order = np.argsort(dates, kind="stable")
        dates, values, lines = dates[order], values[order], lines[order]
        notes.append(f"{backwards.size} row(s) out of date order (first: {where}); rows sorted by date")
    if price_column is not None:
        bad = values <= 0
        if bad.any():
            where = _rows(lines, dates, bad)
            raise ValueError(f"{path}, column {price_column!r}: prices must be positive; see {where}")
    gaps = _missing_business_days(dates)
    if gaps.size and max_gap_days is not None and gaps.max() > max_gap_days:
        large = np.flatnonzero(gaps > max_gap_days)
        listed = ", ".join(f"{gaps[i]} between {dates[i]} and {dates[i + 1]} (lines {lines[i]}, {lines[i + 1]})"
                           for i in large[:5])
        more = f" and {large.size - 5} more" if large.size > 5 else ""
        raise ValueError(
            f"{path}: business days missing between consecutive dates: {listed}{more}; the limit is "
            f"max_gap_days={max_gap_days} (fill the gap, cut the series, or raise the limit)"
        )
    if gaps.size and gaps.max() > 0:
        widest = int(np.argmax(gaps))
        notes.append(
            f"{np.count_nonzero(gaps)} gap(s) of missing business days (holidays or closures), the widest "
            f"{gaps[widest]} day(s) between {dates[widest]} and {dates[widest + 1]}"
        )
    if price_column is not None:
        returns, prices, start, dates = 100.0 * np.diff(np.log(values)), values[1:], dates[0], dates[1:]
    else:
        returns, prices, start = values, None, None
    if returns.size < min_returns:
        raise ValueError(f"{path}: {returns.size} return(s); at least {min_returns} are needed")
    return ReturnSeries(dates, returns, prices, start, tuple(notes))

"""Real sample data that ships with optional packages."""

from __future__ import annotations

import numpy as np

EXTRA_HINT = "pip install 'fhmv_jax[data]' (or pip install arch)"


def sp500_prices() -> tuple[np.ndarray, np.ndarray]:
    """Daily S&P 500 adjusted closes, 1999-01-04 to 2018-12-31 (5031 trading days).

    The sample of the ``arch`` package (``arch.data.sp500``), read from its installed files
    (no network). ``experiments/export_sp500.py`` writes it as a CSV for ``data=returns``.

    Returns:
        (dates [T] datetime64[D], prices [T]).

    Raises:
        ImportError: ``arch`` is not installed (it is the optional extra ``data``).
    """
    try:
        from arch.data import sp500
    except ImportError as error:
        raise ImportError(f"the S&P 500 sample comes with the optional package arch: {EXTRA_HINT}") from error
    frame = sp500.load()
    return frame.index.to_numpy().astype("datetime64[D]"), frame["Adj Close"].to_numpy(dtype=np.float64)

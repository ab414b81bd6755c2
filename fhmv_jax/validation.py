"""Checks of raw arrays that every layer shares, with messages that name the problem."""

from __future__ import annotations

import numpy as np


def check_finite_rows(name: str, values) -> None:
    """Raise naming the rows that hold NaN or inf: t for [T] or [T, D], (b, t) for [B, T, D]; and the columns.

    Args:
        name: how the message calls the array.
        values: [T], [T, D] or [B, T, D] numbers.

    Raises:
        ValueError: any NaN or inf, with up to five of the rows and every column it occurs in.
    """
    bad = ~np.isfinite(np.asarray(values))
    if not bad.any():
        return
    by_row = bad if bad.ndim == 1 else bad.any(axis=-1)
    rows = [tuple(map(int, i)) if len(i) > 1 else int(i[0]) for i in np.argwhere(by_row)]
    shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
    columns = "" if bad.ndim == 1 else f" (columns {np.flatnonzero(bad.reshape(-1, bad.shape[-1]).any(0)).tolist()})"
    raise ValueError(f"{name} has NaN or inf values in {len(rows)} row(s): {shown}{columns}")

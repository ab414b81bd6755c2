"""Feature processing: causal transforms (log returns, log1p, EWMA) and a train-only Standardizer.

The causal part (``FeatureTransform``) uses only the past, so it may run over a whole
series before the train/test split; its ``FeatureCarry`` continues it exactly on later
data. The ``Standardizer`` is fitted on training rows only and stored with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..validation import check_finite_rows


def log_returns(prices, previous=None, axis: int = 0) -> np.ndarray:
    """r_t = log P_t - log P_{t-1} along the time axis.

    Args:
        prices: positive price levels, time along ``axis``.
        previous: the price(s) before the first step (``prices`` without the time axis); ``None``
            drops the first step (one fewer step out).
        axis: the time axis.

    Returns:
        Log returns, the shape of ``prices`` with one step fewer when ``previous`` is ``None``.
    """
    prices = np.asarray(prices, dtype=np.float64)
    if previous is not None:
        prices = np.concatenate([np.expand_dims(np.asarray(previous, np.float64), axis), prices], axis=axis)
    if not np.all(prices > 0):
        raise ValueError(f"log returns need positive prices; found {np.sum(~(prices > 0))} value(s) <= 0 or NaN")
    return np.diff(np.log(prices), axis=axis)


def ewma(values, span: float, initial=None, axis: int = 0) -> np.ndarray:
    """E_t = a v_t + (1 - a) E_{t-1} along the time axis, a = 2 / (span + 1).

    Args:
        values: time along ``axis``.
        span: in steps, >= 1.
        initial: E_{-1} (``values`` without the time axis); ``None`` starts at E_0 = v_0.
        axis: the time axis.

    Returns:
        The EWMA, shaped like ``values``.
    """
    from scipy.signal import lfilter  # imported here: scipy.signal takes about 1 s, half of fhmv_jax's import

    if not span >= 1:
        raise ValueError(f"an EWMA span must be >= 1 step, got {span}")
    values = np.asarray(values, dtype=np.float64)
    a = 2.0 / (span + 1.0)
    initial = np.take(values, 0, axis=axis) if initial is None else np.asarray(initial, np.float64)
    state = np.expand_dims((1 - a) * initial, axis)
    return lfilter([a], [1.0, a - 1.0], values, axis=axis, zi=state)[0]


class FeatureCarry(NamedTuple):
    """The state a causal transform needs to continue a series.

    Attributes:
        last_raw: [D] (or [B, D]) the last raw row seen.
        ewma: [K] (or [B, K]) the last EWMA value of each of the K ``ewma_spans`` columns.
    """

    last_raw: np.ndarray
    ewma: np.ndarray

    def to_dict(self) -> dict:
        return {"last_raw": self.last_raw.tolist(), "ewma": self.ewma.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureCarry:
        return cls(np.asarray(d["last_raw"], np.float64), np.asarray(d["ewma"], np.float64))


class TransformedRows(NamedTuple):
    """Output of ``FeatureTransform.apply``: features [T', D] and the carry after the last row."""

    features: np.ndarray
    carry: FeatureCarry


class FeatureTransform(NamedTuple):
    """The causal feature transform of DATA.md, as plain (JSON-able) settings.

    Attributes:
        feature_names: [D] raw column names, in order.
        log_return: columns of price levels replaced by their log returns.
        log1p: columns transformed by log(1 + v) (values must exceed -1).
        ewma_spans: (name, span) pairs: columns replaced by their EWMA (after the other
            transforms of that column). Default: Delta with a span of 6 hourly steps.
    """

    feature_names: tuple[str, ...]
    log_return: tuple[str, ...] = ("P",)
    log1p: tuple[str, ...] = ()
    ewma_spans: tuple[tuple[str, float], ...] = (("Delta", 6.0),)

    def _columns(self, names: Sequence[str], setting: str) -> list[int]:
        unknown = [n for n in names if n not in self.feature_names]
        if unknown:
            raise ValueError(f"{setting} names unknown feature(s) {unknown}; features are {list(self.feature_names)}")
        return [self.feature_names.index(n) for n in names]

    def validate(self) -> FeatureTransform:
        """Raise ValueError on unknown or duplicate names, two transforms of a column, spans below one step."""
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"feature names must be unique, got {list(self.feature_names)}")
        self._columns(self.log_return, "log_return")
        self._columns(self.log1p, "log1p")
        both = sorted(set(self.log_return) & set(self.log1p))
        if both:
            raise ValueError(f"features {both} are in both log_return and log1p; choose one transform per column")
        self._columns([n for n, _ in self.ewma_spans], "ewma_spans")
        for name, span in self.ewma_spans:
            if not span >= 1:
                raise ValueError(f"ewma span of {name} must be >= 1 step, got {span}")
        return self

    def _check_carry(self, carry: FeatureCarry, batch: tuple[int, ...]) -> None:
        expected = (batch + (len(self.feature_names),), batch + (len(self.ewma_spans),))
        if (np.shape(carry.last_raw), np.shape(carry.ewma)) != expected:
            raise ValueError(
                f"carry shapes {np.shape(carry.last_raw)}, {np.shape(carry.ewma)} do not fit this data and "
                f"transform; expected {expected[0]}, {expected[1]}"
            )

    def apply(self, raw, carry: FeatureCarry | None = None) -> TransformedRows:
        """Transform raw rows [T, D] (or B series [B, T, D]) causally: row t uses rows <= t only.

        Without ``carry`` the first row is the warm-up of the returns and is dropped
        (T - 1 rows out); with the carry of the preceding rows every row is kept and the
        result equals transforming the joined series.

        Returns:
            ``TransformedRows``: features [T - 1, D] ([T, D] with a carry; [B, ...] for a batch)
            and the carry after the last row.
        """
        self.validate()
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim not in (2, 3) or raw.shape[-1] != len(self.feature_names):
            raise ValueError(
                f"raw data must be [T, {len(self.feature_names)}] or [B, T, {len(self.feature_names)}] "
                f"({list(self.feature_names)}), got shape {raw.shape}"
            )
        if raw.shape[-2] < (2 if carry is None else 1):
            raise ValueError(f"raw data has {raw.shape[-2]} rows; the first row is a warm-up, so at least 2 are needed")
        check_finite_rows("raw data", raw)
        if carry is not None:
            self._check_carry(carry, raw.shape[:-2])
        previous, rows = (raw[..., 0, :], raw[..., 1:, :]) if carry is None else (carry.last_raw, raw)
        out = rows.copy()
        for d in self._columns(self.log_return, "log_return"):
            out[..., d] = log_returns(rows[..., d], previous[..., d], axis=-1)
        for d in self._columns(self.log1p, "log1p"):
            if np.any(rows[..., d] <= -1):
                raise ValueError(f"log1p of feature {self.feature_names[d]!r} needs values > -1")
            out[..., d] = np.log1p(rows[..., d])
        ewma_columns = self._columns([n for n, _ in self.ewma_spans], "ewma_spans")
        for i, (d, (_, span)) in enumerate(zip(ewma_columns, self.ewma_spans, strict=True)):
            out[..., d] = ewma(out[..., d], span, None if carry is None else carry.ewma[..., i], axis=-1)
        return TransformedRows(out, FeatureCarry(raw[..., -1, :].copy(), out[..., -1, ewma_columns].copy()))

    def to_dict(self) -> dict:
        return {
            "feature_names": list(self.feature_names),
            "log_return": list(self.log_return),
            "log1p": list(self.log1p),
            "ewma_spans": [[n, float(s)] for n, s in self.ewma_spans],
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureTransform:
        return cls(
            tuple(d["feature_names"]),
            tuple(d["log_return"]),
            tuple(d["log1p"]),
            tuple((n, float(s)) for n, s in d["ewma_spans"]),
        ).validate()


CONSTANT_TOLERANCE = 1e-12
"""A column whose standard deviation is at most this times max(1, |mean|) counts as constant."""


class Standardizer(NamedTuple):
    """z = (y - mean) / scale with statistics of training rows only.

    Attributes:
        mean: [D] training means.  scale: [D] training standard deviations.
        feature_names: [D] names (for error messages), or empty.
    """

    mean: np.ndarray
    scale: np.ndarray
    feature_names: tuple[str, ...] = ()

    @classmethod
    def fit(cls, y, mask=None, feature_names: Sequence[str] = ()) -> Standardizer:
        """Fit on the training rows of y [T, D] (or [B, T, D]).

        Args:
            y: the data; with no mask every row is a training row.
            mask: optional boolean [T] (or [B, T]): True marks the training rows.
            feature_names: [D] names, used in error messages.

        Raises:
            ValueError: fewer than 2 training rows, NaN/inf rows, or a constant column (named).
        """
        y = np.asarray(y, dtype=np.float64)
        if y.ndim not in (2, 3):
            raise ValueError(f"y must be [T, D] or [B, T, D], got shape {y.shape}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.shape != y.shape[:-1]:
                raise ValueError(f"mask must be boolean of shape {y.shape[:-1]}, got {mask.dtype} {mask.shape}")
        check_finite_rows("training data", y if mask is None else np.where(mask[..., None], y, 0.0))
        rows = y.reshape(-1, y.shape[-1]) if mask is None else y[mask]
        if rows.shape[0] < 2:
            raise ValueError(f"a Standardizer needs at least 2 training rows, got {rows.shape[0]}")
        mean, scale = rows.mean(axis=0), rows.std(axis=0)
        constant = np.flatnonzero(scale <= CONSTANT_TOLERANCE * np.maximum(1.0, np.abs(mean)))
        names = tuple(feature_names)
        if names and len(names) != y.shape[-1]:
            raise ValueError(f"{len(names)} feature names for {y.shape[-1]} columns")
        if constant.size:
            labels = [f"{d} ({names[d]})" if names else str(d) for d in constant]
            raise ValueError(f"constant column(s) in the training data cannot be standardised: {', '.join(labels)}")
        return cls(mean, scale, names)

    @classmethod
    def identity(cls, num_features: int, feature_names: Sequence[str] = ()) -> Standardizer:
        """The Standardizer that leaves data as it is (mean 0, scale 1): for data kept in its own units."""
        names = tuple(feature_names)
        if names and len(names) != num_features:
            raise ValueError(f"{len(names)} feature names for {num_features} columns")
        return cls(np.zeros(num_features), np.ones(num_features), names)

    def _check(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if y.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"data has {y.shape[-1]} features but the Standardizer was fitted on {self.mean.shape[0]}")
        check_finite_rows("data", y)
        return y

    def transform(self, y) -> np.ndarray:
        """(y - mean) / scale, for any [..., D]."""
        return (self._check(y) - self.mean) / self.scale

    def inverse_transform(self, z) -> np.ndarray:
        """z * scale + mean, for any [..., D]."""
        return self._check(z) * self.scale + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "feature_names": list(self.feature_names)}

    @classmethod
    def from_dict(cls, d: dict) -> Standardizer:
        """Rebuild from ``to_dict`` output, checking shapes and values."""
        mean, scale = np.asarray(d["mean"], np.float64), np.asarray(d["scale"], np.float64)
        names = tuple(d.get("feature_names", ()))
        if mean.ndim != 1 or mean.shape != scale.shape or (names and len(names) != mean.size):
            raise ValueError(f"inconsistent Standardizer: mean {mean.shape}, scale {scale.shape}, {len(names)} names")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError("a Standardizer needs finite means and positive finite scales")
        return cls(mean, scale, names)

"""Validation of a model's inputs, run outside jit on concrete arrays, with messages that name the problem."""

from __future__ import annotations

import jax
import numpy as np

from ..validation import check_finite_rows
from .params import as_array
from .spec import ModelSpec


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_feature_count(spec: ModelSpec, num_features: int) -> None:
    """Raise unless observations have the spec's number of features."""
    if num_features != spec.num_features:
        raise ValueError(f"y has {num_features} features but the model expects num_features={spec.num_features}")


def missing_driver(spec: ModelSpec) -> ValueError:
    """The error for a leverage mode that needs a driver when none is given or named."""
    return ValueError(
        f"leverage={spec.leverage!r} needs a driver: pass x (shape [T]) or set ModelSpec.driver_feature"
    )


def check_observations(spec: ModelSpec, y, x=None, *, dtype=None, min_steps: int = 1):
    """Validate observations and the driver; return them as arrays of ``dtype``.

    Args:
        spec: the model spec (feature count, leverage mode, driver feature).
        y: [T, D] observations.
        x: optional [T] driver; taken from ``y[:, spec.driver_feature]`` when omitted and the
            spec names a driver feature.
        dtype: the model's float dtype.
        min_steps: the fewest time steps accepted.

    Returns:
        (y, x) with x ``None`` when the leverage mode needs no driver.

    Raises:
        ValueError: wrong rank, shape or feature count; too few steps; NaN or inf; a missing
            driver for a leverage mode that needs one.
    """
    y = as_array(y, dtype)
    if y.ndim != 2:
        raise ValueError(f"y must be a [T, D] array of observations, got shape {y.shape}")
    num_steps, num_features = y.shape
    check_feature_count(spec, num_features)
    if num_steps < min_steps:
        raise ValueError(f"y has {num_steps} time steps; at least {min_steps} are needed")
    if not _is_traced(y):
        check_finite_rows("y", np.asarray(y))
    if not spec.needs_driver:
        return y, None
    if x is None:
        if spec.driver_feature is None:
            raise missing_driver(spec)
        return y, y[:, spec.driver_feature]
    x = as_array(x, dtype)
    if x.shape != (num_steps,):
        raise ValueError(f"driver x must have shape ({num_steps},) to match y, got {x.shape}")
    if not _is_traced(x):
        check_finite_rows("x", np.asarray(x))
    return y, x


def check_sequences(spec: ModelSpec, y, x=None, lengths=None, *, dtype=None, min_steps: int = 2):
    """Validate one sequence [T, D] or a padded batch [B, T, D] for training.

    Args:
        spec: the model spec.
        y: [T, D] or [B, T, D] observations; in a batch, steps at or beyond a sequence's
            length are padding and may hold anything, NaN included.
        x: optional driver [T] or [B, T].
        lengths: [B] valid steps per sequence (default: all T).
        dtype: the model's float dtype.
        min_steps: the fewest valid steps a sequence may have.

    Returns:
        (y [B, T, D], x [B, T] or None, mask [B, T]) with padding zeroed.

    Raises:
        ValueError: as ``check_observations``, per sequence, plus bad lengths.
    """
    y = np.asarray(y, dtype=np.float64 if dtype is None else dtype)
    if y.ndim == 2:
        y = y[None]
        x = None if x is None else np.asarray(x)[None]
    if y.ndim != 3:
        raise ValueError(f"y must be [T, D] or a batch [B, T, D], got shape {y.shape}")
    B, T, D = y.shape
    check_feature_count(spec, D)
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be {B} integers (one per sequence), got {lengths!r}")
    if np.any(lengths > T):
        raise ValueError(f"lengths must not exceed the padded length {T}, got max {lengths.max()}")
    mask = np.arange(T)[None, :] < lengths[:, None]
    if spec.needs_driver and x is None:
        if spec.driver_feature is None:
            raise missing_driver(spec)
        x = y[..., spec.driver_feature]
    elif not spec.needs_driver:
        x = None
    if x is not None:
        x = np.asarray(x, dtype=y.dtype)
        if x.shape != (B, T):
            raise ValueError(f"driver x must have shape {(B, T) if B > 1 else (T,)} to match y, got {x.shape}")
    for b in range(B):
        prefix = f"sequence {b}: " if B > 1 else ""
        if lengths[b] < min_steps:
            raise ValueError(f"{prefix}y has {lengths[b]} time steps; at least {min_steps} are needed")
        try:
            check_finite_rows("y", y[b, : lengths[b]])
            if x is not None:
                check_finite_rows("x", x[b, : lengths[b]])
        except ValueError as error:
            raise ValueError(prefix + str(error)) from None
    y = np.where(mask[..., None], y, 0.0)
    x = None if x is None else np.where(mask, x, 0.0)
    return as_array(y, dtype), as_array(x, dtype), as_array(mask)


def check_observation_row(spec: ModelSpec, y_t, x_t=None, *, dtype=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate one observation [D] and its driver (a scalar) on the host, as ``check_observations`` does a block.

    Returns:
        (y_t, x_t) with x_t ``None`` when the leverage mode needs no driver (else taken from
        ``y_t[spec.driver_feature]`` when omitted).
    """
    y_t = np.asarray(y_t, dtype=dtype)
    if y_t.ndim != 1:
        raise ValueError(f"y_t must be one observation of shape [D], got shape {y_t.shape}")
    check_feature_count(spec, y_t.shape[0])
    check_finite_rows("y_t", y_t[None])
    if not spec.needs_driver:
        return y_t, None
    if x_t is None:
        if spec.driver_feature is None:
            raise missing_driver(spec)
        return y_t, np.asarray(y_t[spec.driver_feature])
    x_t = np.asarray(x_t, dtype=dtype)
    if x_t.ndim != 0:
        raise ValueError(f"driver x_t must be a scalar, got shape {x_t.shape}")
    check_finite_rows("x_t", x_t[None])
    return y_t, x_t

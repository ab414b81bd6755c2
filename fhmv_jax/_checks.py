"""Input validation, run outside jit on concrete arrays, with messages that name the problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .model.spec import ModelSpec


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _non_finite_rows(name: str, values: np.ndarray) -> None:
    """Raise naming the rows holding NaN or inf: t for [T] or [T, D], (b, t) for [B, T, D]; and the columns."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    by_row = bad if bad.ndim == 1 else bad.any(axis=-1)
    rows = [tuple(map(int, i)) if len(i) > 1 else int(i[0]) for i in np.argwhere(by_row)]
    shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
    columns = "" if bad.ndim == 1 else f" (columns {np.flatnonzero(bad.reshape(-1, bad.shape[-1]).any(0)).tolist()})"
    raise ValueError(f"{name} has NaN or inf values in {len(rows)} row(s): {shown}{columns}")


def _check_feature_count(spec: ModelSpec, num_features: int) -> None:
    if num_features != spec.num_features:
        raise ValueError(f"y has {num_features} features but the model expects num_features={spec.num_features}")


def _missing_driver(spec: ModelSpec) -> ValueError:
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
    y = jnp.asarray(y, dtype=dtype)
    if y.ndim != 2:
        raise ValueError(f"y must be a [T, D] array of observations, got shape {y.shape}")
    num_steps, num_features = y.shape
    _check_feature_count(spec, num_features)
    if num_steps < min_steps:
        raise ValueError(f"y has {num_steps} time steps; at least {min_steps} are needed")
    if not _is_traced(y):
        _non_finite_rows("y", np.asarray(y))
    if not spec.needs_driver:
        return y, None
    if x is None:
        if spec.driver_feature is None:
            raise _missing_driver(spec)
        return y, y[:, spec.driver_feature]
    x = jnp.asarray(x, dtype=dtype)
    if x.shape != (num_steps,):
        raise ValueError(f"driver x must have shape ({num_steps},) to match y, got {x.shape}")
    if not _is_traced(x):
        _non_finite_rows("x", np.asarray(x))
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
    _check_feature_count(spec, D)
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths must be {B} integers (one per sequence), got {lengths!r}")
    if np.any(lengths > T):
        raise ValueError(f"lengths must not exceed the padded length {T}, got max {lengths.max()}")
    mask = np.arange(T)[None, :] < lengths[:, None]
    if spec.needs_driver and x is None:
        if spec.driver_feature is None:
            raise _missing_driver(spec)
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
            _non_finite_rows("y", y[b, : lengths[b]])
            if x is not None:
                _non_finite_rows("x", x[b, : lengths[b]])
        except ValueError as error:
            raise ValueError(prefix + str(error)) from None
    y = np.where(mask[..., None], y, 0.0)
    x = None if x is None else np.where(mask, x, 0.0)
    return jnp.asarray(y, dtype=dtype), None if x is None else jnp.asarray(x, dtype=dtype), jnp.asarray(mask)

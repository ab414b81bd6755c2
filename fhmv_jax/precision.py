"""Floating-point precision: float64 is the documented default for fitting, switched on explicitly.

Importing ``fhmv_jax`` changes no JAX setting. Call ``enable_x64()`` once, before creating
arrays or models, to fit in float64 (what the tests, the entry points and the README examples
do); without it JAX computes in float32, which suits GPUs. EM in float32 on a CPU works but its
monotonicity holds only to float32 rounding, so ``fit_em`` warns about it. docs/float32.md gives the
measured agreement of float32 with float64 (E-step statistics, fits) and when to use which.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp


def enable_x64() -> None:
    """Make float64 JAX's default dtype (``jax_enable_x64``), for this process."""
    jax.config.update("jax_enable_x64", True)


def warn_if_float32_on_cpu(dtype, what: str) -> None:
    """Warn that ``what`` runs in float32 on a CPU, where float64 costs little and keeps EM monotone.

    Args:
        dtype: the model's parameter dtype.
        what: the operation, for the message.
    """
    if jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu":
        warnings.warn(
            f"{what} runs in float32 on the CPU: its log-likelihood is monotone only to float32 rounding. Call"
            " fhmv_jax.enable_x64() before building the model to fit in float64 (the library's default on CPU),"
            " or cast it with model.astype(jnp.float64).",
            UserWarning,
            stacklevel=3,
        )

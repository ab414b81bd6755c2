"""fhmv_jax: factorial hidden Markov volatility models for market-regime detection, in JAX.

Float64 is enabled on import (the library's default on CPU); set the environment variable
``FHMV_JAX_ENABLE_X64=0`` before importing to keep JAX's float32 default, e.g. on GPUs, or
cast a model with ``FHMV.astype(jnp.float32)``.
"""

import os

import jax

if os.environ.get("FHMV_JAX_ENABLE_X64", "1") != "0":
    jax.config.update("jax_enable_x64", True)

from .model import FHMV, Factors, FHMVParams, FilterResult, ModelSpec, Sample, SmoothResult  # noqa: E402
from .em import FitResult, em_step, fit_em, init_model  # noqa: E402
from .data import Standardizer  # noqa: E402
from .io import ModelFileError, SavedModel, load, save  # noqa: E402
from .predict import RegimePrediction, predict_regimes  # noqa: E402
from .streaming import StreamOutput, StreamState, init_stream, stream_filter, stream_step  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "FHMV",
    "FHMVParams",
    "Factors",
    "FilterResult",
    "FitResult",
    "ModelFileError",
    "ModelSpec",
    "RegimePrediction",
    "Sample",
    "SavedModel",
    "SmoothResult",
    "Standardizer",
    "StreamOutput",
    "StreamState",
    "__version__",
    "em_step",
    "fit_em",
    "init_model",
    "init_stream",
    "load",
    "predict_regimes",
    "save",
    "stream_filter",
    "stream_step",
]

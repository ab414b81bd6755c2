"""fhmv_jax: factorial hidden Markov volatility models for market-regime detection, in JAX.

Importing the package changes no JAX setting. Fitting is documented and tested in float64:
call ``fhmv_jax.enable_x64()`` first (the entry points and README examples do); without it
JAX computes in float32, the usual choice on GPUs (``FHMV.astype`` casts a model).
"""

from ._version import __version__
from .data import Standardizer
from .diagnostics import (
    InformationCriteria,
    Score,
    StandardErrors,
    hessian,
    information_criteria,
    score,
    standard_errors,
)
from .em import FitResult, em_step, fit_em, fit_gradient, init_model
from .eval import RegimePrediction, predict_regimes
from .io import ModelFileError, SavedModel, load, save
from .model import (
    FHMV,
    Factors,
    FilterResult,
    ModelSpec,
    Sample,
    SmoothResult,
    StreamOutput,
    StreamState,
    init_stream,
    stream_filter,
    stream_step,
)
from .precision import enable_x64

__all__ = [
    "FHMV",
    "Factors",
    "FilterResult",
    "FitResult",
    "InformationCriteria",
    "ModelFileError",
    "ModelSpec",
    "RegimePrediction",
    "Sample",
    "Score",
    "SavedModel",
    "SmoothResult",
    "StandardErrors",
    "Standardizer",
    "StreamOutput",
    "StreamState",
    "__version__",
    "em_step",
    "enable_x64",
    "fit_em",
    "fit_gradient",
    "hessian",
    "information_criteria",
    "init_model",
    "init_stream",
    "load",
    "predict_regimes",
    "save",
    "score",
    "standard_errors",
    "stream_filter",
    "stream_step",
]

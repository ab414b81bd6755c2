"""The FHMV model: spec, parameters, factors, emissions and the Equinox module."""

from .examples import example_model
from .fhmv import FHMV, Factors, FilterResult, InferenceInputs, Sample, SmoothResult, inference_inputs
from .params import FHMVParams
from .spec import ModelSpec

__all__ = [
    "FHMV",
    "FHMVParams",
    "Factors",
    "FilterResult",
    "InferenceInputs",
    "ModelSpec",
    "Sample",
    "SmoothResult",
    "example_model",
    "inference_inputs",
]

"""The FHMV model: spec, parameters, factors, emissions and the Equinox module."""

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
    "inference_inputs",
]

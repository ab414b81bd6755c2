"""The FHMV model: spec, parameter blocks, emissions, the Equinox module, its read-outs and streaming."""

from .emissions import StudentTMixture
from .examples import example_model
from .factors import JumpChain, MarkovLeverage, NoLeverage, PersistenceChains, PredictableLeverage, RegimeChain
from .fhmv import FHMV, Factors, FilterResult, Sample, SequenceInputs, SmoothResult, sequence_inputs
from .spec import ModelSpec
from .streaming import StreamOutput, StreamState, init_stream, stream_filter, stream_step

__all__ = [
    "FHMV",
    "Factors",
    "FilterResult",
    "JumpChain",
    "MarkovLeverage",
    "ModelSpec",
    "NoLeverage",
    "PersistenceChains",
    "PredictableLeverage",
    "RegimeChain",
    "Sample",
    "SequenceInputs",
    "SmoothResult",
    "StreamOutput",
    "StreamState",
    "StudentTMixture",
    "example_model",
    "init_stream",
    "sequence_inputs",
    "stream_filter",
    "stream_step",
]

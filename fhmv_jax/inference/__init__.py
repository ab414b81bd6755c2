"""Exact inference over a factorial state tensor; every routine takes arrays, not models.

One core: the primitives of ``_ops`` (predict, condition, backward step, max-product step),
composed by the sequential backend's scans (``filter.forward_scan``, ``smoother.backward_scan``,
``viterbi``) and driven block by block over masked sequences by ``blocked``.
"""

from .blocked import (
    BlockPosterior,
    FilterPosterior,
    Posterior,
    SmootherPosterior,
    forward_backward,
    forward_filter,
    smoother,
)
from .filter import forward_scan
from .parallel import METHODS, auto_method, check_method
from .viterbi import most_likely_states

__all__ = [
    "METHODS",
    "BlockPosterior",
    "FilterPosterior",
    "Posterior",
    "SmootherPosterior",
    "auto_method",
    "check_method",
    "forward_backward",
    "forward_filter",
    "forward_scan",
    "most_likely_states",
    "smoother",
]

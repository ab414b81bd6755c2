"""Exact inference over a factorial state tensor; every routine takes arrays, not models."""

from .filter import FilterPosterior, forward_filter
from .smoother import SmootherPosterior, backward_pass, backward_step, smoother
from .viterbi import most_likely_states

__all__ = [
    "FilterPosterior",
    "SmootherPosterior",
    "backward_pass",
    "backward_step",
    "forward_filter",
    "most_likely_states",
    "smoother",
]

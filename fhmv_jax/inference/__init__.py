"""Exact inference over a factorial state tensor; every routine takes arrays, not models."""

from .filter import FilterPosterior, forward_filter
from .smoother import SmootherPosterior, backward_filter, smoother, two_slice_marginals
from .viterbi import most_likely_states

__all__ = [
    "FilterPosterior",
    "SmootherPosterior",
    "backward_filter",
    "forward_filter",
    "most_likely_states",
    "smoother",
    "two_slice_marginals",
]

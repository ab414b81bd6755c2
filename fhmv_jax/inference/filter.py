"""The forward recursion of the sequential backend, with a carried predicted law.

The same scan filters a whole sequence (from the law of h_1), one block of a longer one
(``blocked``) and a live stream (from the law carried over from the previous block).
"""

from __future__ import annotations

import jax

from .._types import Array, Float
from ._ops import Transitions, at_step, condition, predict, time_varying, unroll


def forward_scan(
    predicted: Array,
    transitions: Transitions,
    scaled: Float[Array, "L ..."],
    outgoing: tuple[Array, ...] | None = None,
    *,
    with_predicted: bool = False,
) -> tuple[Array, Float[Array, "L ..."], Float[Array, " L"]] | tuple[Array, Array, Array, Array]:
    """The scaled forward recursion (Rabiner 1989) over L consecutive steps.

    alpha_t = (pred_t * b_t) / c_t with c_t = sum_h pred_t(h) b_t(h); pred_{t+1} = alpha_t P_t, one
    factor's matrix at a time. With b_t scaled by exp(-m_t), log p(y_t | y_{1:t-1}) = log c_t + m_t.

    Args:
        predicted: [*shape] P(h_t | y_{1:t-1}) at the first step (the law of h_1 at the start).
        transitions: one matrix per axis; the time-varying ones are taken from ``outgoing``.
        scaled: [L, *shape] p(y_t | h_t) / exp(m_t).
        outgoing: each time-varying matrix from each step to the next, [L, n, n] (default: those of
            ``transitions``, which then cover exactly the L steps).

        with_predicted: also return the predicted laws [L, *shape] P(h_t | y_{1:t-1}) of the L steps.

    Returns:
        (the predicted law of the step after the last, filtered [L, *shape], normalisers [L] c_t[,
        predicted [L, *shape]]).
    """

    outgoing = time_varying(transitions) if outgoing is None else outgoing

    def _step(predicted, inputs):
        b_t, matrices_t = inputs
        filtered, normaliser = condition(predicted, b_t)
        out = (filtered, normaliser, predicted) if with_predicted else (filtered, normaliser)
        return predict(filtered, at_step(transitions, matrices_t)), out

    predicted, out = jax.lax.scan(_step, predicted, (scaled, outgoing), unroll=unroll(scaled.shape))
    return (predicted, *out)

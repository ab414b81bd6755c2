"""Diagnostics of a fitted model: information criteria for choosing a model's size.

n in BIC and HQIC counts the observed time steps (all sequences together), as statsmodels' Markov-switching
models do: a step's D features are one observation of a dependent series, not D independent ones.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

from .em.loop import batch_objective
from .em.m_step import CovariancePrior
from .model.fhmv import FHMV
from .model.inputs import check_sequences


class InformationCriteria(NamedTuple):
    """The fit's log-likelihood and the information criteria derived from it (lower is better).

    Attributes:
        log_likelihood: log p(y) summed over sequences, without the covariance prior.
        num_parameters: k, the model's free scalar parameters (``FHMV.num_free_parameters``: ties, fixed and
            implied parameters respected).
        num_observations: n, the observed time steps.
        aic: -2 log L + 2 k.
        bic: -2 log L + k log n.
        hqic: -2 log L + 2 k log log n.
    """

    log_likelihood: float
    num_parameters: int
    num_observations: int
    aic: float
    bic: float
    hqic: float

    def to_dict(self) -> dict[str, float | int]:
        return self._asdict()


def criteria(log_likelihood: float, num_parameters: int, num_observations: int) -> InformationCriteria:
    """AIC, BIC and HQIC of a log-likelihood with k parameters on n > e observations."""
    if num_observations < 3:
        raise ValueError(f"information criteria need at least 3 observed steps, got {num_observations}")
    deviance, k, n = -2.0 * log_likelihood, num_parameters, num_observations
    return InformationCriteria(log_likelihood, k, n, deviance + 2 * k, deviance + k * math.log(n),
                               deviance + 2 * k * math.log(math.log(n)))


def information_criteria(model: FHMV, y, x=None, *, lengths=None) -> InformationCriteria:
    """The information criteria of ``model`` on one sequence [T, D] or a padded batch [B, T, D].

    Args:
        model: the fitted model.
        y: [T, D] or [B, T, D] observations (steps beyond a sequence's length are padding).
        x: the driver [T] or [B, T], for leverage modes that need one.
        lengths: [B] valid steps per sequence (default: all T).

    Raises:
        ValueError: as ``fit_em`` on bad input (NaN or inf rows, wrong shapes or feature counts).
    """
    ys, xs, mask = check_sequences(model.spec, y, x, lengths, dtype=model.dtype)
    none = CovariancePrior(jnp.zeros((), model.dtype), jnp.zeros((), model.dtype))
    log_likelihood = float(batch_objective(model, ys, xs, mask, none).log_likelihood)
    return criteria(log_likelihood, model.num_free_parameters, int(mask.sum()))

"""Is a fit a maximum? The score of the penalised log-likelihood and the gain a Newton step would still make.

EM's own stopping rule (the gain of one iteration) stops early where EM crawls: along directions
where the E-step cannot tell two parameters apart (a jump probability against the jump size) one
iteration gains little while many would gain much. ``check_score`` measures what is left instead:
the gradient in the unconstrained coordinates (``FHMV.raw_arrays``) and the gain of a Newton step: over
every coordinate for small models, else restricted to one direction per parameter array (the score's
part in that array), which misses the slow directions inside an array. The curvature
in those directions comes from forward differences of the gradient (one more gradient per direction), so no
second program is compiled; its relative error, O(h) with h = 1e-6 in float64, is far below what the
predicted gain is compared with.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .._types import Array, Scalar
from ..model.fhmv import FHMV
from .loop import batch_objective
from .m_step import CovariancePrior
from .sharding import on_mesh, replicate


class ScoreCheck(NamedTuple):
    """The state of a fit's first-order conditions.

    Attributes:
        score: {unconstrained array name: gradient of the penalised log-likelihood}, unused and fixed arrays
            (those not in ``FHMV.free_arrays``) left out.
        norm: the score's norm.
        remaining_gain: the gain per step that a Newton step in the span of the per-array score parts
            predicts (0.5 g^T (-H)^{-1} g there); ``inf`` where the curvature says the point is no maximum.
    """

    score: dict[str, np.ndarray]
    norm: float
    remaining_gain: float


def _penalised(raw: dict[str, Array | None], spec, y: Array, x: Array | None, mask: Array, prior: CovariancePrior,
               block_steps: int | None, method: str = "sequential", batch_chunk: int | None = None,
               mesh: Mesh | None = None) -> Scalar:
    """The penalised log-likelihood as a function of the unconstrained arrays ``raw`` (``FHMV.raw_arrays``)."""
    info = batch_objective(FHMV.from_raw_arrays(spec, raw), y, x, mask, prior, block_steps, method, batch_chunk, mesh,
                           scored=True)
    return info.log_likelihood + info.log_prior


_score = eqx.filter_jit(eqx.filter_grad(_penalised))
_CURVATURE_FLOOR = 1e-10


def _difference_step(dtype) -> float:
    """The forward-difference step in unconstrained coordinates: above sqrt(eps), since a gradient summed over
    T steps carries rounding of about T eps."""
    return 1e-6 if dtype == jnp.float64 else 1e-3


_FULL_DIRECTIONS = 64
"""Up to this many free coordinates, every coordinate is a direction (the whole Newton step)."""


def _directions(score: dict[str, Array], names: list[str]) -> list[dict[str, Array]]:
    """Unit directions {array name: direction part}: every coordinate that carries score when there are at most
    ``_FULL_DIRECTIONS`` of them, else the score's part in each array."""
    sizes = {k: int(np.size(score[k])) for k in names}
    if sum(sizes.values()) <= _FULL_DIRECTIONS:
        directions = []
        for k in names:
            flat = np.ravel(np.asarray(score[k]))
            for i in np.flatnonzero(flat != 0.0):
                unit = np.zeros_like(flat)
                unit[i] = 1.0
                directions.append({k: unit.reshape(np.shape(score[k]))})
        return directions
    parts = {k: np.asarray(score[k]) for k in names}
    return [{k: part / np.sqrt(np.sum(part**2))} for k, part in parts.items() if np.sum(part**2) > 0]


def _flatten(arrays: dict[str, Array], names: list[str]) -> np.ndarray:
    """The arrays ``names`` of ``arrays``, each raveled, as one flat float64 host vector [sum of their sizes]."""
    return np.concatenate([np.ravel(np.asarray(arrays[k], np.float64)) for k in names])


def check_score(model: FHMV, y: Array, x: Array | None, mask: Array, prior: CovariancePrior, *,
                block_steps: int | None = None, method: str = "sequential", batch_chunk: int | None = None,
                mesh: Mesh | None = None) -> ScoreCheck:
    """The score of ``model`` on padded sequences and the gain per step a Newton step would still make.

    The directions d_k are the coordinates that carry score (small models, up to 64 of them: the full Newton
    step) or the score's part in each array (normalised). The restricted Hessian H_kl = d_k^T H d_l comes from
    H d_k = (g(theta + h d_k) - g(theta)) / h; its eigenvalues below 1e-10 of the largest are
    raised to that floor, so a flat or upward direction that still carries score counts as a large gain.

    ``block_steps``, ``method``, ``batch_chunk`` and ``mesh`` are the options of the objective (``em_step``'s);
    with a mesh, y, x and mask are sharded over it (``sharding.shard_sequences``).
    """
    spec, raw, free = model.spec, model.raw_arrays(), model.free_arrays()
    prior = prior if mesh is None else replicate(prior, mesh)
    score_of = on_mesh(_score, mesh)

    def gradient(point):
        score = score_of(point, spec, y, x, mask, prior, block_steps, method, batch_chunk, mesh)
        return {k: g for k, g in score.items() if k in free}

    score = gradient(raw)
    names = list(score)
    flat_score = _flatten(score, names) if names else np.zeros(0)
    norm = float(np.linalg.norm(flat_score))
    if not np.isfinite(norm):
        return ScoreCheck({k: np.asarray(g) for k, g in score.items()}, norm, float("inf"))
    directions = _directions(score, names)
    h = _difference_step(model.dtype)
    zeros = {k: np.zeros(np.shape(score[k])) for k in names}
    basis = np.stack([_flatten(zeros | d, names) for d in directions]) if directions else np.zeros((0, 0))
    host = {k: np.asarray(raw[k]) for k in names}
    columns = []
    for direction in directions:
        moved = gradient({k: host[k] + h * direction[k] if k in direction else raw[k] for k in raw})
        columns.append(basis @ (_flatten(moved, names) - flat_score) / h)
    remaining = 0.0
    if directions:
        slopes = basis @ flat_score
        hessian = np.asarray(columns)
        eigvals, eigvecs = np.linalg.eigh(-0.5 * (hessian + hessian.T))
        floor = _CURVATURE_FLOOR * max(float(np.max(np.abs(eigvals))), np.finfo(float).tiny)
        coefficients = eigvecs.T @ slopes
        remaining = 0.5 * float(np.sum(coefficients**2 / np.maximum(eigvals, floor))) / int(mask.sum())
    return ScoreCheck({k: np.asarray(g) for k, g in score.items()}, norm, remaining)

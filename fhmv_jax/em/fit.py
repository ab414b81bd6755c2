"""The ECM loop: jitted ``em_step`` (vmapped over sequences and restarts) and ``fit_em``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_sequences
from .._types import Array, Float, PRNGKeyArray, Scalar
from ..model.fhmv import FHMV
from ..model.params import natural_parameters
from .init import init_model
from .m_step import CovariancePrior, log_prior, m_step
from .stats import batch_e_step, padded_forward


class StepInfo(NamedTuple):
    """What one EM step saw of the model it started from.

    Attributes:
        log_likelihood: log p(y) summed over sequences.
        log_prior: the covariance penalty; EM never lowers ``log_likelihood + log_prior``.
    """

    log_likelihood: Scalar
    log_prior: Scalar


class FitResult(NamedTuple):
    """Outcome of ``fit_em``.

    Attributes:
        model: the fitted model (the best restart).
        log_likelihoods: [num_iters + 1] log p(y) after 0, 1, ..., num_iters EM iterations.
        converged: whether the gain in mean per-step log-likelihood fell below ``tol``.
        num_iters: EM iterations run.
        objectives: [num_iters + 1] log-likelihood plus covariance log-prior (never decreases).
        restart_log_likelihoods: [R] final log-likelihood of every restart.
    """

    model: FHMV
    log_likelihoods: np.ndarray
    converged: bool
    num_iters: int
    objectives: np.ndarray
    restart_log_likelihoods: np.ndarray


class IterationInfo(NamedTuple):
    """Progress of one EM iteration, passed to the ``callback`` of ``fit_em``."""

    iteration: int
    log_likelihood: float
    gain_per_step: float
    seconds: float
    num_restarts: int


def print_progress(info: IterationInfo) -> None:
    """Default progress line; pass ``callback=None`` to ``fit_em`` to silence it."""
    gain = "" if info.iteration == 0 else f"  gain/step {info.gain_per_step:+.3e}"
    best = " (best of %d restarts)" % info.num_restarts if info.num_restarts > 1 else ""
    print(f"EM iter {info.iteration:3d}  log-lik {info.log_likelihood:.6f}{gain}  {info.seconds:.2f}s{best}", flush=True)


def _em_step(model: FHMV, y: Array, x: Array | None, mask: Array, prior: CovariancePrior) -> tuple[FHMV, StepInfo]:
    """One ECM iteration on padded sequences (``em_step`` is this, jitted once per shape).

    Args:
        model: the current model.
        y: [B, T, D] observations, padding zeroed; x: [B, T] driver or None; mask: [B, T] valid steps.
        prior: the covariance prior.

    Returns:
        (new model, ``StepInfo`` of the input model).
    """
    stats = batch_e_step(model.spec, model.params, y, x, mask)
    params = m_step(model.spec, model.params, stats, y, x, prior)
    info = StepInfo(jnp.sum(stats.log_likelihood), log_prior(model.params, prior))
    return FHMV(model.spec, params), info


em_step = eqx.filter_jit(_em_step)
_em_step_restarts = eqx.filter_jit(eqx.filter_vmap(_em_step, in_axes=(0, None, None, None, None)))


def _objective(model: FHMV, y: Array, x: Array | None, mask: Array, prior: CovariancePrior) -> StepInfo:
    natural = natural_parameters(model.spec, model.params)

    def sequence(yb, xb, mb):
        return padded_forward(model.spec, model.params, natural, yb, xb, mb)[2].marginal_loglik

    return StepInfo(jnp.sum(jax.vmap(sequence)(y, x, mask)), log_prior(model.params, prior))


_objective_single = eqx.filter_jit(_objective)
_objective_restarts = eqx.filter_jit(eqx.filter_vmap(_objective, in_axes=(0, None, None, None, None)))


def _stack(models: list[FHMV]) -> FHMV:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *models)


def _decrease_tolerance(objective: np.ndarray, dtype) -> np.ndarray:
    relative = 1e-9 if dtype == jnp.float64 else 1e-4
    return relative * np.abs(objective) + relative


def fit_em(
    model: FHMV,
    y: Float[Array, "T D"] | Float[Array, "B T D"],
    x: Float[Array, " T"] | Float[Array, "B T"] | None = None,
    *,
    lengths=None,
    max_iters: int = 50,
    tol: float = 1e-4,
    num_restarts: int = 1,
    key: PRNGKeyArray | None = None,
    covariance_ridge: float = 1e-2,
    covariance_prior_count: float = 1e-2,
    callback: Callable[[IterationInfo], None] | None = print_progress,
) -> FitResult:
    """Fit every parameter by ECM (MODEL.md sections 4-6).

    Args:
        model: the starting point (``init_model``, or a previous fit for a warm start).
        y: [T, D] or a padded batch [B, T, D].
        x: driver [T] or [B, T] when the leverage mode needs one (else taken from
            ``spec.driver_feature``).
        lengths: [B] valid steps per sequence; padding never affects the result.
        max_iters: the most EM iterations.
        tol: stop when the gain in mean per-step log-likelihood is below this.
        num_restarts: restart 0 starts from ``model``, the others from ``init_model`` with
            new k-means seeds drawn from ``key``; all run vmapped and the best final
            penalised log-likelihood wins.
        key: PRNG key for the restarts.
        covariance_ridge, covariance_prior_count: the inverse-Wishart ridge
            Sigma = (S + ridge I) / (n + count) that keeps covariances positive definite.
        callback: called with an ``IterationInfo`` after every iteration; ``None`` is silent.

    Returns:
        ``FitResult``.

    Raises:
        ValueError: bad observations (see ``check_sequences``), ``max_iters < 1``,
            ``num_restarts < 1`` or restarts without a key.
        RuntimeError: the penalised log-likelihood decreased beyond rounding (a bug).
    """
    if max_iters < 1 or num_restarts < 1:
        raise ValueError(f"max_iters and num_restarts must be >= 1, got {max_iters} and {num_restarts}")
    spec, dtype = model.spec, model.params.dtype
    y, x, mask = check_sequences(spec, y, x, lengths, dtype=dtype)
    num_steps = int(mask.sum())
    prior = CovariancePrior(jnp.asarray(covariance_ridge, dtype), jnp.asarray(covariance_prior_count, dtype))
    if num_restarts > 1:
        if key is None:
            raise ValueError("num_restarts > 1 needs a PRNG key for the new initialisations")
        keys = jax.random.split(key, num_restarts - 1)
        starts = [model] + [init_model(k, spec, y, x, lengths=mask.sum(1)).astype(dtype) for k in keys]
        model = _stack(starts)
        step, evaluate = _em_step_restarts, _objective_restarts
    else:
        step, evaluate = em_step, _objective_single

    log_liks, objectives = [], []
    converged = False
    start = time.perf_counter()
    for iteration in range(max_iters + 1):
        if iteration < max_iters:
            new_model, info = step(model, y, x, mask, prior)
        else:
            info = evaluate(model, y, x, mask, prior)
        log_lik = np.atleast_1d(np.asarray(info.log_likelihood, np.float64))
        objective = log_lik + np.atleast_1d(np.asarray(info.log_prior, np.float64))
        if objectives:
            drop = objectives[-1] - objective
            if np.any(drop > _decrease_tolerance(objective, dtype)):
                worst = int(np.argmax(drop))
                raise RuntimeError(
                    f"EM decreased the penalised log-likelihood by {drop[worst]:.3e} at iteration {iteration}"
                    f" (restart {worst}): an ECM step is not monotone"
                )
        log_liks.append(log_lik)
        objectives.append(objective)
        gain = (objective - objectives[-2]) / num_steps if len(objectives) > 1 else np.full_like(objective, np.inf)
        if callback is not None:
            now = time.perf_counter()
            callback(IterationInfo(iteration, float(log_lik.max()), float(gain[np.argmax(log_lik)]), now - start, len(log_lik)))
            start = now
        converged = bool(np.all(gain < tol))
        if iteration == max_iters or converged:
            break
        model = new_model

    log_liks, objectives = np.stack(log_liks), np.stack(objectives)
    best = int(np.argmax(objectives[-1]))
    if num_restarts > 1:
        model = jax.tree.map(lambda leaf: leaf[best], model)
    return FitResult(model, log_liks[:, best], converged, len(log_liks) - 1, objectives[:, best], log_liks[-1])

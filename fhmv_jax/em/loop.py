"""The ECM loop: jitted ``em_step`` (vmapped over sequences and restarts) and ``run_em``, the iteration loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._compile import fast_jit
from .._types import Array, Scalar
from ..model.fhmv import FHMV, sequence_log_likelihood
from .m_step import CovariancePrior, log_prior, m_step
from .stats import batch_e_step


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
        restart_objectives: [R] final penalised log-likelihood of every restart (the best wins).
        split_merges: the accepted split-merge moves (``fit_em(split_merge_rounds=...)``), in
            order. The histories then hold num_iters + 1 + len(split_merges) entries: after the
            entry at a move's ``iteration`` comes the candidate's starting value, then
            its iterations; they never decrease between those points.
    """

    model: FHMV
    log_likelihoods: np.ndarray
    converged: bool
    num_iters: int
    objectives: np.ndarray
    restart_log_likelihoods: np.ndarray
    restart_objectives: np.ndarray
    split_merges: tuple = ()


class IterationInfo(NamedTuple):
    """Progress of one EM iteration, passed to the ``callback`` of ``fit_em``."""

    iteration: int
    log_likelihood: float
    gain_per_step: float
    seconds: float
    num_restarts: int


def print_progress(info: IterationInfo) -> None:
    """A progress line per iteration (``fit_em(verbose=True)``)."""
    gain = "" if info.iteration == 0 else f"  gain/step {info.gain_per_step:+.3e}"
    best = f" (best of {info.num_restarts} restarts)" if info.num_restarts > 1 else ""
    print(f"EM iter {info.iteration:3d}  log-lik {info.log_likelihood:.6f}{gain}  {info.seconds:.2f}s{best}",
          flush=True)


def _em_step(
    model: FHMV, y: Array, x: Array | None, mask: Array, prior: CovariancePrior, block_steps: int | None = None
) -> tuple[FHMV, StepInfo]:
    """One ECM iteration on padded sequences (``em_step`` is this, jitted once per shape).

    Args:
        model: the current model.
        y: [B, T, D] observations, padding zeroed; x: [B, T] driver or None; mask: [B, T] valid steps.
        prior: the covariance prior.
        block_steps: steps per block of the forward-backward pass (default: by the state count).

    Returns:
        (new model, ``StepInfo`` of the input model).
    """
    stats = batch_e_step(model, y, x, mask, block_steps=block_steps)
    info = StepInfo(jnp.sum(stats.log_likelihood), log_prior(model.emission, prior))
    return m_step(model, stats, prior), info


def _has_volatility_states(model: FHMV, *args, **kwargs) -> bool:
    """Whether the ECM step has [T, G, K, V] passes with V > 1, where ``fast_jit``'s options pay off."""
    return model.spec.num_volatility_states > 1


em_step = fast_jit(_em_step, _has_volatility_states)
_em_step_restarts = eqx.filter_jit(eqx.filter_vmap(_em_step, in_axes=(0, None, None, None, None, None)))


def _objective(
    model: FHMV, y: Array, x: Array | None, mask: Array, prior: CovariancePrior, block_steps: int | None = None
) -> StepInfo:
    def sequence(yb, xb, mb):
        return sequence_log_likelihood(model, yb, xb, mb, block_steps=block_steps)

    return StepInfo(jnp.sum(jax.vmap(sequence)(y, x, mask)), log_prior(model.emission, prior))


_objective_single = fast_jit(_objective, _has_volatility_states)
_objective_restarts = eqx.filter_jit(eqx.filter_vmap(_objective, in_axes=(0, None, None, None, None, None)))
"""The restarts' programs compile with XLA's defaults: it rejects YNNPACK fusions of some of their layouts."""


def stack_models(models: list[FHMV]) -> FHMV:
    """One model whose every parameter has a leading axis over ``models`` (for ``run_em(stacked=True)``)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *models)


def _decrease_tolerance(objective: np.ndarray, dtype) -> np.ndarray:
    relative = 1e-9 if dtype == jnp.float64 else 1e-4
    return relative * np.abs(objective) + relative


def run_em(
    model: FHMV,
    y: Array,
    x: Array | None,
    mask: Array,
    prior: CovariancePrior,
    *,
    max_iters: int,
    tol: float,
    callback: Callable[[IterationInfo], None] | None,
    stacked: bool = False,
    block_steps: int | None = None,
    tuned_compilation: bool = True,
) -> FitResult:
    """The ECM iterations on checked, padded sequences, until the gain per step is below ``tol``.

    Args:
        model: the start, or with ``stacked`` a stack of starts (leading axis on every
            parameter) run vmapped, of which the best final objective is returned.
        y: [B, T, D] (padding zeroed); x: [B, T] or None; mask: [B, T] valid steps.
        prior: the covariance prior.
        max_iters, tol, callback, block_steps, tuned_compilation: as in ``fit_em``.

    Returns:
        ``FitResult`` of the best start.

    Raises:
        RuntimeError: the penalised log-likelihood decreased beyond rounding (a bug).
    """
    dtype = model.dtype
    num_steps = int(mask.sum())
    if stacked:
        step, evaluate = _em_step_restarts, _objective_restarts
    else:
        step, evaluate = (em_step, _objective_single) if tuned_compilation else (em_step.plain, _objective_single.plain)
    log_liks, objectives = [], []
    converged = False
    start = time.perf_counter()
    for iteration in range(max_iters + 1):
        if iteration < max_iters:
            new_model, info = step(model, y, x, mask, prior, block_steps)
        else:
            info = evaluate(model, y, x, mask, prior, block_steps)
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
            leader = int(np.argmax(log_lik))
            callback(IterationInfo(iteration, float(log_lik[leader]), float(gain[leader]), now - start, len(log_lik)))
            start = now
        converged = bool(np.all(gain < tol))
        if iteration == max_iters or converged:
            break
        model = new_model

    log_liks, objectives = np.stack(log_liks), np.stack(objectives)
    best = int(np.argmax(objectives[-1]))
    if stacked:
        model = jax.tree.map(lambda leaf: leaf[best], model)
    return FitResult(model, log_liks[:, best], converged, len(log_liks) - 1, objectives[:, best], log_liks[-1],
                     objectives[-1])

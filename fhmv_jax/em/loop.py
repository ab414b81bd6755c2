"""The ECM loop: jitted ``em_step`` (vmapped over sequences and restarts) and ``run_em``, the iteration loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .._compile import fast_jit
from .._types import Array, Bool, Int, Scalar
from ..model.fhmv import FHMV, scored_log_likelihood, sequence_log_likelihood
from ..model.params import as_array
from .m_step import CovariancePrior, log_prior, m_step
from .sharding import gathered_statistics, on_mesh, replicate, total_log_likelihood
from .stats import batch_e_step


class StepInfo(NamedTuple):
    """What one EM step saw of the model it started from, and how its iterative updates ended.

    Attributes:
        log_likelihood: log p(y) summed over sequences.
        log_prior: the covariance penalty; EM never lowers ``log_likelihood + log_prior``.
        stalled: {parameter names: whether that block's ``newton_ascent`` stalled} (``m_step``);
            empty for an evaluation without an update.
    """

    log_likelihood: Scalar
    log_prior: Scalar
    stalled: dict[str, Array] = {}


class FitResult(NamedTuple):
    """Outcome of ``fit_em``.

    Attributes:
        model: the fitted model (the best restart).
        log_likelihoods: [num_iters + 1] log p(y) at the start and after every recorded iteration.
        converged: whether the gain in mean per-step log-likelihood fell below ``tol`` with no
            stalled update and no larger ``remaining_gain``.
        num_iters: iterations recorded (len(log_likelihoods) - 1): ECM steps and kept extrapolations.
        objectives: [num_iters + 1] log-likelihood plus covariance log-prior (never decreases).
        restart_log_likelihoods: [R] final log-likelihood of every restart.
        restart_objectives: [R] final penalised log-likelihood of every restart (the best wins).
        split_merges: the accepted split-merge moves (``fit_em(split_merge_rounds=...)``), in
            order. The histories then hold num_iters + 1 + len(split_merges) entries: after the
            entry at a move's ``iteration`` comes the candidate's starting value, then
            its iterations; they never decrease between those points.
        stalled: the parameters whose iterative update (``m_step.newton_ascent``) stalled in the
            iteration that produced ``model``; a fit with any is not converged.
        score: the gradient of the penalised log-likelihood with respect to each unconstrained array
            (``model.raw_arrays()``, unused ones left out) at ``model``; zero at a maximum
            (``convergence.check_score``).
        score_norm: the norm of ``score``.
        remaining_gain: the gain per step a Newton step would still make (``convergence.ScoreCheck``).
    """

    model: FHMV
    log_likelihoods: np.ndarray
    converged: bool
    num_iters: int
    objectives: np.ndarray
    restart_log_likelihoods: np.ndarray
    restart_objectives: np.ndarray
    split_merges: tuple = ()
    stalled: tuple[str, ...] = ()
    score: dict[str, np.ndarray] | None = None
    score_norm: float = float("nan")
    remaining_gain: float = float("nan")


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
    model: FHMV, y: Array, x: Array | None, mask: Array, prior: CovariancePrior, block_steps: int | None = None,
    method: str = "sequential", batch_chunk: int | None = None, mesh: Mesh | None = None,
) -> tuple[FHMV, StepInfo]:
    """One ECM iteration on padded sequences (``em_step`` is this, jitted once per shape and static options).

    Args:
        model: the current model.
        y: [B, T, D] observations, padding zeroed; x: [B, T] driver or None; mask: [B, T] valid steps.
        prior: the covariance prior.
        block_steps: steps per block of the forward-backward pass (default: by the state count).
        method: the inference backend of the E-step (``"sequential"``, ``"parallel"`` or ``"auto"``).
        batch_chunk: sequences per chunk of the E-step (``sharding.gathered_statistics``; B a multiple of it
            times the mesh's ``"batch"`` size), or ``None``: all at once.
        mesh: shard the sequences (y, x, mask sharded, model and prior replicated) over its ``"batch"`` axis.

    Returns:
        (new model, ``StepInfo`` of the input model).
    """
    statistics = partial(batch_e_step, block_steps=block_steps, method=method)
    if batch_chunk is None and mesh is None:
        stats = statistics(model, y, x, mask)
    else:
        stats = gathered_statistics(statistics, model, y, x, mask, chunk=batch_chunk, mesh=mesh)
    updated, stalled = m_step(model, stats, prior)
    return updated, StepInfo(jnp.sum(stats.log_likelihood), log_prior(model.emission, prior), stalled)


def _has_volatility_states(model: FHMV, *args, **kwargs) -> bool:
    """Whether the ECM step has [T, G, K, V] passes with V > 1, where ``fast_jit``'s options pay off."""
    return model.spec.num_volatility_states > 1


em_step = fast_jit(_em_step, _has_volatility_states)
_RESTART_AXES = (0,) + (None,) * 8
_em_step_restarts = eqx.filter_jit(eqx.filter_vmap(_em_step, in_axes=_RESTART_AXES))


def sequence_log_likelihoods(
    model: FHMV, y: Array, x: Array | None, mask: Array, *, block_steps: int | None = None, method: str = "sequential",
    scored: bool = False,
) -> Array:
    """[B] log p(y_b) of padded sequences [B, T, D]; exactly zero for a sequence of length zero. ``scored``: first
    derivatives with respect to ``model`` by ``scored_log_likelihood`` (one forward-backward pass)."""
    log_likelihood = scored_log_likelihood if scored else sequence_log_likelihood

    def sequence(yb, xb, mb):
        return log_likelihood(model, yb, xb, mb, block_steps=block_steps, method=method)

    return jnp.where(jnp.any(mask, axis=1), jax.vmap(sequence)(y, x, mask), 0.0)


def batch_objective(
    model: FHMV, y: Array, x: Array | None, mask: Array, prior: CovariancePrior, block_steps: int | None = None,
    method: str = "sequential", batch_chunk: int | None = None, mesh: Mesh | None = None, scored: bool = False,
) -> StepInfo:
    """The log-likelihood of padded sequences [B, T, D] and the covariance log-prior (no update); the options
    as ``em_step``'s, and ``scored`` as ``sequence_log_likelihoods``'s."""
    log_likelihoods = partial(sequence_log_likelihoods, block_steps=block_steps, method=method, scored=scored)
    if batch_chunk is None and mesh is None:
        log_lik = jnp.sum(log_likelihoods(model, y, x, mask))
    else:
        log_lik = total_log_likelihood(log_likelihoods, model, y, x, mask, chunk=batch_chunk, mesh=mesh)
    return StepInfo(log_lik, log_prior(model.emission, prior))


_objective_single = fast_jit(batch_objective, _has_volatility_states)
_objective_restarts = eqx.filter_jit(eqx.filter_vmap(batch_objective, in_axes=_RESTART_AXES))
"""The restarts' programs compile with XLA's defaults: it rejects YNNPACK fusions of some of their layouts."""


@eqx.filter_jit
def _restart(models: FHMV, index: Int[Array, ""]) -> FHMV:
    """The model of restart ``index`` of a stack (``stack_models``)."""
    return jax.tree.map(lambda leaf: leaf[index], models)


def stack_models(models: list[FHMV]) -> FHMV:
    """One model whose every parameter has a leading axis over ``models`` (for ``run_em(stacked=True)``)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *models)


def _decrease_tolerance(objective: np.ndarray, dtype) -> np.ndarray:
    relative = 1e-9 if dtype == jnp.float64 else 1e-4
    return relative * np.abs(objective) + relative


def _select(flags: np.ndarray, chosen: FHMV, other: FHMV, stacked: bool) -> FHMV:
    """Per restart, ``chosen`` where ``flags`` holds, else ``other``."""
    if not stacked:
        return chosen if bool(flags[0]) else other
    return _where_restarts(as_array(flags), chosen, other)


@eqx.filter_jit
def _where_restarts(flags: Bool[Array, " R"], chosen: FHMV, other: FHMV) -> FHMV:
    return jax.tree.map(lambda a, b: jnp.where(flags.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), chosen, other)


def _select_flags(kept: np.ndarray, chosen: dict, other: dict) -> dict[str, np.ndarray]:
    """Per restart, the stall flags of ``chosen`` where ``kept`` holds, else those of ``other``."""
    return {name: np.where(kept, np.asarray(chosen[name]), np.asarray(other[name])) for name in chosen}


def squarem_point(cycle: list[FHMV], max_length: float, stacked: bool) -> tuple[FHMV, np.ndarray]:
    """The SQUAREM extrapolation (Varadhan & Roland 2008, scheme S3) from three EM iterates theta_0..2.

    With r = theta_1 - theta_0 and v = theta_2 - 2 theta_1 + theta_0 (unconstrained coordinates),
    theta' = theta_0 - 2 alpha r + alpha^2 v, alpha = -max(1, min(|r| / |v|, ``max_length``)); alpha = -1 gives
    theta_2 itself.

    Returns:
        (theta', [R] -alpha per restart).
    """
    point, length = _extrapolate(*cycle, as_array(max_length, cycle[0].dtype), stacked)
    return point, np.atleast_1d(np.asarray(length))


@eqx.filter_jit
def _extrapolate(first: FHMV, second: FHMV, third: FHMV, max_length: Scalar, stacked: bool) -> tuple[FHMV, Array]:
    r = jax.tree.map(jnp.subtract, second, first)
    v = jax.tree.map(lambda a, b, c: c - 2 * b + a, first, second, third)

    def squared_norm(tree):
        return sum(jnp.sum(leaf**2, axis=tuple(range(int(stacked), leaf.ndim))) for leaf in jax.tree.leaves(tree))

    ratio = jnp.sqrt(squared_norm(r) / squared_norm(v))
    length = jnp.clip(jnp.where(jnp.isfinite(ratio), ratio, 1.0), 1.0, max_length)

    def extrapolated(a, dr, dv):
        alpha = length.reshape((-1,) + (1,) * (a.ndim - 1)) if stacked else length
        return a + 2 * alpha * dr + alpha**2 * dv

    return jax.tree.map(extrapolated, first, r, v), length


_SQUAREM_GROWTH = 4.0
ACCELERATIONS = ("squarem", None)


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
    acceleration: str | None = "squarem",
    block_steps: int | None = None,
    tuned_compilation: bool = True,
    method: str = "sequential",
    batch_chunk: int | None = None,
    mesh: Mesh | None = None,
) -> FitResult:
    """The ECM iterations on checked, padded sequences, until the gain per step is below ``tol``.

    With ``acceleration="squarem"`` every cycle runs two ECM steps theta_0 -> theta_1 -> theta_2, then one
    from the extrapolated ``squarem_point`` theta'. theta' is kept (and its ECM step continues from it) only if
    its penalised log-likelihood is at least theta_1's; otherwise the cycle continues from theta_2. Each kept
    point is recorded, so the history never decreases; every recorded gain but the one onto theta' is a
    plain ECM step's, and convergence is judged on those. The longest extrapolation starts at 1 (theta_2
    itself), grows fourfold each time it is reached and kept, and shrinks fourfold on a rejection.

    Args:
        model: the start, or with ``stacked`` a stack of starts (leading axis on every
            parameter) run vmapped, of which the best final objective is returned.
        y: [B, T, D] (padding zeroed); x: [B, T] or None; mask: [B, T] valid steps; with a ``mesh``, global arrays
            sharded over its ``"batch"`` axis (``sharding.shard_sequences``).
        prior: the covariance prior.
        max_iters: the most ECM steps (E-step and M-step each), rejected extrapolations included.
        acceleration: ``"squarem"`` or ``None`` (plain ECM).
        tol, callback, block_steps, tuned_compilation: as in ``fit_em``.
        method, batch_chunk, mesh: as in ``em_step``; with a mesh every step gets the model replicated over it
            and returns it to this process (``sharding.on_mesh``), so the returned model is an ordinary one.

    Returns:
        ``FitResult`` of the best start.

    Raises:
        ValueError: an unknown ``acceleration``.
        RuntimeError: the penalised log-likelihood decreased beyond rounding (a bug).
    """
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
    dtype = model.dtype
    num_steps = int(mask.sum())
    if stacked:
        step, evaluate = _em_step_restarts, _objective_restarts
    else:
        step, evaluate = (em_step, _objective_single) if tuned_compilation else (em_step.plain, _objective_single.plain)
    options = (block_steps, method, batch_chunk, mesh)
    if mesh is not None:
        prior = replicate(prior, mesh)
        step, evaluate = on_mesh(step, mesh), on_mesh(evaluate, mesh)
    log_liks, objectives = [], []
    converged = False
    cycle, flags = [model], [{}]
    max_length, length = 1.0, None
    start = time.perf_counter()
    for call in range(max_iters + 1):
        if call < max_iters:
            new_model, info = step(model, y, x, mask, prior, *options)
        else:
            info = evaluate(model, y, x, mask, prior, *options)
        log_lik = np.atleast_1d(np.asarray(info.log_likelihood, np.float64))
        objective = log_lik + np.atleast_1d(np.asarray(info.log_prior, np.float64))
        extrapolated = len(cycle) == 3
        if extrapolated:
            kept = objective >= objectives[-1]
            log_lik, objective = np.where(kept, log_lik, log_liks[-1]), np.where(kept, objective, objectives[-1])
            if not np.all(kept):
                max_length = max(1.0, max_length / _SQUAREM_GROWTH)
            elif np.any(length >= max_length):
                max_length *= _SQUAREM_GROWTH
        elif objectives:
            drop = objectives[-1] - objective
            if np.any(drop > _decrease_tolerance(objective, dtype)):
                worst = int(np.argmax(drop))
                raise RuntimeError(
                    f"EM decreased the penalised log-likelihood by {drop[worst]:.3e} at ECM step {call}"
                    f" (restart {worst}): an ECM step is not monotone"
                )
        if not extrapolated or np.any(kept):
            log_liks.append(log_lik)
            objectives.append(objective)
            gain = (objective - objectives[-2]) / num_steps if len(objectives) > 1 else np.full_like(objective, np.inf)
            if callback is not None:
                now = time.perf_counter()
                leader = int(np.argmax(log_lik))
                callback(IterationInfo(len(objectives) - 1, float(log_lik[leader]), float(gain[leader]), now - start,
                                       len(log_lik)))
                start = now
            converged = not extrapolated and bool(np.all(gain < tol))
        if extrapolated and call == max_iters:
            model, stalled = _select(kept, model, cycle[1], stacked), _select_flags(kept, flags[2], flags[1])
            break
        if converged or call == max_iters:
            stalled = flags[-1]
            break
        if extrapolated:
            model = _select(kept, new_model, cycle[2], stacked)
            cycle, flags = [model], [_select_flags(kept, info.stalled, flags[2])]
            continue
        model = new_model
        if acceleration is None:
            cycle, flags = [model], [info.stalled]
            continue
        cycle.append(new_model)
        flags.append(info.stalled)
        if len(cycle) == 3:
            model, length = squarem_point(cycle, max_length, stacked)
            if np.all(length <= 1.0):
                model, cycle, flags = cycle[2], [cycle[2]], [flags[2]]
                max_length *= _SQUAREM_GROWTH

    log_liks, objectives = np.stack(log_liks), np.stack(objectives)
    best = int(np.argmax(objectives[-1]))
    if stacked:
        model = _restart(model, as_array(best))
    stalled = tuple(name for name, flags in stalled.items() if np.atleast_1d(np.asarray(flags))[best])
    return FitResult(model, log_liks[:, best], converged and not stalled, len(log_liks) - 1, objectives[:, best],
                     log_liks[-1], objectives[-1], stalled=stalled)

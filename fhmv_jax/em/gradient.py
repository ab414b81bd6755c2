"""Direct maximisation of the penalised log-likelihood by gradient methods (optax), beside ECM.

The parameters are the model's free unconstrained arrays (``FHMV.free_arrays``); the objective is the one EM
maximises, log p(y) plus the covariance log-prior, divided by the observed steps n so that step sizes do not
depend on the data's length. Full batches use L-BFGS with a zoom line search (each step satisfies the Wolfe
conditions, so the objective never decreases); minibatches of sequences use Adam on an unbiased estimate
(the minibatch log-likelihood times B / batch_size), for batches of many series.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._types import Array, PRNGKeyArray, Scalar
from ..model.fhmv import FHMV
from ..model.inputs import check_sequences
from ..model.params import as_array
from ..precision import warn_if_float32_on_cpu
from .convergence import check_score
from .loop import FitResult, IterationInfo, StepInfo, batch_objective, print_progress
from .m_step import CovariancePrior, log_prior


@functools.cache
def default_optimizer(minibatch: bool) -> optax.GradientTransformation:
    """L-BFGS (zoom line search) for full batches, Adam (learning rate 0.01) for minibatches; one instance each,
    so that their jitted steps compile once per process."""
    return optax.adam(1e-2) if minibatch else optax.lbfgs()


def _optax_promotion():
    """optax mixes int32 counters with int64 arrays under float64: let its updates promote dtypes as numpy does,
    whatever the caller's ``jax_numpy_dtype_promotion``."""
    return jax.numpy_dtype_promotion("standard")


def _model(model: FHMV, params: dict[str, Array], hold: dict[str, Array] | None = None) -> FHMV:
    """``model`` with its free arrays from ``params``, except the coordinates ``hold`` flags (kept as in ``model``)."""
    raw = model.raw_arrays()
    if hold is not None:
        params = {k: jnp.where(hold[k], raw[k], v) if k in hold else v for k, v in params.items()}
    return FHMV.from_raw_arrays(model.spec, raw | params)


def _loss(params, model: FHMV, hold, y, x, mask, prior: CovariancePrior, scale, num_steps) -> Scalar:
    """-(scale log p(y) + log prior) / n."""
    info = batch_objective(_model(model, params, hold), y, x, mask, prior, scored=True)
    return -(scale * info.log_likelihood + info.log_prior) / num_steps


def _point(params, model: FHMV, hold, loss: Scalar, prior: CovariancePrior, num_steps) -> StepInfo:
    """(log-likelihood, log prior) of the point whose loss is ``loss``."""
    penalty = log_prior(_model(model, params, hold).emission, prior)
    return StepInfo(-loss * num_steps - penalty, penalty)


@eqx.filter_jit
def _full_batch_step(params, state, optimizer, model, hold, y, x, mask, prior, num_steps):
    """One optimizer step on every sequence; returns (params, state, ``StepInfo`` of the new params, whose loss a
    line search has already evaluated)."""
    def loss(p):
        return _loss(p, model, hold, y, x, mask, prior, 1.0, num_steps)

    line_search = optax.tree_utils.tree_get(state, "value") is not None
    if line_search:
        value, grad = optax.value_and_grad_from_state(loss)(params, state=state)
    else:
        value, grad = jax.value_and_grad(loss)(params)
    with _optax_promotion():
        updates, state = optimizer.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    params = optax.apply_updates(params, updates)
    new_value = optax.tree_utils.tree_get(state, "value") if line_search else loss(params)
    return params, state, _point(params, model, hold, new_value, prior, num_steps)


@eqx.filter_jit
def _minibatch_step(params, state, optimizer, key, model, hold, y, x, mask, prior, batch_size: int, num_steps):
    """One optimizer step on ``batch_size`` sequences drawn without replacement; returns (params, state, the
    minibatch's ``StepInfo`` scaled to the whole batch, before the step)."""
    chosen = jax.random.choice(key, y.shape[0], (batch_size,), replace=False)
    scale = y.shape[0] / batch_size
    value, grad = jax.value_and_grad(_loss)(params, model, hold, y[chosen], None if x is None else x[chosen],
                                            mask[chosen], prior, scale, num_steps)
    with _optax_promotion():
        updates, state = optimizer.update(grad, state, params)
    return optax.apply_updates(params, updates), state, _point(params, model, hold, value, prior, num_steps)


def fit_gradient(
    model: FHMV,
    y,
    x=None,
    *,
    lengths=None,
    optimizer: optax.GradientTransformation | None = None,
    num_steps: int = 200,
    batch_size: int | None = None,
    key: PRNGKeyArray | None = None,
    tol: float = 1e-9,
    covariance_ridge: float = 1e-2,
    covariance_prior_count: float = 1e-2,
    hold: dict[str, Array] | None = None,
    callback: Callable[[IterationInfo], None] | None = None,
    verbose: bool = False,
) -> FitResult:
    """Maximise EM's objective (log p(y) + covariance log-prior) directly, by optax, from ``model``.

    Useful alone, and as a polish after ``fit_em`` where EM crawls (a jump probability against the jump size).

    Args:
        model: the starting point (``init_model`` or a fit).
        y: [T, D] or a padded batch [B, T, D]; x: the driver where the leverage mode needs one.
        lengths: [B] valid steps per sequence (default: all T).
        optimizer: an optax transformation (default ``default_optimizer``: L-BFGS, or Adam with ``batch_size``).
            Full batches pass it ``value``, ``grad`` and ``value_fn`` (what optax's line searches need).
        num_steps: the most optimizer steps.
        batch_size: sequences per step (default: all, deterministic steps); with it, each step draws that many
            sequences from ``key``.
        key: PRNG key for the minibatches.
        tol: full batches stop at the first step that gains less than this in mean per-step objective after
            which a Newton step would gain no more (``convergence.check_score``).
        covariance_ridge, covariance_prior_count: the covariance prior, as ``fit_em``.
        hold: {free array name: bool mask of its shape}: coordinates kept at their values in ``model`` (e.g. for
            a profile likelihood); arrays not named are all free. Such a fit stops on ``tol`` alone and reports no
            score.
        callback: called with an ``IterationInfo`` after every step.
        verbose: print a line per step (when no ``callback`` is given).

    Returns:
        ``FitResult``. ``log_likelihoods`` and ``objectives`` hold the start and every step; with minibatches they
        are each step's unbiased estimates (before the step), the last entry the exact value at the end, and
        ``converged`` is False (stochastic steps have no stopping rule).

    Raises:
        ValueError: bad observations (as ``fit_em``), ``num_steps < 1``, or a ``batch_size`` outside [1, B] or
            without a key.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ys, xs, mask = check_sequences(model.spec, y, x, lengths, dtype=model.dtype)
    if batch_size is not None and not 1 <= batch_size <= ys.shape[0]:
        raise ValueError(f"batch_size must lie in [1, {ys.shape[0]}] (the number of sequences), got {batch_size}")
    if batch_size is not None and key is None:
        raise ValueError("minibatches (batch_size) need a PRNG key")
    warn_if_float32_on_cpu(model.dtype, "fit_gradient")
    free = model.free_arrays()
    for name, flags in (hold or {}).items():
        if name not in free or np.shape(flags) != free[name].shape:
            raise ValueError(f"hold: {name!r} is not a free array of shape {np.shape(flags)} (free arrays:"
                             f" { {k: v.shape for k, v in free.items()} })")
    dtype = model.dtype
    prior = CovariancePrior(as_array(covariance_ridge, dtype), as_array(covariance_prior_count, dtype))
    n = jnp.asarray(mask.sum(), dtype)
    optimizer = default_optimizer(batch_size is not None) if optimizer is None else optimizer
    callback = print_progress if callback is None and verbose else callback
    hold = None if hold is None else {k: jnp.asarray(v, bool) for k, v in hold.items()}
    params = free
    state = optimizer.init(params)

    def exact(params) -> tuple[float, float]:
        info = batch_objective(_model(model, params, hold), ys, xs, mask, prior)
        return float(info.log_likelihood), float(info.log_likelihood + info.log_prior)

    log_likelihoods, objectives = map(list, zip(exact(params), strict=True))
    converged, check = False, None
    start = time.perf_counter()
    for step in range(num_steps):
        if batch_size is None:
            params, state, info = _full_batch_step(params, state, optimizer, model, hold, ys, xs, mask, prior, n)
        else:
            key, draw = jax.random.split(key)
            params, state, info = _minibatch_step(params, state, optimizer, draw, model, hold, ys, xs, mask,
                                                  prior, batch_size, n)
        log_likelihood, objective = float(info.log_likelihood), float(info.log_likelihood + info.log_prior)
        gain = (objective - objectives[-1]) / float(n)
        log_likelihoods.append(log_likelihood)
        objectives.append(objective)
        if callback is not None:
            callback(IterationInfo(step + 1, log_likelihood, gain, time.perf_counter() - start, 1))
        if batch_size is None and abs(gain) < tol:
            check = None if hold is not None else check_score(_model(model, params), ys, xs, mask, prior)
            converged = check is None or check.remaining_gain <= tol
            if converged:
                break
    fitted = _model(model, params, hold)
    if batch_size is not None:
        log_likelihoods[-1], objectives[-1] = exact(params)
    if hold is None and (check is None or not converged):
        check = check_score(fitted, ys, xs, mask, prior)
    return FitResult(
        model=fitted,
        log_likelihoods=np.asarray(log_likelihoods),
        converged=converged,
        num_iters=len(objectives) - 1,
        objectives=np.asarray(objectives),
        restart_log_likelihoods=np.asarray(log_likelihoods[-1:]),
        restart_objectives=np.asarray(objectives[-1:]),
        **({} if check is None else {"score": check.score, "score_norm": check.norm,
                                     "remaining_gain": check.remaining_gain}),
    )

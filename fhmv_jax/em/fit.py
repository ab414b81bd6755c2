"""``fit_em``: restarts, batches and split-merge moves around the ECM loop of ``loop.py``."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from .._types import Array, Float, PRNGKeyArray
from ..inference import check_method
from ..model.fhmv import FHMV
from ..model.inputs import check_sequences
from ..model.params import as_array
from ..precision import warn_if_float32_on_cpu
from .convergence import check_score
from .init import init_model
from .loop import FitResult, IterationInfo, print_progress, run_em, stack_models
from .m_step import CovariancePrior
from .sharding import (
    assert_same_on_every_process,
    batch_layout,
    check_chunk,
    check_mesh,
    pad_sequences,
    shard_sequences,
)
from .split_merge import SplitMerge, candidate_moves, merge_split_candidate, print_split_merge


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
    init_method: str = "kmeans",
    covariance_ridge: float = 1e-2,
    covariance_prior_count: float = 1e-2,
    split_merge_rounds: int = 0,
    split_merge_iters: int = 10,
    acceleration: str | None = "squarem",
    callback: Callable[[IterationInfo], None] | None = None,
    verbose: bool = False,
    block_steps: int | None = None,
    tuned_compilation: bool = True,
    inference: str = "auto",
    batch_chunk: int | None = None,
    mesh: Mesh | None = None,
) -> FitResult:
    """Fit every parameter by ECM (MODEL.md sections 4-6).

    Args:
        model: the starting point (``init_model``, or a previous fit for a warm start).
        y: [T, D] or a padded batch [B, T, D].
        x: driver [T] or [B, T] when the leverage mode needs one (else taken from
            ``spec.driver_feature``).
        lengths: [B] valid steps per sequence; padding never affects the result.
        max_iters: the most ECM steps (E-step and M-step each; per segment: the first run and each accepted
            split-merge move's continuation).
        tol: stop when the gain in mean per-step log-likelihood is below this.
        num_restarts: restart 0 starts from ``model``, the others from ``init_model`` with
            new seeds drawn from ``key`` (method ``init_method``); all run vmapped and the best final
            penalised log-likelihood wins.
        key: PRNG key for the restarts.
        init_method: the ``init_model`` method of the restarts (``"kmeans"`` or ``"hmm"``).
        covariance_ridge, covariance_prior_count: the inverse-Wishart ridge
            Sigma = (S + ridge I) / (n + count) that keeps covariances positive definite.
        split_merge_rounds: after convergence, up to this many split-merge rounds (see
            ``split_merge``): every candidate (two regimes that switch between each other
            most, or are most alike, merged; another split) runs ``split_merge_iters``
            iterations vmapped, and the best is continued to convergence only if it ends above
            the current penalised log-likelihood; the rounds stop at the first that finds no
            better candidate. Needs G >= 3.
        acceleration: ``"squarem"`` (default): every two ECM steps, one step from the SQUAREM extrapolation
            of the last three iterates, kept only if it does not lower the penalised log-likelihood
            (``run_em``); it takes EM along slow directions (jump probability against jump size) in far
            fewer iterations. ``None``: plain ECM.
        callback: called with an ``IterationInfo`` after every iteration (e.g. to drive a progress bar).
        verbose: print a line per iteration (when no ``callback`` is given) and one per accepted
            split-merge move; the default is silent.
        block_steps: steps per block of the E-step's forward-backward pass (default: 2^17 / S
            rounded down to a power of two, measured best on CPU); any value gives the same result.
        tuned_compilation: on CPU, compile the single-model ECM step's elementwise fusions with
            YNNPACK (about 15% faster, docs/benchmarks.md); ``False`` compiles with XLA's defaults,
            e.g. for a jaxlib that rejects one of those fusions.
        inference: the backend of the E-step's forward-backward pass and of the log-likelihood
            (``inference.forward_backward``): ``"sequential"`` (scans over time), ``"parallel"``
            (associative scans, O(log T) depth, for accelerators) or ``"auto"`` (default: parallel on an
            accelerator for small state spaces and long sequences, else sequential: on a CPU always
            sequential); the same numbers to rounding.
        batch_chunk: compute the E-step ``batch_chunk`` sequences at a time and add up their statistics,
            so that memory holds one chunk's forward-backward pass instead of the whole batch's (thousands
            of sequences); ``None`` (default): all at once. The per-step statistics of predictable and
            Markov leverage ([B, T, ...]) are kept for every sequence. A batch that is no multiple of the
            chunk (times the mesh's ``"batch"`` size) is padded with sequences of length zero, which count
            for nothing; the result equals the unchunked one to rounding.
        mesh: a ``jax.sharding.Mesh`` with an axis named ``"batch"``, e.g.
            ``Mesh(jax.devices(), ("batch",))``: the sequences are split over its devices (padded with
            sequences of length zero to a multiple of their number), each computes its sequences' E-step
            statistics, one ``psum`` adds them up and the M-step runs replicated (the per-step statistics of
            predictable and Markov leverage stay sharded with their sequences; XLA partitions the M-step's sums
            over them); the result equals the one-device fit to rounding, restarts included. Over several
            processes (``jax.distributed.initialize``, the mesh over ``jax.devices()``) every process calls
            ``fit_em`` with the same arguments: the same full data and the same starting model (checked).
            ``None`` (default): the default device.

    Returns:
        ``FitResult``; with a mesh its model is an ordinary copy on this process's default device.

    Raises:
        ValueError: bad observations (see ``check_sequences``), ``max_iters < 1``,
            ``num_restarts < 1``, restarts without a key, split-merge rounds with G < 3, an unknown
            ``inference``, a ``batch_chunk`` that is no positive integer, a mesh without a ``"batch"`` axis or
            with more devices on it than sequences, or float16 data or model.
        RuntimeError: the penalised log-likelihood decreased beyond rounding (a bug).
    """
    if max_iters < 1 or num_restarts < 1 or split_merge_rounds < 0:
        raise ValueError(
            f"max_iters and num_restarts must be >= 1 and split_merge_rounds >= 0, got {max_iters},"
            f" {num_restarts} and {split_merge_rounds}"
        )
    check_method(inference)
    check_chunk(batch_chunk)
    check_precision(model, y, x)
    spec, dtype = model.spec, model.dtype
    if split_merge_rounds and spec.num_regimes < 3:
        raise ValueError(f"split-merge moves need at least 3 regimes, the spec has {spec.num_regimes}")
    y, x, mask = check_sequences(spec, y, x, lengths, dtype=dtype)
    if mesh is not None:
        check_mesh(mesh, y.shape[0])
    warn_if_float32_on_cpu(dtype, "fit_em")
    prior = CovariancePrior(as_array(covariance_ridge, dtype), as_array(covariance_prior_count, dtype))
    if callback is None and verbose:
        callback = print_progress
    if num_restarts > 1:
        if key is None:
            raise ValueError("num_restarts > 1 needs a PRNG key for the new initialisations")
        keys = jax.random.split(key, num_restarts - 1)
        starts = [model] + [init_model(k, spec, y, x, lengths=mask.sum(1), method=init_method).astype(dtype)
                            for k in keys]
        model = stack_models(starts)
    layout = batch_layout(y.shape[0], batch_chunk, mesh)
    y, x, mask = pad_sequences(y, x, mask, layout.size)
    if mesh is not None:
        if jax.process_count() > 1:
            assert_same_on_every_process("the starting model (and the restarts' key)", model)
        y, x, mask = shard_sequences(mesh, y, x, mask)
    options = {"block_steps": block_steps, "method": inference, "batch_chunk": layout.chunk, "mesh": mesh}
    run = partial(run_em, y=y, x=x, mask=mask, prior=prior, tol=tol, acceleration=acceleration,
                  tuned_compilation=tuned_compilation, **options)
    with _full_precision_products():
        fit = run(model, max_iters=max_iters, callback=callback, stacked=num_restarts > 1)
        for _ in range(split_merge_rounds):
            moved = _split_merge_round(fit, run, max_iters, split_merge_iters, callback, verbose)
            if moved is None:
                break
            fit = moved
        fit = _to_maximum(fit, run, y, x, mask, prior, tol, max_iters, callback, options)
    warn_if_unconverged(fit, tol)
    return fit


def _full_precision_products():
    """On an accelerator, matrix products at full float32 precision while the fit traces its programs (recent
    GPUs default to TF32's 10-bit mantissa, too coarse for EM's statistics); on CPU, where products are exact in
    their dtype, nothing."""
    if jax.default_backend() == "cpu":
        return contextlib.nullcontext()
    return jax.default_matmul_precision("highest")


_HALF_PRECISION = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))


def check_precision(model: FHMV, y, x=None) -> None:
    """A ``ValueError`` for a model, observations or driver in half precision (float16, bfloat16)."""
    for dtype in (model.dtype, getattr(y, "dtype", None), getattr(x, "dtype", None)):
        if dtype is not None and np.dtype(dtype) in _HALF_PRECISION:
            raise ValueError(f"{np.dtype(dtype).name} is not supported: use float32 or float64")


_CONTINUATION_ITERS = 25


def _to_maximum(fit: FitResult, run: Callable, y, x, mask, prior, tol: float, max_iters: int, callback,
                options: dict) -> FitResult:
    """Where the tolerance was met but ``check_score`` predicts a larger gain, continue EM in rounds of 25 steps
    (each stopped early only by a step that gains nothing) until the predicted gain is within ``tol``, for at
    most ``max_iters`` more steps; fill in the score; ``converged`` needs the tolerance met, no stall and that
    gain within tol. ``options``: the objective's (``check_score``'s keyword arguments).

    Where EM crawls, a step gains far less than the Newton step predicts, so a round stopped by a tolerance
    on the step's gain would end after a step or two, before SQUAREM's first extrapolation, and the check
    after it would cost more than the steps."""
    tol_met = fit.converged
    check = check_score(fit.model, y, x, mask, prior, **options)
    budget = max_iters
    while tol_met and check.remaining_gain > tol and budget > 0:
        rest = run(fit.model, max_iters=min(budget, _CONTINUATION_ITERS), callback=callback, tol=0.0)
        budget -= rest.num_iters
        fit = rest._replace(
            log_likelihoods=np.concatenate([fit.log_likelihoods, rest.log_likelihoods[1:]]),
            objectives=np.concatenate([fit.objectives, rest.objectives[1:]]),
            num_iters=fit.num_iters + rest.num_iters,
            split_merges=fit.split_merges,
        )
        check = check_score(fit.model, y, x, mask, prior, **options)
        if rest.num_iters == 0:
            break
    return fit._replace(score=check.score, score_norm=check.norm, remaining_gain=check.remaining_gain,
                        converged=tol_met and not fit.stalled and check.remaining_gain <= tol)


class ConvergenceWarning(UserWarning):
    """``fit_em`` stopped at a point that is not a maximum: a stalled update or a large score."""


_LEADING_SHARE = 0.1


def leading_parameters(score: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The parameter arrays holding at least a tenth of the squared score, largest first."""
    shares = {k: float(np.sum(np.square(g))) for k, g in score.items()}
    total = sum(shares.values())
    return tuple(k.removesuffix("_raw") for k in sorted(shares, key=shares.get, reverse=True)
                 if shares[k] >= _LEADING_SHARE * total)


def warn_if_unconverged(fit: FitResult, tol: float) -> None:
    """A ``ConvergenceWarning`` naming the parameters concerned when the fit is not a maximum: stalled
    updates, or a Newton step predicted to gain more than ``tol`` per step."""
    if fit.stalled:
        warnings.warn(f"fit_em: the update of {'; '.join(fit.stalled)} stalled (no damped Newton step raised Q"
                      " although its gradient is not zero): these parameters are not at a maximum",
                      ConvergenceWarning, stacklevel=3)
    elif fit.remaining_gain > tol:
        warnings.warn(f"fit_em: a Newton step would still gain {fit.remaining_gain:.2e} per step (> tol={tol:g};"
                      f" score norm {fit.score_norm:.3g}, mostly in {', '.join(leading_parameters(fit.score))}):"
                      " not at a maximum; run more iterations (max_iters) or a smaller tol",
                      ConvergenceWarning, stacklevel=3)


def _split_merge_round(fit: FitResult, run: Callable, max_iters: int, trial_iters: int, callback,
                       verbose: bool) -> FitResult | None:
    """Try every split-merge candidate of ``fit.model`` for ``trial_iters`` iterations (vmapped); if the
    best ends above the current objective, continue it to convergence and return the joined result."""
    model = fit.model
    moves = candidate_moves(model)
    trial = run(stack_models([merge_split_candidate(model, *move) for move in moves]), max_iters=trial_iters,
                callback=None, stacked=True)
    if trial.objectives[-1] <= fit.objectives[-1]:
        return None
    move = moves[int(np.argmax(trial.restart_objectives))]
    if verbose:
        print_split_merge(move, fit.objectives[-1], trial.objectives[-1])
    rest = run(trial.model, max_iters=max_iters, callback=callback)
    record = SplitMerge(*move, iteration=len(fit.objectives) - 1, objective_before=float(fit.objectives[-1]),
                        objective_after=float(rest.objectives[-1]))
    return rest._replace(
        log_likelihoods=np.concatenate([fit.log_likelihoods, trial.log_likelihoods, rest.log_likelihoods[1:]]),
        objectives=np.concatenate([fit.objectives, trial.objectives, rest.objectives[1:]]),
        num_iters=fit.num_iters + trial.num_iters + rest.num_iters,
        split_merges=fit.split_merges + (record,),
    )

"""M-step of the ECM algorithm (MODEL.md section 5).

Conditional maximisations, in this order, each of which does not lower the expected
complete-data log-likelihood Q (plus the covariance prior), so the penalised
log-likelihood never decreases:

1. regime, persistence: closed form from the expected counts;
2. jump chain: Newton ascent on the expected transition counts plus the stationary
   initial law (closed form would ignore that term);
3. weights, means, covariances (with an inverse-Wishart ridge) given the current scales,
   then degrees of freedom by bisection on log nu;
4. volatility magnitudes (c_1, theta_c, m_1, theta_m, l_1, theta_l) given the new means
   and covariances, and the Markov-leverage logits: Newton ascent whose steps are accepted
   only when the objective does not fall.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.scipy.special import digamma, xlogy

from .._types import Array, Float
from ..model import emissions
from ..model.emissions import StudentTMixture
from ..model.factors import JumpChain, MarkovLeverage, PersistenceChains, RegimeChain, jump_stationary_law
from ..model.fhmv import FHMV, initial_shocks, log_scales, volatility_log_scales
from ..model.params import logit, safe_log
from .stats import (
    ComponentStats,
    LeverageStats,
    SequenceStats,
    StateMoments,
    StepMoments,
    moments_about,
    scale_exponents,
)

_NEWTON_STEPS = 3
_STEP_SIZES = 0.5 ** np.arange(5)
_BISECTION_STEPS = 64


class CovariancePrior(NamedTuple):
    """Inverse-Wishart ridge: Sigma = (S + ridge * I) / (n + count); log prior
    -(count / 2) log|Sigma| - (ridge / 2) tr(Sigma^{-1}) per component.

    Pass arrays (as ``fit_em`` does) so that new values do not recompile ``em_step``.
    """

    ridge: float | Array = 1e-2
    count: float | Array = 1e-2


def newton_ascent(objective: Callable, start, num_steps: int = _NEWTON_STEPS, derivatives: Callable | None = None):
    """Maximise ``objective`` over a small pytree by damped Newton steps with a line search.

    Each step moves along -(H)^{-1} g (eigenvalues of -H floored to keep it an ascent
    direction), tries step sizes 1, 1/2, ..., 1/16 and keeps the best only if it does not
    lower the objective, so the result is never worse than ``start``.

    Args:
        objective: pytree -> scalar.
        start: the starting pytree.
        num_steps: Newton steps.
        derivatives: optional flat vector -> (gradient, Hessian) in closed form; by default
            ``jax.grad`` and ``jax.hessian`` of the objective.
    """
    flat, unravel = ravel_pytree(start)

    def f(v):
        return objective(unravel(v))

    if derivatives is None:

        def derivatives(v):
            return jax.grad(f)(v), jax.hessian(f)(v)

    def _step(_, carry):
        flat, value = carry
        grad, hess = derivatives(flat)
        eigvals, eigvecs = jnp.linalg.eigh(-0.5 * (hess + hess.T))
        floor = 1e-8 * jnp.maximum(1.0, jnp.max(jnp.abs(eigvals)))
        direction = eigvecs @ ((eigvecs.T @ grad) / jnp.maximum(eigvals, floor))
        candidates = flat[None, :] + _STEP_SIZES[:, None].astype(flat.dtype) * direction[None, :]
        values = jax.vmap(f)(candidates)
        values = jnp.where(jnp.isfinite(values), values, -jnp.inf)
        best = jnp.argmax(values)
        improved = values[best] >= value
        return jnp.where(improved, candidates[best], flat), jnp.where(improved, values[best], value)

    flat, _ = jax.lax.fori_loop(0, num_steps, _step, (flat, f(flat)))
    return unravel(flat)


def _normalised_rows(counts: Array, fallback: Array) -> Array:
    """counts / row sums; rows without any count keep ``fallback``."""
    totals = jnp.sum(counts, axis=-1, keepdims=True)
    return jnp.where(totals > 0, counts / jnp.where(totals > 0, totals, 1.0), fallback)


def regime_update(regime: RegimeChain, initial: Array, counts: Array) -> RegimeChain:
    """pi = E[1{R_1 = g}] (averaged over sequences); A = expected transition counts, normalised."""
    return RegimeChain(safe_log(initial / jnp.sum(initial)),
                       safe_log(_normalised_rows(counts, regime.step_matrices(None)[0])))


def persistence_update(chains: PersistenceChains, counts: tuple[Array, ...]) -> PersistenceChains:
    """p_n = expected stays / expected transitions of chain n (pooled over chains when tied)."""
    stacked = jnp.stack(counts)
    stays = jnp.trace(stacked, axis1=-2, axis2=-1)
    totals = jnp.sum(stacked, axis=(-2, -1))
    if chains.tied:
        stays, totals = jnp.sum(stays, keepdims=True), jnp.sum(totals, keepdims=True)
    old = jax.nn.sigmoid(chains.persistence_raw)
    p = jnp.where(totals > 0, stays / jnp.where(totals > 0, totals, 1.0), old)
    return chains.replace(persistence_raw=logit(p))


def jump_update(jump: JumpChain, initial: Array, counts: Array) -> JumpChain:
    """Maximise sum_ij n_ij log P_ij + sum_j gamma^J_1(j) log pi^J_j over the jump chain's transition parameters."""

    def objective(values):
        matrix = jump.replace(**values).transition()
        return jnp.sum(xlogy(counts, matrix)) + jnp.sum(xlogy(initial, jump_stationary_law(matrix)))

    return jump.replace(**newton_ascent(objective, jump.present(JumpChain.transition_fields)))


def solve_dof(mean_terms: Array, low: float, high: float) -> Array:
    """Root of 1 + log(nu / 2) - psi(nu / 2) + mean_terms = 0 by bisection on log nu, clamped to [low, high].

    The left side falls with nu, so the root is where its sign changes.
    """

    def score(log_nu):
        nu = jnp.exp(log_nu)
        return 1 + jnp.log(nu / 2) - digamma(nu / 2) + mean_terms

    def _bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        right = score(mid) > 0
        return jnp.where(right, mid, lo), jnp.where(right, hi, mid)

    start = (jnp.full_like(mean_terms, jnp.log(low)), jnp.full_like(mean_terms, jnp.log(high)))
    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, _bisect, start)
    return jnp.clip(jnp.exp(0.5 * (lo + hi)), low, high)


def emission_update(mixture: StudentTMixture, stats: ComponentStats, prior: CovariancePrior) -> StudentTMixture:
    """Weights, means, covariances and degrees of freedom from statistics summed over sequences.

    Moments are about the current means mu_0; with Lambda_t = diag(s_t^{a/2}) the mean solves
    (Sigma^{-1} * sum_e P_e n_e) (mu - mu_0) = sum_e (Sigma^{-1} * P_e) m_e, which is
    mu = mu_0 + m_1 / n_1 without a scale mask; then
    Sigma = (sum_e P_e * S_e(mu) + ridge * I) / (n + count).
    """
    dtype = mixture.means.dtype
    D = mixture.num_features
    counts = stats.counts
    weights = _normalised_rows(counts, mixture.weights())

    eye = jnp.broadcast_to(jnp.eye(D, dtype=dtype), counts.shape + (D, D))
    patterns = emissions.mask_patterns(mixture.scale_mask, D, dtype)
    n_e, m_e, S_e = stats.scale_weights, stats.first, stats.second
    inv_chol = emissions.inverse_cholesky(mixture.cholesky())
    precision = jnp.einsum("gkdi,gkdj->gkij", inv_chol, inv_chol)
    system = precision * jnp.einsum("exy,egk->gkxy", patterns, n_e)
    rhs = jnp.einsum("gkxy,exy,egky->gkx", precision, patterns, m_e)
    has_mass = n_e[0] > jnp.finfo(dtype).tiny * 1e10
    safe_system = jnp.where(has_mass[..., None, None], system, eye)
    shift = jnp.where(has_mass[..., None], jnp.linalg.solve(safe_system, rhs[..., None])[..., 0], 0.0)
    means = mixture.means + shift

    scatter = jnp.einsum("exy,egkxy->gkxy", patterns, moments_about(n_e, m_e, S_e, shift)[2])
    covariance = (scatter + prior.ridge * eye) / (counts + prior.count)[..., None, None]
    covariance = 0.5 * (covariance + jnp.swapaxes(covariance, -1, -2))
    chol = jnp.linalg.cholesky(covariance)
    usable = (counts + prior.count > 0) & jnp.all(jnp.isfinite(chol), axis=(-2, -1))
    log_diag = jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1))
    chol_raw = jnp.tril(jnp.where(usable[..., None, None], chol, 0.0), -1) + jnp.where(
        usable[..., None], log_diag, 0.0
    )[..., None] * eye
    chol_raw = jnp.where(usable[..., None, None], chol_raw, mixture.chol_raw)

    updated = mixture.replace(log_weights=safe_log(weights), means=means, chol_raw=chol_raw)
    if mixture.gaussian:
        return updated
    low, high = mixture.dof_bounds
    safe_counts = jnp.where(counts > 0, counts, 1.0)
    dof = jnp.where(counts > 0, solve_dof(stats.dof_terms / safe_counts, low, high), mixture.dof())
    return updated.replace(dof_raw=logit((dof - low) / (high - low)))


def _quadratic_patterns(mixture: StudentTMixture, inv_chol: Array) -> Float[Array, "Q G K D D"]:
    """Matrices of the quadratic forms in delta'(s) that scale with s: Sigma^{-1} without a scale mask, else
    Sigma^{-1} * P_e for the patterns of s^{-1} and s^{-1/2} (see ``emissions.mask_patterns``)."""
    precision = jnp.einsum("gkdi,gkdj->gkij", inv_chol, inv_chol)
    patterns = emissions.mask_patterns(mixture.scale_mask, mixture.num_features, inv_chol.dtype)[:2]
    return precision[None] * patterns[:, None, None]


def state_loads(mixture: StudentTMixture, moments: StateMoments, shift: Array, inv_chol: Array) -> list[Array]:
    """Per quadratic form, [V] sum_t tau E[W] delta'_q (y_t - mu') from moments about mu = mu' - ``shift``."""
    scatter = moments_about(moments.weights, moments.first, moments.second, shift)[2]
    return list(jnp.einsum("qgkxy,vgkxy->qv", _quadratic_patterns(mixture, inv_chol), scatter))


def step_loads(mixture: StudentTMixture, moments: StepMoments, inv_chol: Array) -> list[Array]:
    """Per quadratic form, [T, V] sum_{g,k} tau E[W] delta'_q(y_t) under ``mixture``'s means and covariances."""
    new = emissions.mahalanobis_terms(moments.observations, mixture.means, inv_chol, mixture.scale_mask)
    quadratic = [new.scaled] if new.cross is None else [new.scaled, 2 * new.cross]
    return [jnp.sum(moments.weights * q[..., None], axis=(1, 2)) for q in quadratic]


def scale_update(old: FHMV, model: FHMV, stats: StateMoments | StepMoments) -> FHMV:
    """Maximise Q_s = -sum tau [ (D_s / 2) log s + E[W] delta'(s) / 2 ] over the magnitude parameters.

    tau and E[W] are those of the E-step's model ``old``; delta'(s) uses the new means and
    covariances of ``model``. ``stats`` keeps its leading sequence axis. With time-invariant
    scales the loads sum_t tau E[W] delta' per sub-state follow from ``StateMoments``; with
    time-varying ones they are summed per step from ``StepMoments``.
    """
    start = model.magnitudes()
    if not start:
        return model
    mixture = model.emission
    inv_chol = emissions.inverse_cholesky(mixture.cholesky())
    time_varying = isinstance(stats, StepMoments)
    if time_varying:
        loads = jax.vmap(lambda moments: step_loads(mixture, moments, inv_chol))(stats)
        counts = stats.counts
    else:
        moments = _summed(stats)
        loads = state_loads(mixture, moments, mixture.means - old.emission.means, inv_chol)
        counts = moments.counts
    exponents = scale_exponents(mixture)[: len(loads)]
    half_dim = 0.5 * mixture.num_scaled_features

    def objective(values):
        candidate = model.with_magnitudes(values)
        if time_varying:
            log_s = jax.vmap(lambda xb: log_scales(candidate, xb, initial_shocks(candidate))[0])(stats.driver)
        else:
            log_s = volatility_log_scales(candidate)
        value = -half_dim * jnp.sum(counts * log_s)
        for e, load in zip(exponents, loads, strict=True):
            value = value - 0.5 * jnp.sum(load * jnp.exp(-e * log_s))
        return value

    return model.with_magnitudes(newton_ascent(objective, start))


def _leverage_inputs(stats: LeverageStats) -> tuple[Array, Array, Array]:
    """(moves to state 1, transitions out of each state, x_{t-1}) from [B, T-1] per-step statistics."""
    return stats.pairwise[..., 1], jnp.sum(stats.pairwise, axis=-1), stats.driver[..., None]


def leverage_log_likelihood(raw: Array, moved: Array, totals: Array, x_prev: Array) -> Array:
    """sum_t xi_t(i, j) log softmax_j(a_ij + b_ij x_{t-1}) with column 0 fixed at zero; raw = (a[:, 1], b[:, 1])."""
    eta = raw[0][None, None, :] + raw[1][None, None, :] * x_prev
    return jnp.sum(moved * eta - totals * jax.nn.softplus(eta))


def leverage_derivatives(raw: Array, moved: Array, totals: Array, x_prev: Array) -> tuple[Array, Array]:
    """Closed-form gradient [4] and Hessian [4, 4] of ``leverage_log_likelihood`` in ``raw.reshape(-1)``.

    Each row i is a binary logistic regression with eta = a_i + b_i x: the gradient is
    sum (n_1 - N p)(1, x) and the Hessian -sum N p (1 - p)(1, x)(1, x)^T, in one pass.
    """
    eta = raw[0][None, None, :] + raw[1][None, None, :] * x_prev
    p = jax.nn.sigmoid(eta)
    residual, weight = moved - totals * p, totals * p * (1 - p)
    grad = jnp.stack([jnp.sum(residual, axis=(0, 1)), jnp.sum(residual * x_prev, axis=(0, 1))])
    m0, m1, m2 = (jnp.diag(jnp.sum(weight * x_prev**k, axis=(0, 1))) for k in range(3))
    hess = -jnp.stack([jnp.stack([m0, m1]), jnp.stack([m1, m2])])
    return grad.reshape(-1), hess.transpose(0, 2, 1, 3).reshape(4, 4)


def leverage_update(leverage: MarkovLeverage, stats: LeverageStats) -> MarkovLeverage:
    """Weighted logistic regression of V_t on x_{t-1} (Markov leverage), by Newton with closed-form derivatives."""
    data = _leverage_inputs(stats)
    best = newton_ascent(
        lambda values: leverage_log_likelihood(values["leverage_raw"], *data),
        {"leverage_raw": leverage.leverage_raw},
        derivatives=lambda flat: leverage_derivatives(flat.reshape(2, 2), *data),
    )
    return leverage.replace(**best)


def _summed(tree):
    """Sum every leaf over its leading (sequence) axis."""
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), tree)


def m_step(model: FHMV, stats: SequenceStats, prior: CovariancePrior) -> FHMV:
    """New parameters from the per-sequence statistics of ``model``'s E-step (leading axis B), in the
    ECM order above; reads no data."""
    initial = _summed(stats.initial)
    transitions = _summed(stats.transitions)
    num_chains = model.spec.num_chains
    updated = eqx.tree_at(lambda m: m.regime, model, regime_update(model.regime, initial[0], transitions[0]))
    if model.persistence is not None:
        chains = persistence_update(model.persistence, transitions[1 : 1 + num_chains])
        updated = eqx.tree_at(lambda m: m.persistence, updated, chains)
    if model.jump is not None:
        axis = 1 + num_chains
        updated = eqx.tree_at(lambda m: m.jump, updated, jump_update(model.jump, initial[axis], transitions[axis]))
    mixture = emission_update(model.emission, _summed(stats.components), prior)
    updated = eqx.tree_at(lambda m: m.emission, updated, mixture)
    updated = scale_update(model, updated, stats.volatility)
    if stats.leverage is not None:
        updated = eqx.tree_at(lambda m: m.leverage, updated, leverage_update(updated.leverage, stats.leverage))
    return updated


def log_prior(mixture: StudentTMixture, prior: CovariancePrior) -> Array:
    """sum_{g,k} -(count / 2) log|Sigma| - (ridge / 2) tr(Sigma^{-1}): the covariance penalty EM maximises."""
    chol = mixture.cholesky()
    log_det = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))
    trace_inv = jnp.sum(emissions.inverse_cholesky(chol) ** 2)
    return -0.5 * prior.count * log_det - 0.5 * prior.ridge * trace_inv

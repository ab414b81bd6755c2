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
from jax.flatten_util import ravel_pytree
from jax.scipy.special import digamma, xlogy

from .._types import Array, Float
from ..model import emissions, factors
from ..model.fhmv import log_scales
from ..model.params import FHMVParams, cholesky_factor, jump_transition_matrix, logit, natural_parameters, safe_log
from ..model.spec import ModelSpec
from .stats import SequenceStats, StateMoments, moments_about, component_posteriors, scale_exponents, sequence_terms

_NEWTON_STEPS = 3
_STEP_SIZES = 0.5 ** jnp.arange(5)
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

    value = f(flat)
    for _ in range(num_steps):
        grad, hess = derivatives(flat)
        eigvals, eigvecs = jnp.linalg.eigh(-0.5 * (hess + hess.T))
        floor = 1e-8 * jnp.maximum(1.0, jnp.max(jnp.abs(eigvals)))
        direction = eigvecs @ ((eigvecs.T @ grad) / jnp.maximum(eigvals, floor))
        candidates = flat[None, :] + _STEP_SIZES[:, None].astype(flat.dtype) * direction[None, :]
        values = jax.vmap(f)(candidates)
        values = jnp.where(jnp.isfinite(values), values, -jnp.inf)
        best = jnp.argmax(values)
        improved = values[best] >= value
        flat = jnp.where(improved, candidates[best], flat)
        value = jnp.where(improved, values[best], value)
    return unravel(flat)


def _normalised_rows(counts: Array, fallback: Array) -> Array:
    """counts / row sums; rows without any count keep ``fallback``."""
    totals = jnp.sum(counts, axis=-1, keepdims=True)
    return jnp.where(totals > 0, counts / jnp.where(totals > 0, totals, 1.0), fallback)


def regime_update(params: FHMVParams, initial: Array, counts: Array) -> FHMVParams:
    """pi = E[1{R_1 = g}] (averaged over sequences); A = expected transition counts, normalised."""
    natural_A = jax.nn.softmax(params.transition_logits, axis=-1)
    return eqx.tree_at(
        lambda p: (p.initial_logits, p.transition_logits),
        params,
        (safe_log(initial / jnp.sum(initial)), safe_log(_normalised_rows(counts, natural_A))),
    )


def persistence_update(spec: ModelSpec, params: FHMVParams, counts: tuple[Array, ...]) -> FHMVParams:
    """p_n = expected stays / expected transitions of chain n (pooled over chains when tied)."""
    stacked = jnp.stack(counts)
    stays = jnp.trace(stacked, axis1=-2, axis2=-1)
    totals = jnp.sum(stacked, axis=(-2, -1))
    if spec.tied_persistence:
        stays, totals = jnp.sum(stays, keepdims=True), jnp.sum(totals, keepdims=True)
    old = jax.nn.sigmoid(params.persistence_raw)
    p = jnp.where(totals > 0, stays / jnp.where(totals > 0, totals, 1.0), old)
    return eqx.tree_at(lambda q: q.persistence_raw, params, logit(p))


_JUMP_FIELDS = ("jump_q_raw", "jump_back_raw", "jump_phi_raw")
_SCALE_FIELDS = ("c1_raw", "theta_c_raw", "m1_raw", "theta_m_raw", "l1_raw", "theta_l_raw")


def _present(params: FHMVParams, names: tuple[str, ...]) -> dict[str, Array]:
    return {n: getattr(params, n) for n in names if getattr(params, n) is not None}


def _with(params: FHMVParams, values: dict[str, Array]) -> FHMVParams:
    names = tuple(values)
    return eqx.tree_at(lambda p: tuple(getattr(p, n) for n in names), params, tuple(values[n] for n in names))


def jump_update(spec: ModelSpec, params: FHMVParams, initial: Array, counts: Array) -> FHMVParams:
    """Maximise sum_ij n_ij log P_ij + sum_j gamma^J_1(j) log pi^J_j over the jump parameters."""

    def objective(values):
        matrix = jump_transition_matrix(spec, _with(params, values))
        law = factors.jump_stationary_law(matrix)
        return jnp.sum(xlogy(counts, matrix)) + jnp.sum(xlogy(initial, law))

    return _with(params, newton_ascent(objective, _present(params, _JUMP_FIELDS)))


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


def emission_update(spec: ModelSpec, params: FHMVParams, stats: SequenceStats, prior: CovariancePrior) -> FHMVParams:
    """Weights, means, covariances and degrees of freedom from statistics summed over sequences.

    Moments are about the current means mu_0; with Lambda_t = diag(s_t^{a/2}) the mean solves
    (Sigma^{-1} * sum_e P_e n_e) (mu - mu_0) = sum_e (Sigma^{-1} * P_e) m_e, which is
    mu = mu_0 + m_1 / n_1 without a scale mask; then
    Sigma = (sum_e P_e * S_e(mu) + ridge * I) / (n + count).
    """
    dtype = params.means.dtype
    D = spec.num_features
    counts = stats.component_counts
    weights = _normalised_rows(counts, jax.nn.softmax(params.log_weights, axis=-1))

    eye = jnp.broadcast_to(jnp.eye(D, dtype=dtype), counts.shape + (D, D))
    patterns = emissions.mask_patterns(spec.scale_mask, D, dtype)
    n_e, m_e, S_e = stats.scale_weights, stats.first_moments, stats.second_moments
    inv_chol = emissions.inverse_cholesky(cholesky_factor(params.chol_raw))
    precision = jnp.einsum("gkdi,gkdj->gkij", inv_chol, inv_chol)
    system = precision * jnp.einsum("exy,egk->gkxy", patterns, n_e)
    rhs = jnp.einsum("gkxy,exy,egky->gkx", precision, patterns, m_e)
    has_mass = n_e[0] > jnp.finfo(dtype).tiny * 1e10
    safe_system = jnp.where(has_mass[..., None, None], system, eye)
    shift = jnp.where(has_mass[..., None], jnp.linalg.solve(safe_system, rhs[..., None])[..., 0], 0.0)
    means = params.means + shift

    scatter = jnp.einsum("exy,egkxy->gkxy", patterns, moments_about(n_e, m_e, S_e, shift)[2])
    covariance = (scatter + prior.ridge * eye) / (counts + prior.count)[..., None, None]
    covariance = 0.5 * (covariance + jnp.swapaxes(covariance, -1, -2))
    chol = jnp.linalg.cholesky(covariance)
    usable = (counts + prior.count > 0) & jnp.all(jnp.isfinite(chol), axis=(-2, -1))
    log_diag = jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1))
    chol_raw = jnp.tril(jnp.where(usable[..., None, None], chol, 0.0), -1) + jnp.where(
        usable[..., None], log_diag, 0.0
    )[..., None] * eye
    chol_raw = jnp.where(usable[..., None, None], chol_raw, params.chol_raw)

    updated = eqx.tree_at(lambda p: (p.log_weights, p.means, p.chol_raw), params, (safe_log(weights), means, chol_raw))
    if spec.gaussian:
        return updated
    low, high = spec.dof_bounds
    old_dof = natural_parameters(spec, params)["dof"]
    safe_counts = jnp.where(counts > 0, counts, 1.0)
    dof = jnp.where(counts > 0, solve_dof(stats.dof_terms / safe_counts, low, high), old_dof)
    return eqx.tree_at(lambda p: p.dof_raw, updated, logit((dof - low) / (high - low)))


def _quadratic_patterns(spec: ModelSpec, inv_chol: Array) -> Float[Array, "Q G K D D"]:
    """Matrices of the quadratic forms in delta'(s) that scale with s: Sigma^{-1} without a scale mask, else
    Sigma^{-1} * P_e for the patterns of s^{-1} and s^{-1/2} (see ``emissions.mask_patterns``)."""
    precision = jnp.einsum("gkdi,gkdj->gkij", inv_chol, inv_chol)
    patterns = emissions.mask_patterns(spec.scale_mask, spec.num_features, inv_chol.dtype)[:2]
    return precision[None] * patterns[:, None, None]


def _state_loads(spec: ModelSpec, moments: StateMoments, shift: Array, inv_chol: Array) -> list[Array]:
    """Per quadratic form, [V] sum_t tau E[W] delta'_q (y_t - mu') from moments about mu = mu' - ``shift``."""
    scatter = moments_about(moments.weights, moments.first, moments.second, shift)[2]
    return list(jnp.einsum("qgkxy,vgkxy->qv", _quadratic_patterns(spec, inv_chol), scatter))


def _step_loads(spec: ModelSpec, old: FHMVParams, means: Array, inv_chol: Array, y: Array, x: Array | None,
                gamma: Float[Array, "T G V"]) -> list[Array]:
    """Per quadratic form, [T, V] sum_{g,k} tau E[W] delta'_q(y_t) under the E-step's model ``old``."""
    old_natural = natural_parameters(spec, old)
    terms = sequence_terms(spec, old, old_natural, y, x)
    _, block = terms.terms_of(terms.inputs)
    new = emissions.mahalanobis_terms(y, means, inv_chol, spec.scale_mask)
    tau, expected_w, _ = component_posteriors(spec, old_natural, block, gamma)
    quadratic = [new.scaled] if new.cross is None else [new.scaled, 2 * new.cross]
    return [jnp.sum(tau * expected_w * q[..., None], axis=(1, 2)) for q in quadratic]


def scale_update(
    spec: ModelSpec, old: FHMVParams, params: FHMVParams, stats: SequenceStats, y: Array, x: Array | None
) -> FHMVParams:
    """Maximise Q_s = -sum tau [ (D_s / 2) log s + E[W] delta'(s) / 2 ] over the magnitude parameters.

    tau and E[W] are those of the E-step's model ``old``; delta'(s) uses the new means and
    covariances of ``params``. ``stats`` keeps its leading sequence axis. With time-invariant
    scales the loads sum_t tau E[W] delta' per sub-state follow from ``stats.state_moments``;
    otherwise they are recomputed per step from the data.
    """
    start = _present(params, _SCALE_FIELDS)
    if not start:
        return params
    inv_chol = emissions.inverse_cholesky(cholesky_factor(params.chol_raw))
    time_varying = stats.state_moments is None
    if time_varying:
        loads = jax.vmap(lambda yb, xb, gamma: _step_loads(spec, old, params.means, inv_chol, yb, xb, gamma))(
            y, x, stats.regime_volatility
        )
        counts = stats.state_counts
    else:
        moments = _summed(stats, "state_moments")
        loads = _state_loads(spec, moments, params.means - old.means, inv_chol)
        counts = moments.counts
    exponents = scale_exponents(spec)[: len(loads)]
    half_dim = 0.5 * spec.num_scaled_features

    def objective(values):
        natural = natural_parameters(spec, _with(params, values))
        if time_varying:
            log_s = jax.vmap(lambda xb: log_scales(spec, natural, xb))(x)
        else:
            log_s = log_scales(spec, natural, None)[0]
        value = -half_dim * jnp.sum(counts * log_s)
        for e, load in zip(exponents, loads):
            value = value - 0.5 * jnp.sum(load * jnp.exp(-e * log_s))
        return value

    return _with(params, newton_ascent(objective, start))


def _leverage_inputs(pairwise: Array, x: Array) -> tuple[Array, Array, Array]:
    """(moves to state 1, transitions out of each state, x_{t-1}) from [B, T-1, 2, 2] two-slice marginals."""
    return pairwise[..., 1], jnp.sum(pairwise, axis=-1), x[:, :-1, None]


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


def leverage_update(params: FHMVParams, pairwise: Array, x: Array) -> FHMVParams:
    """Weighted logistic regression of V_t on x_{t-1} (Markov leverage), by Newton with closed-form derivatives."""
    data = _leverage_inputs(pairwise, x)
    best = newton_ascent(
        lambda values: leverage_log_likelihood(values["leverage_raw"], *data),
        {"leverage_raw": params.leverage_raw},
        derivatives=lambda flat: leverage_derivatives(flat.reshape(2, 2), *data),
    )
    return _with(params, best)


def _summed(stats: SequenceStats, field: str):
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), getattr(stats, field))


def m_step(
    spec: ModelSpec,
    params: FHMVParams,
    stats: SequenceStats,
    y: Float[Array, "B T D"],
    x: Float[Array, "B T"] | None,
    prior: CovariancePrior,
) -> FHMVParams:
    """New parameters from per-sequence statistics (leading axis B), in the ECM order above.

    ``y`` and ``x`` are the (zero-padded) sequences the statistics came from.
    """
    old = params
    initial = _summed(stats, "initial")
    transitions = _summed(stats, "transitions")
    params = regime_update(params, initial[0], transitions[0])
    if spec.num_chains:
        params = persistence_update(spec, params, transitions[1 : 1 + spec.num_chains])
    if spec.has_jumps:
        jump_axis = 1 + spec.num_chains
        params = jump_update(spec, params, initial[jump_axis], transitions[jump_axis])
    summed = stats._replace(
        component_counts=_summed(stats, "component_counts"),
        scale_weights=_summed(stats, "scale_weights"),
        first_moments=_summed(stats, "first_moments"),
        second_moments=_summed(stats, "second_moments"),
        dof_terms=_summed(stats, "dof_terms"),
    )
    params = emission_update(spec, params, summed, prior)
    params = scale_update(spec, old, params, stats, y, x)
    if spec.leverage == "markov":
        params = leverage_update(params, stats.leverage_pairwise, x)
    return params


def log_prior(params: FHMVParams, prior: CovariancePrior) -> Array:
    """sum_{g,k} -(count / 2) log|Sigma| - (ridge / 2) tr(Sigma^{-1}): the covariance penalty EM maximises."""
    chol = cholesky_factor(params.chol_raw)
    log_det = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))
    trace_inv = jnp.sum(emissions.inverse_cholesky(chol) ** 2)
    return -0.5 * prior.count * log_det - 0.5 * prior.ridge * trace_inv

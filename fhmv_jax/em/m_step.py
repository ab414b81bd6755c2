"""M-step of the ECM algorithm (MODEL.md section 5).

Conditional maximisations, in this order, each of which does not lower the expected
complete-data log-likelihood Q (plus the covariance prior), so the penalised
log-likelihood never decreases:

1. regime, persistence: closed form from the expected counts;
2. jump chain: ``newton_ascent`` on the expected transition counts plus the stationary
   initial law (closed form would ignore that term);
3. weights, means, covariances (with an inverse-Wishart ridge) given the current scales,
   then degrees of freedom by bisection on log nu;
4. volatility magnitudes (c_1, theta_c, m_1, theta_m, l_1, theta_l) given the new means
   and covariances, and the Markov-leverage logits: ``newton_ascent``, damped Newton steps in a
   trust region that rise whenever the gradient is not zero, to the maximiser within rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.scipy.special import digamma, xlogy

from .._types import Array, Bool, Float
from ..model import emissions
from ..model.emissions import StudentTMixture, moments_about
from ..model.factors import JumpChain, MarkovLeverage, PersistenceChains, RegimeChain, jump_stationary_law
from ..model.fhmv import FHMV, initial_shocks, volatility_log_scales
from ..model.params import logit, safe_log
from .stats import (
    ComponentStats,
    LeverageStats,
    SequenceStats,
    StateMoments,
    StepMoments,
    scale_exponents,
)

_MAX_ASCENT_STEPS = 60
_MIN_DAMPING, _MIN_RADIUS = 1e-12, 1e-12
_TRUST_RADIUS = 3.0
_ROUNDING = 1e3
_SETTLE_FLOAT32 = 1.0
_BISECTION_STEPS = 64


def _settle_factor(dtype) -> float:
    """The predicted gain, in units of eps (1 + |f|), below which ``newton_ascent`` stops stepping.

    In float64, 1e3 eps |f| = 2e-13 |f| is far below any gain EM resolves, and it is the bar of the stalls
    (``_ROUNDING``) too. In float32, 1e3 eps |f| = 1.2e-4 |Q|, about a nat for the default spec on 500 steps,
    as much as an ECM iteration of the slow phase gains: stopping there cost a float32 M-step up to a quarter
    of the gain that float64 made from the same point (docs/float32.md). So float32 steps on until the
    predicted gain is below f's own resolution, eps (1 + |f|), and a trust region that collapses while the
    predicted gain is between the two bars, where rounding hides the gains, ends the ascent without a stall.
    """
    return _ROUNDING if jnp.dtype(dtype) == jnp.float64 else _SETTLE_FLOAT32


class CovariancePrior(NamedTuple):
    """Inverse-Wishart ridge: Sigma = (S + ridge * I) / (n + count); log prior
    -(count / 2) log|Sigma| - (ridge / 2) tr(Sigma^{-1}) per component.

    Pass arrays (as ``fit_em`` does) so that new values do not recompile ``em_step``.
    """

    ridge: float | Array = 1e-2
    count: float | Array = 1e-2


class Ascent(NamedTuple):
    """Outcome of ``newton_ascent``.

    Attributes:
        params: the maximiser found (never worse than the start).
        stalled: no damped step raised the objective while the predicted Newton gain was above
            rounding: the update stopped short of a maximum (a bug to report, never silent).
        gradient_norm: the gradient's norm at the last point where derivatives were taken.
    """

    params: object
    stalled: Bool[Array, ""]
    gradient_norm: Float[Array, ""]


def newton_ascent(objective: Callable, start, max_steps: int = _MAX_ASCENT_STEPS,
                  derivatives: Callable | None = None) -> Ascent:
    """Maximise ``objective`` over a small pytree (unconstrained coordinates) by Levenberg-Marquardt steps
    in a trust region (More & Sorensen's step, Nocedal & Wright, Algorithm 4.1), until the predicted gain is
    below rounding.

    With the gradient g and the eigen-decomposition -H = V diag(lambda) V^T, a step is
    d(mu) = V (V^T g / (lambda + mu)) with mu = mu_0 = max(0, -lambda_min) + 1e-12 scale (scale the largest
    |lambda|: Newton's step where -H is positive definite) or, where that step is longer than the trust
    radius Delta, the mu > mu_0 with |d(mu)| = Delta (found by bisection: |d| falls with mu). A step is kept if
    it raises the objective (non-finite values count as -inf). A rejected step shrinks Delta to a quarter of
    its length; a kept one that ends on the boundary and gains more than 3/4 of the quadratic model's
    prediction doubles Delta, up to its start of 3; one that gains less than 1/4 of it quarters Delta. Since
    d(mu) -> g / mu as Delta -> 0, a small enough region gives a rise whenever g is not zero and the objective
    is smooth, so the ascent cannot stall on an indefinite Hessian or on a step that leaves the domain. It
    stops when Newton's predicted gain 0.5 g^T (-H + mu_0)^{-1} g is below 1e3 eps (1 + |f|) (float32:
    eps (1 + |f|), ``_settle_factor``), after taking that last step (kept unless it lowers the objective
    by more than 1e3 eps (1 + |f|)), so the result is the maximiser to rounding, not the accident of a step
    count; or when Delta falls below max(1e-12, eps) (1 + |x|) without a rise, which is a stall (``stalled``)
    unless the predicted gain is between the float32 bar and 1e3 eps (1 + |f|); or after ``max_steps`` trials.

    Args:
        objective: pytree -> scalar.
        start: the starting pytree.
        max_steps: the most trial steps.
        derivatives: optional flat vector -> (gradient, Hessian) in closed form; by default
            ``jax.grad`` and ``jax.hessian`` of the objective.
    """
    flat, unravel = ravel_pytree(start)
    dtype = flat.dtype
    eps, tiny = jnp.finfo(dtype).eps, jnp.finfo(dtype).tiny
    rounding, settle = _ROUNDING * eps, _settle_factor(dtype) * eps
    # float32 resolves no curvature below eps of the largest nor a step below eps (1 + |x|)
    min_damping, min_radius = max(_MIN_DAMPING, float(eps)), max(_MIN_RADIUS, float(eps))

    def f(v):
        value = objective(unravel(v))
        return jnp.where(jnp.isfinite(value), value, -jnp.inf)

    if derivatives is None:

        def derivatives(v):
            return jax.grad(f)(v), jax.hessian(f)(v)

    def local_model(v):
        grad, hess = derivatives(v)
        eigvals, eigvecs = jnp.linalg.eigh(-0.5 * (hess + hess.T))
        return _LocalModel(grad, eigvals, eigvecs)

    def _trial(carry):
        flat, value, local, stale, radius, _, _, step = carry
        local = jax.lax.cond(stale, local_model, lambda _: local, flat)
        coefficients = local.eigvecs.T @ local.grad
        scale = jnp.maximum(jnp.max(jnp.abs(local.eigvals)), tiny)
        floor = jnp.maximum(0.0, -local.eigvals[0]) + min_damping * scale
        shift = _region_shift(local.eigvals, coefficients, floor, radius)
        along = coefficients / (local.eigvals + shift)
        length, step_vector = jnp.linalg.norm(along), local.eigvecs @ along
        candidate = f(flat + step_vector)
        tolerance = rounding * (1 + jnp.abs(value))
        newton_gain = 0.5 * jnp.sum(coefficients**2 / (local.eigvals + floor))
        settled = newton_gain <= settle * (1 + jnp.abs(value))
        gain = candidate - value
        accept = (gain > 0) | (settled & (gain >= -tolerance))
        predicted = jnp.sum(coefficients * along) - 0.5 * jnp.sum(local.eigvals * along**2)
        ratio = gain / jnp.maximum(predicted, tiny)
        grown = jnp.where((ratio > 0.75) & (length >= 0.99 * radius), jnp.minimum(2 * radius, _TRUST_RADIUS), radius)
        radius = jnp.where(accept, jnp.where(ratio < 0.25, 0.25 * radius, grown), 0.25 * length)
        flat = jnp.where(accept, flat + step_vector, flat)
        value = jnp.where(accept, candidate, value)
        collapsed = ~accept & (radius < min_radius * (1 + jnp.linalg.norm(flat)))
        stalled = collapsed & (settled | (newton_gain > tolerance))
        return flat, value, local, accept & ~settled, radius, (accept & settled) | collapsed, stalled, step + 1

    def _running(carry):
        return ~carry[5] & (carry[7] < max_steps)

    size = flat.shape[0]
    unknown = _LocalModel(jnp.zeros(size, dtype), jnp.zeros(size, dtype), jnp.zeros((size, size), dtype))
    initial = (flat, f(flat), unknown, jnp.array(True), jnp.asarray(_TRUST_RADIUS, dtype), jnp.array(False),
               jnp.array(False), 0)
    flat, _, local, _, _, _, stalled, _ = jax.lax.while_loop(_running, _trial, initial)
    return Ascent(unravel(flat), stalled, jnp.linalg.norm(local.grad))


def _region_shift(eigvals: Array, coefficients: Array, floor: Array, radius: Array) -> Array:
    """The shift mu >= ``floor`` whose step |c / (lambda + mu)| is at most ``radius``: ``floor`` where that step
    is short enough, else the root of |c / (lambda + mu)| = radius by bisection on [floor, floor + |c| / radius]
    (at its upper end the step is at most ``radius``, since lambda_i + mu >= mu - floor there)."""

    def length(mu):
        return jnp.linalg.norm(coefficients / (eigvals + mu))

    def _bisect(_, bounds):
        low, high = bounds
        middle = 0.5 * (low + high)
        longer = length(middle) > radius
        return jnp.where(longer, middle, low), jnp.where(longer, high, middle)

    upper = floor + jnp.linalg.norm(coefficients) / radius
    _, high = jax.lax.fori_loop(0, _BISECTION_STEPS, _bisect, (floor, upper))
    return jnp.where(length(floor) <= radius, floor, high)


class _LocalModel(NamedTuple):
    """The gradient and the eigen-decomposition of -H at the current point of ``newton_ascent``."""

    grad: Array
    eigvals: Array
    eigvecs: Array


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


def jump_update(jump: JumpChain, initial: Array, counts: Array) -> tuple[JumpChain, Ascent]:
    """Maximise sum_ij n_ij log P_ij + sum_j gamma^J_1(j) log pi^J_j over the jump chain's transition parameters."""

    def objective(values):
        matrix = jump.replace(**values).transition()
        return jnp.sum(xlogy(counts, matrix)) + jnp.sum(xlogy(initial, jump_stationary_law(matrix)))

    ascent = newton_ascent(objective, jump.present(JumpChain.transition_fields))
    return jump.replace(**ascent.params), ascent


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
    Sigma = (sum_e P_e * S_e(mu) + ridge * I) / (n + count). With ``zero_mean`` the means stay at zero.
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
    shift = jnp.where(has_mass[..., None] & (not mixture.zero_mean),
                      jnp.linalg.solve(safe_system, rhs[..., None])[..., 0], 0.0)
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
    """Matrices of the quadratic forms in delta'(s): Sigma^{-1} without a scale mask, else Sigma^{-1} * P_e for
    the patterns of s^{-1}, s^{-1/2} and 1 (see ``emissions.mask_patterns``)."""
    precision = jnp.einsum("gkdi,gkdj->gkij", inv_chol, inv_chol)
    patterns = emissions.mask_patterns(mixture.scale_mask, mixture.num_features, inv_chol.dtype)
    return precision[None] * patterns[:, None, None]


def state_loads(mixture: StudentTMixture, moments: StateMoments, shift: Array, inv_chol: Array) -> list[Array]:
    """Per quadratic form, [G, K, V] sum_t tau E[W] delta'_q (y_t - mu') from moments about mu = mu' - ``shift``."""
    scatter = moments_about(moments.weights, moments.first, moments.second, shift)[2]
    return list(jnp.einsum("qgkxy,vgkxy->qgkv", _quadratic_patterns(mixture, inv_chol), scatter))


class StepLoads(NamedTuple):
    """The volatility loads per step, factored: load_q,t(g, k, v) = forms_q,t(g, k) weights_t(g, k, v), so the
    [..., T, G, K, V] products are never stored; each contraction reads ``weights`` once for every q.

    Attributes:
        weights: [B, T, G, K, V] tau_t(g, k, v) E[W] (``StepMoments.weights``).
        forms: [Q, B, T, G, K] delta'_q(y_t), the quadratic forms of the new means and covariances.
    """

    weights: Float[Array, "B T G K V"]
    forms: Float[Array, "Q B T G K"]

    def summed(self, step_weights: Float[Array, "Q B T"]) -> Float[Array, "Q G K V"]:
        """sum_t c_q,t load_q,t: the loads summed over steps with per-step weights.

        One matrix product over the flattened steps for every pair of (g, k), of which the diagonal is kept: XLA
        reads the weights once that way, where a product batched over (g, k) or a weighted sum over steps
        transposes or strides through them (about 7x slower for [1, 5000, 1, 1, 10240] on a CPU)."""
        coefficients = step_weights[..., None, None] * self.forms
        Q, B, T, G, K = coefficients.shape
        both = jnp.einsum("qnj,nm->qjm", coefficients.reshape(Q, B * T, G * K), self.weights.reshape(B * T, -1))
        diagonal = jnp.diagonal(both.reshape(Q, G * K, G * K, -1), axis1=1, axis2=2)
        return jnp.moveaxis(diagonal, -1, 1).reshape(Q, G, K, -1)

    def contracted(self, matrices: Float[Array, "Q V M"]) -> Float[Array, "Q B T G K M"]:
        """sum_v load_q,t(v) M_q(v, m): every step's loads contracted with a matrix per q."""
        stacked = self.weights @ jnp.moveaxis(matrices, 0, 1).reshape(matrices.shape[1], -1)
        per_form = jnp.moveaxis(stacked.reshape(stacked.shape[:-1] + (matrices.shape[0], -1)), -2, 0)
        return self.forms[..., None] * per_form


def step_loads(mixture: StudentTMixture, moments: StepMoments, inv_chol: Array) -> StepLoads:
    """The per-step loads tau E[W] delta'_q(y_t) under ``mixture``'s means and covariances, of [B, T, ...]
    ``moments``."""
    new = jax.vmap(lambda y: emissions.mahalanobis_terms(y, mixture.means, inv_chol, mixture.scale_mask))(
        moments.observations)
    quadratic = [new.scaled] if new.cross is None else [new.scaled, 2 * new.cross, new.rest]
    return StepLoads(moments.weights, jnp.stack(quadratic))


class ScaleProblem(NamedTuple):
    """The volatility CM-step as an optimisation problem (``scale_problem``).

    Attributes:
        objective: (w, u) -> Q, with w = {"magnitudes": the time-invariant ones, "covariance_scale": kappa [G, K]}
            and u the leverage magnitudes that drive a time-varying path (empty otherwise).
        start: (w, u) at the current model (kappa = 0).
        derivatives: flat (w, u) -> (gradient, Hessian) in closed form through the leverage path, or ``None``
            (autodiff of ``objective``).
    """

    objective: Callable
    start: tuple
    derivatives: Callable | None


def scale_update(old: FHMV, model: FHMV, stats: StateMoments | StepMoments, counts: Float[Array, "G K"],
                 prior: CovariancePrior) -> tuple[FHMV, Ascent | None]:
    """Maximise Q over the magnitudes and covariance scales (``scale_problem``) by ``newton_ascent``."""
    if not model.magnitudes():
        return model, None
    problem = scale_problem(old, model, stats, counts, prior)
    ascent = newton_ascent(problem.objective, problem.start, derivatives=problem.derivatives)
    static, lever = ascent.params
    updated = model.with_magnitudes(static["magnitudes"] | lever)
    mixture = updated.emission.with_scaled_covariances(static["covariance_scale"])
    return eqx.tree_at(lambda m: m.emission, updated, mixture), ascent


def scale_problem(old: FHMV, model: FHMV, stats: StateMoments | StepMoments, counts: Float[Array, "G K"],
                  prior: CovariancePrior) -> ScaleProblem:
    """Q over the magnitude parameters and a log-factor kappa_{g,k} of every covariance, jointly.

    With Sigma'_{g,k} = exp(kappa_{g,k}) Sigma_{g,k} the terms of Q (plus the covariance prior) that move are
    -sum tau [ (D_s / 2) log s + (D / 2) kappa + E[W] delta'(s) exp(-kappa) / 2 ]
    - (count D / 2) kappa - (ridge / 2) exp(-kappa) tr(Sigma^{-1}), summed over components. The covariance
    update alone leaves the overall level of the scales to the magnitudes and the reverse; moving both in one
    conditional maximisation takes EM along that ridge in one step instead of a zig-zag of many (ECM stays
    monotone: kappa = 0 and the old magnitudes are a candidate).

    tau and E[W] are those of the E-step's model ``old``; delta'(s) uses the new means and
    covariances of ``model``. ``stats`` keeps its leading sequence axis. With time-invariant
    scales the loads sum_t tau E[W] delta' per sub-state follow from ``StateMoments``; with
    time-varying ones they are summed per step from ``StepMoments``. ``counts`` are the component counts n_{g,k}.
    """
    magnitudes = model.magnitudes()
    mixture = model.emission
    inv_chol = emissions.inverse_cholesky(mixture.cholesky())
    time_varying = isinstance(stats, StepMoments)
    if time_varying:
        loads = step_loads(mixture, stats, inv_chol)
        state_counts = stats.counts
    else:
        moments = _summed(stats)
        loads = state_loads(mixture, moments, mixture.means - old.emission.means, inv_chol)
        state_counts = moments.counts
    state_totals = jnp.sum(state_counts.reshape(-1, state_counts.shape[-1]), axis=0)
    step_totals = jnp.sum(state_counts, axis=-1) if time_varying else None
    exponents = scale_exponents(mixture)
    half_dim, D = 0.5 * mixture.num_scaled_features, mixture.num_features
    trace_precision = jnp.sum(inv_chol**2, axis=(-2, -1))

    leverage = model.leverage.magnitudes() if time_varying else {}
    others = {k: v for k, v in magnitudes.items() if k not in leverage}

    def log_path(values):
        """[B, T] log L_t of the leverage magnitudes ``values``."""
        block = model.leverage.replace(**values)
        return jax.vmap(lambda xb: block.log_leverage_path(xb, initial_shocks(model))[1])(stats.driver)

    def log_scales(values):
        """[V] log s(v), the time-invariant part of the log-scales, at the magnitudes of ``values``."""
        return volatility_log_scales(model.with_magnitudes(magnitudes | values["magnitudes"]))

    def weighted_loads(path):
        """Per exponent e, [G, K, V] the loads summed over steps with weights L_t^{-e} (as they are when the
        scales do not vary in time): every term of Q that mixes loads and parameters is linear in them."""
        if path is None:
            return loads
        return list(loads.summed(jnp.stack([jnp.exp(-e * path) for e in exponents])))

    def terms(values, weighted):
        """Q as a function of the other magnitudes and kappa, given ``weighted_loads``; without the path's own
        term -(D_s / 2) sum_t n_t log L_t."""
        log_s = log_scales(values)
        kappa = values["covariance_scale"]
        value = -half_dim * jnp.sum(state_totals * log_s) - 0.5 * D * jnp.sum((counts + prior.count) * kappa)
        value = value - 0.5 * prior.ridge * jnp.sum(jnp.exp(-kappa) * trace_precision)
        for e, load in zip(exponents, weighted, strict=True):
            value = value - 0.5 * jnp.sum(jnp.exp(-kappa) * (load @ jnp.exp(-e * log_s)))
        return value

    def objective(values):
        static, lever = values
        if not time_varying:
            return terms(static, loads)
        path = log_path(lever)
        return terms(static, weighted_loads(path)) - half_dim * jnp.sum(step_totals * path)

    start = ({"magnitudes": others, "covariance_scale": jnp.zeros_like(counts)}, leverage)
    if not time_varying:
        return ScaleProblem(objective, start, None)
    pieces = _ScalePieces(terms, weighted_loads, log_path, log_scales, loads, exponents, half_dim * step_totals)
    return ScaleProblem(objective, start, functools.partial(_composite_derivatives, start, pieces))


class _ScalePieces(NamedTuple):
    """What ``_composite_derivatives`` needs of a time-varying ``scale_problem``."""

    terms: Callable
    weighted_loads: Callable
    log_path: Callable
    log_scales: Callable
    loads: StepLoads
    exponents: tuple[float, ...]
    path_counts: Array


def _composite_derivatives(start: tuple, pieces: _ScalePieces, flat: Array) -> tuple[Array, Array]:
    """Gradient and Hessian of Q(w, u) = q(w, p(u)) at ``flat`` (the flat coordinates of ``start`` = (w, u)),
    where the path p = [B, T] log L_t is a scan over time and q is separable in its steps.

    Forward-mode through the scan gives p, J = dp/du and K = d^2p/du^2 for the few leverage parameters u;
    then g_u = sum_t q_p J, H_uu = sum_t (q_pp J J^T + q_p K), H_wu = sum_t q_wp J^T. The step weights are read
    twice (``StepLoads``): summed over steps with the path's weights (q's derivatives in w, by autodiff of
    ``terms``), and contracted per step with s(v)^{-e} and its w-derivatives in one matrix product (q_p, q_pp
    and q_wp in closed form: the load terms are -1/2 sum exp(-kappa) L_t^{-e} A_t(w), A_t = sum_v load_t(v)
    s(v)^{-e}).
    """
    static_flat, unravel_static = ravel_pytree(start[0])
    _, unravel_lever = ravel_pytree(start[1])
    w, u = flat[: static_flat.shape[0]], flat[static_flat.shape[0] :]

    def path(u):
        return pieces.log_path(unravel_lever(u))

    def with_jacobian(u):
        jacobian = jax.jacfwd(path)(u)
        return jacobian, (jacobian, path(u))

    second, (jacobian, p) = jax.jacfwd(with_jacobian, has_aux=True)(u)
    weighted = pieces.weighted_loads(p)

    def q(w):
        return pieces.terms(unravel_static(w), weighted)

    def factors(w, e):
        return jnp.exp(-e * pieces.log_scales(unravel_static(w)))

    per_step = pieces.loads.contracted(jnp.stack([jnp.concatenate([factors(w, e)[:, None], jax.jacfwd(factors)(w, e)],
                                                                  axis=1) for e in pieces.exponents]))

    def slope(v):
        """q_p [B, T] at (v, p), exact to first order in v - w."""
        scales = jnp.exp(-unravel_static(v)["covariance_scale"])[None, None]
        total = -pieces.path_counts
        for e, products in zip(pieces.exponents, per_step, strict=True):
            contracted = products[..., 0] + products[..., 1:] @ (v - w)
            total = total + 0.5 * e * jnp.exp(-e * p) * jnp.sum(scales * contracted, axis=(-2, -1))
        return total

    scales = jnp.exp(-unravel_static(w)["covariance_scale"])[None, None]
    q_p, q_wp = slope(w), jax.jacfwd(slope)(w)
    q_pp = sum(-0.5 * e**2 * jnp.exp(-e * p) * jnp.sum(scales * products[..., 0], axis=(-2, -1))
               for e, products in zip(pieces.exponents, per_step, strict=True))
    grad_u = jnp.einsum("bt,btu->u", q_p, jacobian)
    hess_uu = jnp.einsum("bt,btu,btv->uv", q_pp, jacobian, jacobian) + jnp.einsum("bt,btuv->uv", q_p, second)
    hess_wu = jnp.einsum("btw,btu->wu", q_wp, jacobian)
    grad = jnp.concatenate([jax.grad(q)(w), grad_u])
    hess = jnp.block([[jax.hessian(q)(w), hess_wu], [hess_wu.T, hess_uu]])
    return grad, hess


def _leverage_inputs(stats: LeverageStats) -> tuple[Array, Array, Array]:
    """(moves to state 1, transitions out of each state, x_{t-1}) from [B, T-1] per-step statistics."""
    return stats.pairwise[..., 1], jnp.sum(stats.pairwise, axis=-1), stats.driver[..., None]


def leverage_log_likelihood(raw: Array, moved: Array, totals: Array, x_prev: Array) -> Array:
    """sum_t xi_t(i, j) log softmax_j(a_ij + b_ij x_{t-1}) with column 0 fixed at zero; raw = (a[:, 1], b[:, 1]).

    Summed as -sum [(N - n_1) softplus(eta) + n_1 softplus(-eta)], terms of one sign: the equal
    n_1 eta - N softplus(eta) cancels where |eta| is large (a nearly separable regression), which in float32
    leaves rounding far above eps |Q| and lets ``newton_ascent`` take noise for gains.
    """
    eta = raw[0][None, None, :] + raw[1][None, None, :] * x_prev
    return -jnp.sum((totals - moved) * jax.nn.softplus(eta) + moved * jax.nn.softplus(-eta))


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


def leverage_update(leverage: MarkovLeverage, stats: LeverageStats) -> tuple[MarkovLeverage, Ascent]:
    """Weighted logistic regression of V_t on x_{t-1} (Markov leverage), by Newton with closed-form derivatives."""
    data = _leverage_inputs(stats)
    ascent = newton_ascent(
        lambda values: leverage_log_likelihood(values["leverage_raw"], *data),
        {"leverage_raw": leverage.leverage_raw},
        derivatives=lambda flat: leverage_derivatives(flat.reshape(2, 2), *data),
    )
    return leverage.replace(**ascent.params), ascent


def _summed(tree):
    """Sum every leaf over its leading (sequence) axis."""
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), tree)


def m_step(model: FHMV, stats: SequenceStats, prior: CovariancePrior) -> tuple[FHMV, dict[str, Array]]:
    """New parameters from the per-sequence statistics of ``model``'s E-step (leading axis B), in the
    ECM order above; reads no data.

    Returns:
        (the updated model, {parameter names: whether that iterative update stalled}) for the
        iterative blocks in use, e.g. ``{"c1, theta_c, m1, l1, theta_l": False}`` (see ``Ascent.stalled``).
    """
    initial = _summed(stats.initial)
    transitions = _summed(stats.transitions)
    num_chains = model.spec.num_chains
    stalled = {}
    updated = eqx.tree_at(lambda m: m.regime, model, regime_update(model.regime, initial[0], transitions[0]))
    if model.persistence is not None:
        chains = persistence_update(model.persistence, transitions[1 : 1 + num_chains])
        updated = eqx.tree_at(lambda m: m.persistence, updated, chains)
    if model.jump is not None:
        axis = 1 + num_chains
        jump, ascent = jump_update(model.jump, initial[axis], transitions[axis])
        updated = eqx.tree_at(lambda m: m.jump, updated, jump)
        stalled[_names(model.jump.present(JumpChain.transition_fields))] = ascent.stalled
    mixture = emission_update(model.emission, _summed(stats.components), prior)
    updated = eqx.tree_at(lambda m: m.emission, updated, mixture)
    updated, ascent = scale_update(model, updated, stats.volatility, _summed(stats.components).counts, prior)
    if ascent is not None:
        stalled[_names(model.magnitudes()) + ", covariance scales"] = ascent.stalled
    if stats.leverage is not None:
        leverage, ascent = leverage_update(updated.leverage, stats.leverage)
        updated = eqx.tree_at(lambda m: m.leverage, updated, leverage)
        stalled["leverage_logits"] = ascent.stalled
    return updated, stalled


def _names(fields: dict) -> str:
    """"c1, theta_c" from the unconstrained field names {"c1_raw": ..., "theta_c_raw": ...}."""
    return ", ".join(name.removesuffix("_raw") for name in fields)


def log_prior(mixture: StudentTMixture, prior: CovariancePrior) -> Array:
    """sum_{g,k} -(count / 2) log|Sigma| - (ridge / 2) tr(Sigma^{-1}): the covariance penalty EM maximises."""
    chol = mixture.cholesky()
    log_det = 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))
    trace_inv = jnp.sum(emissions.inverse_cholesky(chol) ** 2)
    return -0.5 * prior.count * log_det - 0.5 * prior.ridge * trace_inv

"""Multivariate Student-t (or Gaussian) mixture emissions with a volatility scale (MODEL.md section 3).

For component (g, k) with U = chol(Sigma_{g,k}) and a scale s, the covariance is
Lambda Sigma Lambda with Lambda = diag(s^{a_d / 2}) (a_d = 1 for every feature unless a
scale mask is set, so that it is s * Sigma). Writing z = y - mu and splitting it into its
scaled part z_a = a * z and the rest z_r,

    delta(s) = ||U^{-1} z_a||^2 / s + 2 <U^{-1} z_a, U^{-1} z_r> / sqrt(s) + ||U^{-1} z_r||^2,

so the three quadratic forms are computed once per (t, g, k), never per combined state:

    log t_D(y; mu, Lambda Sigma Lambda, nu) = lgamma((nu + D) / 2) - lgamma(nu / 2) - (D / 2) log(nu pi)
        - (1 / 2) log|Sigma| - (D_s / 2) log s - ((nu + D) / 2) log(1 + delta(s) / nu).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from .._types import Array, Float
from .params import AbstractBlock, as_array, bounded, check_interval, check_stochastic, cholesky_factor, logit, safe_log


class MahalanobisTerms(NamedTuple):
    """Quadratic forms of z = y_t - mu_{g,k} under Sigma_{g,k}^{-1}, each [T, G, K].

    ``scaled`` is ||U^{-1} z_a||^2; ``cross`` and ``rest`` (``None`` without a scale mask) are
    <U^{-1} z_a, U^{-1} z_r> and ||U^{-1} z_r||^2.
    """

    scaled: Float[Array, "T G K"]
    cross: Float[Array, "T G K"] | None
    rest: Float[Array, "T G K"] | None


def inverse_cholesky(chol: Float[Array, "... D D"]) -> Float[Array, "... D D"]:
    """U^{-1} for lower-triangular U by forward substitution, one row per step: X_i = (e_i - U_i X) / U_ii with the
    rows of X from i on still zero. Plain array operations instead of LAPACK's triangular solve, whose batched
    calls (e.g. under ``vmap`` of a Hessian-vector product) have deadlocked XLA's CPU thread pool."""
    num = chol.shape[-1]
    rows = jnp.moveaxis(chol, -2, 0)
    eye = jnp.moveaxis(jnp.broadcast_to(jnp.eye(num, dtype=chol.dtype), chol.shape), -2, 0)

    def step(inverse, i):
        row = (eye[i] - jnp.einsum("...j,...jk->...k", rows[i], inverse)) / rows[i][..., i, None]
        return inverse.at[..., i, :].set(row), None

    return jax.lax.scan(step, jnp.zeros_like(chol), jnp.arange(num))[0]


def mask_patterns(scale_mask: tuple[bool, ...] | None, num_features: int, dtype) -> Float[Array, "E D D"]:
    """P_e with Lambda^{-1} M Lambda^{-1} = sum_e s^{-e} (P_e * M), Lambda = diag(s^{a/2}), e in (1, 1/2, 0).

    Without a mask there is one pattern (all ones, e = 1).
    """
    if scale_mask is None:
        return jnp.ones((1, num_features, num_features), dtype)
    a = jnp.asarray(scale_mask, dtype)
    b = 1 - a
    return jnp.stack([jnp.outer(a, a), jnp.outer(a, b) + jnp.outer(b, a), jnp.outer(b, b)])


def num_forms(scale_mask: tuple[bool, ...] | None) -> int:
    """r, the quadratic forms of ``MahalanobisTerms`` that a scale mask uses (``scaled``; with a mask also ``cross``
    and ``rest``)."""
    return 1 if scale_mask is None else 3


def form_matrices(inv_chol: Float[Array, "G K D D"], scale_mask: tuple[bool, ...] | None
                  ) -> Float[Array, "r G K D D"]:
    """Q_f with form_f(y) = (y - mu)^T Q_f (y - mu) for the forms of ``MahalanobisTerms`` in its order: the
    precision U^{-T} U^{-1} masked by ``mask_patterns`` (halved for ``cross``)."""
    precision = jnp.einsum("gkdi,gkdj->gkij", inv_chol, inv_chol)
    patterns = mask_patterns(scale_mask, inv_chol.shape[-1], inv_chol.dtype)
    halves = jnp.asarray([1.0, 0.5, 1.0][:num_forms(scale_mask)], inv_chol.dtype)
    return halves[:, None, None, None, None] * precision[None] * patterns[:, None, None]


def _whitened_forms(y, means, inv_chol, scale_mask) -> MahalanobisTerms:
    """Via whitened residuals U^{-1}(y - mu): stores a [T, G, K, D] array; cheap when G K is small."""

    def _whiten(factor):
        return jnp.einsum("gkde,te->tgkd", factor, y) - jnp.einsum("gkde,gke->gkd", factor, means)[None]

    whitened = _whiten(inv_chol)
    if scale_mask is None:
        return MahalanobisTerms(jnp.sum(whitened**2, axis=-1), None, None)
    rest_part = _whiten(inv_chol * (1 - jnp.asarray(scale_mask, dtype=y.dtype))[None, None, None, :])
    scaled_part = whitened - rest_part
    return MahalanobisTerms(
        jnp.sum(scaled_part**2, axis=-1), jnp.sum(scaled_part * rest_part, axis=-1), jnp.sum(rest_part**2, axis=-1)
    )


def _expanded_forms(y, means, inv_chol, scale_mask) -> MahalanobisTerms:
    """As y'^T Q y' - 2 mu'^T Q y' + mu'^T Q mu' about the mean of the component means: one matrix
    product with the data's [T, D * D] outer products, never a [T, G, K, D] array; cheap when G K > 2 D."""
    T, D = y.shape
    G, K = means.shape[:2]
    reference = jnp.mean(means, axis=(0, 1))
    y_ref, mu_ref = y - reference[None, :], means - reference[None, None, :]
    outer = (y_ref[:, :, None] * y_ref[:, None, :]).reshape(T, D * D)
    forms = []
    for q in form_matrices(inv_chol, scale_mask):
        q_mu = jnp.einsum("gkde,gke->gkd", q, mu_ref)
        quadratic = outer @ q.reshape(G * K, D * D).T - 2 * y_ref @ q_mu.reshape(G * K, D).T
        constant = jnp.einsum("gkd,gkd->gk", q_mu, mu_ref).reshape(1, G * K)
        forms.append((quadratic + constant).reshape(T, G, K))
    if scale_mask is None:
        return MahalanobisTerms(jnp.maximum(forms[0], 0.0), None, None)
    return MahalanobisTerms(jnp.maximum(forms[0], 0.0), forms[1], jnp.maximum(forms[2], 0.0))


def mahalanobis_terms(
    y: Float[Array, "T D"],
    means: Float[Array, "G K D"],
    inv_chol: Float[Array, "G K D D"],
    scale_mask: tuple[bool, ...] | None,
) -> MahalanobisTerms:
    """Quadratic forms of z = y_t - mu_{g,k} under Sigma^{-1} (split by the scale mask); see the module docstring.

    Uses whichever of two exact formulations stores less per time step: whitened residuals
    (G K D numbers) or the data's outer products (D^2 numbers).
    """
    G, K, D = means.shape
    forms = _expanded_forms if 2 * D < G * K else _whitened_forms
    return forms(y, means, inv_chol, scale_mask)


def moments_about(
    weights: Array, first: Array, second: Array, offset: Float[Array, "G K D"]
) -> tuple[Array, Array, Array]:
    """Moments [W, G, K, ...] about a reference point re-expressed about reference + ``offset`` [G, K, D]."""
    offset = offset[None]
    first_about = first - weights[..., None] * offset
    second_about = (
        second
        - first[..., :, None] * offset[..., None, :]
        - offset[..., :, None] * first[..., None, :]
        + weights[..., None, None] * offset[..., :, None] * offset[..., None, :]
    )
    return weights, first_about, second_about


class FormMoments(NamedTuple):
    """Weighted moments of the steps about fixed centres c_{g,k}, one set per quadratic form f of
    ``MahalanobisTerms`` (in its order, r of them): they give sum_t w_t(g, k, f) form_f(y_t) for any mu and Sigma
    (``weighted_forms``).

    Attributes:
        weights: [r, G, K] sum_t w_t.
        first: [r, G, K, D] sum_t w_t (y_t - c).
        second: [r, G, K, D, D] sum_t w_t (y_t - c)(y_t - c)^T.
    """

    weights: Float[Array, "r G K"]
    first: Float[Array, "r G K D"]
    second: Float[Array, "r G K D D"]


def form_moments(y: Float[Array, "L D"], weights: Float[Array, "L G K r"], centres: Float[Array, "G K D"]
                 ) -> FormMoments:
    """The ``FormMoments`` of L steps with weights w_t(g, k, f)."""
    residuals = y[:, None, None, :] - centres[None]
    weighted = jnp.einsum("lgkf,lgkd->fgkld", weights, residuals)
    return FormMoments(jnp.einsum("lgkf->fgk", weights), jnp.sum(weighted, axis=3),
                       jnp.einsum("fgkld,lgke->fgkde", weighted, residuals))


def weighted_forms(moments: FormMoments, centres: Float[Array, "G K D"], means: Float[Array, "G K D"],
                   inv_chol: Float[Array, "G K D D"], scale_mask: tuple[bool, ...] | None) -> Float[Array, "G K r"]:
    """sum_t w_t(g, k, f) form_f(y_t) for the forms of ``mahalanobis_terms`` at ``means`` and U^{-1} = ``inv_chol``,
    from the moments about ``centres``: tr(Q_f W2'), Q_f the form's matrix and W2' the moments about the means
    (``moments_about``)."""
    second = moments_about(*moments, means - centres)[2]
    return jnp.einsum("fgkde,fgkde->gkf", form_matrices(inv_chol, scale_mask), second)


def scaled_mahalanobis(terms: MahalanobisTerms, log_scale: Float[Array, "T V"],
                       inv_scale: Float[Array, "T V"] | None = None) -> Float[Array, "T G K V"]:
    """delta(s) for every (t, g, k) and volatility sub-state v, with log s = ``log_scale[t, v]`` (and 1 / s =
    ``inv_scale`` when given, e.g. as the outer product of two vectors: no exp per element)."""
    inv_scale = (jnp.exp(-log_scale) if inv_scale is None else inv_scale)[:, None, None, :]
    delta = terms.scaled[..., None] * inv_scale
    if terms.cross is None:
        return delta
    return delta + 2 * terms.cross[..., None] * jnp.sqrt(inv_scale) + terms.rest[..., None]


class ComponentTerms(NamedTuple):
    """Per (t, g, k, v) quantities, cheap to recompute inside fused reductions.

    Attributes:
        weighted_log_dens: log w_{g,k} + log t_D(y_t; mu_{g,k}, s_t(v) Sigma_{g,k}, nu_{g,k}).
        delta: delta(s_t(v)), the scaled Mahalanobis distance.
        log_ratio: log(1 + delta / nu) (``None`` when gaussian).
    """

    weighted_log_dens: Float[Array, "T G K V"]
    delta: Float[Array, "T G K V"]
    log_ratio: Float[Array, "T G K V"] | None


class SharedTerms(NamedTuple):
    """Per (g, k): ``normalisers`` (everything in log t_D that depends on neither y nor s), ``log_weights``
    (normalised: log w_{g,k}) and ``dof`` (nu, ``None`` for Gaussian components)."""

    normalisers: Float[Array, "G K"]
    log_weights: Float[Array, "G K"]
    dof: Float[Array, "G K"] | None


def component_log_densities(mahalanobis: MahalanobisTerms, shared: SharedTerms, log_scale: Float[Array, "T V"],
                            inv_scale: Float[Array, "T V"] | None, num_features: int, num_scaled_features: int
                            ) -> ComponentTerms:
    """log w_{g,k} + log t_D(y_t; mu_{g,k}, s_t(v) Sigma_{g,k}, nu_{g,k}) (or the Gaussian density) and its parts.

    Args:
        mahalanobis: the quadratic forms of the steps (``mahalanobis_terms``).
        shared: the mixture's ``SharedTerms``.
        log_scale: [T, V] (or [1, V]) log s_t(v).
        inv_scale: 1 / s_t(v), if known without an exp per element (default exp(-log_scale)).
        num_features: D; num_scaled_features: D_s, the features the scale multiplies.
    """
    delta = scaled_mahalanobis(mahalanobis, log_scale, inv_scale)
    normalisers = shared.normalisers[None, :, :, None]
    scale_term = -0.5 * num_scaled_features * log_scale[:, None, None, :]
    log_ratio = None
    if shared.dof is None:
        component = normalisers + scale_term - 0.5 * delta
    else:
        nu = shared.dof[None, :, :, None]
        log_ratio = jnp.log1p(delta / nu)
        component = normalisers + scale_term - 0.5 * (nu + num_features) * log_ratio
    weighted = component + shared.log_weights[None, :, :, None]
    return ComponentTerms(weighted, delta, log_ratio)


class BlockTerms(NamedTuple):
    """Emission terms of L steps, as expressions that XLA fuses into their consumers.

    Attributes:
        log_scale: [L, V] (or [1, V]) log s_t(v).
        components: the ``ComponentTerms``, [L, G, K, V].
        shift: [L] m_t, the largest weighted component log-density of the step.
        scaled_components: [L, G, K, V] w_{g,k} t_D(y_t; ...) / exp(m_t), in [0, 1].
        scaled: [L, G, V] b_t(g, v) / exp(m_t) = sum_k ``scaled_components``.
        inv_scale: [L, V] (or [1, V]) 1 / s_t(v).
    """

    log_scale: Array
    components: ComponentTerms
    shift: Float[Array, " L"]
    scaled_components: Float[Array, "L G K V"]
    scaled: Float[Array, "L G V"]
    inv_scale: Array | None = None


class StudentTMixture(AbstractBlock):
    """Each regime's K-component Student-t (or Gaussian) mixture, rescaled by the volatility factors.

    Attributes:
        dof_bounds: (lower, upper) bounds of nu (static).
        scale_mask: D flags of the features the scale multiplies, ``None`` for all (static).
        zero_mean: the means are fixed at zero and not estimated (static).
        log_weights: [G, K] log mixture weights.
        means: [G, K, D] component means.
        chol_raw: [G, K, D, D] log-Cholesky factors of Sigma: strict lower triangle as is, log diagonal
            (the upper triangle is unused).
        dof_raw: [G, K] logit of (nu - lower) / (upper - lower); ``None`` for Gaussian components.
    """

    dof_bounds: tuple[float, float] = eqx.field(static=True)
    scale_mask: tuple[bool, ...] | None = eqx.field(static=True)
    zero_mean: bool = eqx.field(static=True)
    log_weights: Float[Array, "G K"]
    means: Float[Array, "G K D"]
    chol_raw: Float[Array, "G K D D"]
    dof_raw: Float[Array, "G K"] | None

    @classmethod
    def static_fields(cls, spec):
        return {"dof_bounds": spec.dof_bounds, "scale_mask": spec.scale_mask, "zero_mean": spec.zero_mean}

    @classmethod
    def natural_shapes(cls, spec):
        G, K, D = spec.num_regimes, spec.num_components, spec.num_features
        shapes = {"weights": (G, K), "means": (G, K, D), "covariances": (G, K, D, D)}
        return shapes | ({} if spec.gaussian else {"dof": (G, K)})

    @classmethod
    def raw_shapes(cls, spec):
        G, K, D = spec.num_regimes, spec.num_components, spec.num_features
        return {"log_weights": (G, K), "means": (G, K, D), "chol_raw": (G, K, D, D),
                "dof_raw": None if spec.gaussian else (G, K)}

    @classmethod
    def natural_bounds(cls, spec):
        return {"weights": (0.0, 1.0), "dof": spec.dof_bounds}

    @classmethod
    def from_natural(cls, spec, values, dtype=None):
        check_stochastic("weights", values["weights"])
        if spec.zero_mean and np.any(np.asarray(values["means"]) != 0):
            raise ValueError("the spec has zero_mean=True: every mean must be 0")
        dof_raw = None
        if "dof" in values:
            low, high = spec.dof_bounds
            check_interval("dof", values["dof"], low, high, "both")
            dof_raw = logit((values["dof"] - low) / (high - low))
        return cls(spec.dof_bounds, spec.scale_mask, spec.zero_mean, as_array(safe_log(values["weights"]), dtype),
                   as_array(values["means"], dtype), as_array(_covariance_raw(values["covariances"]), dtype),
                   as_array(dof_raw, dtype))

    @property
    def gaussian(self) -> bool:
        return self.dof_raw is None

    @property
    def num_features(self) -> int:
        return self.means.shape[-1]

    @property
    def num_scaled_features(self) -> int:
        """D_s: how many features the volatility scale multiplies."""
        return self.num_features if self.scale_mask is None else sum(self.scale_mask)

    def weights(self) -> Float[Array, "G K"]:
        return jax.nn.softmax(self.log_weights, axis=-1)

    def cholesky(self) -> Float[Array, "G K D D"]:
        """U with Sigma = U U^T, lower triangular with a positive diagonal."""
        return cholesky_factor(self.chol_raw)

    def with_scaled_covariances(self, log_factor: Float[Array, "G K"]) -> StudentTMixture:
        """The mixture with every Sigma_{g,k} multiplied by exp(log_factor[g, k])."""
        half = 0.5 * log_factor[..., None, None]
        eye = jnp.broadcast_to(jnp.eye(self.num_features, dtype=self.chol_raw.dtype), self.chol_raw.shape)
        return self.replace(chol_raw=jnp.tril(self.chol_raw, -1) * jnp.exp(half) + (self.chol_raw + half) * eye)

    def dof(self) -> Float[Array, "G K"] | None:
        """nu in ``dof_bounds`` (``None`` for Gaussian components)."""
        return None if self.gaussian else bounded(self.dof_raw, *self.dof_bounds)

    def natural(self):
        chol = self.cholesky()
        values = {"weights": self.weights(), "means": self.means, "covariances": chol @ jnp.swapaxes(chol, -1, -2)}
        return values | ({} if self.gaussian else {"dof": self.dof()})

    @property
    def num_free_parameters(self) -> int:
        G, K, D = self.means.shape
        means = 0 if self.zero_mean else G * K * D
        return G * (K - 1) + means + G * K * D * (D + 1) // 2 + (0 if self.gaussian else G * K)

    def fixed_fields(self) -> tuple[str, ...]:
        return ("means",) if self.zero_mean else ()

    def permuted(self, order: np.ndarray) -> StudentTMixture:
        """The mixture with regime i being the old regime ``order[i]``."""
        return self.replace(**{name: value[order] for name, value in self.raw_arrays().items() if value is not None})

    def log_normalisers(self, chol: Float[Array, "G K D D"]) -> Float[Array, "G K"]:
        """Everything in log t_D (or log N) that depends on neither y nor s."""
        D = self.num_features
        half_log_det = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
        if self.gaussian:
            return -0.5 * D * math.log(2 * math.pi) - half_log_det
        dof = self.dof()
        return gammaln((dof + D) / 2) - gammaln(dof / 2) - 0.5 * D * jnp.log(dof * math.pi) - half_log_det

    def shared_terms(self) -> SharedTerms:
        """The (g, k) quantities of the component log-densities that depend on neither y nor s."""
        return SharedTerms(self.log_normalisers(self.cholesky()), jax.nn.log_softmax(self.log_weights, axis=-1),
                           self.dof())

    def component_terms(self, mahalanobis: MahalanobisTerms, log_scale: Float[Array, "T V"],
                        inv_scale: Float[Array, "T V"] | None = None) -> ComponentTerms:
        """``component_log_densities`` of this mixture."""
        return component_log_densities(mahalanobis, self.shared_terms(), log_scale, inv_scale, self.num_features,
                                       self.num_scaled_features)

    def block_terms(self, inv_chol: Array, y: Float[Array, "L D"], log_scale: Array,
                    inv_scale: Array | None = None) -> BlockTerms:
        """``BlockTerms`` of L steps (``inv_chol``: U^{-1} of every component, computed once outside any loop;
        ``inv_scale``: 1 / s if known without an exp per element, see ``scaled_mahalanobis``)."""
        inv_scale = jnp.exp(-log_scale) if inv_scale is None else inv_scale
        components = self.component_terms(mahalanobis_terms(y, self.means, inv_chol, self.scale_mask), log_scale,
                                          inv_scale)
        shift = jax.lax.stop_gradient(jnp.max(components.weighted_log_dens, axis=(1, 2, 3)))
        scaled_components = jnp.exp(components.weighted_log_dens - shift[:, None, None, None])
        return BlockTerms(log_scale, components, shift, scaled_components, jnp.sum(scaled_components, axis=2),
                          inv_scale)


def _covariance_raw(covariances: np.ndarray) -> np.ndarray:
    """Log-Cholesky storage of symmetric positive definite matrices (checked)."""
    if not np.allclose(covariances, np.swapaxes(covariances, -1, -2), rtol=1e-10, atol=1e-12):
        raise ValueError("covariances must be symmetric")
    chol = np.zeros_like(covariances)
    for index in np.ndindex(covariances.shape[:-2]):
        try:
            chol[index] = np.linalg.cholesky(covariances[index])
        except np.linalg.LinAlgError:
            raise ValueError(f"covariances{list(index)} is not positive definite") from None
    diagonal = np.diagonal(chol, axis1=-2, axis2=-1)
    return np.tril(chol, -1) + np.log(diagonal)[..., None] * np.eye(covariances.shape[-1])


def log_sum_exp(values: Array, axis: int) -> Array:
    """log sum_k exp(values) along ``axis`` for finite values, as one max and one sum.

    ``jax.nn.logsumexp`` also guards against infinite maxima with selects, which XLA:CPU
    does not vectorise: on [T, G, K, V] emission terms it costs several times this.
    """
    shift = jax.lax.stop_gradient(jnp.max(values, axis=axis, keepdims=True))
    return jnp.squeeze(shift, axis) + jnp.log(jnp.sum(jnp.exp(values - shift), axis=axis))

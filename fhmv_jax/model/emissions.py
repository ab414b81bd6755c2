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

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from .._types import Array, Float
from .spec import ModelSpec


class MahalanobisTerms(NamedTuple):
    """Quadratic forms of z = y_t - mu_{g,k} under Sigma_{g,k}^{-1}, each [T, G, K].

    ``scaled`` is ||U^{-1} z_a||^2; ``cross`` and ``rest`` (``None`` without a scale mask) are
    <U^{-1} z_a, U^{-1} z_r> and ||U^{-1} z_r||^2.
    """

    scaled: Float[Array, "T G K"]
    cross: Float[Array, "T G K"] | None
    rest: Float[Array, "T G K"] | None


def inverse_cholesky(chol: Float[Array, "G K D D"]) -> Float[Array, "G K D D"]:
    """U^{-1} for lower-triangular U (computed once per model, outside any scan)."""
    eye = jnp.broadcast_to(jnp.eye(chol.shape[-1], dtype=chol.dtype), chol.shape)
    return jax.scipy.linalg.solve_triangular(chol, eye, lower=True)


def mask_patterns(scale_mask: tuple[bool, ...] | None, num_features: int, dtype) -> Float[Array, "E D D"]:
    """P_e with Lambda^{-1} M Lambda^{-1} = sum_e s^{-e} (P_e * M), Lambda = diag(s^{a/2}), e in (1, 1/2, 0).

    Without a mask there is one pattern (all ones, e = 1).
    """
    if scale_mask is None:
        return jnp.ones((1, num_features, num_features), dtype)
    a = jnp.asarray(scale_mask, dtype)
    b = 1 - a
    return jnp.stack([jnp.outer(a, a), jnp.outer(a, b) + jnp.outer(b, a), jnp.outer(b, b)])


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
    precision = jnp.einsum("gkdi,gkdj->gkij", inv_chol, inv_chol)
    reference = jnp.mean(means, axis=(0, 1))
    y_ref, mu_ref = y - reference[None, :], means - reference[None, None, :]
    outer = (y_ref[:, :, None] * y_ref[:, None, :]).reshape(T, D * D)
    forms = []
    for pattern in mask_patterns(scale_mask, D, y.dtype):
        q = precision * pattern[None, None]
        q_mu = jnp.einsum("gkde,gke->gkd", q, mu_ref)
        quadratic = outer @ q.reshape(G * K, D * D).T - 2 * y_ref @ q_mu.reshape(G * K, D).T
        constant = jnp.einsum("gkd,gkd->gk", q_mu, mu_ref).reshape(1, G * K)
        forms.append((quadratic + constant).reshape(T, G, K))
    if scale_mask is None:
        return MahalanobisTerms(jnp.maximum(forms[0], 0.0), None, None)
    return MahalanobisTerms(jnp.maximum(forms[0], 0.0), 0.5 * forms[1], jnp.maximum(forms[2], 0.0))


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


def scaled_mahalanobis(terms: MahalanobisTerms, log_scale: Float[Array, "T V"]) -> Float[Array, "T G K V"]:
    """delta(s) for every (t, g, k) and volatility sub-state v, with log s = ``log_scale[t, v]``."""
    inv_scale = jnp.exp(-log_scale)[:, None, None, :]
    delta = terms.scaled[..., None] * inv_scale
    if terms.cross is None:
        return delta
    return delta + 2 * terms.cross[..., None] * jnp.sqrt(inv_scale) + terms.rest[..., None]


def component_log_normalisers(
    spec: ModelSpec, chol: Float[Array, "G K D D"], dof: Float[Array, "G K"] | None
) -> Float[Array, "G K"]:
    """Everything in log t_D (or log N) that depends on neither y nor s."""
    D = spec.num_features
    half_log_det = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    if spec.gaussian:
        return -0.5 * D * math.log(2 * math.pi) - half_log_det
    return gammaln((dof + D) / 2) - gammaln(dof / 2) - 0.5 * D * jnp.log(dof * math.pi) - half_log_det


def component_log_densities(
    spec: ModelSpec,
    normalisers: Float[Array, "G K"],
    dof: Float[Array, "G K"] | None,
    delta: Float[Array, "T G K V"],
    log_scale: Float[Array, "T V"],
) -> tuple[Float[Array, "T G K V"], Float[Array, "T G K V"] | None]:
    """log t_D(y_t; mu_{g,k}, s_{t,v} Sigma_{g,k}, nu_{g,k}) (or the Gaussian density).

    Returns:
        (log densities, log(1 + delta / nu) or ``None`` when gaussian), the latter reused by
        the E-step for E[log W].
    """
    scale_term = -0.5 * spec.num_scaled_features * log_scale[:, None, None, :]
    if spec.gaussian:
        return normalisers[None, :, :, None] + scale_term - 0.5 * delta, None
    nu = dof[None, :, :, None]
    log_ratio = jnp.log1p(delta / nu)
    return normalisers[None, :, :, None] + scale_term - 0.5 * (nu + spec.num_features) * log_ratio, log_ratio


def log_sum_exp(values: Array, axis: int) -> Array:
    """log sum_k exp(values) along ``axis`` for finite values, as one max and one sum.

    ``jax.nn.logsumexp`` also guards against infinite maxima with selects, which XLA:CPU
    does not vectorise: on [T, G, K, V] emission terms it costs several times this.
    """
    shift = jax.lax.stop_gradient(jnp.max(values, axis=axis, keepdims=True))
    return jnp.squeeze(shift, axis) + jnp.log(jnp.sum(jnp.exp(values - shift), axis=axis))

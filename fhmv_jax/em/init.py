"""Data-driven initialisation (MODEL.md section 6): k-means into regimes, then into components."""

from __future__ import annotations

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, PRNGKeyArray, Scalar
from ..model.fhmv import FHMV, block_classes, initial_law, smoother, volatility_log_scales
from ..model.inputs import check_sequences
from ..model.params import as_array
from ..model.spec import ModelSpec
from .loop import run_em, stack_models
from .m_step import CovariancePrior

_MAX_KMEANS_POINTS = 50_000
INIT_METHODS = ("kmeans", "hmm")


def _squared_distances(points: Array, centres: Array) -> Array:
    return jnp.sum((points[:, None, :] - centres[None, :, :]) ** 2, axis=-1)


@partial(jax.jit, static_argnums=(3, 4))
def kmeans(key: PRNGKeyArray, points: Array, weights: Array, num_clusters: int, num_iters: int = 50):
    """Weighted k-means (k-means++ seeding, then Lloyd iterations); empty clusters keep their centre.

    Args:
        points: [n, D]; weights: [n] non-negative (zero rows are ignored).

    Returns:
        (centres [k, D], assignments [n], inertia).
    """
    keys = jax.random.split(key, num_clusters)
    first = jax.random.choice(keys[0], points.shape[0], p=weights / jnp.sum(weights))
    centres = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(points[first])
    for j in range(1, num_clusters):
        nearest = jnp.min(_squared_distances(points, centres[:j]), axis=1)
        probs = weights * nearest
        probs = jnp.where(jnp.sum(probs) > 0, probs, weights)
        centres = centres.at[j].set(points[jax.random.choice(keys[j], points.shape[0], p=probs / jnp.sum(probs))])

    def _lloyd(_, centres):
        assign = jnp.argmin(_squared_distances(points, centres), axis=1)
        onehot = jax.nn.one_hot(assign, num_clusters, dtype=points.dtype) * weights[:, None]
        totals = jnp.sum(onehot, axis=0)
        sums = onehot.T @ points
        return jnp.where(totals[:, None] > 0, sums / jnp.maximum(totals, 1e-300)[:, None], centres)

    centres = jax.lax.fori_loop(0, num_iters, _lloyd, centres)
    distances = _squared_distances(points, centres)
    return centres, jnp.argmin(distances, axis=1), jnp.sum(weights * jnp.min(distances, axis=1))


@jax.jit
def _weighted_covariances(points: Array, weights: Array, centres: Array) -> Array:
    """[k, D, D] weighted covariance of ``points`` about each centre; ``weights`` is [k, n]."""
    centred = points[None, :, :] - centres[:, None, :]
    totals = jnp.sum(weights, axis=1)[:, None, None]
    return jnp.einsum("kn,knd,kne->kde", weights, centred, centred) / jnp.maximum(totals, 1e-300)


def _kmeans_runs(key: PRNGKeyArray, points: Array, spec: ModelSpec, num_seeds: int) -> tuple[Array, Array]:
    """``num_seeds`` k-means runs into G clusters (vmapped): ([num_seeds, n] assignments, [num_seeds] inertia)."""
    ones = jnp.ones(points.shape[0], points.dtype)
    _, assignments, inertia = jax.vmap(lambda k: kmeans(k, points, ones, spec.num_regimes))(
        jax.random.split(key, num_seeds))
    return assignments, inertia


@eqx.filter_jit
def _kmeans_regimes(key: PRNGKeyArray, points: Array, spec: ModelSpec, num_seeds: int) -> Array:
    """[n] regime of every point: the best (least inertia) of ``num_seeds`` k-means runs."""
    assignments, inertia = _kmeans_runs(key, points, spec, num_seeds)
    return assignments[jnp.argmin(inertia)]


def reduced_hmm_spec(spec: ModelSpec) -> ModelSpec:
    """The Gaussian HMM behind ``init_model(method="hmm")``: G regimes, one Gaussian each, no factors."""
    return ModelSpec(num_features=spec.num_features, num_regimes=spec.num_regimes, num_chains=0, num_jump_states=1,
                     num_components=1, leverage="none", gaussian=True)


@eqx.filter_jit
def _smoothed_regimes(model: FHMV, y: Array, mask: Array) -> Array:
    """[B, T] most probable regime of every step under the smoothed posterior."""
    smoothed = jax.vmap(lambda yb, mb: smoother(model, yb, None, mb).smoothed)(y, mask)
    return jnp.argmax(jnp.sum(smoothed, axis=tuple(range(3, smoothed.ndim))), axis=-1)


def _hmm_regimes(key: PRNGKeyArray, spec: ModelSpec, y: Array, mask: Array, points: Array, num_seeds: int,
                 num_iters: int) -> Array:
    """[n valid steps] smoothed regime path of the best of ``num_seeds`` Gaussian HMMs, each started
    from one k-means run on ``points`` and fitted for ``num_iters`` EM iterations (vmapped)."""
    reduced = reduced_hmm_spec(spec)
    key_regimes, key_components = jax.random.split(key)
    assignments, _ = _kmeans_runs(key_regimes, points, spec, num_seeds)
    starts = [_partition_start(key_components, reduced, points, regime_of) for regime_of in assignments]
    fit = run_em(stack_models(starts), y, None, mask, CovariancePrior(), max_iters=num_iters, tol=0.0,
                 callback=None, stacked=True)
    return _smoothed_regimes(fit.model, y, mask)[mask]


@eqx.filter_jit
def _component_clusters(key: PRNGKeyArray, points: Array, spec: ModelSpec, regime_of: Array):
    """K k-means sub-clusters within every regime; a regime without points takes all points.

    Returns:
        (centres [G, K, D], component weights [G, K, n]).
    """
    membership = jax.nn.one_hot(regime_of, spec.num_regimes, dtype=points.dtype).T
    membership = jnp.where(jnp.sum(membership, axis=1, keepdims=True) > 0, membership, 1.0)

    def _within(k, member):
        sub_centres, sub_assign, _ = kmeans(k, points, member, spec.num_components)
        return sub_centres, jax.nn.one_hot(sub_assign, spec.num_components, dtype=points.dtype).T * member[None]

    return jax.vmap(_within)(jax.random.split(key, spec.num_regimes), membership)


@eqx.filter_jit
def _mean_scale(model: FHMV) -> Scalar:
    """E[s] under the law of h_1 (chains uniform, jump stationary, Markov leverage uniform; L_t = 1)."""
    volatility_law = jnp.sum(initial_law(model), axis=0).reshape(-1)
    return volatility_law @ jnp.exp(volatility_log_scales(model))


def init_model(
    key: PRNGKeyArray,
    spec: ModelSpec,
    y,
    x=None,
    *,
    lengths=None,
    num_seeds: int = 5,
    method: str = "kmeans",
    hmm_iters: int = 30,
) -> FHMV:
    """A starting model from data: a partition into G regimes, then K k-means components in each.

    The partition (``method``):
      - ``"kmeans"`` (MODEL.md 6): the best of ``num_seeds`` k-means runs on the observations.
      - ``"hmm"``: ``num_seeds`` Gaussian HMMs (G regimes, one full-covariance Gaussian each,
        no factors; ``reduced_hmm_spec``) started from single k-means runs, fitted for
        ``hmm_iters`` EM iterations (vmapped); the smoothed path of the best. The chain's
        persistence keeps apart clusters that k-means merges, and joins the fast-alternating
        modes of one regime that k-means splits; a better basin for ECM on regime data.

    Means and covariances come from the clusters (covariances divided by the mean
    volatility scale, so that the mixture over sub-states matches the data's spread);
    weights uniform, nu = 10; the chains and magnitudes start at each block's ``start`` values
    (MODEL.md 6): A = 0.95 on the diagonal, p = 0.98, q = 0.05 (q_back = 0.5), c_1 = 2, m_1 = 3,
    theta = 0.5, l_1 = 1.5 (Markov leverage; 0.5 predictable), Markov leverage logits giving
    0.9 persistence.

    Args:
        key: PRNG key for k-means.
        spec: the model spec.
        y: [T, D] or a padded batch [B, T, D] (with ``lengths``); x is validated alongside.
        num_seeds: k-means runs (``"kmeans"``) or HMM starts (``"hmm"``).
        method: ``"kmeans"`` or ``"hmm"``; hmm_iters: EM iterations of the HMM stage.

    Returns:
        An ``FHMV`` in float64 (or the dtype of the JAX default).

    Raises:
        ValueError: bad observations, fewer observations than G x K, or an unknown method.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"init method must be one of {INIT_METHODS}, got {method!r}")
    y, _, mask = check_sequences(spec, y, x, lengths)
    points = np.asarray(y)[np.asarray(mask)]
    if points.shape[0] < spec.num_regimes * spec.num_components:
        raise ValueError(
            f"{points.shape[0]} observations cannot initialise {spec.num_regimes} regimes"
            f" x {spec.num_components} components"
        )
    key_subsample, key_clusters = jax.random.split(key)
    key_regimes, key_components = jax.random.split(key_clusters)
    chosen = None
    if points.shape[0] > _MAX_KMEANS_POINTS:
        chosen = np.asarray(jax.random.choice(key_subsample, points.shape[0], (_MAX_KMEANS_POINTS,), replace=False))
        points = points[chosen]
    points = as_array(points)
    if method == "hmm":
        regime_of = _hmm_regimes(key_regimes, spec, y, mask, points, num_seeds, hmm_iters)
        regime_of = regime_of if chosen is None else regime_of[chosen]
    else:
        regime_of = _kmeans_regimes(key_regimes, points, spec, num_seeds)
    return _partition_start(key_components, spec, points, regime_of)


def _partition_start(key: PRNGKeyArray, spec: ModelSpec, points: Array, regime_of: Array) -> FHMV:
    """The starting model of a regime partition: K k-means components per regime, the fixed
    starting values of the chains and scales listed in ``init_model``.

    Args:
        points: [n, D] observations; regime_of: [n] their regimes.
    """
    centres, component_weights = _component_clusters(key, points, spec, regime_of)
    G, K, D = spec.num_regimes, spec.num_components, spec.num_features
    flat_weights = component_weights.reshape(G * K, -1)
    covariances = np.asarray(_weighted_covariances(points, flat_weights, centres.reshape(G * K, D)))
    counts = np.asarray(flat_weights.sum(axis=1))[:, None, None]
    pooled = np.cov(np.asarray(points).T).reshape(D, D)
    covariances = (covariances * counts + pooled) / (counts + 1)

    natural = {name: value for slot, block in block_classes(spec).items() if block is not None and slot != "emission"
               for name, value in block.start(spec).items()}
    means = np.zeros((G, K, D)) if spec.zero_mean else np.asarray(centres)
    natural |= {"weights": np.full((G, K), 1 / K), "means": means}
    if not spec.gaussian:
        natural["dof"] = np.full((G, K), 10.0)
    covariances = covariances.reshape(G, K, D, D)
    mean_scale = float(_mean_scale(FHMV.from_natural_parameters(spec, **natural, covariances=covariances)))
    mask = np.ones(D) if spec.scale_mask is None else np.asarray(spec.scale_mask, float)
    unscale = mean_scale ** (-mask / 2)
    return FHMV.from_natural_parameters(spec, **natural, covariances=covariances * unscale[:, None] * unscale[None, :])

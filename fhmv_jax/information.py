"""The Hessian of log p(y) in the emission parameters, by Louis' identity (``inference.additive``).

The mixture parameters of regime g (its log weights, means, the lower triangle of its log-Cholesky factors, its
degrees of freedom: p coordinates) move only the emissions of the states of regime g, so with
E_t(h) = log p(y_t | h)

    H_ee = sum_t E[d^2 E_t(h_t) | y] + Var[sum_t dE_t(h_t) | y].

The emissions of regime g at step t depend on its parameters through a few numbers z_t(g) (per component the
quadratic forms of ``mahalanobis_terms`` and the ``SharedTerms``: 8 for the default spec), so
dE_t(h) = J_t(g)^T a_t(h) with J = dz / d theta_g (p forward passes over the quadratic forms, each moving one
coordinate of every regime at once) and a = dE / dz, and the expected second derivatives follow by the chain
rule. Their part sum_t w_t . d^2 z_t (w = E[a]) is the Hessian of sum_t w_t . z_t, which the quadratic forms
give from the weights' moments of the data (``FormMoments``): one small program after the pass, not one per
block. For the default spec (96 states, 804 emission coordinates) this replaces 804 Hessian-vector products of
the whole log-likelihood by one pass over the data and the forward recursion of the variance.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._compile import classic_emitters
from ._types import Array, Float, Scalar
from .inference import forward_backward
from .inference.additive import BlockFactors, additive_covariance
from .model.emissions import (
    FormMoments,
    MahalanobisTerms,
    SharedTerms,
    StudentTMixture,
    component_log_densities,
    form_moments,
    inverse_cholesky,
    log_sum_exp,
    mahalanobis_terms,
    num_forms,
    weighted_forms,
)
from .model.fhmv import FHMV, Emissions, sequence_inputs


class EmissionCoordinates(NamedTuple):
    """The emission coordinates of theta, p per regime (static: hashable).

    Attributes:
        fields: per coordinate of one regime, its ``StudentTMixture`` field.
        indices: per coordinate, its index in the field's trailing axes (those after the regime axis).
        theta: [G][p] the position of every coordinate in the flat vector theta.
    """

    fields: tuple[str, ...]
    indices: tuple[tuple[int, ...], ...]
    theta: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return len(self.fields)

    def flat_theta(self) -> np.ndarray:
        """[G p] the positions in theta, regime by regime."""
        return np.asarray(self.theta).reshape(-1)


def _offsets(names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]) -> dict[str, int]:
    """Where each named array starts in the flat vector."""
    return dict(zip(names, np.cumsum([0] + [math.prod(s) for s in shapes])[:-1].tolist(), strict=True))


def other_coordinates(model: FHMV, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """The positions in a flat layout (``names``, ``shapes`` in vector order) outside the mixture's arrays."""
    offsets = _offsets(names, shapes)
    mixture = set(model.emission.raw_arrays())
    return np.concatenate([np.arange(offsets[name], offsets[name] + math.prod(shape))
                           for name, shape in zip(names, shapes, strict=True) if name not in mixture]
                          or [np.zeros(0, int)])


def emission_coordinates(model: FHMV, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...],
                         moving: np.ndarray) -> EmissionCoordinates:
    """The emission coordinates of a flat layout (``names``, ``shapes`` in vector order) that ``moving`` [P] marks
    (those that can move a natural parameter: not the unused upper triangle of a Cholesky factor)."""
    offsets = _offsets(names, shapes)
    layout = dict(zip(names, shapes, strict=True))

    def position(name, g, index):
        rest = layout[name][1:]
        return offsets[name] + g * math.prod(rest) + int(np.ravel_multi_index(index, rest))

    G = model.spec.num_regimes
    fields, indices = [], []
    for name in (name for name in model.emission.raw_arrays() if name in layout):
        for index in np.ndindex(*layout[name][1:]):
            if any(moving[position(name, g, index)] for g in range(G)):
                fields.append(name)
                indices.append(index)
    theta = tuple(tuple(position(f, g, i) for f, i in zip(fields, indices, strict=True)) for g in range(G))
    return EmissionCoordinates(tuple(fields), tuple(indices), theta)


def _tangents(mixture: StudentTMixture, coordinates: EmissionCoordinates) -> StudentTMixture:
    """The p directions of one coordinate in every regime at once, stacked [p, ...] in every array field."""
    stacked = {name: np.zeros((coordinates.size,) + value.shape, value.dtype)
               for name, value in mixture.raw_arrays().items() if value is not None}
    for j, (name, index) in enumerate(zip(coordinates.fields, coordinates.indices, strict=True)):
        stacked[name][(j, slice(None)) + index] = 1.0
    return mixture.replace(**{name: jnp.asarray(value) for name, value in stacked.items()})


def _gathered(arrays: StudentTMixture, coordinates: EmissionCoordinates) -> Float[Array, "... G p"]:
    """The coordinates of every regime from arrays shaped like the mixture's fields (leading axes kept)."""
    columns = []
    for name, index in zip(coordinates.fields, coordinates.indices, strict=True):
        value = getattr(arrays, name)
        columns.append(value[(Ellipsis, slice(None)) + index] if index else value)
    return jnp.stack(columns, axis=-1)


class MixtureParts(NamedTuple):
    """What the emissions of every step depend on the mixture's parameters through: the means, U^{-1}, and the
    ``SharedTerms`` stacked [G, K, c]."""

    means: Float[Array, "G K D"]
    inv_chol: Float[Array, "G K D D"]
    shared: Float[Array, "G K c"]


def _mixture_parts(mixture: StudentTMixture) -> MixtureParts:
    return MixtureParts(mixture.means, inverse_cholesky(mixture.cholesky()),
                        jnp.stack([a for a in mixture.shared_terms() if a is not None], axis=-1))


def _parts(parts: MixtureParts, scale_mask: tuple[bool, ...] | None, y: Float[Array, "L D"]) -> Float[Array, "L G z"]:
    """z_t(g): every quantity the emissions of regime g at step t depend on its parameters through (per component:
    the quadratic forms of ``mahalanobis_terms`` and the ``SharedTerms``), packed [L, G, K (r + c)]."""
    forms = mahalanobis_terms(y, parts.means, parts.inv_chol, scale_mask)
    local = jnp.stack([a for a in forms if a is not None], axis=-1)
    L, G = local.shape[:2]
    shared = jnp.broadcast_to(parts.shared.reshape(1, G, -1), (L, G, parts.shared[0].size))
    return jnp.concatenate([local.reshape(L, G, -1), shared], axis=-1)


def _log_densities_of_parts(mixture: StudentTMixture, z: Float[Array, " z"], log_scale: Float[Array, " V"],
                            inv_scale: Float[Array, " V"] | None) -> Float[Array, " V"]:
    """log p(y_t | g, v) for every v from z_t(g) (``_parts``): ``Emissions.log_densities`` of one (t, g)."""
    K = mixture.log_weights.shape[-1]
    r = num_forms(mixture.scale_mask)
    local, shared = z[:K * r].reshape(K, r), z[K * r:].reshape(K, -1)
    forms = MahalanobisTerms(*(local[None, None, :, i] for i in range(r)), *(None,) * (3 - r))
    terms = SharedTerms(shared[None, :, 0], shared[None, :, 1], None if mixture.gaussian else shared[None, :, 2])
    components = component_log_densities(forms, terms, log_scale[None], None if inv_scale is None else inv_scale[None],
                                         mixture.num_features, mixture.num_scaled_features)
    return log_sum_exp(components.weighted_log_dens, axis=2)[0, 0]


def _weighted_parts(mixture: StudentTMixture, moments: FormMoments, shared_weights: Float[Array, "G K c"],
                    centres: Float[Array, "G K D"]) -> Scalar:
    """sum_t sum_g w_t(g) . z_t(g) (``_parts``) from the block sums of ``_factors_and_curvature``, for any mixture."""
    parts = _mixture_parts(mixture)
    forms = weighted_forms(moments, centres, parts.means, parts.inv_chol, mixture.scale_mask)
    return jnp.sum(forms) + jnp.sum(shared_weights * parts.shared)


def _factors_and_curvature(mixture: StudentTMixture, emissions: Emissions, parts: MixtureParts,
                           moving: MixtureParts, rows, gamma: Float[Array, "L G ..."]) -> BlockFactors:
    """g_t(h) = dE_t(h) / d theta_g factored through z = ``_parts`` (J = dz / d theta_g from ``moving``, the
    [p, ...] directional derivatives of the mixture's ``parts``; a = dE / dz). The sums
    are what sum_t E[d^2 E_t(h_t)] = sum_t E[J^T (d^2 E / dz^2) J + (dE / dz) . d^2 z] needs: its first term
    [G, p, p], and for the second, which is d^2 / d theta^2 of sum_t w_t . z_t with w_t(g) = E[dE / dz | g], the
    ``FormMoments`` of the quadratic forms' weights and [G, K, c] the summed weights of the ``SharedTerms``."""
    y, log_scale, inv_scale = emissions.scales(rows)
    L, G = gamma.shape[:2]
    K = mixture.log_weights.shape[-1]
    log_scale = jnp.broadcast_to(log_scale, (L, log_scale.shape[-1]))
    inv_scale = None if inv_scale is None else jnp.broadcast_to(inv_scale, log_scale.shape)
    gamma = gamma.reshape(L, G, -1)
    z, jacobian = jax.vmap(lambda t: jax.jvp(lambda q: _parts(q, mixture.scale_mask, y), (parts,), (t,)),
                           out_axes=(None, -1))(moving)

    def per_state(z_tg, log_scale_t, inv_scale_t, gamma_tg):
        def value(z_):
            return _log_densities_of_parts(mixture, z_, log_scale_t, inv_scale_t)
        return jax.jacfwd(value)(z_tg), jax.hessian(lambda z_: jnp.sum(gamma_tg * value(z_)))(z_tg)

    over_regimes = jax.vmap(per_state, in_axes=(0, None, None, 0))
    slopes, hessian = jax.vmap(over_regimes, in_axes=(0, 0, None if inv_scale is None else 0, 0))(
        z, log_scale, inv_scale, gamma)
    weights = jnp.einsum("lgv,lgvz->lgz", gamma, slopes)
    local, shared = jnp.split(weights, [num_forms(mixture.scale_mask) * K], axis=-1)
    curvature = jnp.einsum("lgzj,lgzw,lgwi->gji", jacobian, hessian, jacobian)
    sums = (curvature, form_moments(y, local.reshape(L, G, K, -1), mixture.means),
            jnp.sum(shared, axis=0).reshape(G, K, -1))
    return BlockFactors(jacobian, slopes.reshape((L,) + emissions.state_shape + slopes.shape[-1:]), sums)


def _sequence_emission_hessian(model: FHMV, coordinates: EmissionCoordinates, y, x, mask, block_steps: int
                               ) -> Float[Array, "Q Q"]:
    inputs = sequence_inputs(model, y, x)
    previous, smoothed = forward_backward(inputs.initial, inputs.transitions, inputs.emissions.likelihoods, inputs.rows,
                                          mask, collect=lambda _, block: (block.previous, block.smoothed),
                                          keep_likelihoods=True).steps
    filtered = jnp.concatenate([previous[1:], jnp.zeros_like(previous[:1])])
    mixture = model.emission
    tangents = _tangents(mixture, coordinates)
    parts, moving = jax.vmap(lambda t: jax.jvp(_mixture_parts, (mixture,), (t,)), out_axes=(None, 0))(tangents)

    def functional(rows, gamma):
        return _factors_and_curvature(mixture, inputs.emissions, parts, moving, rows, gamma)

    result = additive_covariance(filtered, smoothed, inputs.transitions, inputs.rows, functional,
                                 num_coordinates=coordinates.size, block_steps=block_steps)
    curvature, moments, shared_weights = result.sums
    weighted_gradient = jax.grad(_weighted_parts)
    second = jax.vmap(lambda t: jax.jvp(lambda m: weighted_gradient(m, moments, shared_weights, mixture.means),
                                        (mixture,), (t,))[1])(tangents)
    curvature = curvature + jnp.moveaxis(_gathered(second, coordinates), 0, 1)
    return result.covariance + jax.scipy.linalg.block_diag(*curvature)


@functools.cache
def _sequence_emission_hessian_jit() -> Callable:
    """``jax.jit`` (whose calls return before the program has run; ``eqx.filter_jit`` waits for it on CPU) with
    ``classic_emitters``, built at the first call (the options depend on the backend)."""
    return jax.jit(_sequence_emission_hessian, static_argnames=("coordinates", "block_steps"),
                   compiler_options=classic_emitters())


def emission_hessian(model: FHMV, coordinates: EmissionCoordinates, y: Float[Array, "B T D"],
                     x: Float[Array, "B T"] | None, mask: Float[Array, "B T"], *, block_steps: int = 64
                     ) -> Float[Array, "Q Q"]:
    """[G p, G p] d^2 log p(y) / d theta_e^2 over the coordinates of ``coordinates`` (in ``flat_theta`` order),
    all sequences of a checked batch together (dispatched, not waited for)."""
    total = 0.0
    for b in range(y.shape[0]):
        total = total + _sequence_emission_hessian_jit()(model, coordinates, y[b], None if x is None else x[b], mask[b],
                                                       block_steps=block_steps)
    return total

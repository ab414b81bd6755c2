"""The parameter schema: the abstract parameter block, the constraint maps and the value checks.

Every parameter is stored on an unconstrained scale (log, logit, log-Cholesky), so any real
array is a valid model and gradient steps never leave the parameter space. Each factor of the
model (the regime chain, the persistence chains, the jump chain, the leverage, the Student-t
mixture; ``factors.py`` and ``emissions.py``) is a final ``AbstractBlock`` that owns its
unconstrained fields, their natural <-> unconstrained maps, its natural-parameter keys and
shapes, its checks and its count of free parameters. The field names are also the names of
the arrays in a model file (``fhmv_jax.io``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Float
from .spec import ModelSpec

Shape = tuple[int, ...]
Block = TypeVar("Block", bound="AbstractBlock")


class AbstractBlock(eqx.Module):
    """The parameters of one factor: unconstrained array fields (``None`` where the spec has no such
    parameter) and static sizes and flags (``static_fields``)."""

    @classmethod
    def static_fields(cls, spec: ModelSpec) -> dict:
        """The block's static sizes and flags implied by ``spec``."""
        return {}

    @classmethod
    @abc.abstractmethod
    def natural_shapes(cls, spec: ModelSpec) -> dict[str, Shape]:
        """The natural-parameter keys the block owns under ``spec``, with their shapes."""

    @classmethod
    @abc.abstractmethod
    def raw_shapes(cls, spec: ModelSpec) -> dict[str, Shape | None]:
        """Every array field, in field order, with its shape under ``spec`` (``None``: the field is ``None``)."""

    @classmethod
    def natural_bounds(cls, spec: ModelSpec) -> dict[str, tuple[float, float]]:
        """The open interval (low, high) of every bounded natural key under ``spec`` (unbounded keys absent):
        where a value sits at a limit its unconstrained coordinate runs off to infinity."""
        return {}

    @classmethod
    @abc.abstractmethod
    def from_natural(cls: type[Block], spec: ModelSpec, values: dict[str, np.ndarray], dtype=None) -> Block:
        """Validate natural values (float64 arrays of ``natural_shapes``) and map them to a block.

        Raises:
            ValueError: a value outside its range or family, naming its key.
        """

    @abc.abstractmethod
    def natural(self) -> dict[str, Array]:
        """The constrained values, keyed and shaped as ``natural_shapes``."""

    @property
    @abc.abstractmethod
    def num_free_parameters(self) -> int:
        """The number of free scalar parameters (the degrees of freedom of ``natural()``)."""

    @classmethod
    def from_raw(cls: type[Block], spec: ModelSpec, arrays: dict[str, Array | None]) -> Block:
        """The block of stored arrays (every field of ``raw_shapes``)."""
        return cls(**cls.static_fields(spec), **{name: arrays[name] for name in cls.raw_shapes(spec)})

    def fixed_fields(self) -> tuple[str, ...]:
        """The array fields held fixed by the spec (not estimated), e.g. zero means."""
        return ()

    def raw_arrays(self) -> dict[str, Array | None]:
        """Every array field by name, ``None`` where unused."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("static")}

    @classmethod
    def magnitude_fields(cls) -> tuple[str, ...]:
        """The fields that set volatility magnitudes (updated together by the ECM scale step)."""
        return ()

    def magnitudes(self) -> dict[str, Array]:
        """The magnitude fields in use, by name."""
        return self.present(self.magnitude_fields())

    def present(self, names: tuple[str, ...]) -> dict[str, Array]:
        """The fields among ``names`` that are not ``None``, by name."""
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def replace(self: Block, **values: Array) -> Block:
        """The block with the named fields replaced."""
        return eqx.tree_at(lambda b: tuple(getattr(b, name) for name in values), self, tuple(values.values()))

    def check_shapes(self, spec: ModelSpec, where: str) -> None:
        """Raise unless every field has the shape (or is ``None`` exactly where) ``spec`` implies."""
        for name, shape in self.raw_shapes(spec).items():
            value = getattr(self, name)
            actual = None if value is None else tuple(value.shape)
            if actual != shape:
                raise ValueError(f"{where}.{name} has shape {actual}, the spec implies {shape}")


def cholesky_factor(chol_raw: Float[Array, "... D D"]) -> Float[Array, "... D D"]:
    """Lower Cholesky factor with a positive diagonal from its log-Cholesky storage."""
    diagonal = jnp.exp(jnp.diagonal(chol_raw, axis1=-2, axis2=-1))
    eye = jnp.broadcast_to(jnp.eye(chol_raw.shape[-1], dtype=chol_raw.dtype), chol_raw.shape)
    return jnp.tril(chol_raw, -1) + diagonal[..., None] * eye


def bounded(raw: Array, low: float, high: float) -> Array:
    """low + (high - low) sigmoid(raw)."""
    return low + (high - low) * jax.nn.sigmoid(raw)


def _namespace(value):
    """numpy for host values (``from_natural``'s), so that building a model compiles nothing; jax.numpy for
    device and traced arrays (the M-step)."""
    return jnp if isinstance(value, jax.Array) else np


def safe_log(p: Array) -> Array:
    """log p with zero probabilities mapped to log(tiny), a finite logit."""
    xp = _namespace(p)
    p = xp.asarray(p)
    return xp.log(xp.maximum(p, xp.finfo(p.dtype).tiny))


def logit(p: Array) -> Array:
    """log(p / (1 - p)), with p clipped into (0, 1) so that 0 and 1 stay finite."""
    xp = _namespace(p)
    p = xp.asarray(p)
    p = xp.clip(p, xp.finfo(p.dtype).tiny, 1 - xp.finfo(p.dtype).epsneg)
    return xp.log(p) - xp.log1p(-p)


def as_array(value, dtype=None) -> Array | None:
    """``jnp.asarray(value, dtype)``, ``None`` kept. A host value is cast on the host and transferred, which
    compiles nothing (``jnp.asarray`` of a host array compiles a copy program per shape)."""
    if value is None:
        return None
    if isinstance(value, jax.Array):
        return jnp.asarray(value, dtype=dtype)
    return jax.device_put(np.asarray(value, dtype=dtype))


def check_stochastic(name: str, probs: np.ndarray, atol: float = 1e-6) -> None:
    """Raise unless ``probs`` is non-negative and sums to one along its last axis."""
    if np.any(probs < 0):
        raise ValueError(f"{name} has negative probabilities")
    sums = probs.sum(axis=-1)
    bad = np.flatnonzero(np.abs(sums - 1) > atol)
    if bad.size:
        where = np.unravel_index(bad[0], sums.shape)
        raise ValueError(f"{name} must sum to one along its last axis; entry {where} sums to {sums[where]:.6g}")


def check_interval(name: str, value: np.ndarray, low: float, high: float, closed: str) -> None:
    """Raise unless ``value`` lies in the interval (``closed``: "both", "left", "right" or "neither")."""
    ok_low = value >= low if closed in ("both", "left") else value > low
    ok_high = value <= high if closed in ("both", "right") else value < high
    if not np.all(ok_low & ok_high):
        brackets = {"both": "[]", "left": "[)", "right": "(]", "neither": "()"}[closed]
        raise ValueError(f"{name} must lie in {brackets[0]}{low}, {high}{brackets[1]}, got {value}")

"""Many sequences: the E-step's statistics accumulated over chunks of the batch and over the devices of a mesh.

The statistics come in two kinds (``split_statistics``):

- sums over sequences (the log-likelihood, initial laws, transition counts, mixture moments and the
  time-invariant volatility moments), which chunks add up and devices join with one ``psum``;
- per-step statistics (``StepMoments`` of predictable leverage, ``LeverageStats`` of Markov leverage), which
  the M-step reads step by step: they stay per sequence, [B, T, ...], concatenated over chunks and sharded
  over the mesh like the data.

A batch is padded with sequences of length zero to a multiple of the chunk times the device count
(``batch_layout``, ``pad_sequences``); such a sequence contributes exactly zero to every statistic
(``batch_e_step``) and to the log-likelihood.

With a mesh the sequences lie on its ``"batch"`` axis (``shard_sequences``), the model and the prior are
replicated for each jitted call (``replicate``, ``on_mesh``) and every device computes the statistics of its
own sequences; ``jax.shard_map`` runs that part and a ``psum`` over ``"batch"`` adds the sums up, after which
the M-step runs replicated (XLA partitions its sums over the sharded per-step statistics). Every process of a
multi-process run passes the same full data: each device reads its shard from its own process's copy
(``jax.make_array_from_callback``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._types import Array, Scalar
from .stats import SequenceStats, StepMoments

BATCH_AXIS = "batch"
"""The mesh axis over which ``fit_em(mesh=...)`` shards the sequences."""
_SHARDED, _REPLICATED = PartitionSpec(BATCH_AXIS), PartitionSpec()

Statistics = Callable[..., SequenceStats]
"""(model, y [b, T, D], x [b, T] or None, mask [b, T]) -> ``SequenceStats`` with a leading [b]."""

LogLikelihoods = Callable[..., Array]
"""(model, y [b, T, D], x [b, T] or None, mask [b, T]) -> [b] log p(y) per sequence (zero for length zero)."""


class BatchLayout(NamedTuple):
    """How a batch is padded and cut.

    Attributes:
        size: the padded number of sequences, a multiple of ``num_shards`` (times ``chunk``).
        chunk: sequences per chunk of one device's share, or ``None`` (the whole share at once).
        num_shards: the size of the mesh's ``"batch"`` axis (1 without a mesh).
    """

    size: int
    chunk: int | None
    num_shards: int


def check_mesh(mesh: Mesh, num_sequences: int) -> None:
    """A ``ValueError`` for a mesh without a ``"batch"`` axis or with more devices on it than sequences."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if BATCH_AXIS not in mesh.axis_names:
        raise ValueError(
            f"mesh needs an axis named {BATCH_AXIS!r} to shard the sequences over, got axes {mesh.axis_names}:"
            f" e.g. jax.sharding.Mesh(jax.devices(), ({BATCH_AXIS!r},))"
        )
    devices = mesh.shape[BATCH_AXIS]
    if num_sequences < devices:
        raise ValueError(
            f"the batch has {num_sequences} sequences but the mesh's {BATCH_AXIS!r} axis has {devices} devices:"
            " give every device at least one sequence (a smaller mesh, or more sequences)"
        )


def check_chunk(chunk: int | None) -> None:
    """A ``ValueError`` unless ``chunk`` is ``None`` or a positive integer."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1):
        raise ValueError(f"batch_chunk must be None or a positive integer, got {chunk!r}")


def batch_layout(num_sequences: int, chunk: int | None, mesh: Mesh | None) -> BatchLayout:
    """The padded size and the chunk of a batch of ``num_sequences``: each of the mesh's ``"batch"`` devices
    takes ceil(B / devices) sequences, rounded up to a multiple of the chunk (a chunk larger than that share
    shrinks to it)."""
    shards = 1 if mesh is None else mesh.shape[BATCH_AXIS]
    share = -(-num_sequences // shards)
    if chunk is not None:
        chunk = min(int(chunk), share)
        share = -(-share // chunk) * chunk
    return BatchLayout(share * shards, chunk, shards)


def pad_sequences(y: Array, x: Array | None, mask: Array, size: int) -> tuple[Array, Array | None, Array]:
    """y [B, T, D], x [B, T] and mask [B, T] with ``size - B`` sequences of length zero (zeros) appended."""
    extra = size - y.shape[0]
    if extra == 0:
        return y, x, mask

    def padded(a):
        return None if a is None else jnp.concatenate([a, jnp.zeros((extra,) + a.shape[1:], a.dtype)])

    return padded(y), padded(x), padded(mask)


def split_statistics(stats: SequenceStats) -> tuple[SequenceStats, tuple]:
    """(the sums over sequences, with the per-step fields ``None``; (per-step volatility moments or ``None``,
    leverage statistics or ``None``))."""
    per_step_volatility = isinstance(stats.volatility, StepMoments)
    sums = stats._replace(volatility=None if per_step_volatility else stats.volatility, leverage=None)
    return sums, (stats.volatility if per_step_volatility else None, stats.leverage)


def join_statistics(sums: SequenceStats, per_step: tuple) -> SequenceStats:
    """The inverse of ``split_statistics``."""
    volatility, leverage = per_step
    return sums._replace(volatility=sums.volatility if volatility is None else volatility, leverage=leverage)


def summed_statistics(stats: SequenceStats) -> tuple[SequenceStats, tuple]:
    """``split_statistics`` with the sums added up over the sequences (leading axis kept, of size 1)."""
    sums, per_step = split_statistics(stats)
    return jax.tree.map(lambda a: jnp.sum(a, axis=0, keepdims=True), sums), per_step


def _chunks(tree, chunk: int):
    """Every leaf [B, ...] as [B / chunk, chunk, ...]."""
    return jax.tree.map(lambda a: a.reshape((a.shape[0] // chunk, chunk) + a.shape[1:]), tree)


def _check_divides(num_sequences: int, chunk: int) -> None:
    if num_sequences % chunk:
        raise ValueError(f"{num_sequences} sequences are not a whole number of chunks of {chunk}: pad them"
                         " (batch_layout, pad_sequences)")


def accumulated_statistics(statistics: Statistics, model, y: Array, x: Array | None, mask: Array,
                           chunk: int | None) -> tuple[SequenceStats, tuple]:
    """``summed_statistics`` of ``statistics`` over [B] sequences, computed ``chunk`` sequences at a time
    (``jax.lax.map``: one chunk's forward-backward in memory at once), the sums added over chunks and the
    per-step statistics concatenated back to [B, ...]."""
    if chunk is None or chunk >= y.shape[0]:
        return summed_statistics(statistics(model, y, x, mask))
    _check_divides(y.shape[0], chunk)
    sums, per_step = jax.lax.map(lambda batch: summed_statistics(statistics(model, *batch)),
                                 _chunks((y, x, mask), chunk))
    return (jax.tree.map(lambda a: jnp.sum(a, axis=0), sums),
            jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), per_step))


def gathered_statistics(statistics: Statistics, model, y: Array, x: Array | None, mask: Array, *,
                        chunk: int | None = None, mesh: Mesh | None = None) -> SequenceStats:
    """The batch's statistics as ``m_step`` reads them: the sums with a leading axis of size 1, the per-step
    statistics [B, ...] (sharded over the mesh's ``"batch"`` axis when there is one).

    Args:
        statistics: the E-step of a batch (``batch_e_step`` with its options).
        model: the model (replicated over the mesh).
        y: [B, T, D]; x: [B, T] or None; mask: [B, T]: B a multiple of the chunk times the devices.
        chunk: sequences per chunk (``accumulated_statistics``), or ``None``.
        mesh: the devices: each computes its sequences' statistics; one ``psum`` adds up the sums.

    Returns:
        ``SequenceStats``.
    """
    if mesh is None:
        return join_statistics(*accumulated_statistics(statistics, model, y, x, mask, chunk))
    arrays, static = eqx.partition(model, eqx.is_array)

    def local(arrays, y, x, mask):
        sums, per_step = accumulated_statistics(statistics, eqx.combine(arrays, static), y, x, mask, chunk)
        return jax.lax.psum(sums, BATCH_AXIS), per_step

    # check_vma=False: the model's scans start from constants (the leverage path's zero shocks) and carry values
    # that vary over the devices, which the varying-axis types reject; the results (and total_log_likelihood's
    # gradient) equal the one-device ones (tests/test_scale.py)
    sums, per_step = jax.shard_map(local, mesh=mesh, in_specs=(_REPLICATED, _SHARDED, _SHARDED, _SHARDED),
                                   out_specs=(_REPLICATED, _SHARDED), check_vma=False)(arrays, y, x, mask)
    return join_statistics(sums, per_step)


def total_log_likelihood(log_likelihoods: LogLikelihoods, model, y: Array, x: Array | None, mask: Array, *,
                         chunk: int | None = None, mesh: Mesh | None = None) -> Scalar:
    """sum_b log p(y_b) over [B] sequences, ``chunk`` at a time (each chunk rematerialised under
    differentiation, so a gradient holds one chunk's residuals at a time) and over the mesh's devices (one
    ``psum``); arguments as ``gathered_statistics``."""
    def local(model, y, x, mask):
        if chunk is None or chunk >= y.shape[0]:
            return jnp.sum(log_likelihoods(model, y, x, mask))
        _check_divides(y.shape[0], chunk)
        per_chunk = jax.lax.map(jax.checkpoint(lambda batch: jnp.sum(log_likelihoods(model, *batch))),
                                _chunks((y, x, mask), chunk))
        return jnp.sum(per_chunk)

    if mesh is None:
        return local(model, y, x, mask)
    arrays, static = eqx.partition(model, eqx.is_array)
    return jax.shard_map(
        lambda arrays, y, x, mask: jax.lax.psum(local(eqx.combine(arrays, static), y, x, mask), BATCH_AXIS),
        mesh=mesh, in_specs=(_REPLICATED, _SHARDED, _SHARDED, _SHARDED), out_specs=_REPLICATED, check_vma=False,
    )(arrays, y, x, mask)


def _global_array(value, mesh: Mesh, spec: PartitionSpec) -> Array:
    """A global array over ``mesh`` whose shards this process fills from its own full copy ``value``."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda index: value[index])


def shard_sequences(mesh: Mesh, y: Array, x: Array | None, mask: Array) -> tuple[Array, Array | None, Array]:
    """y [B, T, D], x [B, T] and mask [B, T] as global arrays split over the mesh's ``"batch"`` axis (B a multiple
    of its size); in a multi-process run every process passes the same full arrays, which is checked."""
    if jax.process_count() > 1:
        assert_same_on_every_process("the data (y, x, lengths)", (y, x, mask))
    return tuple(None if a is None else _global_array(a, mesh, _SHARDED) for a in (y, x, mask))


def replicate(tree, mesh: Mesh):
    """Every array of ``tree`` as a global array replicated over ``mesh`` (other leaves unchanged)."""
    return jax.tree.map(lambda a: _global_array(a, mesh, _REPLICATED) if eqx.is_array(a) else a, tree)


def on_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
    """``fn(model, *rest)`` with ``model`` (any pytree) replicated over ``mesh`` on the way in and the result copied
    back to this process on the way out (``rest``: already placed, e.g. by ``shard_sequences``). Between calls the
    model then lives on this process as in a one-device fit, so the host-side steps around the jitted ones (SQUAREM,
    the score's directions) run unchanged and without cross-process programs."""
    if mesh is None:
        return fn

    def call(model, *rest):
        return local_copy(fn(replicate(model, mesh), *rest))

    return call


def local_copy(tree):
    """Every array of ``tree`` (global, fully replicated) as an ordinary array on this process's default device."""
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)) if eqx.is_array(a) else a, tree)


def assert_same_on_every_process(what: str, tree) -> None:
    """A ``ValueError`` on every process unless all hold the same ``tree`` (compared by a checksum of its arrays:
    their sums and sums of squares, in float64, gathered from every process)."""
    leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(tree) if eqx.is_array(a)]
    checksum = np.array([f(a) for a in leaves for f in (np.sum, lambda v: np.sum(v**2))] + [float(len(leaves))])
    gathered = np.asarray(multihost_utils.process_allgather(checksum))
    differing = [i for i in range(gathered.shape[0]) if not np.array_equal(gathered[i], gathered[0])]
    if differing:
        raise ValueError(f"fit_em with a multi-process mesh needs {what} to be the same on every process: processes"
                         f" {differing} differ from process 0")

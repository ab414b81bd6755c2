"""Diagnostics of a fitted model: scores, standard errors and information criteria, by exact autodiff.

Coordinates. The model stores unconstrained arrays (``FHMV.raw_arrays``); its free ones (``FHMV.free_arrays``),
flattened in sorted name order, are the coordinates theta of ``score``. Some directions in theta change nothing
(a softmax's logits shifted together, the unused upper triangle of a Cholesky factor), and a parameter at a
bound of its range (a probability at 0 or 1, nu at ``dof_bounds``) or a mixture component with almost no data
has no information. ``standard_errors`` therefore works in the identified directions V [P, k]: an orthonormal
basis of the directions that move the natural parameters (the row space of their Jacobian J = d natural / d theta)
and leave every flagged natural parameter where it is. With A = -V^T H V the observed information there, and
B = sum_t (V^T s_t)(V^T s_t)^T the outer product of the per-step scores s_t = d log p(y_t | y_{1:t-1}) / d theta,
the covariance of phi (theta = theta_hat + V phi) is A^-1 (``hessian``), B^-1 (``opg``) or A^-1 B A^-1
(``sandwich``); the natural parameters' is (J V) C (J V)^T (the delta method, J by forward-mode autodiff).

Cost. The Hessian's emission block (most coordinates: the default spec has 804 of 1397) comes from Louis'
identity in one pass over the data (``fhmv_jax.information``); the rest of V^T H V from Hessian-vector products
(forward-over-reverse) along the other coordinates, ``chunk_size`` directions per call of one compiled program,
run side by side with the emission pass. The per-step scores come from Jacobian-vector products of the per-step
log-likelihoods. Nothing of size P x P x T is formed; memory is about ``chunk_size`` times that of one gradient.

n in BIC and HQIC counts the observed time steps (all sequences together), as statsmodels' Markov-switching
models do: a step's D features are one observation of a dependent series, not D independent ones.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ._compile import classic_emitters, fast_jit
from ._types import Array, Float, Scalar
from .em.gradient import fit_gradient
from .em.loop import FitResult, batch_objective, sequence_log_likelihoods
from .em.m_step import CovariancePrior
from .em.stats import batch_e_step
from .information import emission_coordinates, emission_hessian, other_coordinates
from .model.fhmv import FHMV, natural_bounds, natural_shapes, sequence_filter
from .model.inputs import check_sequences
from .precision import warn_if_float32_on_cpu

KINDS = ("hessian", "opg", "sandwich")


class InformationCriteria(NamedTuple):
    """The fit's log-likelihood and the information criteria derived from it (lower is better).

    Attributes:
        log_likelihood: log p(y) summed over sequences, without the covariance prior.
        num_parameters: k, the model's free scalar parameters (``FHMV.num_free_parameters``: ties, fixed and
            implied parameters respected).
        num_observations: n, the observed time steps.
        aic: -2 log L + 2 k.
        bic: -2 log L + k log n.
        hqic: -2 log L + 2 k log log n.
    """

    log_likelihood: float
    num_parameters: int
    num_observations: int
    aic: float
    bic: float
    hqic: float

    def to_dict(self) -> dict[str, float | int]:
        return self._asdict()


def criteria(log_likelihood: float, num_parameters: int, num_observations: int) -> InformationCriteria:
    """AIC, BIC and HQIC of a log-likelihood with k parameters on n > e observations."""
    if num_observations < 3:
        raise ValueError(f"information criteria need at least 3 observed steps, got {num_observations}")
    deviance, k, n = -2.0 * log_likelihood, num_parameters, num_observations
    return InformationCriteria(log_likelihood, k, n, deviance + 2 * k, deviance + k * math.log(n),
                               deviance + 2 * k * math.log(math.log(n)))


def information_criteria(model: FHMV, y, x=None, *, lengths=None) -> InformationCriteria:
    """The information criteria of ``model`` on one sequence [T, D] or a padded batch [B, T, D].

    Args:
        model: the fitted model.
        y: [T, D] or [B, T, D] observations (steps beyond a sequence's length are padding).
        x: the driver [T] or [B, T], for leverage modes that need one.
        lengths: [B] valid steps per sequence (default: all T).

    Raises:
        ValueError: as ``fit_em`` on bad input (NaN or inf rows, wrong shapes or feature counts).
    """
    ys, xs, mask = check_sequences(model.spec, y, x, lengths, dtype=model.dtype)
    none = CovariancePrior(jnp.zeros((), model.dtype), jnp.zeros((), model.dtype))
    log_likelihood = float(batch_objective(model, ys, xs, mask, none).log_likelihood)
    return criteria(log_likelihood, model.num_free_parameters, int(mask.sum()))


# ----------------------------------------------------------------------------------------
# flat coordinates


class FlatLayout(NamedTuple):
    """How named arrays lie in one flat vector (hashable: a static argument of the jitted programs).

    Attributes:
        names: the array names, in vector order.
        shapes: their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]]) -> FlatLayout:
        return cls(tuple(shapes), tuple(tuple(s) for s in shapes.values()))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def ravel(self, arrays: dict[str, Array]) -> Float[Array, " P"]:
        return jnp.concatenate([jnp.ravel(arrays[name]) for name in self.names])

    def unravel(self, flat: Float[Array, " P"]) -> dict[str, Array]:
        sizes = [math.prod(s) for s in self.shapes]
        pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
        return {name: piece.reshape(shape) for name, shape, piece in zip(self.names, self.shapes, pieces, strict=True)}

    def labels(self) -> tuple[str, ...]:
        """One label per coordinate: ``"means[2,1,4]"``, or the bare name of a scalar."""
        return tuple(name if not shape else f"{name}[{','.join(map(str, index))}]"
                     for name, shape in zip(self.names, self.shapes, strict=True) for index in np.ndindex(*shape))


def free_layout(model: FHMV) -> FlatLayout:
    """The layout of ``model.free_arrays()`` in sorted name order: the coordinates theta."""
    free = model.free_arrays()
    return FlatLayout.of({name: free[name].shape for name in sorted(free)})


def natural_layout(model: FHMV) -> FlatLayout:
    """The layout of ``model.natural_parameters()`` (its key order)."""
    return FlatLayout.of(natural_shapes(model.spec))


def model_at(model: FHMV, layout: FlatLayout, theta: Float[Array, " P"]) -> FHMV:
    """``model`` with its free arrays read from the flat coordinates ``theta`` (the rest kept)."""
    return FHMV.from_raw_arrays(model.spec, model.raw_arrays() | layout.unravel(theta))


# ----------------------------------------------------------------------------------------
# the compiled programs: value and gradient, Hessian-vector and per-step Jacobian-vector products


def _total(theta, model: FHMV, layout: FlatLayout, y, x, mask, scored: bool = False) -> Scalar:
    """log p(y) of every sequence at ``theta``; ``scored``: first derivatives by one forward-backward pass
    (``sequence_log_likelihoods``), not by differentiating the filter (which the Hessian-vector products do)."""
    return jnp.sum(sequence_log_likelihoods(model_at(model, layout, theta), y, x, mask, scored=scored))


def _per_step(theta, model: FHMV, layout: FlatLayout, y, x, mask) -> Float[Array, "B T"]:
    at = model_at(model, layout, theta)
    return jax.vmap(lambda yb, xb, mb: sequence_filter(at, yb, xb, mb).step_log_likelihoods)(y, x, mask)


_value_and_gradient = eqx.filter_jit(jax.value_and_grad(functools.partial(_total, scored=True)))


@eqx.filter_jit
def _component_counts(model: FHMV, y, x, mask) -> Float[Array, "G K"]:
    """The expected observations of every mixture component, all sequences together."""
    return jnp.sum(batch_e_step(model, y, x, mask).components.counts, axis=0)


def _gradient_and_products(theta, tangents: Float[Array, "C P"], model, layout, y, x, mask
                           ) -> tuple[Float[Array, " P"], Float[Array, "C P"]]:
    """(the gradient, H v for every row v of ``tangents``) by forward-over-reverse."""
    gradient = jax.grad(lambda t: _total(t, model, layout, y, x, mask))
    return jax.vmap(lambda v: jax.jvp(gradient, (theta,), (v,)), out_axes=(None, 0))(tangents)


_hessian_products = fast_jit(_gradient_and_products, options=classic_emitters)


@eqx.filter_jit
def _step_score_products(theta, tangents: Float[Array, "C P"], model, layout, y, x, mask) -> Float[Array, "C B T"]:
    """s_t^T v for every step t and every row v of ``tangents`` (forward mode)."""
    return jax.vmap(lambda v: jax.jvp(lambda t: _per_step(t, model, layout, y, x, mask), (theta,), (v,))[1])(tangents)


@eqx.filter_jit
def _natural_jacobian(theta, model: FHMV, layout: FlatLayout, natural: FlatLayout) -> Float[Array, "Q P"]:
    return jax.jacfwd(lambda t: natural.ravel(model_at(model, layout, t).natural_parameters()))(theta)


def _rank_tolerance(model: FHMV) -> float:
    """Singular values below this fraction of the largest count as zero (directions, bases)."""
    return 1e-9 if model.dtype == jnp.float64 else 1e-5


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def _structural_jacobian(model: FHMV, layout: FlatLayout, natural: FlatLayout) -> np.ndarray:
    """[Q, P] |d natural / d theta| at the generic point theta = 0 (uniform laws, unit scales, mid-range bounded
    values): zero exactly where a coordinate cannot move a natural parameter, whatever the estimate."""
    return np.abs(np.asarray(_natural_jacobian(jnp.zeros(layout.size, model.dtype), model, layout, natural)))


def _in_chunks(product: Callable[[Array], Array], directions: np.ndarray, chunk_size: int, progress: bool,
               description: str) -> np.ndarray:
    """``product`` of the rows of ``directions`` [k, P], ``chunk_size`` rows per call (the last chunk padded with
    zero rows, so one program serves every chunk), stacked [k, ...]."""
    k = directions.shape[0]
    padded = np.zeros((-(-k // chunk_size) * chunk_size, directions.shape[1]), directions.dtype)
    padded[:k] = directions
    starts = range(0, padded.shape[0], chunk_size)
    chunks = [np.asarray(product(jnp.asarray(padded[i:i + chunk_size])))
              for i in tqdm(starts, desc=description, unit="chunk", disable=not progress, leave=False)]
    return np.concatenate(chunks)[:k]


# ----------------------------------------------------------------------------------------
# score


class Score(NamedTuple):
    """The gradient of the log-likelihood (no prior) in the unconstrained coordinates.

    Attributes:
        log_likelihood: log p(y), all sequences.
        gradient: {free array name (``FHMV.free_arrays``): d log p(y) / d array}.
        norm: the gradient's norm.
        labels: [P] the coordinate labels, ``"means[2,1,4]"`` (sorted array names, C order).
        per_observation: [B, T, P] (or [T, P] for one sequence) d log p(y_t | y_{1:t-1}) / d theta, zero on
            padding; they sum over steps to the gradient. ``None`` unless asked for.
    """

    log_likelihood: float
    gradient: dict[str, np.ndarray]
    norm: float
    labels: tuple[str, ...]
    per_observation: np.ndarray | None = None


class _Problem(NamedTuple):
    """A model and checked data, with its flat coordinates."""

    model: FHMV
    layout: FlatLayout
    theta: Array
    y: Array
    x: Array | None
    mask: Array
    single: bool

    @classmethod
    def of(cls, model: FHMV, y, x, lengths, what: str) -> _Problem:
        if not isinstance(model, FHMV):
            raise TypeError(f"{what} needs an FHMV model (or a FitResult), got {type(model).__name__}")
        ys, xs, mask = check_sequences(model.spec, y, x, lengths, dtype=model.dtype)
        warn_if_float32_on_cpu(model.dtype, what)
        layout = free_layout(model)
        theta = layout.ravel(model.free_arrays())
        return cls(model, layout, theta, ys, xs, mask, np.ndim(y) == 2)

    def args(self) -> tuple:
        return self.model, self.layout, self.y, self.x, self.mask

    def gradient(self) -> tuple[float, np.ndarray]:
        value, gradient = _value_and_gradient(self.theta, *self.args())
        return float(value), np.asarray(gradient)

    def hessian_products(self, directions: np.ndarray, chunk_size: int, progress: bool
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(the gradient, [k, P] H v for the rows v of ``directions``)."""
        gradients = []

        def products(v):
            gradient, product = _hessian_products(self.theta, v, *self.args())
            gradients.append(gradient)
            return product

        chunks = _in_chunks(products, directions, chunk_size, progress, "Hessian")
        return np.asarray(gradients[0]), chunks

    def projected_hessian(self, directions: np.ndarray, chunk_size: int, progress: bool
                          ) -> tuple[np.ndarray, np.ndarray | None]:
        """([k, k] V H V^T for the rows of ``directions`` V, the gradient or ``None``): the emission block H_ee by
        Louis' identity (``information.emission_hessian``), the rest from Hessian-vector products along an
        orthonormal basis U of the other coordinates' part V_o of the directions (which also give the gradient).
        With R = U V_o^T and Z = H U^T,

            V H V^T = V_e H_ee V_e^T + V Z R + (V Z R)^T - R^T (U_o Z_o) R,

        the last term removing the other-other block counted twice. The emission program is dispatched first (not
        waited for); the products compile and run in a second thread meanwhile, so that the two programs run side
        by side (docs/benchmarks.md)."""
        moving = _structural_jacobian(self.model, self.layout, natural_layout(self.model)).max(axis=0) > 0
        coordinates = emission_coordinates(self.model, self.layout.names, self.layout.shapes, moving)
        emission = coordinates.flat_theta()
        other = other_coordinates(self.model, self.layout.names, self.layout.shapes)
        basis, _ = _orthonormal_rows(directions[:, other], _rank_tolerance(self.model))
        embedded = np.zeros((basis.shape[0], self.layout.size), basis.dtype)
        embedded[:, other] = basis
        inner = emission_hessian(self.model, coordinates, self.y, self.x, self.mask)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.hessian_products, embedded, chunk_size, progress) if basis.shape[0] else None
            gradient, products = (None, None) if pending is None else pending.result()
        inner = np.asarray(inner)
        moved = directions[:, emission]
        total = moved @ inner @ moved.T
        if products is not None:
            reduced = basis @ directions[:, other].T
            mixed = directions @ products.T @ reduced
            total = total + mixed + mixed.T - reduced.T @ (basis @ products[:, other].T) @ reduced
        return 0.5 * (total + total.T), gradient

    def step_scores(self, directions: np.ndarray, chunk_size: int, progress: bool) -> np.ndarray:
        """[k, B, T] s_t^T v for the rows v of ``directions``."""
        return _in_chunks(lambda v: _step_score_products(self.theta, v, *self.args()), directions, chunk_size,
                          progress, "per-step scores")


def _unwrap(model: FHMV | FitResult, what: str) -> FHMV:
    """The model of a ``FitResult`` (warning when that fit did not converge), or ``model`` itself."""
    if isinstance(model, FitResult):
        if not model.converged:
            warnings.warn(f"{what}: the fit did not converge, so the model may not be a maximum; the results assume"
                          " one", UserWarning, stacklevel=3)
        return model.model
    return model


def score(model: FHMV | FitResult, y, x=None, *, lengths=None, per_observation: bool = False,
          chunk_size: int = 16, progress: bool = False) -> Score:
    """The gradient of log p(y) in the unconstrained coordinates, and optionally every step's.

    Args:
        model: the model (or a ``FitResult``).
        y: [T, D] or a padded batch [B, T, D]; x: the driver [T] or [B, T] where the leverage mode needs one.
        lengths: [B] valid steps per sequence (default: all T).
        per_observation: also return the per-step scores (P forward-mode passes, ``chunk_size`` at a time).
        chunk_size: directions per compiled call.
        progress: show a progress bar over the chunks.

    Raises:
        ValueError: bad observations (as ``fit_em``).
    """
    _check_chunk_size(chunk_size)
    problem = _Problem.of(_unwrap(model, "score"), y, x, lengths, "score")
    value, gradient = problem.gradient()
    steps = None
    if per_observation:
        steps = np.moveaxis(problem.step_scores(np.eye(gradient.size), chunk_size, progress), 0, -1)
        steps = steps[0] if problem.single else steps
    arrays = {k: np.asarray(v) for k, v in problem.layout.unravel(jnp.asarray(gradient)).items()}
    return Score(value, arrays, float(np.linalg.norm(gradient)), problem.layout.labels(), steps)


def hessian(model: FHMV | FitResult, y, x=None, *, lengths=None, chunk_size: int = 16,
            progress: bool = False) -> np.ndarray:
    """[P, P] the Hessian of log p(y) in the coordinates of ``score``: the emission block by Louis' identity, the
    other coordinates' rows by Hessian-vector products, ``chunk_size`` per call. Arguments as ``score``."""
    _check_chunk_size(chunk_size)
    problem = _Problem.of(_unwrap(model, "hessian"), y, x, lengths, "hessian")
    return problem.projected_hessian(np.eye(problem.layout.size), chunk_size, progress)[0]


# ----------------------------------------------------------------------------------------
# standard errors


class StandardErrors(NamedTuple):
    """Standard errors of the natural parameters, and what they rest on.

    Attributes:
        kind: ``"hessian"``, ``"opg"`` or ``"sandwich"``.
        natural: {key of ``natural_parameters()``: standard errors of its shape}, NaN where none exists (a
            flagged parameter, one the spec fixes, or every one when the information is not positive definite).
        estimates: the natural parameters, flattened in ``labels`` order [Q].
        labels: [Q] ``"means[2,1,4]"`` labels of the natural coordinates.
        covariance: [Q, Q] covariance of the natural parameters (delta method).
        raw_labels: [P] labels of the unconstrained coordinates (as ``Score.labels``).
        raw_covariance: [P, P] covariance of the unconstrained coordinates, V C V^T (zero along the directions
            that change no parameter).
        flagged: {natural label: why it has no standard error}: at a bound of its range, a mixture component
            with fewer expected observations than ``min_count``, or the initial regime law when fewer than
            ``min_count`` sequences start. Those are held fixed: the others' standard errors are conditional on
            them.
        num_identified: k, the directions the standard errors are computed in.
        information_eigenvalues: the smallest (up to 5) eigenvalues of the observed information A = -V^T H V (of
            the outer product B for ``opg``, which computes no Hessian).
        condition_number: its largest over smallest eigenvalue (inf when not positive).
        positive_definite: whether that matrix is positive definite (for A: the model a strict local maximum along
            every identified direction); without it there are no standard errors.
        newton_gain: the gain per step of log p(y) a Newton step would still make, 0.5 g^T A^-1 g / n (B for
            ``opg``: the BHHH step); about 0 at a maximum, inf when the matrix is not positive definite.
        num_observations: n, the observed steps.
        bounds: {natural key: (low, high)} the open ranges of the bounded parameters (``FHMV`` blocks'
            ``natural_bounds``), for ``table``'s intervals.
    """

    kind: str
    natural: dict[str, np.ndarray]
    estimates: np.ndarray
    labels: tuple[str, ...]
    covariance: np.ndarray
    raw_labels: tuple[str, ...]
    raw_covariance: np.ndarray
    flagged: dict[str, str]
    num_identified: int
    information_eigenvalues: np.ndarray
    condition_number: float
    positive_definite: bool
    newton_gain: float
    num_observations: int
    bounds: dict[str, tuple[float, float]]

    def standard_errors(self) -> np.ndarray:
        """[Q] the standard errors in ``labels`` order."""
        return np.concatenate([np.ravel(v) for v in self.natural.values()])

    def table(self, level: float = 0.95) -> list[dict]:
        """One row per natural coordinate: label, estimate, standard error, z = estimate / se and the Wald
        interval at ``level`` (NaN where there is no standard error; ``flag`` says why).

        A bounded parameter's interval (``bounds``) is the Wald interval of its unconstrained transform (the logit
        of its place in a finite range, the log of its distance to a lower bound), mapped back: it stays inside
        the range and covers better than estimate +- z se near a bound."""
        from scipy.stats import norm

        half = norm.ppf(0.5 + level / 2)
        rows = []
        for label, estimate, se in zip(self.labels, self.estimates, self.standard_errors(), strict=True):
            bounds = self.bounds.get(label.split("[")[0])
            low, high = (estimate - half * se, estimate + half * se) if bounds is None else _bounded_interval(
                estimate, se, half, *bounds)
            rows.append({"parameter": label, "estimate": float(estimate), "se": float(se),
                         "z": float(estimate / se) if se > 0 else float("nan"), "low": float(low), "high": float(high),
                         "flag": self.flagged.get(label, "")})
        return rows


def _bounded_interval(estimate: float, se: float, half: float, low: float, high: float) -> tuple[float, float]:
    """estimate's Wald interval on the unconstrained scale u = logit((v - low) / (high - low)) (finite range) or
    u = log(v - low) (half-line), with se_u = se du/dv, mapped back (NaN without a standard error)."""
    if not np.isfinite(se):
        return float("nan"), float("nan")
    if np.isfinite(high):
        width = high - low
        u, slope = np.log((estimate - low) / (high - estimate)), width / ((estimate - low) * (high - estimate))
        back = lambda t: low + width / (1 + np.exp(-t))  # noqa: E731
    else:
        u, slope = np.log(estimate - low), 1 / (estimate - low)
        back = lambda t: low + np.exp(t)  # noqa: E731
    return back(u - half * se * slope), back(u + half * se * slope)


_SMALLEST = 5


def _bound_flags(values: np.ndarray, labels: tuple[str, ...], layout: FlatLayout,
                 bounds: dict[str, tuple[float, float]], tolerance: float) -> dict[str, str]:
    """{label: reason} of the natural coordinates within ``tolerance`` (relative to the range's width, or to
    max(1, |limit|) for a half-line) of a bound."""
    flags = {}
    names = np.repeat(np.arange(len(layout.names)), [math.prod(s) for s in layout.shapes])
    for value, label, name_index in zip(values, labels, names, strict=True):
        name = layout.names[name_index]
        if name not in bounds:
            continue
        low, high = bounds[name]
        width = high - low if np.isfinite(high) else max(1.0, abs(low))
        if value - low <= tolerance * width:
            flags[label] = f"at its lower bound {low:g}"
        elif np.isfinite(high) and high - value <= tolerance * width:
            flags[label] = f"at its upper bound {high:g}"
    return flags


def _sparse_component_flags(model: FHMV, counts: np.ndarray, min_count: float) -> dict[str, str]:
    """{label: reason} of every natural parameter of a mixture component with fewer than ``min_count`` expected
    observations (``counts`` [G, K])."""
    shapes = natural_shapes(model.spec)
    flags = {}
    for g, k in zip(*np.nonzero(counts < min_count), strict=True):
        reason = f"component ({g}, {k}) has {counts[g, k]:.3g} expected observations (< {min_count:g})"
        for name in ("weights", "means", "covariances", "dof"):
            if name not in shapes:
                continue
            rest = shapes[name][2:]
            flags |= {f"{name}[{','.join(map(str, (g, k) + index))}]": reason for index in np.ndindex(*rest)}
    return flags


def _initial_law_flags(model: FHMV, num_sequences: int, min_count: float) -> dict[str, str]:
    """{label: reason} of the initial regime law when fewer than ``min_count`` sequence starts inform it (one
    sequence: a single draw, whose maximum-likelihood law sits at or near a corner)."""
    if num_sequences >= min_count:
        return {}
    reason = f"the initial law is estimated from {num_sequences} sequence start(s) (< {min_count:g})"
    return {f"initial_regime[{g}]": reason for g in range(model.spec.num_regimes)}


def _orthonormal_rows(matrix: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """(an orthonormal basis of the row space of ``matrix`` [r, P], of its null space [P - r, P]), singular values
    below ``rtol`` of the largest counting as zero."""
    _, singular, vt = np.linalg.svd(matrix, full_matrices=True)
    rank = int(np.sum(singular > rtol * singular.max())) if singular.size and singular.max() > 0 else 0
    return vt[:rank], vt[rank:]


def identified_directions(jacobian: np.ndarray, flagged: np.ndarray, rtol: float) -> np.ndarray:
    """[k, P] orthonormal directions in theta that move the natural parameters (the row space of ``jacobian``
    [Q, P]) and keep every flagged one ([Q] bool) fixed."""
    basis = np.eye(jacobian.shape[1])
    if flagged.any():
        rows = jacobian[flagged]
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        _, basis = _orthonormal_rows(rows / np.where(norms > 0, norms, 1.0), rtol)
    moving, _ = _orthonormal_rows(jacobian[~flagged] @ basis.T, rtol)
    return moving @ basis


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix, by Cholesky."""
    factor = np.linalg.cholesky(matrix)
    inverse_factor = np.linalg.solve(factor, np.eye(matrix.shape[0]))
    return inverse_factor.T @ inverse_factor


def _positive_definite(eigenvalues: np.ndarray) -> bool:
    """Positive beyond rounding: the smallest eigenvalue above k eps times the largest."""
    return bool(eigenvalues.size == 0 or eigenvalues[0] > eigenvalues.size * np.finfo(float).eps * eigenvalues[-1])


def standard_errors(
    model: FHMV | FitResult,
    y,
    x=None,
    *,
    lengths=None,
    kind: str = "hessian",
    chunk_size: int = 16,
    bound_tolerance: float = 1e-6,
    min_count: float | None = None,
    progress: bool = False,
) -> StandardErrors:
    """Standard errors of every natural parameter from the observed information, the OPG or the sandwich.

    See the module docstring for the coordinates. The log-likelihood is that of the data alone (no covariance
    prior); at a fit of ``fit_em`` its score is therefore not exactly zero (the prior's pull, O(ridge / n)).

    Args:
        model: the fitted model (or ``fit_em``'s ``FitResult``: a warning if it did not converge).
        y: [T, D] or a padded batch [B, T, D]; x: the driver [T] or [B, T] where the leverage mode needs one.
        lengths: [B] valid steps per sequence (default: all T).
        kind: ``"hessian"`` (inverse observed information), ``"opg"`` (inverse outer product of the per-step
            scores) or ``"sandwich"`` (H^-1 OPG H^-1, robust to misspecification).
        chunk_size: directions per compiled Hessian- or Jacobian-vector call (memory: about ``chunk_size``
            gradients).
        bound_tolerance: a natural parameter this close to a bound of its range (relative to the range's width)
            is flagged and held fixed.
        min_count: a mixture component with fewer expected observations, and the initial regime law with fewer
            sequences, are flagged and held fixed (default: the feature count D + 1).
        progress: show progress bars over the chunks.

    Returns:
        ``StandardErrors``; with an information that is not positive definite, a warning and NaN standard errors.

    Raises:
        ValueError: an unknown ``kind``, a non-positive ``chunk_size``, or bad observations (as ``fit_em``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _check_chunk_size(chunk_size)
    problem = _Problem.of(_unwrap(model, "standard_errors"), y, x, lengths, "standard_errors")
    model = problem.model
    natural = natural_layout(model)
    labels = natural.labels()
    estimates = np.asarray(natural.ravel(model.natural_parameters()))
    jacobian = np.asarray(_natural_jacobian(problem.theta, model, problem.layout, natural))
    counts = np.asarray(_component_counts(model, problem.y, problem.x, problem.mask))
    min_count = model.spec.num_features + 1 if min_count is None else min_count
    rtol = _rank_tolerance(model)
    generic = _structural_jacobian(model, problem.layout, natural)
    fixed = generic.max(axis=1, initial=0.0) <= rtol * generic.max(initial=0.0)
    bounds = natural_bounds(model.spec)
    flags = _bound_flags(estimates, labels, natural, bounds, bound_tolerance)
    flags |= {k: v for k, v in _sparse_component_flags(model, counts, min_count).items() if k not in flags}
    flags |= {k: v for k, v in _initial_law_flags(model, problem.y.shape[0], min_count).items() if k not in flags}
    flags = {label: reason for label, reason, still in zip(labels, map(flags.get, labels), fixed, strict=True)
             if reason is not None and not still}
    flagged = np.array([label in flags for label in labels], bool)
    directions = identified_directions(jacobian, flagged, rtol)

    outer = gradient = None
    if kind != "hessian":
        steps = problem.step_scores(directions, chunk_size, progress).reshape(directions.shape[0], -1)
        outer = steps @ steps.T
    if kind == "opg":
        information = outer
    else:
        hessian, gradient = problem.projected_hessian(directions, chunk_size, progress)
        information = -hessian
    if gradient is None:
        _, gradient = problem.gradient()
    eigenvalues = np.linalg.eigvalsh(information)
    positive = _positive_definite(eigenvalues)
    num_observations = int(problem.mask.sum())
    projected = directions @ gradient
    covariance = np.full((directions.shape[0],) * 2, np.nan)
    newton_gain = float("inf")
    if positive:
        inverse = _inverse(information)
        newton_gain = 0.5 * float(projected @ inverse @ projected) / num_observations
        covariance = inverse @ outer @ inverse if kind == "sandwich" else inverse
    else:
        warnings.warn(_indefinite_message(kind, information, directions, problem.layout.labels(), eigenvalues),
                      UserWarning, stacklevel=2)
    moved = jacobian @ directions.T
    natural_covariance = moved @ covariance @ moved.T
    errors = np.where(flagged | fixed, np.nan, np.sqrt(np.maximum(np.diagonal(natural_covariance), 0.0)))
    smallest = eigenvalues[:_SMALLEST]
    return StandardErrors(
        kind=kind,
        natural={k: np.asarray(v) for k, v in natural.unravel(jnp.asarray(errors)).items()},
        estimates=estimates,
        labels=labels,
        covariance=natural_covariance,
        raw_labels=problem.layout.labels(),
        raw_covariance=directions.T @ covariance @ directions,
        flagged=flags,
        num_identified=int(directions.shape[0]),
        information_eigenvalues=smallest,
        condition_number=float(eigenvalues[-1] / eigenvalues[0]) if positive and eigenvalues.size else float("inf"),
        positive_definite=positive,
        newton_gain=newton_gain,
        num_observations=num_observations,
        bounds=bounds,
    )


def _indefinite_message(kind: str, information: np.ndarray, directions: np.ndarray, raw_labels: tuple[str, ...],
                        eigenvalues: np.ndarray) -> str:
    """The warning for an information matrix that is not positive definite, naming the coordinates of its weakest
    direction."""
    _, vectors = np.linalg.eigh(information)
    weakest = np.abs(vectors[:, 0] @ directions)
    top = [raw_labels[i] for i in np.argsort(weakest)[::-1][:3]]
    what, cause = (("outer product of the per-step scores", "fewer steps than parameters, or a parameter no step"
                    " informs") if kind == "opg" else
                   ("observed information", "the model is not a strict maximum: not converged, or not identified"))
    return (f"standard_errors: the {what} is not positive definite (smallest eigenvalues"
            f" {np.array2string(eigenvalues[:3], precision=3)}), mostly along {', '.join(top)} ({cause}); no standard"
            " errors (no pseudo-inverse is taken)")


# ----------------------------------------------------------------------------------------
# profile likelihood


class Profile(NamedTuple):
    """The profile log-likelihood of one natural parameter.

    Attributes:
        parameter: its label, e.g. ``"means[0,0,1]"``.
        values: [M] the values it was held at.
        log_likelihoods: [M] max log p(y) over every other parameter, at each value.
    """

    parameter: str
    values: np.ndarray
    log_likelihoods: np.ndarray


def _own_coordinate(model: FHMV, layout: FlatLayout, natural: FlatLayout, parameter: str) -> tuple[int, int]:
    """(natural index, theta index) of a natural parameter that one unconstrained coordinate alone sets."""
    labels = natural.labels()
    if parameter not in labels:
        raise ValueError(f"unknown parameter {parameter!r}; natural labels look like {labels[0]!r}, {labels[-1]!r}")
    row = labels.index(parameter)
    moving = np.flatnonzero(_structural_jacobian(model, layout, natural)[row] > 0)
    if moving.size != 1:
        raise ValueError(f"a profile needs a parameter set by one unconstrained coordinate of its own (a mean, nu,"
                         f" c_1, theta, l_1, ...); {parameter} depends on {moving.size}")
    return row, int(moving[0])


def profile_log_likelihood(model: FHMV | FitResult, y, x=None, *, parameter: str, values, lengths=None,
                           num_steps: int = 200, tol: float = 1e-10, progress: bool = False) -> Profile:
    """max log p(y) over every other parameter with ``parameter`` held at each of ``values`` (L-BFGS,
    ``fit_gradient(hold=...)``, each value warm-started from the previous one; no covariance prior).

    Compared with the Wald interval of ``standard_errors`` it shows how far the quadratic approximation holds: the
    likelihood-ratio interval is where the profile lies within chi2_1(level) / 2 of its maximum.

    Raises:
        ValueError: an unknown ``parameter``, or one that no single unconstrained coordinate sets (a probability).
    """
    model = _unwrap(model, "profile_log_likelihood")
    layout, natural = free_layout(model), natural_layout(model)
    row, column = _own_coordinate(model, layout, natural, parameter)
    theta = np.asarray(layout.ravel(model.free_arrays()))
    natural_at = jax.jit(lambda t: natural.ravel(model_at(model, layout, t).natural_parameters())[row])
    indices = layout.unravel(jnp.arange(layout.size))
    hold = {k: np.asarray(v) == column for k, v in indices.items()}

    def coordinate(value: float) -> float:
        return _solve_coordinate(lambda t: float(natural_at(jnp.asarray(theta).at[column].set(t))) - value,
                                 float(theta[column]))

    current, results = model, []
    for value in tqdm(np.asarray(values, float), desc=f"profile {parameter}", disable=not progress, leave=False):
        point = np.array(layout.ravel(current.free_arrays()))
        point[column] = coordinate(value)
        fit = fit_gradient(model_at(current, layout, jnp.asarray(point)), y, x, lengths=lengths, num_steps=num_steps,
                           tol=tol, covariance_ridge=0.0, covariance_prior_count=0.0, hold=hold)
        current = fit.model
        results.append(fit.log_likelihoods[-1])
    return Profile(parameter, np.asarray(values, float), np.asarray(results))


def _solve_coordinate(residual: Callable[[float], float], start: float) -> float:
    """The root of a monotone ``residual`` of one coordinate, bracketed by doubling steps from ``start``."""
    from scipy.optimize import brentq

    low, high, width = start - 1.0, start + 1.0, 1.0
    while residual(low) * residual(high) > 0:
        width *= 2
        low, high = start - width, start + width
        if width > 1e3:
            raise ValueError("the profile value lies outside the parameter's range")
    return brentq(residual, low, high, xtol=1e-14, rtol=1e-14)

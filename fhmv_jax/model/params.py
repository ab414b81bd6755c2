"""Unconstrained FHMV parameters and their maps to and from natural values.

Every parameter is stored on an unconstrained scale (log, logit, log-Cholesky), so any
real array is a valid model and gradient steps never leave the parameter space.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Float
from .spec import ModelSpec


class FHMVParams(eqx.Module):
    """Unconstrained parameters of an FHMV model; ``None`` where the spec has no such factor.

    Attributes:
        initial_logits: [G] log pi (softmax gives the initial regime law).
        transition_logits: [G, G] row-wise log A.
        log_weights: [G, K] log mixture weights.
        means: [G, K, D] component means.
        chol_raw: [G, K, D, D] log-Cholesky factors: strict lower triangle as is, log diagonal.
        dof_raw: [G, K] logit of (nu - lower) / (upper - lower); ``None`` when gaussian.
        persistence_raw: [1] (tied) or [N] logit p_n.
        c1_raw: log(c_1 - 1).  theta_c_raw: logit theta_c (N >= 2).
        jump_q_raw: logit q.  jump_back_raw: logit q_back (jump_mode markov).
        jump_phi_raw: logit phi (jump_mode family).
        m1_raw: log(m_1 - 1).  theta_m_raw: logit theta_m (N_M >= 3).
        l1_raw: log l_1 (predictable) or log(l_1 - 1) (markov).
        theta_l_raw: logit theta_l (predictable, N_L >= 2).
        leverage_raw: [2, 2] Markov-leverage logits of moving to state 1:
            row 0 holds a[i, 1], row 1 holds b[i, 1], for i the previous state.
    """

    initial_logits: Float[Array, " G"]
    transition_logits: Float[Array, "G G"]
    log_weights: Float[Array, "G K"]
    means: Float[Array, "G K D"]
    chol_raw: Float[Array, "G K D D"]
    dof_raw: Float[Array, "G K"] | None
    persistence_raw: Float[Array, " P"] | None
    c1_raw: Float[Array, ""] | None
    theta_c_raw: Float[Array, ""] | None
    jump_q_raw: Float[Array, ""] | None
    jump_back_raw: Float[Array, ""] | None
    jump_phi_raw: Float[Array, ""] | None
    m1_raw: Float[Array, ""] | None
    theta_m_raw: Float[Array, ""] | None
    l1_raw: Float[Array, ""] | None
    theta_l_raw: Float[Array, ""] | None
    leverage_raw: Float[Array, "2 2"] | None

    @property
    def dtype(self):
        return self.means.dtype


def raw_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...] | None]:
    """The shape of every ``FHMVParams`` field a spec uses, ``None`` for the fields it does not use.

    Args:
        spec: the model spec.

    Returns:
        Field name -> shape (``None`` where the field must be ``None``), in field order.
    """
    G, K, D, N, M = spec.num_regimes, spec.num_components, spec.num_features, spec.num_chains, spec.num_jump_states
    uses = {
        "initial_logits": (G,),
        "transition_logits": (G, G),
        "log_weights": (G, K),
        "means": (G, K, D),
        "chol_raw": (G, K, D, D),
        "dof_raw": None if spec.gaussian else (G, K),
        "persistence_raw": ((1,) if spec.tied_persistence else (N,)) if N >= 1 else None,
        "c1_raw": () if N >= 1 else None,
        "theta_c_raw": () if N >= 2 else None,
        "jump_q_raw": () if M >= 2 else None,
        "jump_back_raw": () if M >= 2 and spec.jump_mode == "markov" else None,
        "jump_phi_raw": () if M >= 2 and spec.jump_mode == "family" else None,
        "m1_raw": () if M >= 2 else None,
        "theta_m_raw": () if M >= 3 else None,
        "l1_raw": () if spec.leverage != "none" else None,
        "theta_l_raw": () if spec.leverage == "predictable" and spec.num_leverage_lags >= 2 else None,
        "leverage_raw": (2, 2) if spec.leverage == "markov" else None,
    }
    return {f.name: uses[f.name] for f in dataclasses.fields(FHMVParams)}


def expected_keys(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Natural-parameter keys a spec uses, with their shapes (ARCHITECTURE.md)."""
    G, K, D, N, M = (
        spec.num_regimes,
        spec.num_components,
        spec.num_features,
        spec.num_chains,
        spec.num_jump_states,
    )
    keys = {
        "initial_regime": (G,),
        "regime_transition": (G, G),
        "weights": (G, K),
        "means": (G, K, D),
        "covariances": (G, K, D, D),
    }
    if not spec.gaussian:
        keys["dof"] = (G, K)
    if N >= 1:
        keys |= {"persistence_stay": (N,), "c1": ()}
    if N >= 2:
        keys["theta_c"] = ()
    if M >= 2:
        keys |= {"jump_transition": (M, M), "m1": ()}
    if M >= 3:
        keys["theta_m"] = ()
    if spec.leverage != "none":
        keys["l1"] = ()
    if spec.leverage == "predictable" and spec.num_leverage_lags >= 2:
        keys["theta_l"] = ()
    if spec.leverage == "markov":
        keys["leverage_logits"] = (2, 2, 2)
    return keys


def cholesky_factor(chol_raw: Float[Array, "... D D"]) -> Float[Array, "... D D"]:
    """Lower Cholesky factor with a positive diagonal from its log-Cholesky storage."""
    diagonal = jnp.exp(jnp.diagonal(chol_raw, axis1=-2, axis2=-1))
    eye = jnp.broadcast_to(jnp.eye(chol_raw.shape[-1], dtype=chol_raw.dtype), chol_raw.shape)
    return jnp.tril(chol_raw, -1) + diagonal[..., None] * eye


def _bounded(raw, low, high):
    return low + (high - low) * jax.nn.sigmoid(raw)


def jump_transition_matrix(spec: ModelSpec, params: FHMVParams) -> Float[Array, "M M"]:
    """The jump chain's transition matrix (MODEL.md section 1)."""
    q = jax.nn.sigmoid(params.jump_q_raw)
    if spec.jump_mode == "markov":
        q_back = jax.nn.sigmoid(params.jump_back_raw)
        return jnp.stack([jnp.stack([1 - q, q]), jnp.stack([q_back, 1 - q_back])])
    phi = jnp.zeros_like(q) if spec.jump_mode == "iid" else jax.nn.sigmoid(params.jump_phi_raw)
    return phi * jnp.eye(spec.num_jump_states, dtype=q.dtype) + (1 - phi) * jump_family_law(q, spec.num_jump_states)[None, :]


def jump_family_law(q: Float[Array, ""], num_states: int) -> Float[Array, " M"]:
    """pi_M = (1 - q, q / (N_M - 1), ..., q / (N_M - 1))."""
    rest = jnp.full((num_states - 1,), q / (num_states - 1))
    return jnp.concatenate([(1 - q)[None], rest])


def natural_parameters(spec: ModelSpec, params: FHMVParams) -> dict[str, Array]:
    """Constrained values of every parameter the spec uses, keyed as in ARCHITECTURE.md."""
    natural = {
        "initial_regime": jax.nn.softmax(params.initial_logits),
        "regime_transition": jax.nn.softmax(params.transition_logits, axis=-1),
        "weights": jax.nn.softmax(params.log_weights, axis=-1),
        "means": params.means,
    }
    chol = cholesky_factor(params.chol_raw)
    natural["covariances"] = chol @ jnp.swapaxes(chol, -1, -2)
    if not spec.gaussian:
        natural["dof"] = _bounded(params.dof_raw, *spec.dof_bounds)
    if spec.num_chains >= 1:
        p = jax.nn.sigmoid(params.persistence_raw)
        natural["persistence_stay"] = jnp.broadcast_to(p, (spec.num_chains,))
        natural["c1"] = 1 + jnp.exp(params.c1_raw)
    if spec.num_chains >= 2:
        natural["theta_c"] = jax.nn.sigmoid(params.theta_c_raw)
    if spec.has_jumps:
        natural["jump_transition"] = jump_transition_matrix(spec, params)
        natural["m1"] = 1 + jnp.exp(params.m1_raw)
    if spec.num_jump_states >= 3:
        natural["theta_m"] = jax.nn.sigmoid(params.theta_m_raw)
    if spec.leverage == "predictable":
        natural["l1"] = jnp.exp(params.l1_raw)
        if spec.num_leverage_lags >= 2:
            natural["theta_l"] = jax.nn.sigmoid(params.theta_l_raw)
    if spec.leverage == "markov":
        natural["l1"] = 1 + jnp.exp(params.l1_raw)
        zeros = jnp.zeros_like(params.leverage_raw)
        natural["leverage_logits"] = jnp.stack([zeros, params.leverage_raw], axis=-1)
    return natural


def safe_log(p: Array) -> Array:
    """log p with zero probabilities mapped to log(tiny), a finite logit."""
    p = jnp.asarray(p)
    return jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny))


def logit(p: Array) -> Array:
    """log(p / (1 - p)), with p clipped into (0, 1) so that 0 and 1 stay finite."""
    p = jnp.asarray(p)
    p = jnp.clip(p, jnp.finfo(p.dtype).tiny, 1 - jnp.finfo(p.dtype).epsneg)
    return jnp.log(p) - jnp.log1p(-p)


# ----------------------------------------------------------------------------------------
# natural -> unconstrained, with validation (outside jit, on concrete values)


def _check_keys(spec: ModelSpec, values: dict) -> dict[str, np.ndarray]:
    expected = expected_keys(spec)
    missing = sorted(set(expected) - set(values))
    unknown = sorted(set(values) - set(expected))
    if missing:
        raise ValueError(f"missing natural parameters for this spec: {missing}")
    if unknown:
        raise ValueError(f"natural parameters not used by this spec: {unknown} (spec uses {sorted(expected)})")
    arrays = {}
    for key, shape in expected.items():
        array = np.asarray(values[key], dtype=np.float64)
        if array.shape != shape:
            raise ValueError(f"natural parameter {key!r} has shape {array.shape}, expected {shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"natural parameter {key!r} has non-finite values")
        arrays[key] = array
    return arrays


def _check_stochastic(name: str, probs: np.ndarray, atol: float = 1e-6) -> None:
    if np.any(probs < 0):
        raise ValueError(f"{name} has negative probabilities")
    sums = probs.sum(axis=-1)
    bad = np.flatnonzero(np.abs(sums - 1) > atol)
    if bad.size:
        where = np.unravel_index(bad[0], sums.shape)
        raise ValueError(f"{name} must sum to one along its last axis; entry {where} sums to {sums[where]:.6g}")


def _check_interval(name: str, value: np.ndarray, low: float, high: float, closed: str) -> None:
    ok_low = value >= low if closed in ("both", "left") else value > low
    ok_high = value <= high if closed in ("both", "right") else value < high
    if not np.all(ok_low & ok_high):
        brackets = {"both": "[]", "left": "[)", "right": "(]", "neither": "()"}[closed]
        raise ValueError(f"{name} must lie in {brackets[0]}{low}, {high}{brackets[1]}, got {value}")


def _jump_raw(spec: ModelSpec, matrix: np.ndarray) -> dict[str, np.ndarray | None]:
    """Recover (q, q_back) or (phi, q) from a jump matrix, checking it is in the spec's family."""
    M = spec.num_jump_states
    _check_stochastic("jump_transition", matrix)
    if spec.jump_mode == "markov":
        return {"jump_q_raw": logit(matrix[0, 1]), "jump_back_raw": logit(matrix[1, 0]), "jump_phi_raw": None}
    one_minus_phi = matrix[1, 0] + (M - 1) * matrix[0, 1]
    if one_minus_phi <= 0:
        raise ValueError("jump_transition is the identity: phi = 1 leaves q unidentified")
    q = (M - 1) * matrix[0, 1] / one_minus_phi
    phi = 1 - one_minus_phi
    law = np.concatenate([[1 - q], np.full(M - 1, q / (M - 1))])
    rebuilt = phi * np.eye(M) + (1 - phi) * law[None, :]
    if not np.allclose(rebuilt, matrix, atol=1e-8) or not 0 <= phi < 1 or not 0 <= q <= 1:
        raise ValueError(f"jump_transition is not of the form phi * I + (1 - phi) * 1 pi_M^T ({spec.jump_mode})")
    if spec.jump_mode == "iid" and abs(phi) > 1e-8:
        raise ValueError(f"jump_mode='iid' needs identical rows (phi = 0), got phi = {phi:.6g}")
    return {
        "jump_q_raw": logit(q),
        "jump_back_raw": None,
        "jump_phi_raw": logit(phi) if spec.jump_mode == "family" else None,
    }


def _covariance_raw(covariances: np.ndarray) -> np.ndarray:
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


def params_from_natural(spec: ModelSpec, values: dict, dtype=None) -> FHMVParams:
    """Validate natural values and map them to unconstrained storage (inverse of ``natural_parameters``).

    Raises:
        ValueError: naming the offending key for a missing or unknown key, a wrong shape, a
            non-finite value, a probability vector that does not sum to one, a value outside
            its range (c1 <= 1, dof outside ``spec.dof_bounds``, ...) or a covariance that is
            not symmetric positive definite.
    """
    v = _check_keys(spec, values)
    _check_stochastic("initial_regime", v["initial_regime"])
    _check_stochastic("regime_transition", v["regime_transition"])
    _check_stochastic("weights", v["weights"])
    raw = {
        "initial_logits": safe_log(v["initial_regime"]),
        "transition_logits": safe_log(v["regime_transition"]),
        "log_weights": safe_log(v["weights"]),
        "means": v["means"],
        "chol_raw": _covariance_raw(v["covariances"]),
        "dof_raw": None,
        "persistence_raw": None,
        "c1_raw": None,
        "theta_c_raw": None,
        "jump_q_raw": None,
        "jump_back_raw": None,
        "jump_phi_raw": None,
        "m1_raw": None,
        "theta_m_raw": None,
        "l1_raw": None,
        "theta_l_raw": None,
        "leverage_raw": None,
    }
    if "dof" in v:
        low, high = spec.dof_bounds
        _check_interval("dof", v["dof"], low, high, "both")
        raw["dof_raw"] = logit((v["dof"] - low) / (high - low))
    if "persistence_stay" in v:
        p = v["persistence_stay"]
        _check_interval("persistence_stay", p, 0.0, 1.0, "both")
        if spec.tied_persistence and not np.allclose(p, p[0], rtol=0, atol=1e-12):
            raise ValueError(f"tied_persistence needs equal persistence_stay values, got {p}")
        raw["persistence_raw"] = logit(p[:1] if spec.tied_persistence else p)
        _check_interval("c1", v["c1"], 1.0, np.inf, "neither")
        raw["c1_raw"] = np.log(v["c1"] - 1)
    if "theta_c" in v:
        _check_interval("theta_c", v["theta_c"], 0.0, 1.0, "neither")
        raw["theta_c_raw"] = logit(v["theta_c"])
    if "jump_transition" in v:
        raw |= _jump_raw(spec, v["jump_transition"])
        _check_interval("m1", v["m1"], 1.0, np.inf, "neither")
        raw["m1_raw"] = np.log(v["m1"] - 1)
    if "theta_m" in v:
        _check_interval("theta_m", v["theta_m"], 0.0, 1.0, "neither")
        raw["theta_m_raw"] = logit(v["theta_m"])
    if spec.leverage == "predictable":
        _check_interval("l1", v["l1"], 0.0, np.inf, "neither")
        raw["l1_raw"] = np.log(v["l1"])
        if "theta_l" in v:
            _check_interval("theta_l", v["theta_l"], 0.0, 1.0, "left")
            raw["theta_l_raw"] = logit(v["theta_l"])
    if spec.leverage == "markov":
        _check_interval("l1", v["l1"], 1.0, np.inf, "neither")
        raw["l1_raw"] = np.log(v["l1"] - 1)
        logits = v["leverage_logits"]
        if np.any(logits[..., 0] != 0):
            raise ValueError("leverage_logits[..., 0] (the logits of moving to state 0) must be zero")
        raw["leverage_raw"] = logits[..., 1]
    return FHMVParams(**{k: None if a is None else jnp.asarray(a, dtype=dtype) for k, a in raw.items()})

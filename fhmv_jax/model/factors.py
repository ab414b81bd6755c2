"""Per-factor transition matrices, initial laws and volatility scales (MODEL.md sections 1-2).

Everything here takes natural parameter values (``params.natural_parameters``) and returns
the arrays the inference routines consume: one transition matrix per axis of the joint
state tensor (time-varying ones with a leading time axis) and log-scales per volatility
sub-state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._types import Array, Float
from .spec import ModelSpec


def persistence_matrix(p: Float[Array, ""]) -> Float[Array, "2 2"]:
    """[[p, 1 - p], [1 - p, p]]."""
    return jnp.stack([jnp.stack([p, 1 - p]), jnp.stack([1 - p, p])])


def jump_stationary_law(jump_transition: Float[Array, "M M"]) -> Float[Array, " M"]:
    """Stationary law of the jump chain, read off its matrix.

    Both jump families have it in closed form: (q_back, q) / (q + q_back) for the 2-state
    Markov chain and pi_M for phi * I + (1 - phi) * 1 pi_M^T; in each case it is
    (P[1, 0], P[0, 1:]) normalised.
    """
    unnormalised = jnp.concatenate([jump_transition[1:2, 0], jump_transition[0, 1:]])
    return unnormalised / jnp.maximum(unnormalised.sum(), jnp.finfo(unnormalised.dtype).tiny)


def leverage_transition(leverage_logits: Float[Array, "2 2 2"], x_prev: Float[Array, ""]) -> Float[Array, "2 2"]:
    """P(V_t = j | V_{t-1} = i, x_{t-1}) = softmax_j(a_ij + b_ij x_{t-1})."""
    a, b = leverage_logits
    return jax.nn.softmax(a + b * x_prev, axis=-1)


def markov_leverage_transitions(
    leverage_logits: Float[Array, "2 2 2"], x: Float[Array, " T"]
) -> Float[Array, "T 2 2"]:
    """``leverage_transition`` at every step, driven by x_{t-1}; entry 0 (no predecessor) is unused."""
    x_prev = jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])
    return jax.vmap(leverage_transition, in_axes=(None, 0))(leverage_logits, x_prev)


def leverage_lag_weights(l1: Float[Array, ""], theta_l: Float[Array, ""] | None, num_lags: int) -> Float[Array, " L"]:
    """l_1 theta_l^{i-1} for i = 1..N_L (theta_l = 1 when N_L = 1)."""
    decay = jnp.ones_like(l1) if theta_l is None else theta_l
    return l1 * jnp.cumprod(jnp.concatenate([jnp.ones_like(l1)[None], jnp.full((num_lags - 1,), decay)]))


def log_leverage(lag_weights: Float[Array, " L"], recent_g: Float[Array, " L"]) -> Float[Array, ""]:
    """log L_t = sum_i log(1 + w_i g_{t-i}) from the most recent shocks g (newest first)."""
    return jnp.sum(jnp.log1p(lag_weights * recent_g))


def push_shock(recent_g: Float[Array, " L"], x_t: Float[Array, ""], log_l: Float[Array, ""]) -> Float[Array, " L"]:
    """Prepend g_t = |x_t| 1{x_t < 0} / sqrt(L_t) to the shocks, dropping the oldest."""
    g_t = jnp.where(x_t < 0, -x_t, 0.0) * jnp.exp(-0.5 * log_l)
    return jnp.concatenate([g_t[None], recent_g[:-1]])


def predictable_log_leverage(
    x: Float[Array, " T"], l1: Float[Array, ""], theta_l: Float[Array, ""] | None, num_lags: int
) -> Float[Array, " T"]:
    """log L_t with L_t = prod_{i <= min(N_L, t-1)} (1 + l_1 theta_l^{i-1} g_{t-i}).

    g_s = |x_s| 1{x_s < 0} / sqrt(L_s); L_1 = 1. A ``lax.scan`` carries the last N_L values of g.
    """
    lag_weights = leverage_lag_weights(l1, theta_l, num_lags)

    def _step(recent_g, x_t):
        log_l = log_leverage(lag_weights, recent_g)
        return push_shock(recent_g, x_t, log_l), log_l

    _, log_leverages = jax.lax.scan(_step, jnp.zeros((num_lags,), x.dtype), x)
    return log_leverages


def log_volatility_scales(spec: ModelSpec, natural: dict[str, Array]) -> Float[Array, " V"]:
    """log C(e) + log M(J) (+ V log l_1 for Markov leverage) per volatility sub-state, flattened.

    c_n = 1 + theta_c^{n-1} (c_1 - 1); M(0) = 1, M(j) = 1 + theta_m^{j-1} (m_1 - 1).
    """
    dtype = natural["means"].dtype
    per_axis = []
    if spec.num_chains:
        theta_c = natural.get("theta_c", jnp.ones((), dtype))
        c = 1 + theta_c ** jnp.arange(spec.num_chains, dtype=dtype) * (natural["c1"] - 1)
        per_axis += [jnp.stack([jnp.zeros((), dtype), jnp.log(c_n)]) for c_n in c]
    if spec.has_jumps:
        theta_m = natural.get("theta_m", jnp.ones((), dtype))
        m = 1 + theta_m ** jnp.arange(spec.num_jump_states - 1, dtype=dtype) * (natural["m1"] - 1)
        per_axis.append(jnp.concatenate([jnp.zeros((1,), dtype), jnp.log(m)]))
    if spec.leverage == "markov":
        per_axis.append(jnp.stack([jnp.zeros((), dtype), jnp.log(natural["l1"])]))
    total = jnp.zeros((), dtype)
    for axis, values in enumerate(per_axis):
        shape = [1] * len(per_axis)
        shape[axis] = values.shape[0]
        total = total + values.reshape(shape)
    return jnp.broadcast_to(total, spec.volatility_shape).reshape(-1)

"""The chain factors of the latent state and the leverage (MODEL.md sections 1-2), one block each.

A chain factor contributes axes to the joint state tensor: for each, the law of its state at
t = 1, its transition matrix ([n, n], or [T, n, n] when it varies in time: entry t maps step t
to step t + 1 and is driven by the driver x_t) and, for the volatility factors, the log of its
volatility multiplier per state. ``FHMV`` composes them in axis order: regime, persistence
chains, jump, Markov leverage.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Float
from .params import AbstractBlock, as_array, check_interval, check_stochastic, logit, safe_log
from .spec import ModelSpec

STAY_START = 0.98
"""Starting stay probability of every persistence chain (MODEL.md 6)."""

THETA_START = 0.5
"""Starting value of every decay theta (MODEL.md 6)."""


class AbstractChainFactor(AbstractBlock):
    """A factor with state axes in the joint state tensor."""

    @abc.abstractmethod
    def initial_laws(self) -> tuple[Array, ...]:
        """The law of the factor's state at t = 1, one [n] vector per axis."""

    @abc.abstractmethod
    def step_matrices(self, x_t: Float[Array, ""] | None) -> tuple[Array, ...]:
        """The [n, n] transition from step t to t + 1 per axis, given the driver x_t."""

    def transition_matrices(self, x: Float[Array, " T"] | None) -> tuple[Array, ...]:
        """One matrix per axis: [n, n], or [T, n, n] (entry t driven by x_t) for a time-varying axis."""
        return self.step_matrices(None)


class AbstractVolatilityFactor(AbstractChainFactor):
    """A chain factor whose states multiply the volatility scale s_t(h)."""

    @abc.abstractmethod
    def axis_log_scales(self) -> tuple[Array, ...]:
        """The [n] log volatility multipliers of each axis's states."""


class RegimeChain(AbstractChainFactor):
    """The regime chain R: a free initial law pi [G] and a free transition matrix A [G, G].

    Attributes:
        initial_logits: [G] log pi.
        transition_logits: [G, G] row-wise log A.
    """

    initial_logits: Float[Array, " G"]
    transition_logits: Float[Array, "G G"]

    @classmethod
    def natural_shapes(cls, spec):
        G = spec.num_regimes
        return {"initial_regime": (G,), "regime_transition": (G, G)}

    @classmethod
    def raw_shapes(cls, spec):
        G = spec.num_regimes
        return {"initial_logits": (G,), "transition_logits": (G, G)}

    @classmethod
    def natural_bounds(cls, spec):
        return {"initial_regime": (0.0, 1.0), "regime_transition": (0.0, 1.0)}

    @classmethod
    def from_natural(cls, spec, values, dtype=None):
        check_stochastic("initial_regime", values["initial_regime"])
        check_stochastic("regime_transition", values["regime_transition"])
        return cls(as_array(safe_log(values["initial_regime"]), dtype),
                   as_array(safe_log(values["regime_transition"]), dtype))

    @classmethod
    def start(cls, spec: ModelSpec) -> dict[str, np.ndarray]:
        """MODEL.md 6: a uniform initial law and 0.95 on the diagonal of A, the rest spread evenly."""
        G = spec.num_regimes
        off = 0.05 / max(G - 1, 1)
        transition = np.full((G, G), off) + np.eye(G) * (0.95 - off) if G > 1 else np.ones((1, 1))
        return {"initial_regime": np.full(G, 1 / G), "regime_transition": transition}

    def natural(self):
        return {"initial_regime": self.initial_laws()[0], "regime_transition": self.step_matrices(None)[0]}

    @property
    def num_free_parameters(self) -> int:
        G = self.initial_logits.shape[-1]
        return (G - 1) + G * (G - 1)

    def initial_laws(self):
        return (jax.nn.softmax(self.initial_logits),)

    def step_matrices(self, x_t):
        return (jax.nn.softmax(self.transition_logits, axis=-1),)

    def permuted(self, order: np.ndarray) -> RegimeChain:
        """The chain with regime i being the old regime ``order[i]``."""
        return RegimeChain(self.initial_logits[order], self.transition_logits[order][:, order])


def persistence_matrix(p: Float[Array, ""]) -> Float[Array, "2 2"]:
    """[[p, 1 - p], [1 - p, p]]."""
    return jnp.stack([jnp.stack([p, 1 - p]), jnp.stack([1 - p, p])])


def _uniform_pair(dtype) -> Float[Array, " 2"]:
    return jnp.full((2,), 0.5, dtype)


def _off_and_on(log_multiplier: Float[Array, ""]) -> Float[Array, " 2"]:
    """(0, log m): the log multipliers of a binary factor's states."""
    return jnp.stack([jnp.zeros((), log_multiplier.dtype), log_multiplier])


class PersistenceChains(AbstractVolatilityFactor):
    """N binary persistence chains e^n: stay probability p_n, multiplier c_n = 1 + theta_c^{n-1} (c_1 - 1).

    Attributes:
        num_chains: N >= 1 (static).
        tied: one p shared by every chain (static).
        persistence_raw: [1] (tied) or [N] logit p_n.
        c1_raw: log(c_1 - 1).
        theta_c_raw: logit theta_c (``None`` when N = 1).
    """

    num_chains: int = eqx.field(static=True)
    tied: bool = eqx.field(static=True)
    persistence_raw: Float[Array, " P"]
    c1_raw: Float[Array, ""]
    theta_c_raw: Float[Array, ""] | None

    @classmethod
    def static_fields(cls, spec):
        return {"num_chains": spec.num_chains, "tied": spec.tied_persistence}

    @classmethod
    def natural_shapes(cls, spec):
        shapes = {"persistence_stay": (spec.num_chains,), "c1": ()}
        return shapes | ({"theta_c": ()} if spec.num_chains >= 2 else {})

    @classmethod
    def raw_shapes(cls, spec):
        N = spec.num_chains
        return {"persistence_raw": (1,) if spec.tied_persistence else (N,), "c1_raw": (),
                "theta_c_raw": () if N >= 2 else None}

    @classmethod
    def natural_bounds(cls, spec):
        return {"persistence_stay": (0.0, 1.0), "c1": (1.0, np.inf), "theta_c": (0.0, 1.0)}

    @classmethod
    def magnitude_fields(cls):
        return ("c1_raw", "theta_c_raw")

    @classmethod
    def from_natural(cls, spec, values, dtype=None):
        p = values["persistence_stay"]
        check_interval("persistence_stay", p, *cls.natural_bounds(spec)["persistence_stay"], "both")
        if spec.tied_persistence and not np.allclose(p, p[0], rtol=0, atol=1e-12):
            raise ValueError(f"tied_persistence needs equal persistence_stay values, got {p}")
        check_interval("c1", values["c1"], *cls.natural_bounds(spec)["c1"], "neither")
        theta = None
        if "theta_c" in values:
            check_interval("theta_c", values["theta_c"], *cls.natural_bounds(spec)["theta_c"], "neither")
            theta = logit(values["theta_c"])
        stay, c1 = logit(p[:1] if spec.tied_persistence else p), np.log(values["c1"] - 1)
        return cls(spec.num_chains, spec.tied_persistence, *(as_array(a, dtype) for a in (stay, c1, theta)))

    @classmethod
    def start(cls, spec: ModelSpec) -> dict[str, np.ndarray]:
        """MODEL.md 6: p = 0.98, c_1 = 2, theta_c = 0.5."""
        values = {"persistence_stay": np.full(spec.num_chains, STAY_START), "c1": 2.0}
        return values | ({"theta_c": THETA_START} if spec.num_chains >= 2 else {})

    def stay(self) -> Float[Array, " N"]:
        """p_n of every chain."""
        return jnp.broadcast_to(jax.nn.sigmoid(self.persistence_raw), (self.num_chains,))

    def multipliers(self) -> Float[Array, " N"]:
        """c_n = 1 + theta_c^{n-1} (c_1 - 1)."""
        c1 = 1 + jnp.exp(self.c1_raw)
        theta = jnp.ones((), c1.dtype) if self.theta_c_raw is None else jax.nn.sigmoid(self.theta_c_raw)
        return 1 + theta ** jnp.arange(self.num_chains, dtype=c1.dtype) * (c1 - 1)

    def natural(self):
        values = {"persistence_stay": self.stay(), "c1": 1 + jnp.exp(self.c1_raw)}
        return values | ({} if self.theta_c_raw is None else {"theta_c": jax.nn.sigmoid(self.theta_c_raw)})

    @property
    def num_free_parameters(self) -> int:
        return self.persistence_raw.shape[-1] + 1 + (self.theta_c_raw is not None)

    def initial_laws(self):
        return (_uniform_pair(self.c1_raw.dtype),) * self.num_chains

    def step_matrices(self, x_t):
        return tuple(persistence_matrix(p) for p in self.stay())

    def axis_log_scales(self):
        return tuple(_off_and_on(jnp.log(c_n)) for c_n in self.multipliers())


def jump_family_law(q: Float[Array, ""], num_states: int) -> Float[Array, " M"]:
    """pi_M = (1 - q, q / (N_M - 1), ..., q / (N_M - 1))."""
    rest = jnp.full((num_states - 1,), q / (num_states - 1))
    return jnp.concatenate([(1 - q)[None], rest])


def jump_stationary_law(jump_transition: Float[Array, "M M"]) -> Float[Array, " M"]:
    """Stationary law of the jump chain, read off its matrix.

    Both jump families have it in closed form: (q_back, q) / (q + q_back) for the 2-state
    Markov chain and pi_M for phi * I + (1 - phi) * 1 pi_M^T; in each case it is
    (P[1, 0], P[0, 1:]) normalised.
    """
    unnormalised = jnp.concatenate([jump_transition[1:2, 0], jump_transition[0, 1:]])
    return unnormalised / jnp.maximum(unnormalised.sum(), jnp.finfo(unnormalised.dtype).tiny)


class JumpChain(AbstractVolatilityFactor):
    """The jump chain J in 0..N_M-1: multiplier M(0) = 1, M(j) = 1 + theta_m^{j-1} (m_1 - 1).

    Transitions: ``"markov"`` [[1 - q, q], [q_back, 1 - q_back]] (N_M = 2); ``"family"``
    phi I + (1 - phi) 1 pi_M^T; ``"iid"`` the family with phi = 0. The law at t = 1 is stationary.

    Attributes:
        num_states: N_M >= 2 (static).
        mode: ``"markov"``, ``"family"`` or ``"iid"`` (static).
        jump_q_raw: logit q.
        jump_back_raw: logit q_back (``"markov"`` only).
        jump_phi_raw: logit phi (``"family"`` only).
        m1_raw: log(m_1 - 1).
        theta_m_raw: logit theta_m (N_M >= 3 only).
    """

    num_states: int = eqx.field(static=True)
    mode: str = eqx.field(static=True)
    jump_q_raw: Float[Array, ""]
    jump_back_raw: Float[Array, ""] | None
    jump_phi_raw: Float[Array, ""] | None
    m1_raw: Float[Array, ""]
    theta_m_raw: Float[Array, ""] | None

    transition_fields: ClassVar[tuple[str, ...]] = ("jump_q_raw", "jump_back_raw", "jump_phi_raw")

    @classmethod
    def static_fields(cls, spec):
        return {"num_states": spec.num_jump_states, "mode": spec.jump_mode}

    @classmethod
    def natural_shapes(cls, spec):
        M = spec.num_jump_states
        return {"jump_transition": (M, M), "m1": ()} | ({"theta_m": ()} if M >= 3 else {})

    @classmethod
    def raw_shapes(cls, spec):
        return {"jump_q_raw": (), "jump_back_raw": () if spec.jump_mode == "markov" else None,
                "jump_phi_raw": () if spec.jump_mode == "family" else None, "m1_raw": (),
                "theta_m_raw": () if spec.num_jump_states >= 3 else None}

    @classmethod
    def natural_bounds(cls, spec):
        return {"jump_transition": (0.0, 1.0), "m1": (1.0, np.inf), "theta_m": (0.0, 1.0)}

    @classmethod
    def magnitude_fields(cls):
        return ("m1_raw", "theta_m_raw")

    @classmethod
    def from_natural(cls, spec, values, dtype=None):
        raw = _jump_raw(spec, values["jump_transition"])
        check_interval("m1", values["m1"], *cls.natural_bounds(spec)["m1"], "neither")
        theta = None
        if "theta_m" in values:
            check_interval("theta_m", values["theta_m"], *cls.natural_bounds(spec)["theta_m"], "neither")
            theta = logit(values["theta_m"])
        return cls(spec.num_jump_states, spec.jump_mode, *(as_array(raw[k], dtype) for k in cls.transition_fields),
                   as_array(np.log(values["m1"] - 1), dtype), as_array(theta, dtype))

    @classmethod
    def start(cls, spec: ModelSpec) -> dict[str, np.ndarray]:
        """MODEL.md 6: q = 0.05 (q_back = 0.5; phi = 0.5 for ``"family"``), m_1 = 3, theta_m = 0.5."""
        M, q = spec.num_jump_states, 0.05
        if spec.jump_mode == "markov":
            transition = np.array([[1 - q, q], [0.5, 0.5]])
        else:
            phi = 0.0 if spec.jump_mode == "iid" else 0.5
            law = np.concatenate([[1 - q], np.full(M - 1, q / (M - 1))])
            transition = phi * np.eye(M) + (1 - phi) * law[None, :]
        return {"jump_transition": transition, "m1": 3.0} | ({"theta_m": THETA_START} if M >= 3 else {})

    def transition(self) -> Float[Array, "M M"]:
        """The transition matrix of the chain's family."""
        q = jax.nn.sigmoid(self.jump_q_raw)
        if self.mode == "markov":
            q_back = jax.nn.sigmoid(self.jump_back_raw)
            return jnp.stack([jnp.stack([1 - q, q]), jnp.stack([q_back, 1 - q_back])])
        phi = jnp.zeros_like(q) if self.mode == "iid" else jax.nn.sigmoid(self.jump_phi_raw)
        law = jump_family_law(q, self.num_states)
        return phi * jnp.eye(self.num_states, dtype=q.dtype) + (1 - phi) * law[None, :]

    def natural(self):
        values = {"jump_transition": self.transition(), "m1": 1 + jnp.exp(self.m1_raw)}
        return values | ({} if self.theta_m_raw is None else {"theta_m": jax.nn.sigmoid(self.theta_m_raw)})

    @property
    def num_free_parameters(self) -> int:
        return {"markov": 2, "family": 2, "iid": 1}[self.mode] + 1 + (self.theta_m_raw is not None)

    def initial_laws(self):
        return (jump_stationary_law(self.transition()),)

    def step_matrices(self, x_t):
        return (self.transition(),)

    def axis_log_scales(self):
        m1 = 1 + jnp.exp(self.m1_raw)
        theta = jnp.ones((), m1.dtype) if self.theta_m_raw is None else jax.nn.sigmoid(self.theta_m_raw)
        m = 1 + theta ** jnp.arange(self.num_states - 1, dtype=m1.dtype) * (m1 - 1)
        return (jnp.concatenate([jnp.zeros((1,), m.dtype), jnp.log(m)]),)


def _jump_raw(spec: ModelSpec, matrix: np.ndarray) -> dict[str, np.ndarray | None]:
    """Recover (q, q_back) or (phi, q) from a jump matrix, checking it is in the spec's family."""
    M = spec.num_jump_states
    check_stochastic("jump_transition", matrix)
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
    return {"jump_q_raw": logit(q), "jump_back_raw": None,
            "jump_phi_raw": logit(phi) if spec.jump_mode == "family" else None}


class AbstractLeverage(AbstractVolatilityFactor):
    """The leverage factor (MODEL.md 2): none, a deterministic path L_t, or a Markov state V_t.

    Every mode carries ``recent_shocks`` through a sequence (the predictable mode's last N_L
    shocks g, newest first; a [1] zero otherwise) so that filtering can continue across blocks.
    """

    @property
    def num_shocks(self) -> int:
        """Length of the carried shocks."""
        return 1

    def initial_laws(self):
        return ()

    def step_matrices(self, x_t):
        return ()

    def axis_log_scales(self):
        return ()

    def log_leverage_path(self, x: Float[Array, " T"] | None, recent_shocks: Array) -> tuple[Array, Array | None]:
        """(the shocks after the last step, [T] log L_t or ``None`` when the leverage has no path)."""
        return recent_shocks, None


class NoLeverage(AbstractLeverage):
    """No leverage: L = 1."""

    @classmethod
    def natural_shapes(cls, spec):
        return {}

    @classmethod
    def raw_shapes(cls, spec):
        return {}

    @classmethod
    def from_natural(cls, spec, values, dtype=None):
        return cls()

    @classmethod
    def start(cls, spec: ModelSpec) -> dict[str, np.ndarray]:
        return {}

    def natural(self):
        return {}

    @property
    def num_free_parameters(self) -> int:
        return 0


class PredictableLeverage(AbstractLeverage):
    """The published model's leverage: L_t = prod_{i=1..min(N_L, t-1)} (1 + l_1 theta_l^{i-1} g_{t-i}),
    g_s = |x_s| 1{x_s < 0} / sqrt(L_s), so L_1 = 1.

    Attributes:
        num_lags: N_L (static).
        l1_raw: log l_1.
        theta_l_raw: logit theta_l (``None`` when N_L = 1).
    """

    num_lags: int = eqx.field(static=True)
    l1_raw: Float[Array, ""]
    theta_l_raw: Float[Array, ""] | None

    @classmethod
    def static_fields(cls, spec):
        return {"num_lags": spec.num_leverage_lags}

    @classmethod
    def natural_shapes(cls, spec):
        return {"l1": ()} | ({"theta_l": ()} if spec.num_leverage_lags >= 2 else {})

    @classmethod
    def raw_shapes(cls, spec):
        return {"l1_raw": (), "theta_l_raw": () if spec.num_leverage_lags >= 2 else None}

    @classmethod
    def natural_bounds(cls, spec):
        return {"l1": (0.0, np.inf), "theta_l": (0.0, 1.0)}

    @classmethod
    def magnitude_fields(cls):
        return ("l1_raw", "theta_l_raw")

    @classmethod
    def from_natural(cls, spec, values, dtype=None):
        check_interval("l1", values["l1"], *cls.natural_bounds(spec)["l1"], "neither")
        theta = None
        if "theta_l" in values:
            check_interval("theta_l", values["theta_l"], *cls.natural_bounds(spec)["theta_l"], "left")
            theta = logit(values["theta_l"])
        return cls(spec.num_leverage_lags, as_array(np.log(values["l1"]), dtype), as_array(theta, dtype))

    @classmethod
    def start(cls, spec: ModelSpec) -> dict[str, np.ndarray]:
        """l_1 = 0.5, theta_l = 0.5."""
        return {"l1": 0.5} | ({"theta_l": THETA_START} if spec.num_leverage_lags >= 2 else {})

    def natural(self):
        values = {"l1": jnp.exp(self.l1_raw)}
        return values | ({} if self.theta_l_raw is None else {"theta_l": jax.nn.sigmoid(self.theta_l_raw)})

    @property
    def num_free_parameters(self) -> int:
        return 1 + (self.theta_l_raw is not None)

    @property
    def num_shocks(self) -> int:
        return self.num_lags

    def lag_weights(self) -> Float[Array, " L"]:
        """l_1 theta_l^{i-1} for i = 1..N_L."""
        l1 = jnp.exp(self.l1_raw)
        decay = jnp.ones_like(l1) if self.theta_l_raw is None else jax.nn.sigmoid(self.theta_l_raw)
        return l1 * jnp.cumprod(jnp.concatenate([jnp.ones_like(l1)[None], jnp.full((self.num_lags - 1,), decay)]))

    def log_leverage_path(self, x, recent_shocks):
        """A ``lax.scan`` over x carrying the last N_L shocks."""
        lag_weights = self.lag_weights()

        def _step(recent, x_t):
            log_l = log_leverage(lag_weights, recent)
            return push_shock(recent, x_t, log_l), log_l

        return jax.lax.scan(_step, recent_shocks, x)


def log_leverage(lag_weights: Float[Array, " L"], recent_shocks: Float[Array, " L"]) -> Float[Array, ""]:
    """log L_t = sum_i log(1 + w_i g_{t-i}) from the shocks before t (newest first)."""
    return jnp.sum(jnp.log1p(lag_weights * recent_shocks))


def push_shock(recent_shocks: Float[Array, " L"], x_t: Float[Array, ""], log_l: Float[Array, ""]) -> Float[Array, " L"]:
    """Prepend g_t = |x_t| 1{x_t < 0} / sqrt(L_t) to the shocks, dropping the oldest."""
    g_t = jnp.where(x_t < 0, -x_t, 0.0) * jnp.exp(-0.5 * log_l)
    return jnp.concatenate([g_t[None], recent_shocks[:-1]])


class MarkovLeverage(AbstractLeverage):
    """The prototype's leverage state V_t in {0, 1}: L = l_1^{V_t}, l_1 > 1, and
    P(V_{t+1} = j | V_t = i, x_t) = softmax_j(a_ij + b_ij x_t) with a_i0 = b_i0 = 0; the law at t = 1 is (1/2, 1/2).

    Attributes:
        l1_raw: log(l_1 - 1).
        leverage_raw: [2, 2]: row 0 holds a[i, 1], row 1 holds b[i, 1], for i the previous state.
    """

    l1_raw: Float[Array, ""]
    leverage_raw: Float[Array, "2 2"]

    @classmethod
    def natural_shapes(cls, spec):
        return {"l1": (), "leverage_logits": (2, 2, 2)}

    @classmethod
    def raw_shapes(cls, spec):
        return {"l1_raw": (), "leverage_raw": (2, 2)}

    @classmethod
    def natural_bounds(cls, spec):
        return {"l1": (1.0, np.inf)}

    @classmethod
    def magnitude_fields(cls):
        return ("l1_raw",)

    @classmethod
    def from_natural(cls, spec, values, dtype=None):
        check_interval("l1", values["l1"], *cls.natural_bounds(spec)["l1"], "neither")
        logits = values["leverage_logits"]
        if np.any(logits[..., 0] != 0):
            raise ValueError("leverage_logits[..., 0] (the logits of moving to state 0) must be zero")
        return cls(as_array(np.log(values["l1"] - 1), dtype), as_array(logits[..., 1], dtype))

    @classmethod
    def start(cls, spec: ModelSpec) -> dict[str, np.ndarray]:
        """l_1 = 1.5 and logits that keep the state with probability 0.9 whatever the driver."""
        logits = np.zeros((2, 2, 2))
        logits[0, :, 1] = [-np.log(9.0), np.log(9.0)]
        return {"l1": 1.5, "leverage_logits": logits}

    def logits(self) -> Float[Array, "2 2 2"]:
        """(a, b), each [2, 2], column 0 zero."""
        return jnp.stack([jnp.zeros_like(self.leverage_raw), self.leverage_raw], axis=-1)

    def natural(self):
        return {"l1": 1 + jnp.exp(self.l1_raw), "leverage_logits": self.logits()}

    @property
    def num_free_parameters(self) -> int:
        return 1 + 4

    def initial_laws(self):
        return (_uniform_pair(self.l1_raw.dtype),)

    def step_matrices(self, x_t):
        a, b = self.logits()
        return (jax.nn.softmax(a + b * x_t, axis=-1),)

    def transition_matrices(self, x):
        return (jax.vmap(lambda x_t: self.step_matrices(x_t)[0])(x),)

    def axis_log_scales(self):
        return (_off_and_on(jnp.log(1 + jnp.exp(self.l1_raw))),)


LEVERAGE_BLOCKS: dict[str, type[AbstractLeverage]] = {
    "none": NoLeverage, "predictable": PredictableLeverage, "markov": MarkovLeverage,
}

"""Static sizes and modes of an FHMV model (MODEL.md section 1)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

LeverageMode = Literal["markov", "predictable", "none"]
JumpMode = Literal["markov", "family", "iid"]

_LEVERAGE_MODES = ("markov", "predictable", "none")
_JUMP_MODES = ("markov", "family", "iid")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static description of an FHMV model: sizes, modes and bounds.

    Hashable, so it can be a static field of an Equinox module and a jit key.

    Attributes:
        num_features: D, the length of each observation y_t.
        num_regimes: G, the number of market regimes.
        num_chains: N, the number of binary persistence chains (0 disables them).
        num_jump_states: N_M, the number of jump states (1 disables jumps).
        num_components: K, Student-t (or Gaussian) components per regime.
        leverage: ``"markov"`` (2-state chain logistic in the driver), ``"predictable"``
            (deterministic product over N_L lags of the driver) or ``"none"``.
        num_leverage_lags: N_L for ``"predictable"`` leverage.
        jump_mode: ``"markov"`` (free 2-state chain, q and q_back; needs N_M = 2),
            ``"family"`` (phi * I + (1 - phi) * 1 pi_M^T) or ``"iid"`` (the family with phi = 0).
        tied_persistence: one stay probability p shared by all chains.
        gaussian: Gaussian components (nu = infinity) instead of Student-t.
        scale_mask: optional D flags; the volatility scale applies only to flagged features.
        driver_feature: optional feature index used as the driver x when none is given.
        dof_bounds: (lower, upper) bounds of the degrees of freedom nu.
        zero_mean: every component mean is fixed at zero (the published FHMV of daily returns, MODEL.md
            section 7); with D > 1 it applies to every feature, so use it only for centred series.
    """

    num_features: int = 10
    num_regimes: int = 6
    num_chains: int = 2
    num_jump_states: int = 2
    num_components: int = 2
    leverage: LeverageMode = "markov"
    num_leverage_lags: int = 70
    jump_mode: JumpMode = "markov"
    tied_persistence: bool = True
    gaussian: bool = False
    scale_mask: tuple[bool, ...] | None = None
    driver_feature: int | None = None
    dof_bounds: tuple[float, float] = (2.01, 100.0)
    zero_mean: bool = False

    def __post_init__(self):
        for name, minimum in (
            ("num_features", 1),
            ("num_regimes", 1),
            ("num_chains", 0),
            ("num_jump_states", 1),
            ("num_components", 1),
            ("num_leverage_lags", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"ModelSpec.{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("tied_persistence", "gaussian", "zero_mean"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelSpec.{name} must be True or False, got {getattr(self, name)!r}")
        if self.leverage not in _LEVERAGE_MODES:
            raise ValueError(f"ModelSpec.leverage must be one of {_LEVERAGE_MODES}, got {self.leverage!r}")
        if self.jump_mode not in _JUMP_MODES:
            raise ValueError(f"ModelSpec.jump_mode must be one of {_JUMP_MODES}, got {self.jump_mode!r}")
        if self.jump_mode == "markov" and self.num_jump_states > 2:
            raise ValueError(
                f"jump_mode='markov' is the free 2-state chain; num_jump_states={self.num_jump_states} "
                "needs jump_mode='family' or 'iid'"
            )
        if self.scale_mask is not None:
            mask = tuple(bool(a) for a in self.scale_mask)
            if len(mask) != self.num_features:
                raise ValueError(
                    f"ModelSpec.scale_mask has {len(mask)} entries but num_features={self.num_features}"
                )
            if not any(mask):
                raise ValueError("ModelSpec.scale_mask flags no feature: the factors would have no effect")
            object.__setattr__(self, "scale_mask", None if all(mask) else mask)
        if self.driver_feature is not None and not 0 <= self.driver_feature < self.num_features:
            raise ValueError(
                f"ModelSpec.driver_feature={self.driver_feature} is not a feature index in [0, {self.num_features})"
            )
        low, high = (float(b) for b in self.dof_bounds)
        if not 0.0 < low < high < math.inf:
            raise ValueError(f"ModelSpec.dof_bounds must satisfy 0 < lower < upper < inf, got {self.dof_bounds}")
        object.__setattr__(self, "dof_bounds", (low, high))

    @property
    def has_jumps(self) -> bool:
        return self.num_jump_states > 1

    @property
    def factor_names(self) -> tuple[str, ...]:
        """Names of the axes of the joint state tensor, regime first."""
        names = ["regime", *(f"chain_{n + 1}" for n in range(self.num_chains))]
        if self.has_jumps:
            names.append("jump")
        if self.leverage == "markov":
            names.append("leverage")
        return tuple(names)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape (G, 2, ..., 2, N_M[, 2]) of the joint state tensor."""
        return (self.num_regimes, *self.volatility_shape)

    @property
    def volatility_shape(self) -> tuple[int, ...]:
        """Shape of the volatility sub-states (persistence x jump[ x leverage]) of one regime."""
        shape = [2] * self.num_chains
        if self.has_jumps:
            shape.append(self.num_jump_states)
        if self.leverage == "markov":
            shape.append(2)
        return tuple(shape)

    @property
    def num_volatility_states(self) -> int:
        return math.prod(self.volatility_shape)

    @property
    def num_states(self) -> int:
        """S = G * 2^N * N_M (* 2 with Markov leverage)."""
        return math.prod(self.state_shape)

    @property
    def num_scaled_features(self) -> int:
        """D_s: how many features the volatility scale multiplies."""
        return self.num_features if self.scale_mask is None else sum(self.scale_mask)

    @property
    def needs_driver(self) -> bool:
        return self.leverage != "none"

"""The simulated hourly market of DATA.md: 6 regimes, 10 features, a sticky Markov regime path."""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._compile import llvm_o2
from .._types import PRNGKeyArray

FEATURE_NAMES = ("LM", "SR", "Abs", "RoC", "RoC2", "P", "T", "Vol", "RPN", "Delta")
REGIME_NAMES = ("ST", "VT", "RC", "RHA", "HPEM", "AMB")
DEFAULT_FREQUENCIES = (0.30, 0.20, 0.25, 0.10, 0.10, 0.05)
RANGE_REGIME = REGIME_NAMES.index("RC")


class MarketData(NamedTuple):
    """A simulated (or loaded) market.

    Attributes:
        features: [T, D] raw features (``P`` is the price level), or [B, T, D].
        regimes: [T] (or [B, T]) true regime indices into ``regime_names`` (``None`` if unknown).
        timestamps: [T] hourly ``datetime64[h]`` stamps.
        feature_names: [D] column names.
        regime_names: names of the regime indices.
    """

    features: np.ndarray
    regimes: np.ndarray | None
    timestamps: np.ndarray
    feature_names: tuple[str, ...]
    regime_names: tuple[str, ...]


class _RegimeTable(NamedTuple):
    """DATA.md's per-regime draws, one entry per regime in REGIME_NAMES order."""

    lm_mean: tuple = (0.5, 1.5, 0.8, 2.0, 3.0, 1.0)
    sr_mean: tuple = (0.3, 1.0, 0.6, 1.5, 2.5, 0.8)
    abs_mean: tuple = (1.0, 0.7, 1.2, 2.5, 0.3, 1.0)
    abs_sd: tuple = (0.2, 0.3, 0.4, 0.5, 0.15, 0.5)
    roc_mean: tuple = (0.0, 0.0, 0.0, 0.5, 1.0, 0.0)
    roc_sd: tuple = (0.1, 0.3, 0.15, 0.3, 0.4, 0.2)
    roc2_mean: tuple = (0.0, 0.0, 0.0, -0.2, 0.5, 0.0)
    roc2_sd: tuple = (0.05, 0.2, 0.1, 0.2, 0.3, 0.15)
    step_mean: tuple = (0.02, 0.0, 0.0, -0.02, 0.05, 0.0)
    step_sd: tuple = (0.01, 0.03, 0.0, 0.01, 0.02, 0.02)
    trend_per_step: tuple = (10.0, 15.0, 0.0, 12.0, 20.0, 0.0)
    trend_sd: tuple = (0.0, 0.0, 0.005, 0.0, 0.0, 0.01)
    vol_shape: tuple = (2.0, 3.0, 2.5, 4.0, 5.0, 2.5)
    vol_scale: tuple = (0.1, 0.2, 0.15, 0.2, 0.3, 0.15)
    rpn_up: tuple = (0.45, 0.3, 0.5, 0.7, 0.1, 0.5)
    rpn_down: tuple = (0.55, 0.7, 0.5, 0.7, 0.9, 0.5)
    rpn_sd: tuple = (0.05, 0.1, 0.08, 0.1, 0.05, 0.1)
    delta_per_step: tuple = (100.0, 150.0, 0.0, 0.0, 200.0, 0.0)
    delta_mean: tuple = (0.0, 0.0, 0.0, -50.0, 0.0, 0.0)
    delta_sd: tuple = (10.0, 30.0, 15.0, 25.0, 40.0, 20.0)


TABLE = _RegimeTable()
SMOOTHED = ("Vol", "RPN")
SMOOTHING = 0.1
NOISE_SD = 0.01


def regime_transition_matrix(frequencies=DEFAULT_FREQUENCIES, persistence: float = 0.85) -> np.ndarray:
    """P(i -> i) = persistence + (1 - persistence) pi_i and P(i -> j) = (1 - persistence) pi_j.

    pi (the frequencies) is the chain's stationary law and 1 / (1 - P(i -> i)) the mean
    duration of regime i.
    """
    frequencies = _frequencies(frequencies)
    if not 0.0 <= persistence < 1.0:
        raise ValueError(f"persistence must lie in [0, 1), got {persistence}")
    return persistence * np.eye(len(frequencies)) + (1 - persistence) * frequencies[None, :]


def _frequencies(frequencies) -> np.ndarray:
    values = np.asarray(frequencies, dtype=np.float64)
    if values.shape != (len(REGIME_NAMES),) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"frequencies must be {len(REGIME_NAMES)} positive values (one per regime), got {frequencies}")
    if abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"frequencies must sum to 1, got sum {values.sum():.6g}")
    return values / values.sum()


def _regime_path(key: PRNGKeyArray, num_steps: int, frequencies: np.ndarray, transition: np.ndarray):
    log_initial, log_transition = jnp.log(frequencies), jnp.log(transition)

    def _step(previous, step_key):
        regime = jax.random.categorical(step_key, log_transition[previous])
        return regime, regime

    first_key, rest_key = jax.random.split(key)
    first = jax.random.categorical(first_key, log_initial)
    _, rest = jax.lax.scan(_step, first, jax.random.split(rest_key, num_steps - 1))
    return jnp.concatenate([first[None], rest])


def _prices(regimes, steps, range_noise, initial_price: float):
    """P_t = P_{t-1} (1 + g_t), or the range rule in RC; returns prices and realised steps."""

    def _step(carry, inputs):
        previous_price, entry_price, previous_regime = carry
        regime, step, noise = inputs
        in_range = regime == RANGE_REGIME
        entry_price = jnp.where(in_range & (previous_regime != RANGE_REGIME), previous_price, entry_price)
        ranged = jnp.clip(previous_price + 0.005 * entry_price * noise, 0.9 * entry_price, 1.1 * entry_price)
        price = jnp.where(in_range, ranged, previous_price * (1 + step))
        return (price, entry_price, regime), price

    start = (jnp.asarray(initial_price), jnp.asarray(initial_price), jnp.asarray(-1, regimes.dtype))
    _, prices = jax.lax.scan(_step, start, (regimes, steps, range_noise))
    previous = jnp.concatenate([jnp.asarray(initial_price)[None], prices[:-1]])
    return prices, prices / previous - 1


def _simulate_one(key: PRNGKeyArray, num_steps: int, frequencies, transition, initial_price: float):
    keys = jax.random.split(key, 8)
    regimes = _regime_path(keys[0], num_steps, frequencies, transition)
    t = {name: jnp.asarray(values)[regimes] for name, values in TABLE._asdict().items()}
    normal = jax.random.normal(keys[1], (num_steps, 9))
    exponential = jax.random.exponential(keys[2], (num_steps, 2))
    steps = t["step_mean"] + t["step_sd"] * normal[:, 0]
    prices, realised = _prices(regimes, steps, normal[:, 1], initial_price)
    rpn_mean = jnp.where(realised > 0, t["rpn_up"], t["rpn_down"])
    columns = {
        "LM": t["lm_mean"] * exponential[:, 0],
        "SR": t["sr_mean"] * exponential[:, 1],
        "Abs": t["abs_mean"] + t["abs_sd"] * normal[:, 2],
        "RoC": t["roc_mean"] + t["roc_sd"] * normal[:, 3],
        "RoC2": t["roc2_mean"] + t["roc2_sd"] * normal[:, 4],
        "P": prices,
        "T": t["trend_per_step"] * realised + t["trend_sd"] * normal[:, 5],
        "Vol": t["vol_scale"] * jax.random.gamma(keys[3], t["vol_shape"]),
        "RPN": rpn_mean + t["rpn_sd"] * normal[:, 6],
        "Delta": t["delta_per_step"] * realised + t["delta_mean"] + t["delta_sd"] * normal[:, 7],
    }
    noise = NOISE_SD * jax.random.normal(keys[4], (num_steps, len(FEATURE_NAMES)))
    return regimes, jnp.stack([columns[name] for name in FEATURE_NAMES], axis=-1), noise


@functools.partial(jax.jit, static_argnames="num_steps", compiler_options=llvm_o2())
def _simulate_batch(keys: PRNGKeyArray, frequencies, transition, initial_price, num_steps: int):
    """vmap of ``_simulate_one`` over keys [B]; compiled once per (B, num_steps).

    Compiled with LLVM at -O2 instead of XLA's default -O3: on a CPU that takes 2.1 s instead of 5.1 s at
    B = 40, T = 5000, and the program runs as fast (0.26 s against 0.31 s; docs/benchmarks.md).
    """
    return jax.vmap(lambda k: _simulate_one(k, num_steps, frequencies, transition, initial_price))(keys)


def _post_process(features: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Smooth Vol and RPN (x_t += 0.1 x_{t-1}, recursively), Abs -= 0.3 Vol, clip RPN, add noise."""
    from scipy.signal import lfilter  # imported here: scipy.signal takes about 1 s, half of fhmv_jax's import

    out = features.copy()
    for name in SMOOTHED:
        d = FEATURE_NAMES.index(name)
        out[..., d] = lfilter([1.0], [1.0, -SMOOTHING], out[..., d], axis=-1)
    out[..., FEATURE_NAMES.index("Abs")] -= 0.3 * out[..., FEATURE_NAMES.index("Vol")]
    rpn = FEATURE_NAMES.index("RPN")
    out[..., rpn] = np.clip(out[..., rpn], 0.01, 0.99)
    return out + noise


def simulate_market(
    key: PRNGKeyArray,
    num_steps: int,
    *,
    num_series: int | None = None,
    frequencies=DEFAULT_FREQUENCIES,
    persistence: float = 0.85,
    start: str = "2023-01-01T00",
    initial_price: float = 100.0,
) -> MarketData:
    """Simulate the DATA.md market: a Markov regime path and the tabulated per-regime draws.

    Per step t with regime r: the draws of DATA.md's table (the price follows
    P_t = P_{t-1} (1 + g_t) from P_{-1} = ``initial_price``; in RC it moves within +-10% of the
    price at which the range was entered; T, RPN and Delta use the realised step). Then, in
    this order: Vol and RPN smoothed recursively (x_t += 0.1 x_{t-1}), Abs -= 0.3 Vol, RPN
    clipped to [0.01, 0.99], N(0, 0.01^2) noise on every column.

    Args:
        key: JAX PRNG key; the same key gives the same market.
        num_steps: T >= 2 hourly steps.
        num_series: draw this many independent series ([B, T, D]); ``None`` for one [T, D].
        frequencies: stationary regime frequencies (ST, VT, RC, RHA, HPEM, AMB), summing to 1.
        persistence: extra probability of staying, see ``regime_transition_matrix``.
        start: timestamp of the first step.
        initial_price: the price before the first step.

    Returns:
        ``MarketData`` (float64 numpy arrays).
    """
    num_steps = operator.index(num_steps)
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if num_series is not None and operator.index(num_series) < 1:
        raise ValueError(f"num_series must be >= 1, got {num_series}")
    if not np.isfinite(initial_price) or initial_price <= 0:
        raise ValueError(f"initial_price must be positive, got {initial_price}")
    transition = regime_transition_matrix(frequencies, persistence)
    frequencies = _frequencies(frequencies)
    timestamps = np.datetime64(start, "h") + np.arange(num_steps).astype("timedelta64[h]")

    keys = jax.random.split(key, 1 if num_series is None else num_series)
    regimes, features, noise = _simulate_batch(keys, frequencies, transition, float(initial_price), num_steps)
    if num_series is None:
        regimes, features, noise = regimes[0], features[0], noise[0]
    features = np.asarray(features, np.float64)
    if not np.all(np.isfinite(features)):
        raise ValueError(
            f"the simulated price overflowed float64 within {num_steps} steps (DATA.md's trends compound to about"
            " exp(0.009 t)); draw shorter series, several with num_series, or change the frequencies"
        )
    features = _post_process(features, np.asarray(noise, np.float64))
    return MarketData(features, np.asarray(regimes, np.int64), timestamps, FEATURE_NAMES, REGIME_NAMES)

"""The simulated market, feature transforms, the Standardizer and the CSV loader."""

import json

import jax
import numpy as np
import pytest

from fhmv_jax.data import (
    DEFAULT_FREQUENCIES,
    FEATURE_NAMES,
    REGIME_NAMES,
    FeatureCarry,
    FeatureTransform,
    Standardizer,
    ewma,
    load_csv,
    log_returns,
    regime_transition_matrix,
    simulate_market,
)

COL = {name: d for d, name in enumerate(FEATURE_NAMES)}

# DATA.md's table, transcribed independently of the simulator, one entry per regime (ST, VT, RC, RHA, HPEM, AMB):
# LM and SR exponential means; Abs, RoC, RoC2 and the price step g normal (mean, sd) (RC's g: the range rule);
# T = k g + N(0, sd) as (k, sd); Vol Gamma (shape, scale); RPN (mean if g > 0, mean otherwise, sd);
# Delta = k g + N(mean, sd) as (k, mean, sd).
DATA_MD = {
    "LM": (0.5, 1.5, 0.8, 2.0, 3.0, 1.0),
    "SR": (0.3, 1.0, 0.6, 1.5, 2.5, 0.8),
    "Abs": ((1, 0.2), (0.7, 0.3), (1.2, 0.4), (2.5, 0.5), (0.3, 0.15), (1, 0.5)),
    "RoC": ((0, 0.1), (0, 0.3), (0, 0.15), (0.5, 0.3), (1, 0.4), (0, 0.2)),
    "RoC2": ((0, 0.05), (0, 0.2), (0, 0.1), (-0.2, 0.2), (0.5, 0.3), (0, 0.15)),
    "g": ((0.02, 0.01), (0, 0.03), None, (-0.02, 0.01), (0.05, 0.02), (0, 0.02)),
    "T": ((10, 0), (15, 0), (0, 0.005), (12, 0), (20, 0), (0, 0.01)),
    "Vol": ((2, 0.1), (3, 0.2), (2.5, 0.15), (4, 0.2), (5, 0.3), (2.5, 0.15)),
    "RPN": ((0.45, 0.55, 0.05), (0.3, 0.7, 0.1), (0.5, 0.5, 0.08), (0.7, 0.7, 0.1), (0.1, 0.9, 0.05), (0.5, 0.5, 0.1)),
    "Delta": ((100, 0, 10), (150, 0, 30), (0, 0, 15), (0, -50, 25), (200, 0, 40), (0, 0, 20)),
}


STEPS, SERIES = 5000, 40
"""The statistical tests use 40 independent series of 5000 steps (200000 steps in all): one long
series would overflow the price, whose trends compound to about exp(0.009 t)."""

SMALL = 200
"""Every other simulation has this length, so that the simulator compiles only twice."""


@pytest.fixture(scope="module")
def market():
    return simulate_market(jax.random.key(7), STEPS, num_series=SERIES)


def _differenced(x: np.ndarray) -> np.ndarray:
    """Undo the x_t += 0.1 x_{t-1} smoothing: x_t - 0.1 x_{t-1} over [B, T] -> [B, T - 1]."""
    return x[:, 1:] - 0.1 * x[:, :-1]


def test_same_key_same_market_and_shapes(market):
    a, b = simulate_market(jax.random.key(1), SMALL), simulate_market(jax.random.key(1), SMALL)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.regimes, b.regimes)
    assert not np.array_equal(a.features, simulate_market(jax.random.key(2), SMALL).features)
    assert a.features.shape == (SMALL, 10) and a.regimes.shape == (SMALL,)
    assert a.features.dtype == np.float64
    assert a.timestamps[0] == np.datetime64("2023-01-01T00") and np.all(np.diff(a.timestamps) == np.timedelta64(1, "h"))
    assert a.feature_names == FEATURE_NAMES and a.regime_names == REGIME_NAMES
    assert market.features.shape == (SERIES, STEPS, 10) and market.regimes.shape == (SERIES, STEPS)
    assert market.timestamps.shape == (STEPS,)
    assert not np.array_equal(market.regimes[0], market.regimes[1]), "the series of a batch are independent draws"


def test_regime_chain_matches_the_configured_law(market):
    regimes = market.regimes
    A = regime_transition_matrix()
    pi = np.asarray(DEFAULT_FREQUENCIES)
    np.testing.assert_allclose(pi @ A, pi, rtol=1e-12)
    frequencies = np.bincount(regimes.ravel(), minlength=6) / regimes.size
    # 1{r_t = i} has autocorrelation 0.85^k, so the effective sample size is n (1 - 0.85) / (1 + 0.85); 5 s.e.
    effective = regimes.size * 0.15 / 1.85
    np.testing.assert_array_less(np.abs(frequencies - pi), 5 * np.sqrt(pi * (1 - pi) / effective))
    pairs = np.zeros((6, 6))
    np.add.at(pairs, (regimes[:, :-1].ravel(), regimes[:, 1:].ravel()), 1)
    empirical = pairs / pairs.sum(1, keepdims=True)
    # binomial standard error of each row's transition probabilities; 5 s.e.
    np.testing.assert_array_less(np.abs(empirical - A), 5 * np.sqrt(A * (1 - A) / pairs.sum(1, keepdims=True)))
    runs = {g: [] for g in range(6)}
    for row in regimes:
        for run in np.split(row, np.flatnonzero(np.diff(row)) + 1)[1:-1]:  # the first and last runs are censored
            runs[run[0]].append(len(run))
    for g, lengths in runs.items():
        # run lengths are geometric with mean m = 1 / (1 - A_gg) and sd sqrt(A_gg) m < m; 5 s.e.
        expected = 1 / (1 - A[g, g])
        assert abs(np.mean(lengths) - expected) < 5 * expected / np.sqrt(len(lengths))


def test_configured_persistence_and_frequencies_change_the_chain():
    frequencies, persistence = np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]), 0.5
    m = simulate_market(jax.random.key(3), STEPS, num_series=SERIES, frequencies=frequencies, persistence=persistence)
    A = regime_transition_matrix(frequencies, persistence)
    np.testing.assert_allclose(np.diag(A), persistence + (1 - persistence) * frequencies, rtol=1e-12)
    n = m.regimes.size
    # the indicators are correlated with factor persistence^k: inflate the variance by (1 + p) / (1 - p); 5 s.e.
    inflation = (1 + persistence) / (1 - persistence)
    switch_rate = np.sum(frequencies * (1 - np.diag(A)))
    switches = np.mean(m.regimes[:, 1:] != m.regimes[:, :-1])
    assert abs(switches - switch_rate) < 5 * np.sqrt(switch_rate * (1 - switch_rate) * inflation / n)
    assert abs(np.mean(m.regimes == 0) - 0.5) < 5 * np.sqrt(0.25 * inflation / n)


def _realised_steps(market) -> np.ndarray:
    """[B, T - 1] relative price changes P_t / P_{t-1} - 1 (the noise on P is negligible against the price)."""
    prices = market.features[..., COL["P"]]
    return prices[:, 1:] / prices[:, :-1] - 1


def _assert_mean(values: np.ndarray, expected: float, sd: float, what: str) -> None:
    """Mean within 5 standard errors (sd / sqrt(n)), plus 0.002 for the 0.01 noise and small biases."""
    assert abs(values.mean() - expected) < 5 * sd / np.sqrt(values.size) + 0.002, (what, values.mean(), expected)


def test_per_regime_draws_match_the_table(market):
    regimes = market.regimes[:, 1:]
    x = market.features[:, 1:]
    g_hat = _realised_steps(market)
    smoothed_vol = _differenced(market.features[..., COL["Vol"]])
    for g, name in enumerate(REGIME_NAMES):
        lm, sr, absorption, roc, roc2, step, trend, vol, delta = (
            DATA_MD[c][g] for c in ("LM", "SR", "Abs", "RoC", "RoC2", "g", "T", "Vol", "Delta")
        )
        at = regimes == g
        rows = x[at]
        _assert_mean(rows[:, COL["LM"]], lm, lm, f"LM {name}")
        _assert_mean(rows[:, COL["SR"]], sr, sr, f"SR {name}")
        _assert_mean(rows[:, COL["RoC"]], *roc, f"RoC {name}")
        _assert_mean(rows[:, COL["RoC2"]], *roc2, f"RoC2 {name}")
        _assert_mean(smoothed_vol[at], vol[0] * vol[1], np.sqrt(vol[0]) * vol[1], f"Vol {name}")
        # Abs is shifted by -0.3 Vol after Vol's smoothing
        _assert_mean(rows[:, COL["Abs"]] + 0.3 * rows[:, COL["Vol"]], *absorption, f"Abs {name}")
        residual = rows[:, COL["Delta"]] - delta[0] * g_hat[at]
        _assert_mean(residual, delta[1], delta[2], f"Delta {name}")
        assert abs(residual.std() / delta[2] - 1) < 0.05
        residual = rows[:, COL["T"]] - trend[0] * g_hat[at]
        _assert_mean(residual, 0.0, trend[1] + 0.01, f"T {name}")
        assert residual.std() < trend[1] + 0.02
        if step is not None:
            _assert_mean(g_hat[at], *step, f"price step {name}")
            assert abs(g_hat[at].std() - step[1]) < 0.001


def test_liquidation_dominance_follows_the_table(market):
    rpn = market.features[..., COL["RPN"]]
    assert rpn.min() >= 0.01 - 0.05 and rpn.max() <= 0.99 + 0.05
    regimes, up = market.regimes[:, 1:], _realised_steps(market) > 0
    # undoing the smoothing is exact where neither value was clipped; the previous value is kept in (0.05, 0.95)
    # and the clipping of the current one biases the means by at most 0.001
    unclipped = (rpn[:, :-1] > 0.05) & (rpn[:, :-1] < 0.95)
    draws = _differenced(rpn)
    for name in ("ST", "VT", "RC", "RHA", "AMB"):
        g = REGIME_NAMES.index(name)
        mean_up, mean_down, sd = DATA_MD["RPN"][g]
        for direction, expected in ((up, mean_up), (~up, mean_down)):
            _assert_mean(draws[(regimes == g) & direction & unclipped], expected, sd, f"RPN {name}")


def test_range_regime_price_stays_in_a_band_around_its_entry_price(market):
    rc = REGIME_NAMES.index("RC")
    checked = 0
    for regimes, prices in zip(market.regimes, market.features[..., COL["P"]], strict=True):
        for run in np.split(np.arange(len(regimes)), np.flatnonzero(np.diff(regimes)) + 1):
            if regimes[run[0]] != rc or run[0] == 0:
                continue
            entry = prices[run[0] - 1]
            assert np.all(prices[run] <= 1.1 * entry + 0.05) and np.all(prices[run] >= 0.9 * entry - 0.05)
            checked += len(run)
    assert checked > 0.2 * market.regimes.size


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_steps": 1}, "num_steps"),
        ({"frequencies": (0.5, 0.5)}, "6 positive values"),
        ({"frequencies": (0.3, 0.2, 0.25, 0.1, 0.1, 0.1)}, "sum to 1"),
        ({"persistence": 1.0}, "persistence"),
        ({"num_series": 0}, "num_series"),
        ({"initial_price": -1.0}, "initial_price"),
    ],
)
def test_bad_simulator_arguments_raise(kwargs, message):
    arguments = {"num_steps": SMALL} | kwargs
    with pytest.raises(ValueError, match=message):
        simulate_market(jax.random.key(0), **arguments)


def _ewma_loop(values: np.ndarray, span: float) -> np.ndarray:
    """The EWMA recursion written out step by step, E_0 = v_0."""
    a, out = 2 / (span + 1), np.empty(len(values))
    out[0] = values[0]
    for t in range(1, len(values)):
        out[t] = a * values[t] + (1 - a) * out[t - 1]
    return out


def test_log_returns_and_ewma_against_references(rng):
    prices = np.exp(np.cumsum(rng.normal(0, 0.01, 50))) * 100
    np.testing.assert_allclose(log_returns(prices), np.diff(np.log(prices)), rtol=1e-13)
    np.testing.assert_allclose(log_returns(prices[1:], prices[0]), np.diff(np.log(prices)), rtol=1e-13)
    values = rng.normal(size=(40, 3))
    for span in (1.0, 6.0, 24.0):
        expected = np.stack([_ewma_loop(values[:, j], span) for j in range(3)], axis=1)
        np.testing.assert_allclose(ewma(values, span), expected, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ewma(values.T, span, axis=1), expected.T, rtol=1e-12, atol=1e-14)
    head = ewma(values[:25], 6.0)
    np.testing.assert_allclose(ewma(values[25:], 6.0, initial=head[-1]), ewma(values, 6.0)[25:], rtol=1e-12)
    with pytest.raises(ValueError, match="positive prices"):
        log_returns(np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="span"):
        ewma(values, 0.5)


def test_feature_transform_is_causal_drops_one_row_and_continues_with_its_carry():
    raw = simulate_market(jax.random.key(5), SMALL).features
    transform = FeatureTransform(FEATURE_NAMES, log1p=("LM",))
    full = transform.apply(raw)
    assert full.features.shape == (SMALL - 1, 10)
    np.testing.assert_allclose(full.features[:, COL["P"]], np.diff(np.log(raw[:, COL["P"]])), rtol=1e-13)
    np.testing.assert_allclose(full.features[:, COL["LM"]], np.log1p(raw[1:, COL["LM"]]), rtol=1e-13)
    np.testing.assert_allclose(full.features[:, COL["Delta"]], _ewma_loop(raw[1:, COL["Delta"]], 6.0), rtol=1e-12)
    untouched = [COL[n] for n in FEATURE_NAMES if n not in ("P", "LM", "Delta")]
    np.testing.assert_array_equal(full.features[:, untouched], raw[1:, untouched])
    changed = raw.copy()
    changed[150:] += 1.0
    moved = transform.apply(changed).features
    np.testing.assert_array_equal(moved[:149], full.features[:149])
    assert np.all(moved[149] != full.features[149])
    head = transform.apply(raw[:101])
    tail = transform.apply(raw[101:], head.carry)
    np.testing.assert_allclose(np.concatenate([head.features, tail.features]), full.features, rtol=1e-12, atol=1e-13)
    assert FeatureTransform.from_dict(transform.to_dict()) == transform
    with pytest.raises(ValueError, match="carry shapes"):
        transform.apply(raw, FeatureCarry(raw[-1, :9], head.carry.ewma))


def test_feature_transform_of_a_batch_equals_each_series(market):
    transform = FeatureTransform(FEATURE_NAMES, log1p=("LM", "SR"), ewma_spans=(("Delta", 6.0), ("RoC", 3.0)))
    raw = market.features[:3, :300]
    batch = transform.apply(raw)
    assert batch.features.shape == (3, 299, 10)
    for b in range(3):
        single = transform.apply(raw[b])
        np.testing.assert_array_equal(batch.features[b], single.features)
        np.testing.assert_array_equal(batch.carry.last_raw[b], single.carry.last_raw)
        np.testing.assert_array_equal(batch.carry.ewma[b], single.carry.ewma)
    more = transform.apply(market.features[:3, 300:400], batch.carry)
    np.testing.assert_allclose(more.features, transform.apply(market.features[:3, :400]).features[:, 299:], rtol=1e-12)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"log_return": ("Price",)}, "unknown feature"),
        ({"ewma_spans": (("Delta", 0.0),)}, "span"),
        ({"log1p": ("RoC",)}, "log1p"),
        ({"log1p": ("P",)}, "both log_return and log1p"),
    ],
)
def test_feature_transform_bad_settings_raise(settings, message):
    raw = simulate_market(jax.random.key(5), SMALL).features
    raw[:, COL["RoC"]] = -2.0
    with pytest.raises(ValueError, match=message):
        FeatureTransform(FEATURE_NAMES, **settings).apply(raw)


def test_feature_transform_rejects_bad_raw_data():
    transform = FeatureTransform(FEATURE_NAMES)
    raw = simulate_market(jax.random.key(5), SMALL).features
    with pytest.raises(ValueError, match="got shape"):
        transform.apply(raw[:, :9])
    raw[10, 3] = np.nan
    with pytest.raises(ValueError, match="1 row.*: 10"):
        transform.apply(raw)
    with pytest.raises(ValueError, match="at least 2"):
        transform.apply(raw[:1])


def test_standardizer_uses_training_rows_only(rng):
    train = rng.normal(1.0, 2.0, size=(500, 3))
    test = rng.normal(5.0, 1.0, size=(100, 3))
    fitted = Standardizer.fit(train)
    np.testing.assert_allclose(fitted.mean, train.mean(0), rtol=1e-13)
    np.testing.assert_allclose(fitted.scale, train.std(0), rtol=1e-13)
    y, mask = np.concatenate([train, test]), np.arange(600) < 500
    masked = Standardizer.fit(y, mask)
    np.testing.assert_array_equal(masked.mean, fitted.mean)
    np.testing.assert_array_equal(masked.scale, fitted.scale)
    extreme = y.copy()
    extreme[500:] = 1e6
    extreme[550] = np.nan
    leaked = Standardizer.fit(extreme, mask)
    np.testing.assert_array_equal(leaked.mean, fitted.mean)
    np.testing.assert_array_equal(leaked.scale, fitted.scale)
    z = fitted.transform(test)
    assert np.all(z.mean(0) > 1.5), "test rows keep their shift under the training statistics"
    np.testing.assert_allclose(fitted.inverse_transform(fitted.transform(test)), test, rtol=1e-13)
    again = Standardizer.from_dict(json.loads(json.dumps(fitted.to_dict())))
    np.testing.assert_array_equal(again.mean, fitted.mean)
    np.testing.assert_array_equal(again.scale, fitted.scale)
    series = np.stack([y, y + 1.0])
    batch_mask = np.stack([mask, np.zeros(600, bool)])
    np.testing.assert_array_equal(Standardizer.fit(series, batch_mask).mean, fitted.mean)


def test_standardizer_errors_name_the_problem(rng):
    y = rng.normal(size=(50, 3))
    constant = y.copy()
    constant[:, 1] = 7.0
    with pytest.raises(ValueError, match=r"constant column\(s\).*1 \(SR\)"):
        Standardizer.fit(constant, feature_names=("LM", "SR", "Abs"))
    bad = y.copy()
    bad[4, 2] = np.inf
    with pytest.raises(ValueError, match=r"1 row\(s\): 4 \(columns \[2\]\)"):
        Standardizer.fit(bad)
    with pytest.raises(ValueError, match=r"1 row\(s\): \(1, 4\)"):
        Standardizer.fit(np.stack([y, bad]))
    with pytest.raises(ValueError, match="NaN or inf"):
        Standardizer.fit(y).transform(bad)
    with pytest.raises(ValueError, match="at least 2 training rows"):
        Standardizer.fit(y[:1])
    with pytest.raises(ValueError, match="at least 2 training rows"):
        Standardizer.fit(y, np.arange(50) == 3)
    with pytest.raises(ValueError, match="mask must be boolean"):
        Standardizer.fit(y, np.ones(49, bool))
    with pytest.raises(ValueError, match="2 features but"):
        Standardizer.fit(y).transform(y[:, :2])
    with pytest.raises(ValueError, match="positive"):
        Standardizer.from_dict({"mean": [0.0], "scale": [0.0]})
    with pytest.raises(ValueError, match="inconsistent"):
        Standardizer.from_dict({"mean": [0.0, 1.0], "scale": [1.0]})


def test_csv_round_trip_and_errors(tmp_path):
    market = simulate_market(jax.random.key(9), SMALL)
    path = tmp_path / "market.csv"
    lines = ["timestamp," + ",".join(FEATURE_NAMES) + ",regime"]
    for stamp, row, regime in zip(market.timestamps, market.features, market.regimes, strict=True):
        lines.append(f"{stamp}," + ",".join(repr(float(v)) for v in row) + f",{REGIME_NAMES[regime]}")
    path.write_text("\n".join(lines) + "\n")
    loaded = load_csv(path, regime_column="regime")
    np.testing.assert_array_equal(loaded.features, market.features)
    np.testing.assert_array_equal(loaded.regimes, market.regimes)
    np.testing.assert_array_equal(loaded.timestamps, market.timestamps)
    assert load_csv(path).regimes is None
    with pytest.raises(ValueError, match="no column 'Volume'"):
        load_csv(path, feature_names=("LM", "Volume"))
    broken = lines.copy()
    broken[3] = broken[3].replace(broken[3].split(",")[2], "abc", 1)
    (tmp_path / "bad.csv").write_text("\n".join(broken) + "\n")
    with pytest.raises(ValueError, match="line 4, column 'SR': not a number: 'abc'"):
        load_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no such data file"):
        load_csv(tmp_path / "missing.csv")
    (tmp_path / "short.csv").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match="1 data row"):
        load_csv(tmp_path / "short.csv")
    with pytest.raises(ValueError, match=r"unknown regime name\(s\) \['ST'"):
        load_csv(path, regime_column="regime", regime_names=("VT", "RC", "RHA", "HPEM", "AMB"))

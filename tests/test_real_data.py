"""Real data through the main job: the daily-returns loader and its bad inputs, the S&P 500 sample,
the naming rule for unlabelled regimes, and an unlabelled run's dashboard and console summary."""

import contextlib
import io
import json
import sys
from pathlib import Path

import export_sp500
import jax
import numpy as np
import pipeline
import pytest
import schema
from hydra import compose, initialize_config_dir

import fhmv_jax
from fhmv_jax.data import FEATURE_NAMES, REGIME_NAMES, FeatureTransform, load_returns, simulate_market, sp500_prices
from fhmv_jax.eval import RULE_NAMES, name_by_rule, volatility_scale

ROOT = Path(__file__).resolve().parent.parent
schema.register()


def _csv(tmp_path, rows, header="date,price", name="series.csv"):
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


WEEK = ["2020-01-06,100", "2020-01-07,101", "2020-01-08,99.5", "2020-01-09,100.5", "2020-01-10,102"]


# ----------------------------------------------------------------------------------------
# the loader


def test_prices_become_percent_log_returns_dated_by_their_second_day(tmp_path):
    series = load_returns(_csv(tmp_path, WEEK), price_column="price")
    prices = np.array([100, 101, 99.5, 100.5, 102])
    np.testing.assert_allclose(series.returns, 100 * np.diff(np.log(prices)), rtol=1e-14)
    np.testing.assert_array_equal(series.prices, prices[1:])
    assert series.dates[0] == np.datetime64("2020-01-07") and series.start == np.datetime64("2020-01-06")
    assert series.notes == ()


def test_a_return_column_is_used_as_it_is(tmp_path):
    path = _csv(tmp_path, ["01/06/2020,0.5", "01/07/2020,-1.25", "01/08/2020,0"], header="Date,ret")
    series = load_returns(path, date_column="Date", return_column="ret")
    np.testing.assert_array_equal(series.returns, [0.5, -1.25, 0.0])
    assert series.prices is None and series.dates[0] == np.datetime64("2020-01-06")


@pytest.mark.parametrize("columns", [{}, {"price_column": "price", "return_column": "price"}])
def test_exactly_one_of_price_and_return_column(tmp_path, columns):
    with pytest.raises(ValueError, match="exactly one of price_column and return_column"):
        load_returns(_csv(tmp_path, WEEK), **columns)


def test_duplicate_dates_are_refused_and_named(tmp_path):
    rows = WEEK[:3] + ["2020-01-08,99.7"] + WEEK[3:]
    with pytest.raises(ValueError, match=r"duplicate dates at line 4 \(2020-01-08\), line 5 \(2020-01-08\)"):
        load_returns(_csv(tmp_path, rows), price_column="price")


def test_unsorted_dates_are_sorted_with_a_note_or_refused(tmp_path):
    path = _csv(tmp_path, [WEEK[0], WEEK[2], WEEK[1], *WEEK[3:]])
    series = load_returns(path, price_column="price")
    np.testing.assert_array_equal(series.returns, load_returns(_csv(tmp_path, WEEK, name="s.csv"),
                                                               price_column="price").returns)
    assert len(series.notes) == 1 and "out of date order" in series.notes[0] and "2020-01-07" in series.notes[0]
    with pytest.raises(ValueError, match=r"not in increasing order: line 4 \(2020-01-07\) follows line 3"):
        load_returns(path, price_column="price", sort_dates=False)


def test_gaps_beyond_the_limit_are_named_and_small_ones_noted(tmp_path):
    path = _csv(tmp_path, [*WEEK, "2020-01-24,103", "2020-01-27,104"])   # 9 business days missing
    with pytest.raises(ValueError, match="9 between 2020-01-10 and 2020-01-24 .*max_gap_days=5"):
        load_returns(path, price_column="price")
    series = load_returns(path, price_column="price", max_gap_days=None)
    assert series.notes == ("1 gap(s) of missing business days (holidays or closures), the widest 9 day(s) "
                            "between 2020-01-10 and 2020-01-24",)
    weekend = load_returns(_csv(tmp_path, ["2020-01-10,1", "2020-01-13,2", "2020-01-14,3"], name="w.csv"),
                           price_column="price", max_gap_days=0)
    assert weekend.notes == ()


@pytest.mark.parametrize("bad,message", [
    ("2020-01-08,", "missing or non-numeric value"),
    ("2020-01-08,NaN", "missing or non-numeric value"),
    ("2020-01-08,abc", "missing or non-numeric value"),
    ("2020-01-08,0", "prices must be positive"),
    ("2020-01-08,-3", "prices must be positive"),
    ("2020-13-45,99", "unreadable date"),
    ("2020-01-08 10:30,99", "a daily series is expected"),
])
def test_bad_values_are_named_with_their_line(tmp_path, bad, message):
    rows = [*WEEK[:2], bad, *WEEK[3:]]
    with pytest.raises(ValueError, match=f"{message}.*line 4"):
        load_returns(_csv(tmp_path, rows), price_column="price")


def test_missing_files_columns_and_too_few_rows(tmp_path):
    with pytest.raises(ValueError, match="no such data file"):
        load_returns(tmp_path / "nope.csv", price_column="price")
    with pytest.raises(ValueError, match="no column 'close'; columns are"):
        load_returns(_csv(tmp_path, WEEK), price_column="close")
    with pytest.raises(ValueError, match="1 return"):
        load_returns(_csv(tmp_path, WEEK[:2]), price_column="price")
    with pytest.raises(ValueError, match="empty file"):
        load_returns(_csv(tmp_path, [], header=""), price_column="price")


def test_the_sp500_sample_exports_to_a_file_the_loader_reads(tmp_path):
    dates, prices = sp500_prices()
    assert len(prices) == 5031 and str(dates[0]) == "1999-01-04" and np.all(prices > 0)
    assert export_sp500.main(["--out", str(tmp_path / "sp500.csv")]) == 0
    series = load_returns(tmp_path / "sp500.csv", price_column="price")
    np.testing.assert_allclose(series.returns, 100 * np.diff(np.log(prices)), rtol=1e-12)
    assert "widest 4 day(s) between 2001-09-10 and 2001-09-17" in series.notes[0]


def test_without_arch_the_sample_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "arch.data", None)
    with pytest.raises(ImportError, match=r"fhmv_jax\[data\]"):
        sp500_prices()


# ----------------------------------------------------------------------------------------
# naming unlabelled regimes


# Expected feature values per regime from DATA.md's table (LM, Abs, Vol, T), in REGIME_NAMES order.
TABLE = {"ST": (0.5, 0.94, 0.2, 0.2), "VT": (1.5, 0.52, 0.6, 0.0), "RC": (0.8, 1.09, 0.375, 0.0),
         "RHA": (2.0, 2.26, 0.8, -0.24), "HPEM": (3.0, -0.15, 1.5, 1.0), "AMB": (1.0, 0.89, 0.375, 0.01)}


def _table_means(order, rng):
    """[6, D] means over FEATURE_NAMES with the TABLE's columns, other features random, regimes in ``order``."""
    means = rng.normal(size=(len(order), len(FEATURE_NAMES)))
    for g, name in enumerate(order):
        for feature, value in zip(("LM", "Abs", "Vol", "T"), TABLE[name], strict=True):
            means[g, FEATURE_NAMES.index(feature)] = value
    return means


def test_the_rule_names_the_table_regimes_in_any_order(rng):
    for _ in range(5):
        order = list(rng.permutation(REGIME_NAMES))
        means = _table_means(order, rng)
        assert name_by_rule(means, FEATURE_NAMES) == tuple(order)
        scaled = means * rng.uniform(0.5, 2.0, size=len(FEATURE_NAMES))          # units do not matter
        assert name_by_rule(scaled, FEATURE_NAMES) == tuple(order)


def test_the_rule_gives_names_in_its_order_and_neutral_names_beyond_six(rng):
    assert name_by_rule(_table_means(["ST", "HPEM", "RHA"], rng), FEATURE_NAMES) == ("ST", "HPEM", "RHA")
    assert name_by_rule(_table_means(["VT", "HPEM"], rng), FEATURE_NAMES) == ("RHA", "HPEM")   # first two names
    eight = name_by_rule(np.concatenate([_table_means(list(REGIME_NAMES), rng), np.zeros((2, len(FEATURE_NAMES)))]),
                         FEATURE_NAMES)
    neutral = [g for g, name in enumerate(eight) if name not in RULE_NAMES]
    assert set(eight) >= set(RULE_NAMES) and [eight[g] for g in neutral] == [f"R{g}" for g in neutral]
    assert len(neutral) == 2


def test_the_rule_recovers_the_simulated_markets_names():
    market = simulate_market(jax.random.key(3), 3001)
    transform = FeatureTransform(market.feature_names, ("P",), ("LM", "SR", "Vol"), (("Delta", 6.0),))
    features = transform.apply(market.features).features
    labels = np.asarray(market.regimes)[1:]
    means = np.stack([features[labels == g].mean(axis=0) for g in range(len(REGIME_NAMES))])
    assert name_by_rule(means, market.feature_names) == tuple(REGIME_NAMES)


def test_without_the_market_features_or_with_one_regime_regimes_stay_unnamed(rng):
    assert name_by_rule(rng.normal(size=(3, 1)), ("r",)) is None
    assert name_by_rule(_table_means(["ST"], rng), FEATURE_NAMES) is None
    names, naming = pipeline.unlabelled_names(rng.normal(size=(2, 1)), ("r",))
    assert names == ("R0", "R1") and naming == "unnamed"
    with pytest.raises(ValueError, match="means must be"):
        name_by_rule(np.zeros((2, 3)), FEATURE_NAMES)


# ----------------------------------------------------------------------------------------
# the volatility read-out


def _leverage_path(x, l1, theta, lags):
    """L_t of MODEL.md section 2 (predictable leverage), step by step."""
    L = np.ones(len(x))
    g = np.zeros(len(x))
    for t in range(len(x)):
        L[t] = np.prod([1 + l1 * theta ** (i - 1) * g[t - i] for i in range(1, min(lags, t) + 1)])
        g[t] = abs(x[t]) * (x[t] < 0) / np.sqrt(L[t])
    return L


@pytest.mark.parametrize("method", ["smooth", "filter"])
def test_the_expected_volatility_scale_weighs_each_states_scale_by_its_probability(rng, method):
    spec = fhmv_jax.ModelSpec(num_features=1, num_regimes=2, num_chains=1, num_jump_states=2, num_components=1,
                              leverage="predictable", num_leverage_lags=3, jump_mode="iid", gaussian=True,
                              driver_feature=0)
    y = rng.standard_t(4, size=(40, 1))
    model = fhmv_jax.init_model(jax.random.key(0), spec, y, num_seeds=1)
    natural = {k: float(np.ravel(v)[0]) for k, v in model.natural_parameters().items() if np.size(v) == 1}
    posterior = model.smooth(y) if method == "smooth" else model.filter(y)
    joint = np.asarray(posterior.joint).sum(axis=1)                          # [T, chain, jump]
    static = np.outer([1.0, natural["c1"]], [1.0, natural["m1"]])
    expected = np.einsum("tej,ej->t", joint, static) * _leverage_path(y[:, 0], natural["l1"], natural["theta_l"], 3)
    np.testing.assert_allclose(volatility_scale(model, y, method=method), expected, rtol=1e-10)


# ----------------------------------------------------------------------------------------
# an unlabelled run of the main job


RUN = ["data=returns", "model=fhmv_paper", "train=quick", "train.max_iters=3", "train.init_seeds=1",
       "train.hmm_iters=3", "model.num_chains=1", "model.num_leverage_lags=5", "incremental.max_iters=2"]


@pytest.fixture(scope="module")
def returns_job(tmp_path_factory):
    directory = tmp_path_factory.mktemp("returns")
    dates, prices = sp500_prices()
    order = np.r_[np.arange(5)[::-1], np.arange(5, 301)]   # the first rows out of order: sorted, with a note
    path = export_sp500.write_price_csv(directory / "sp500.csv", dates[order], prices[order])
    overrides = [*RUN, f"data.path={path}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = schema.validate(compose("config", overrides=overrides), overrides)
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        metrics = pipeline.run(cfg, directory / "run")
    return directory / "run", metrics, console.getvalue()


def test_an_unlabelled_run_writes_its_dashboard_and_says_its_regimes_are_unnamed(returns_job):
    directory, metrics, console = returns_job
    assert (directory / pipeline.DASHBOARD_FILE).stat().st_size > 10_000
    assert "data: 4 row(s) out of date order" in console
    assert pipeline.UNNAMED in console
    listed = console.strip().splitlines()[-1]
    assert listed.startswith("outputs in") and pipeline.DASHBOARD_FILE in listed
    written = json.loads((directory / pipeline.METRICS_FILE).read_text())
    assert written["regime_naming"] == "unnamed" and written["regime_names"] == ["R0"]
    assert written["train"]["num_steps"] + written["test"]["num_steps"] == 300
    assert "accuracy" not in written["test"]


def test_the_summary_lists_only_what_was_written(returns_job, tmp_path, capsys):
    _, metrics, _ = returns_job
    pipeline.summarise(metrics, tmp_path, [pipeline.MODEL_FILE, pipeline.METRICS_FILE])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert pipeline.MODEL_FILE in last and pipeline.DASHBOARD_FILE not in last

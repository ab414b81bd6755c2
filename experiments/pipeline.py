"""The main job's steps, shared by train.py and quick_test.py: config in, outputs on disk.

Data flow: data (simulated, CSV features or a daily returns CSV) -> causal features -> split
-> Standardizer (train rows; or none, ``data.standardize=false``) -> init_model -> fit_em
-> regime naming (Hungarian on train with labels, else the rule on fitted means, else unnamed)
-> metrics, oracle (labels only) -> dashboard -> save -> reload -> predict on test -> metrics.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import fhmv_jax
from fhmv_jax.data import RETURN_FEATURE, FeatureTransform, Standardizer, load_csv, load_returns, simulate_market
from fhmv_jax.em import IterationInfo
from fhmv_jax.eval import (
    align_to_labels,
    name_by_rule,
    oracle_readout,
    predict_raw,
    predict_regimes,
    regime_means,
    regime_scores,
    volatility_scale,
)
from fhmv_jax.incremental import IncrementalTrainer, ModelRegistry, RetrainSettings, TriggerSettings

MODEL_FILE = "fhmv_model.fhmv"
DASHBOARD_FILE = "fhmv_training_results.png"
METRICS_FILE = "metrics.json"
UNNAMED = "regimes are unnamed: no labels and no naming rule for these features"


class Dataset(NamedTuple):
    """Model-ready data of one run.

    Attributes:
        raw: [T + 1, D] raw rows (row 0 is the warm-up of the causal features).
        features: [T, D] causal features (before standardisation), row t from raw rows <= t + 1.
        labels: [T] true regime indices, or None.
        timestamps: [T] timestamps of the feature rows.
        feature_names: [D]; regime_names: [G_true] names of the true labels.
        transform: the causal feature transform.
        level: [T] a price level (or cumulative return) at each feature row, for the dashboard, or None.
        level_label: what ``level`` is.
        notes: what the loader did to or found in the data (rows sorted, small gaps), one line each.
    """

    raw: np.ndarray
    features: np.ndarray
    labels: np.ndarray | None
    timestamps: np.ndarray
    feature_names: tuple[str, ...]
    regime_names: tuple[str, ...]
    transform: FeatureTransform
    level: np.ndarray | None = None
    level_label: str = ""
    notes: tuple[str, ...] = ()


def feature_transform(cfg: DictConfig, feature_names) -> FeatureTransform:
    """The causal transform of ``cfg.data.features``; a ``null`` setting means none."""
    features = cfg.data.features
    return FeatureTransform(
        feature_names=tuple(feature_names),
        log_return=tuple(features.log_return or ()),
        log1p=tuple(features.log1p or ()),
        ewma_spans=tuple((name, float(span)) for name, span in (features.ewma_spans or {}).items()),
    )


def load_returns_dataset(cfg: DictConfig) -> Dataset:
    """A daily returns CSV (``data.kind=returns``) as one feature ``r``, with a zero warm-up row ahead of it.

    The warm-up row stands where every other data kind has its first raw row (dropped by the
    causal transform), so no return is lost.
    """
    d = cfg.data
    series = load_returns(d.path, date_column=d.date_column, price_column=d.price_column,
                          return_column=d.return_column, sort_dates=d.sort_dates, max_gap_days=d.max_gap_days)
    raw = np.concatenate([[0.0], series.returns])[:, None]
    transform = feature_transform(cfg, (RETURN_FEATURE,))
    features = transform.apply(raw).features
    if series.prices is not None:
        level, level_label = series.prices, d.price_column
    else:
        level, level_label = np.cumsum(series.returns), f"cumulative {d.return_column}"
    return Dataset(raw, features, None, series.dates, (RETURN_FEATURE,), (), transform, level, level_label,
                   series.notes)


def load_dataset(cfg: DictConfig, key) -> Dataset:
    """Simulate (``data.kind=synthetic``) or read (``csv``, ``returns``) the data and compute causal features."""
    if cfg.data.kind == "returns":
        return load_returns_dataset(cfg)
    if cfg.data.kind == "synthetic":
        market = simulate_market(
            key,
            cfg.data.num_steps + 1,
            frequencies=tuple(cfg.data.frequencies),
            persistence=cfg.data.persistence,
            start=cfg.data.start,
        )
        regime_names = market.regime_names
    else:
        market = load_csv(
            cfg.data.path,
            feature_names=tuple(cfg.data.feature_columns),
            timestamp_column=cfg.data.timestamp_column,
            regime_column=cfg.data.regime_column,
            regime_names=tuple(cfg.data.regime_names),
        )
        regime_names = tuple(cfg.data.regime_names)
    transform = feature_transform(cfg, market.feature_names)
    features = transform.apply(market.features).features
    labels = None if market.regimes is None else np.asarray(market.regimes)[1:]
    prices = transform.log_return   # the dashboard draws the first price level under the regimes
    level = np.asarray(market.features)[1:, list(market.feature_names).index(prices[0])] if prices else None
    return Dataset(market.features, features, labels, market.timestamps[1:], tuple(market.feature_names),
                   tuple(regime_names), transform, level, f"{prices[0]} (price level)" if prices else "")


def model_spec(cfg: DictConfig, feature_names) -> fhmv_jax.ModelSpec:
    """The ModelSpec of ``cfg.model``; feature names in the config are checked against the data."""
    m = cfg.model

    def index(name):
        if name not in feature_names:
            raise ValueError(f"model config names feature {name!r}, which is not one of {list(feature_names)}")
        return feature_names.index(name)

    scale_mask = None
    if m.scale_features is not None:
        chosen = {index(name) for name in m.scale_features}
        scale_mask = tuple(d in chosen for d in range(len(feature_names)))
    return fhmv_jax.ModelSpec(
        num_features=len(feature_names),
        num_regimes=m.num_regimes,
        num_chains=m.num_chains,
        num_jump_states=m.num_jump_states,
        num_components=m.num_components,
        leverage=m.leverage,
        num_leverage_lags=m.num_leverage_lags,
        jump_mode=m.jump_mode,
        tied_persistence=m.tied_persistence,
        gaussian=m.gaussian,
        scale_mask=scale_mask,
        driver_feature=None if m.driver is None else index(m.driver),
        dof_bounds=tuple(m.dof_bounds),
        zero_mean=m.zero_mean,
    )


def split_rows(num_steps: int, train_fraction: float, min_steps: int) -> int:
    """Number of training rows; both parts must keep at least ``min_steps`` rows."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"data.train_fraction must lie in (0, 1), got {train_fraction}")
    num_train = int(round(train_fraction * num_steps))
    if min(num_train, num_steps - num_train) < min_steps:
        raise ValueError(
            f"{num_steps} steps split at {train_fraction} leave {num_train} train / {num_steps - num_train} test rows;"
            f" each part needs at least {min_steps}"
        )
    return num_train


def factor_parameters(model: fhmv_jax.FHMV) -> dict[str, float]:
    """Scalar factor parameters of a fitted model, for display and metrics."""
    natural = model.natural_parameters()
    scalars = {}
    for name in ("persistence_stay", "c1", "theta_c", "m1", "theta_m", "l1", "theta_l"):
        if name in natural:
            values = np.atleast_1d(np.asarray(natural[name]))
            scalars.update({name if values.size == 1 else f"{name}[{i}]": float(v) for i, v in enumerate(values)})
    if "jump_transition" in natural:
        jump = np.asarray(natural["jump_transition"])
        scalars["jump q"] = float(1 - jump[0, 0])
        scalars["jump q_back"] = float(jump[1, 0])
    return scalars


def check_reload(saved, y_test, before, prediction) -> None:
    """The reloaded model, fed the raw test rows through its stored transform, predicts as the trained one.

    Raises:
        RuntimeError: any difference beyond the rounding of the feature transform.
    """
    same_inputs = predict_regimes(saved.model, y_test, regime_names=saved.metadata["regime_names"])
    if not np.array_equal(same_inputs.probabilities, before.probabilities):
        raise RuntimeError("the reloaded model's test probabilities differ from the trained model's")
    if not (np.allclose(prediction.probabilities, before.probabilities, rtol=0, atol=1e-9)
            and np.array_equal(prediction.regimes, before.regimes)):
        raise RuntimeError("predictions from raw test rows through the stored feature transform differ")


class EMProgress:
    """A progress bar over EM iterations (count, elapsed, log-likelihood, gain per step): ``fit_em``'s callback.

    Split-merge trials and continuations count on; a continuation starts its iterations at 0 again.
    """

    def __init__(self, description: str):
        self.bar = tqdm(desc=description, unit="iter", dynamic_ncols=True)

    def __call__(self, info: IterationInfo) -> None:
        if info.iteration:
            self.bar.update()
            self.bar.set_postfix_str(f"log-lik {info.log_likelihood:.4f}, gain/step {info.gain_per_step:+.2e}")
        else:
            self.bar.set_postfix_str(f"log-lik {info.log_likelihood:.4f}")

    def __enter__(self) -> EMProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def fit_model(cfg: DictConfig, spec: fhmv_jax.ModelSpec, y_train, key_init, key_restarts):
    """init_model + fit_em with the ``train`` settings, with a progress bar."""
    train = cfg.train
    start = fhmv_jax.init_model(key_init, spec, y_train, num_seeds=train.init_seeds, method=train.init_method,
                                hmm_iters=train.hmm_iters)
    with EMProgress("EM") as progress:
        return fhmv_jax.fit_em(
            start,
            y_train,
            max_iters=train.max_iters,
            tol=train.tol,
            num_restarts=train.num_restarts,
            key=key_restarts,
            init_method=train.init_method,
            covariance_ridge=train.covariance_ridge,
            covariance_prior_count=train.covariance_prior_count,
            split_merge_rounds=train.split_merge_rounds if spec.num_regimes >= 3 else 0,
            split_merge_iters=train.split_merge_iters,
            inference=train.inference,
            batch_chunk=train.batch_chunk,
            callback=progress,
        )


def name_regimes(model, y_train, labels_train, regime_names):
    """Hungarian naming fitted on the smoothed training path (training rows only).

    Returns:
        (``RegimeAlignment``, or None without labels; [T] smoothed training regimes).
    """
    regimes = np.asarray(model.smooth(y_train).marginals.regime).argmax(-1)
    if labels_train is None:
        return None, regimes
    return align_to_labels(labels_train, regimes, model.spec.num_regimes, names=regime_names), regimes


def incremental_settings(cfg: DictConfig) -> tuple[TriggerSettings, RetrainSettings]:
    """The ``incremental`` config as the library's settings."""
    c = cfg.incremental
    triggers = TriggerSettings(c.every, c.log_likelihood_drop, c.accuracy_drop, c.drift_psi, c.anomaly_z, c.recent)
    return triggers, RetrainSettings(c.max_iters, c.tol, c.window, c.validation, c.margin)


def _write_json(path: Path, payload: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(temporary, path)


def run(cfg: DictConfig, output_dir: str | os.PathLike) -> dict:
    """Run the whole job into ``output_dir`` and return the metrics written to metrics.json.

    Raises:
        ValueError: bad configuration or data (named); RuntimeError: the reloaded model
            does not reproduce the trained model's predictions.
    """
    job_start = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    key_data, key_init, key_restarts = jax.random.split(jax.random.key(cfg.seed), 3)

    data = load_dataset(cfg, key_data)
    for note in data.notes:
        print(f"data: {note}", flush=True)
    spec = model_spec(cfg, data.feature_names)
    num_steps = data.features.shape[0]
    num_train = split_rows(num_steps, cfg.data.train_fraction, min_steps=2 * spec.num_regimes)
    if cfg.data.standardize:
        standardizer = Standardizer.fit(data.features[:num_train], feature_names=data.feature_names)
    else:
        standardizer = Standardizer.identity(len(data.feature_names), feature_names=data.feature_names)
    y = standardizer.transform(data.features)
    y_train, y_test = y[:num_train], y[num_train:]
    print(f"data: {num_steps} steps ({num_train} train / {num_steps - num_train} test), {spec.num_features} features;"
          f" model: {spec.num_states} joint states, {spec.num_components} components per regime", flush=True)

    fit_start = time.perf_counter()
    fit = fit_model(cfg, spec, y_train, key_init, key_restarts)
    fit_seconds = time.perf_counter() - fit_start
    model = fit.model

    labels_train = None if data.labels is None else data.labels[:num_train]
    alignment, train_regimes = name_regimes(model, y_train, labels_train, data.regime_names)
    means = standardizer.inverse_transform(regime_means(model))
    names, naming = unlabelled_names(means, data.feature_names) if alignment is None else (alignment.names, "labels")

    model_path = output_dir / MODEL_FILE
    metadata = {
        "feature_names": list(data.feature_names),
        "feature_transform": data.transform.to_dict(),
        "feature_carry": data.transform.apply(data.raw[: num_train + 1]).carry.to_dict(),
        "standardizer": standardizer.to_dict(),
        "regime_names": list(names),
        "training": {"num_steps": num_train, "num_iters": fit.num_iters, "converged": fit.converged,
                     "log_likelihood": float(fit.log_likelihoods[-1]), "seed": cfg.seed},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    fhmv_jax.save(model_path, model, **metadata)
    written = [MODEL_FILE]
    before = predict_regimes(model, y_test, regime_names=names, ambiguity_threshold=cfg.eval.ambiguity_threshold)
    saved = fhmv_jax.load(model_path)
    prediction = predict_raw(saved, data.raw[num_train + 1 :], ambiguity_threshold=cfg.eval.ambiguity_threshold)
    check_reload(saved, y_test, before, prediction)

    train_criteria = fhmv_jax.information_criteria(model, y_train)
    metrics = {
        "regime_naming": naming,
        "regime_means": {name: dict(zip(data.feature_names, map(float, row), strict=True))
                         for name, row in zip(names, means, strict=True)},
        "log_likelihoods": [float(v) for v in fit.log_likelihoods],
        "converged": fit.converged,
        "num_iters": fit.num_iters,
        "split_merges": [{"merged": list(move.merged), "split": move.split, "iteration": move.iteration,
                          "objective_before": move.objective_before, "objective_after": move.objective_after}
                         for move in fit.split_merges],
        "fit_seconds": fit_seconds,
        "regime_names": list(names),
        "factor_parameters": factor_parameters(model),
        "train": {"num_steps": num_train, "log_likelihood_per_step": train_criteria.log_likelihood / num_train,
                  "information_criteria": train_criteria.to_dict()},
        "test": {"num_steps": num_steps - num_train,
                 "log_likelihood_per_step": float(model.log_likelihood(y_test)) / (num_steps - num_train),
                 "ambiguous_fraction": float(np.mean(prediction.ambiguous))},
    }
    if alignment is not None:
        labels_test = data.labels[num_train:]
        G_true = len(data.regime_names)
        # scores over the alignment's reference indices: the true labels, then any extra fitted regimes
        G_ref, reference_names = alignment.num_reference, alignment.reference_names
        metrics["train"].update(regime_scores(labels_train, alignment.relabel(train_regimes), G_ref)
                                .to_dict(reference_names))
        test_filtered = regime_scores(labels_test, alignment.relabel(prediction.regimes), G_ref)
        smoothed = predict_regimes(model, y_test, method="smooth").regimes
        viterbi = predict_regimes(model, y_test, method="viterbi").regimes
        oracle = oracle_readout(y_train, labels_train, y_test, G_true)
        metrics["test"].update(test_filtered.to_dict(reference_names))
        metrics["test"].update({
            "smoothed_accuracy": regime_scores(labels_test, alignment.relabel(smoothed), G_ref).accuracy,
            "viterbi_accuracy": regime_scores(labels_test, alignment.relabel(viterbi), G_ref).accuracy,
            "oracle_accuracy": regime_scores(labels_test, oracle.filtered, G_true).accuracy,
            "oracle_smoothed_accuracy": regime_scores(labels_test, oracle.smoothed, G_true).accuracy,
        })
        if cfg.eval.dashboard:
            from fhmv_jax.eval.plots import DashboardData, training_dashboard

            natural = model.natural_parameters()
            dof = None if spec.gaussian else alignment.per_reference(natural["dof"])
            training_dashboard(output_dir / DASHBOARD_FILE, DashboardData(
                log_likelihoods=fit.log_likelihoods,
                split_merge_iterations=[move.iteration for move in fit.split_merges],
                names=reference_names,
                confusion=test_filtered.confusion,
                true_regimes=labels_test,
                predicted_regimes=alignment.relabel(prediction.regimes),
                probabilities=alignment.reorder(prediction.probabilities),
                factor_parameters=metrics["factor_parameters"],
                dof=dof,
                title=f"FHMV training results: {spec.num_regimes} regimes ({G_true} true), {spec.num_states} joint"
                      f" states, seed {cfg.seed}",
            ))
            written.append(DASHBOARD_FILE)
    elif cfg.eval.dashboard:
        unlabelled_dashboard(output_dir / DASHBOARD_FILE, cfg, data, model, fit, y, num_train, names, naming,
                             means, prediction, metrics["factor_parameters"])
        written.append(DASHBOARD_FILE)
    metrics["incremental"] = update_cycle(cfg, output_dir, model, metadata, y_train, y_test, data, num_train)
    metrics["total_seconds"] = time.perf_counter() - job_start
    _write_json(output_dir / METRICS_FILE, metrics)
    OmegaConf.save(cfg, output_dir / "config.yaml")
    written += [METRICS_FILE, "config.yaml", "registry/"]
    summarise(metrics, output_dir, written)
    return metrics


def unlabelled_names(means, feature_names) -> tuple[tuple[str, ...], str]:
    """Names of unlabelled regimes: the rule on fitted means (``name_by_rule``) where it applies, else R0, R1, ...

    Returns:
        (G names, how they were given: ``"rule"`` or ``"unnamed"``).
    """
    named = name_by_rule(means, feature_names)
    if named is not None:
        return named, "rule"
    return tuple(f"R{g}" for g in range(len(means))), "unnamed"


def unlabelled_dashboard(path: Path, cfg, data: Dataset, model, fit, y, num_train: int, names, naming: str, means,
                         prediction, factors: dict) -> None:
    """The dashboard of a run without labels: smoothed read-outs on the training rows, filtered on the rest."""
    from fhmv_jax.eval.plots import RegimeDashboardData, regime_dashboard

    y_train, y_test = y[:num_train], y[num_train:]
    smoothed = predict_regimes(model, y_train, method="smooth")
    has_factors = model.spec.num_volatility_states > 1 or model.spec.leverage != "none"
    volatility = (np.concatenate([volatility_scale(model, y_train), volatility_scale(model, y_test, method="filter")])
                  if has_factors else None)
    naming_line = {"labels": "regimes named by their labels", "rule": "regimes named by the rule on fitted means"
                   " (fhmv_jax.eval.regimes)", "unnamed": UNNAMED}[naming]
    spec = model.spec
    regime_dashboard(path, RegimeDashboardData(
        log_likelihoods=fit.log_likelihoods,
        split_merge_iterations=[move.iteration for move in fit.split_merges],
        names=names,
        naming=naming_line,
        timestamps=data.timestamps,
        num_train=num_train,
        regimes=np.concatenate([smoothed.regimes, prediction.regimes]),
        probabilities=np.concatenate([smoothed.probabilities, prediction.probabilities]),
        volatility=volatility,
        level=data.level,
        level_label=data.level_label,
        series=data.features[:, 0],
        series_label=data.feature_names[0],
        feature_names=data.feature_names,
        means=means,
        factor_parameters=factors,
        title=f"FHMV fit ({cfg.data.kind} data, no labels): {spec.num_regimes} regime(s), {spec.num_states} joint"
              f" states, seed {cfg.seed}",
    ))


def update_cycle(cfg, output_dir: Path, model, metadata: dict, y_train, y_test, data: Dataset, num_train: int):
    """One incremental-update cycle on the held-out rows: deploy v1, feed the test rows, refit (forced)."""
    registry = ModelRegistry(output_dir / "registry")
    registry.deploy(model, **metadata)
    triggers, retrain = incremental_settings(cfg)
    retrain = retrain._replace(validation=min(retrain.validation, len(y_test) // 2))
    labels = data.labels
    trainer = IncrementalTrainer(
        registry, y_train, labels=None if labels is None else labels[:num_train],
        label_names=data.regime_names, triggers=triggers, retrain=retrain,
        log=lambda line: print(f"incremental update: {line}", flush=True),
    )
    report = trainer.observe(y_test, None if labels is None else labels[num_train:], force=True)
    return {
        "decision": report.decision,
        "version": report.version,
        "triggers": {t.name: {"fired": t.fired, "value": float(t.value), "threshold": float(t.threshold)}
                     for t in report.triggers},
        "current_validation_log_likelihood": report.current_score,
        "candidate_validation_log_likelihood": report.candidate_score,
        "num_iters": report.num_iters,
        "seconds": report.seconds,
    }


def summarise(metrics: dict, output_dir: Path, written: list[str]) -> None:
    """The console summary; ``written`` lists the outputs the run wrote."""
    train, test = metrics["train"], metrics["test"]
    moves = [f"regimes {m['merged'][0]}+{m['merged'][1]} merged, {m['split']} split" for m in metrics["split_merges"]]
    lines = [
        "",
        f"EM: {metrics['num_iters']} iterations, {len(moves)} split-merge moves{': ' if moves else ''}"
        f"{'; '.join(moves)}, converged={metrics['converged']}, fit {metrics['fit_seconds']:.1f} s",
        f"log-likelihood per step: train {train['log_likelihood_per_step']:.4f},"
        f" test {test['log_likelihood_per_step']:.4f}",
    ]
    if "accuracy" in test:
        lines += [
            f"aligned accuracy: train (smoothed) {train['accuracy']:.3f}; test filtered {test['accuracy']:.3f},"
            f" smoothed {test['smoothed_accuracy']:.3f}, viterbi {test['viterbi_accuracy']:.3f}",
            f"oracle (supervised Gaussian HMM): test filtered {test['oracle_accuracy']:.3f},"
            f" smoothed {test['oracle_smoothed_accuracy']:.3f}",
        ]
        recall = ", ".join(f"{n} {'-' if v is None else f'{v:.2f}'}" for n, v in test["recall"].items())
        lines.append(f"test recall per regime: {recall}")
    lines.append(f"regimes: {', '.join(metrics['regime_names'])};"
                 f" ambiguous test steps {test['ambiguous_fraction']:.1%}")
    if metrics["regime_naming"] == "unnamed":
        lines.append(UNNAMED)
    elif metrics["regime_naming"] == "rule":
        lines.append("regimes named by the rule on fitted means (no labels; fhmv_jax.eval.regimes.name_by_rule)")
    factors = metrics["factor_parameters"]
    if factors:
        lines.append("factor parameters: " + ", ".join(f"{name} {value:.4g}" for name, value in factors.items()))
    lines.append(f"outputs in {output_dir}: {', '.join(written)}")
    print("\n".join(lines), flush=True)

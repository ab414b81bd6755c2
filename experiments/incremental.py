"""Replay a simulated stream through incremental retraining and print every decision.

    python experiments/incremental.py                          # defaults: conf/config.yaml
    python experiments/incremental.py incremental.chunk=100 incremental.every=500

The model is first fitted on ``data.num_steps`` rows; then ``incremental.stream_steps`` rows
arrive in chunks of ``incremental.chunk``; half-way the regime frequencies shift to
``incremental.shifted_frequencies``. Versions are kept in <run dir>/registry/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import jax
import numpy as np
import pipeline
import schema
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import fhmv_jax
from fhmv_jax.data import FEATURE_NAMES, REGIME_NAMES, Standardizer, simulate_market
from fhmv_jax.incremental import IncrementalTrainer, ModelRegistry

schema.register()


def simulate_shifted_stream(cfg: DictConfig, key):
    """Raw rows: the initial period and the first half of the stream at the configured frequencies,
    the second half at the shifted ones (the price continues across the shift)."""
    num_before = cfg.data.num_steps + 1 + cfg.incremental.stream_steps // 2
    num_after = cfg.incremental.stream_steps - cfg.incremental.stream_steps // 2
    key_before, key_after = jax.random.split(key)
    before = simulate_market(key_before, num_before, frequencies=tuple(cfg.data.frequencies),
                             persistence=cfg.data.persistence)
    after = simulate_market(key_after, num_after, frequencies=tuple(cfg.incremental.shifted_frequencies),
                            persistence=cfg.data.persistence, initial_price=float(before.features[-1, 5]))
    return np.concatenate([before.features, after.features]), np.concatenate([before.regimes, after.regimes])


def replay(cfg: DictConfig, output_dir) -> list[dict]:
    key_data, key_init, key_restarts = jax.random.split(jax.random.key(cfg.seed), 3)
    raw, regimes = simulate_shifted_stream(cfg, key_data)
    transform = pipeline.feature_transform(cfg, FEATURE_NAMES)
    features, labels = transform.apply(raw).features, regimes[1:]
    num_train = cfg.data.num_steps
    standardizer = Standardizer.fit(features[:num_train], feature_names=transform.feature_names)
    y = standardizer.transform(features)
    spec = pipeline.model_spec(cfg, transform.feature_names)
    fit = pipeline.fit_model(cfg, spec, y[:num_train], key_init, key_restarts)
    names = pipeline.name_regimes(fit.model, y[:num_train], labels[:num_train], REGIME_NAMES)[0].names
    registry = ModelRegistry(output_dir / "registry")
    registry.deploy(fit.model, regime_names=list(names), standardizer=standardizer.to_dict(),
                    feature_transform=transform.to_dict())
    triggers, retrain = pipeline.incremental_settings(cfg)
    trainer = IncrementalTrainer(registry, y[:num_train], labels=labels[:num_train], label_names=REGIME_NAMES,
                                 triggers=triggers, retrain=retrain, log=print)
    log, chunk, shift = [], cfg.incremental.chunk, num_train + cfg.incremental.stream_steps // 2
    for start in range(num_train, len(y), chunk):
        stop = min(start + chunk, len(y))
        if start <= shift < stop or start == shift:
            print(f"--- regime frequencies shift to {list(cfg.incremental.shifted_frequencies)} at row {shift} ---")
        report = trainer.observe(y[start:stop], labels[start:stop])
        log.append({"rows": [start, stop], "decision": report.decision, "version": report.version,
                    "fired": [t.name for t in report.triggers if t.fired], "seconds": report.seconds,
                    "current_score": report.current_score, "candidate_score": report.candidate_score})
    (output_dir / "incremental_log.json").write_text(json.dumps(log, indent=2))
    deployed = sum(entry["decision"] == "deployed" for entry in log)
    rejected = sum(entry["decision"] == "rejected" for entry in log)
    print(f"{len(log)} updates: {deployed} deployed, {rejected} rejected; versions {registry.versions()}, "
          f"current v{registry.current_version}; log in {output_dir / 'incremental_log.json'}")
    return log


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    fhmv_jax.enable_x64()
    try:
        cfg = schema.validate(cfg, HydraConfig.get().overrides.task)
        if cfg.data.kind != "synthetic":
            raise ValueError("experiments/incremental.py replays the simulated market: use data=synthetic")
        replay(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

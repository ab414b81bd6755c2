"""The main job: simulate a market, fit the FHMV model, evaluate, draw, save, reload, predict.

    python experiments/train.py                                # defaults: 1000 steps, seed 42
    python experiments/train.py data.num_steps=5000 seed=7     # any key of conf/ can be overridden
    python experiments/train.py experiment=long                # an experiment file (conf/experiment/)
    python experiments/train.py -m model.num_components=1,2    # a multirun sweep
    python experiments/train.py data=returns data.path=data/sp500.csv model=fhmv_paper   # daily returns (README)
    python experiments/train.py data.features.ewma_spans={}   # a dict on the command line replaces the setting

Outputs go to the Hydra run directory (outputs/<date>/<time>/): fhmv_model.fhmv,
fhmv_training_results.png (unless eval.dashboard=false; runs without labels get the unlabelled
dashboard), metrics.json, config.yaml, registry/ (and Hydra's .hydra/).
"""

from __future__ import annotations

import sys

import hydra
import pipeline
import schema
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import fhmv_jax

schema.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    fhmv_jax.enable_x64()
    try:
        cfg = schema.validate(cfg, HydraConfig.get().overrides.task)
        pipeline.run(cfg, HydraConfig.get().runtime.output_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

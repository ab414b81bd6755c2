"""The main job's whole path on a tiny problem (under a minute on a 2-core CPU).

    python experiments/quick_test.py [hydra overrides ...]

Composes conf/ with ``experiment=tiny``, runs the job into a temporary directory, checks
every output and exits non-zero on any failure.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import pipeline
import schema
from hydra import compose, initialize_config_dir

import fhmv_jax

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def check_outputs(output_dir: Path, metrics: dict) -> list[str]:
    """Problems found in a finished run's outputs (empty when all is well)."""
    problems = [f"missing {name}" for name in (pipeline.MODEL_FILE, pipeline.DASHBOARD_FILE, pipeline.METRICS_FILE,
                                               "config.yaml") if not (output_dir / name).is_file()]
    if problems:
        return problems
    written = json.loads((output_dir / pipeline.METRICS_FILE).read_text())
    for key in ("log_likelihoods", "converged", "num_iters", "fit_seconds"):
        if key not in written:
            problems.append(f"metrics.json lacks {key}")
    for key in ("accuracy", "log_likelihood_per_step", "oracle_accuracy"):
        if key not in written.get("test", {}):
            problems.append(f"metrics.json lacks test.{key}")
    history = written.get("log_likelihoods", [])
    moves = {move["iteration"] for move in written.get("split_merges", [])}
    if any(b < a - 1e-6 * abs(a) for i, (a, b) in enumerate(itertools.pairwise(history)) if i not in moves):
        problems.append(f"log-likelihood decreased outside a split-merge move: {history}")
    if not 0.0 <= written.get("test", {}).get("accuracy", -1) <= 1.0:
        problems.append("test accuracy outside [0, 1]")
    saved = fhmv_jax.load(output_dir / pipeline.MODEL_FILE)
    if saved.metadata["regime_names"] != metrics["regime_names"]:
        problems.append("saved regime names differ from the run's")
    return problems


def main(overrides: list[str]) -> int:
    fhmv_jax.enable_x64()
    start = time.perf_counter()
    schema.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = schema.validate(compose("config", overrides=["experiment=tiny", *overrides]), overrides)
    with tempfile.TemporaryDirectory(prefix="fhmv_quick_test_") as directory:
        metrics = pipeline.run(cfg, directory)
        problems = check_outputs(Path(directory), metrics)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    print(f"quick test {'FAILED' if problems else 'passed'} in {time.perf_counter() - start:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The main job end to end (the tiny experiment), quick_test in-process, and one Hydra multirun in a subprocess.

The job, quick_test and the multirun's runs fit the same tiny problem, so after the module's first
run they find every compiled program in memory or in the persistent compilation cache (conftest)."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pipeline
import pytest
import quick_test
import schema
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import fhmv_jax
from fhmv_jax.eval import predict_raw, predict_regimes

ROOT = Path(__file__).resolve().parent.parent
schema.register()


def _config(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return schema.validate(compose("config", overrides=["experiment=tiny", *overrides]))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    cfg = _config([])
    return cfg, directory, pipeline.run(cfg, directory)


def test_job_writes_every_output_with_the_documented_metrics(job):
    _, directory, metrics = job
    for name in ("fhmv_model.fhmv", "fhmv_training_results.png", "metrics.json", "config.yaml"):
        assert (directory / name).is_file(), name
    written = json.loads((directory / "metrics.json").read_text())
    for key in ("log_likelihoods", "converged", "num_iters", "fit_seconds"):
        assert key in written
    for key in ("accuracy", "log_likelihood_per_step", "oracle_accuracy", "confusion_matrix", "precision", "recall"):
        assert key in written["test"]
    assert "accuracy" in written["train"]
    train = written["train"]
    criteria = train["information_criteria"]
    assert criteria["num_observations"] == train["num_steps"]
    assert criteria["log_likelihood"] == pytest.approx(train["log_likelihood_per_step"] * train["num_steps"], rel=1e-9)
    assert criteria["bic"] == pytest.approx(-2 * criteria["log_likelihood"] + criteria["num_parameters"]
                                            * np.log(train["num_steps"]), rel=1e-12)
    history = np.asarray(written["log_likelihoods"])
    assert len(history) == written["num_iters"] + 1 + len(written["split_merges"])
    cuts = [0] + [move["iteration"] + 1 for move in written["split_merges"]] + [len(history)]
    for begin, end in itertools.pairwise(cuts):
        assert np.all(np.diff(history[begin:end]) >= -1e-6)
    assert written["incremental"]["decision"] in ("deployed", "rejected")
    assert (directory / "registry" / "v0001.fhmv").is_file()


def test_reloaded_model_predicts_exactly_what_the_trained_one_did(job):
    import jax

    cfg, directory, _ = job
    saved = fhmv_jax.load(directory / "fhmv_model.fhmv")
    key_data = jax.random.split(jax.random.key(cfg.seed), 3)[0]
    data = pipeline.load_dataset(cfg, key_data)
    num_train = saved.metadata["training"]["num_steps"]
    standardizer = fhmv_jax.Standardizer.from_dict(saved.metadata["standardizer"])
    y_test = standardizer.transform(data.features[num_train:])
    from_raw = predict_raw(saved, data.raw[num_train + 1 :])
    direct = predict_regimes(saved.model, y_test, regime_names=saved.metadata["regime_names"])
    np.testing.assert_allclose(from_raw.probabilities, direct.probabilities, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(from_raw.names, direct.names)
    pipeline.check_reload(saved, y_test, direct, from_raw)
    tampered = direct._replace(probabilities=direct.probabilities[::-1])
    with pytest.raises(RuntimeError, match="differ"):
        pipeline.check_reload(saved, y_test, tampered, from_raw)


def test_quick_test_passes(job, capsys):
    assert quick_test.main([]) == 0
    assert "quick test passed" in capsys.readouterr().out


def test_quick_test_reports_a_broken_output(job, capsys):
    _, directory, metrics = job
    assert quick_test.check_outputs(directory, metrics) == []
    assert quick_test.check_outputs(directory, {**metrics, "regime_names": ["x"]}) == [
        "saved regime names differ from the run's"
    ]


def test_train_entry_point_multirun(job, tmp_path):
    result = subprocess.run(
        [sys.executable, "experiments/train.py", "-m", "experiment=tiny", "seed=42,7", "eval.dashboard=false",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted((d for d in tmp_path.iterdir() if (d / "metrics.json").is_file()), key=lambda d: d.name)
    seeds = [fhmv_jax.load(d / "fhmv_model.fhmv").metadata["training"]["seed"] for d in runs]
    assert seeds == [42, 7]
    _, _, metrics = job
    first = json.loads((runs[0] / "metrics.json").read_text())
    assert first["log_likelihoods"] == pytest.approx(metrics["log_likelihoods"], rel=1e-12)


def test_train_entry_point_rejects_an_unknown_key(tmp_path):
    result = subprocess.run([sys.executable, "experiments/train.py", "+bogus=1", f"hydra.run.dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Key 'bogus' not in 'Config'" in result.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_diagnose_reads_the_saved_run_and_writes_its_report(job, tmp_path):
    """experiments/diagnose.py on the tiny job: its training rows are rebuilt from the model file (the saved
    log-likelihood reproduced), every natural parameter gets a row, and the tiny fit (4 EM iterations, no maximum)
    gets no standard errors but says why."""
    import diagnose

    _, directory, _ = job
    cfg = diagnose.validate(OmegaConf.create({"run_dir": str(directory)}))
    with pytest.warns(UserWarning, match="not positive definite"):
        result = diagnose.run(cfg, tmp_path)
    saved = fhmv_jax.load(directory / "fhmv_model.fhmv")
    written = json.loads((tmp_path / "diagnostics.json").read_text())
    assert written["num_observations"] == saved.metadata["training"]["num_steps"] == result["num_observations"]
    assert [row["parameter"] for row in written["parameters"]] == list(
        fhmv_jax.diagnostics.natural_layout(saved.model).labels())
    assert not written["positive_definite"] and written["profile"] is None
    assert written["information_smallest_eigenvalues"][0] < 0
    assert all(label in {row["parameter"] for row in written["parameters"]} for label in written["flagged"])
    assert (tmp_path / "diagnostics.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="kind must be one of"):
        diagnose.validate(OmegaConf.create({"run_dir": str(directory), "kind": "bootstrap"}))
    with pytest.raises(fhmv_jax.ModelFileError, match="no model file"):
        diagnose.run(diagnose.validate(OmegaConf.create({"run_dir": str(tmp_path)})), tmp_path)
    fhmv_jax.save(tmp_path / "fhmv_model.fhmv", saved.model)
    with pytest.raises(ValueError, match="not written by experiments/train.py"):
        diagnose.run(diagnose.validate(OmegaConf.create({"run_dir": str(tmp_path)})), tmp_path)

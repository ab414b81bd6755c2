"""experiments/select_model.py on hand-built sweep directories (no training): table, best choice, CSV, plot, errors.

Each fake job mirrors what a multirun job of experiments/train.py leaves: ``<sweep>/<num>/metrics.json``
(``train.information_criteria``), ``config.yaml`` (the composed config, saved as pipeline.run saves it) and
Hydra's ``.hydra/overrides.yaml`` and ``.hydra/config.yaml``, with ``multirun.yaml`` in the sweep directory.
"""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import schema
import select_model
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
schema.register()

N = 240   # training steps of the tiny experiment (300 steps, train_fraction 0.8)


def _criteria(log_likelihood: float, k: int, n: int) -> dict:
    deviance = -2.0 * log_likelihood
    return {"log_likelihood": log_likelihood, "num_parameters": k, "num_observations": n,
            "aic": deviance + 2 * k, "bic": deviance + k * math.log(n),
            "hqic": deviance + 2 * k * math.log(math.log(n))}


def write_job(sweep: Path, num: int, overrides: list[str], log_likelihood: float, k: int, n: int = N,
              metrics: dict | None = None) -> Path:
    """One finished job, laid out as train.py's multirun leaves it."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = schema.validate(compose("config", overrides=overrides))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
    OmegaConf.save(cfg, job / "config.yaml")
    if metrics is None:
        metrics = {"converged": True, "num_iters": 4, "regime_names": [],
                   "train": {"num_steps": n, "log_likelihood_per_step": log_likelihood / n,
                             "information_criteria": _criteria(log_likelihood, k, n)},
                   "test": {"num_steps": 60, "log_likelihood_per_step": -8.0}}
    (job / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    return job


# (num_regimes, num_components) -> (log-likelihood, k): BIC prefers (3, 1), AIC the larger (4, 2)
GRID = {(2, 1): (-2000.0, 60), (2, 2): (-1960.0, 100), (3, 1): (-1850.0, 80),
        (3, 2): (-1820.0, 130), (4, 1): (-1830.0, 105), (4, 2): (-1700.0, 170)}


@pytest.fixture
def sweep(tmp_path):
    directory = tmp_path / "sweep"
    for num, ((regimes, components), (log_lik, k)) in enumerate(GRID.items()):
        write_job(directory, num, ["experiment=tiny", f"model.num_regimes={regimes}",
                                   f"model.num_components={components}"], log_lik, k)
    return directory


def _expected(criterion: str) -> list[tuple[int, int, float]]:
    """(regimes, components, criterion) sorted by the criterion."""
    rows = [(g, c, _criteria(ll, k, N)[criterion]) for (g, c), (ll, k) in GRID.items()]
    return sorted(rows, key=lambda row: row[2])


def test_rows_are_ranked_by_bic_with_the_right_deltas(sweep):
    selection = select_model.select(sweep)
    assert selection.swept == ["model.num_regimes", "model.num_components"]   # experiment=tiny is shared
    assert selection.size_keys == ["model.num_chains"]
    expected = _expected("bic")
    got = [(int(job.overrides["model.num_regimes"]), int(job.overrides["model.num_components"]),
            job.criteria["bic"]) for job in selection.jobs]
    assert [row[:2] for row in got] == [row[:2] for row in expected]
    assert [row[2] for row in got] == pytest.approx([row[2] for row in expected], rel=1e-15)
    assert (got[0][0], got[0][1]) == (3, 1)
    best = expected[0][2]
    assert [selection.delta(job) for job in selection.jobs] == pytest.approx([row[2] - best for row in expected])
    assert selection.best.name == "2" and selection.best.size["model.num_chains"] == 1


def test_main_writes_table_csv_and_plot(sweep, capsys):
    assert select_model.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "best by BIC: model.num_regimes=3 model.num_components=1 (job 2, k = 80" in out
    table = (sweep / "selection.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(GRID)
    assert rows[0].startswith("| **best** | 2 | 3 | 1 | 1 | 80 | 240 | -1850.00 |")
    assert all("**best**" not in row for row in rows[1:])
    assert rows[-1].endswith(f"| {_expected('bic')[-1][2] - _expected('bic')[0][2]:.2f} |")
    assert "ΔBIC" in table and "n = 240" in table

    with open(sweep / "selection.csv", newline="") as file:
        parsed = list(csv.DictReader(file))
    assert list(parsed[0]) == ["job", "model.num_regimes", "model.num_components", "model.num_chains",
                               "log_likelihood", "num_parameters", "num_observations", "aic", "bic", "hqic",
                               "delta_bic", "best"]
    for row in parsed:
        criteria = _criteria(*GRID[int(row["model.num_regimes"]), int(row["model.num_components"])], N)
        for key in ("log_likelihood", "aic", "bic", "hqic"):
            assert float(row[key]) == criteria[key]   # exact: written at full precision
        assert int(row["num_parameters"]) == criteria["num_parameters"] and int(row["num_observations"]) == N
    assert [row["best"] for row in parsed] == ["True"] + ["False"] * (len(GRID) - 1)
    assert float(parsed[0]["delta_bic"]) == 0.0
    assert [float(row["bic"]) for row in parsed] == sorted(float(row["bic"]) for row in parsed)

    png = (sweep / "selection.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert sorted(p.name for p in sweep.iterdir() if p.is_file()) == [
        "multirun.yaml", "selection.csv", "selection.md", "selection.png"]   # no temporary file left


def test_criterion_and_out_directory(sweep, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "selection"
    assert select_model.main([str(sweep), "--criterion", "aic", "--out", str(out)]) == 0
    assert "best by AIC: model.num_regimes=4 model.num_components=2" in capsys.readouterr().out
    assert (out / "selection.md").is_file() and (out / "selection.png").is_file()
    assert not (sweep / "selection.md").exists()
    with open(out / "selection.csv", newline="") as file:
        parsed = list(csv.DictReader(file))
    assert [float(row["aic"]) for row in parsed] == pytest.approx([row[2] for row in _expected("aic")], rel=1e-15)
    assert "delta_aic" in parsed[0]


def test_three_swept_keys_are_plotted_against_k_and_a_nan_job_goes_last(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    jobs = [(2, 1, "markov", -2000.0, 60), (3, 1, "none", -1900.0, 70), (3, 2, "markov", float("nan"), 120),
            (4, 2, "none", -1800.0, 150)]
    for num, (regimes, components, leverage, log_lik, k) in enumerate(jobs):
        write_job(sweep, num, ["experiment=tiny", f"model.num_regimes={regimes}",
                               f"model.num_components={components}", f"model.leverage={leverage}"], log_lik, k)
    selection = select_model.select(sweep)
    assert selection.swept == ["model.num_regimes", "model.num_components", "model.leverage"]
    assert [job.name for job in selection.jobs] == ["1", "0", "3", "2"]   # BIC 4183.6, 4328.8, 4422.1, nan
    assert select_model.main([str(sweep)]) == 0
    assert (sweep / "selection.png").read_bytes().startswith(b"\x89PNG")
    assert "best by BIC: model.num_regimes=3 model.num_components=1 model.leverage=none (job 1" in \
        capsys.readouterr().out


def test_the_entry_point_runs_as_a_script(sweep):
    result = subprocess.run([sys.executable, "experiments/select_model.py", str(sweep)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best by BIC: model.num_regimes=3 model.num_components=1" in result.stdout
    assert (sweep / "selection.csv").is_file()


def _missing_directory(sweep: Path) -> Path:
    return sweep / "nope"


def _no_metrics(sweep: Path) -> Path:
    for path in sweep.rglob("metrics.json"):
        path.unlink()
    return sweep


def _older_metrics(sweep: Path) -> Path:
    path = sweep / "3" / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["train"]["information_criteria"]   # as the main job wrote it before the criteria
    path.write_text(json.dumps(metrics))
    return sweep


def _corrupt_metrics(sweep: Path) -> Path:
    (sweep / "4" / "metrics.json").write_text('{"train": {')
    return sweep


def _corrupt_overrides(sweep: Path) -> Path:
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text("- a=[1,\n")
    return sweep


BAD_INPUTS = {
    "missing directory": (_missing_directory, ["does not exist"]),
    "no metrics.json": (_no_metrics, ["no metrics.json under"]),
    "older metrics.json": (_older_metrics, ["3/metrics.json has no train.information_criteria", "older version",
                                            "rerun"]),
    "corrupt JSON": (_corrupt_metrics, ["cannot read", "4/metrics.json as JSON"]),
    "corrupt overrides": (_corrupt_overrides, ["1/.hydra/overrides.yaml"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_naming_the_problem(sweep, case, capsys):
    prepare, expected = BAD_INPUTS[case]
    target = prepare(sweep)
    assert select_model.main([str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    for text in expected:
        assert text in captured.err
    assert not (sweep / "selection.md").exists()


def test_jobs_on_different_data_are_refused(tmp_path, capsys):
    sweep = tmp_path / "steps"
    write_job(sweep, 0, ["experiment=tiny", "model.num_regimes=2"], -2000.0, 60)
    write_job(sweep, 1, ["experiment=tiny", "model.num_regimes=3", "data.num_steps=400"], -3000.0, 80, n=320)
    assert select_model.main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "different data" in err and "n = 240 in 0; n = 320 in 1" in err and "same data" in err

    seeds = tmp_path / "seeds"   # same n, but different simulated markets
    write_job(seeds, 0, ["experiment=tiny", "seed=42"], -2000.0, 60)
    write_job(seeds, 1, ["experiment=tiny", "seed=7"], -1990.0, 60)
    assert select_model.main([str(seeds)]) == 2
    err = capsys.readouterr().err
    assert "different data" in err and "seed: 42 in 0; 7 in 1" in err

    standardize = tmp_path / "standardize"   # a different likelihood scale
    write_job(standardize, 0, ["experiment=tiny"], -2000.0, 60)
    write_job(standardize, 1, ["experiment=tiny", "data.standardize=false"], -900.0, 60)
    assert select_model.main([str(standardize)]) == 2
    assert "data.standardize: true in 0; false in 1" in capsys.readouterr().err
    assert not any(path.name.startswith("selection") for path in tmp_path.rglob("*"))

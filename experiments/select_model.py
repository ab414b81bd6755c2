"""Model selection over a multirun of the main job: the information criteria of every job, side by side.

    python experiments/train.py -m model.num_regimes=3,4,5 model.num_components=1,2 hydra.sweep.dir=multirun/size
    python experiments/select_model.py multirun/size                   # by BIC; outputs in the sweep directory
    python experiments/select_model.py multirun/size --criterion aic --out selection/

Reads every job directory under SWEEP_DIR that holds a metrics.json: its information criteria on the
training rows (``train.information_criteria``), its overrides (``.hydra/overrides.yaml``) and its model
size (``config.yaml``, else ``.hydra/config.yaml``). The swept keys are the overrides that differ between
jobs. Writes, atomically, selection.md (the table sorted by the criterion, the best row first and marked),
selection.csv (the same numbers at full precision) and selection.png (AIC, BIC and HQIC against the first
swept key, one line per value of a second; with no or more than two swept keys, against the number of free
parameters k), and prints the table and the best configuration.

Criteria compare fits of the same data only: jobs with different training steps n, different ``data``
settings or, on simulated data, different seeds are refused. Bad input exits with status 2.

The file is not called select.py: next to train.py it would shadow Python's ``select`` module (which
``subprocess`` imports) for every script in this directory.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pipeline  # noqa: E402
import yaml  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fhmv_jax.io import atomic_write_bytes  # noqa: E402

CRITERIA = ("aic", "bic", "hqic")
LABELS = {"aic": "AIC", "bic": "BIC", "hqic": "HQIC"}
FIELDS = ("log_likelihood", "num_parameters", "num_observations", "aic", "bic", "hqic")
SIZE_KEYS = ("model.num_regimes", "model.num_components", "model.num_chains")
MARKDOWN_FILE, CSV_FILE, PLOT_FILE = "selection.md", "selection.csv", "selection.png"


class SelectionError(ValueError):
    """A sweep directory whose jobs cannot be read or compared (the message names the file or the jobs)."""


class Job(NamedTuple):
    """One finished job of the sweep.

    Attributes:
        name: the job directory relative to the sweep directory (``"."`` for the sweep directory itself).
        overrides: override key -> value as Hydra prints it (``.hydra/overrides.yaml``).
        values: override key -> parsed value (numbers stay numbers), for sorting and plotting.
        size: each of ``SIZE_KEYS`` -> its value in the job's config (None without a config or the key).
        criteria: ``FIELDS`` of ``train.information_criteria``.
        data: the settings that fix the data (``data.*``, and ``seed`` on simulated data), or None
            without a config.
    """

    name: str
    overrides: dict[str, str]
    values: dict[str, Any]
    size: dict[str, Any]
    criteria: dict[str, float]
    data: dict[str, Any] | None


class Selection(NamedTuple):
    """The compared jobs, best first by ``criterion``; ``swept``: override keys that differ between jobs."""

    sweep_dir: Path
    criterion: str
    jobs: list[Job]
    swept: list[str]
    size_keys: list[str]

    @property
    def best(self) -> Job:
        return self.jobs[0]

    def delta(self, job: Job) -> float:
        return job.criteria[self.criterion] - self.best.criteria[self.criterion]


def _natural_key(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in Path(name).parts)


def find_metrics(sweep_dir: Path) -> list[Path]:
    """Every metrics.json under ``sweep_dir`` (hidden directories skipped), in job-number order."""
    if not sweep_dir.exists():
        raise SelectionError(f"sweep directory {sweep_dir} does not exist")
    if not sweep_dir.is_dir():
        raise SelectionError(f"{sweep_dir} is not a directory: give the sweep directory of a multirun")
    paths = [p for p in sweep_dir.rglob(pipeline.METRICS_FILE)
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(sweep_dir).parts)]
    if not paths:
        raise SelectionError(f"no {pipeline.METRICS_FILE} under {sweep_dir}: give the sweep directory of a finished"
                             " multirun (hydra.sweep.dir; by default multirun/<date>/<time>)")
    return sorted(paths, key=lambda p: _natural_key(str(p.parent.relative_to(sweep_dir))))


def read_criteria(path: Path) -> dict[str, float]:
    """``train.information_criteria`` of one metrics.json."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SelectionError(f"cannot read {path} as JSON: {error}") from None
    train = metrics.get("train") if isinstance(metrics, dict) else None
    criteria = train.get("information_criteria") if isinstance(train, dict) else None
    if not isinstance(criteria, dict):
        raise SelectionError(f"{path} has no train.information_criteria: it was written by an older version of the"
                             " main job; rerun that job")
    missing = [key for key in FIELDS if not isinstance(criteria.get(key), int | float)
               or isinstance(criteria.get(key), bool)]
    if missing:
        raise SelectionError(f"{path}: train.information_criteria lacks a number for {', '.join(missing)}; rerun the"
                             " job")
    return {key: criteria[key] for key in FIELDS}


def read_overrides(job_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The job's overrides (``.hydra/overrides.yaml``; none without the file): (key -> text, key -> value)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}, {}
    try:
        lines = yaml.safe_load(path.read_text())
        if lines is None:
            lines = []
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise ValueError("not a list of overrides")
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception as error:  # yaml, Hydra's grammar, or the check above
        raise SelectionError(f"cannot read the overrides in {path}: {error}") from None
    texts, values = {}, {}
    for override in overrides:
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        if override.is_delete():
            texts[key], values[key] = "(deleted)", None
        else:
            texts[key], values[key] = override.get_value_element_as_str(), override.value()
    return texts, values


def read_config(job_dir: Path) -> DictConfig | None:
    """The job's config: config.yaml (written by the job), else .hydra/config.yaml; None without either."""
    for path in (job_dir / "config.yaml", job_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                config = OmegaConf.load(path)
            except Exception as error:  # yaml or OmegaConf
                raise SelectionError(f"cannot read the config {path}: {error}") from None
            if not isinstance(config, DictConfig):
                raise SelectionError(f"the config {path} is not a mapping")
            return config
    return None


def _flatten(value, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat or {prefix: {}}
    return {prefix: value}


def data_settings(config: DictConfig | None) -> dict[str, Any] | None:
    """The settings that fix a job's data: ``data.*`` flattened, and ``seed`` when the data are simulated."""
    if config is None or "data" not in config:
        return None
    data = OmegaConf.to_container(config.data, resolve=False)
    settings = _flatten(data, "data")
    if isinstance(data, dict) and data.get("kind", "synthetic") == "synthetic":
        settings["seed"] = config.get("seed")
    return settings


def read_job(sweep_dir: Path, metrics_path: Path) -> Job:
    job_dir = metrics_path.parent
    criteria = read_criteria(metrics_path)
    texts, values = read_overrides(job_dir)
    config = read_config(job_dir)
    size = {key: None if config is None else OmegaConf.select(config, key, default=None,
                                                               throw_on_resolution_failure=False)
            for key in SIZE_KEYS}
    return Job(str(job_dir.relative_to(sweep_dir)), texts, values, size, criteria, data_settings(config))


def _groups(jobs: list[Job], value) -> str:
    """'n = 240 in 0, 1; n = 400 in 2' for ``value(job)`` -> the text of each group."""
    groups: dict[str, list[str]] = {}
    for job in jobs:
        groups.setdefault(value(job), []).append(job.name)
    return "; ".join(f"{text} in {', '.join(names)}" for text, names in groups.items())


def check_same_data(jobs: list[Job]) -> None:
    """Refuse jobs fitted on different data: their criteria are not comparable."""
    why = "information criteria compare fits of the same data only; select among jobs fitted on the same data"
    if len({job.criteria["num_observations"] for job in jobs}) > 1:
        groups = _groups(jobs, lambda job: f"n = {job.criteria['num_observations']}")
        raise SelectionError(f"the jobs were fitted on different data (training steps differ: {groups}); {why}")
    configured = [job for job in jobs if job.data is not None]
    keys = sorted({key for job in configured for key in job.data})
    differing = [key for key in keys if len({json.dumps(job.data.get(key, "(unset)"), sort_keys=True, default=str)
                                             for job in configured}) > 1]
    if differing:
        details = " | ".join(f"{key}: " + _groups(configured, lambda job, key=key: json.dumps(
            job.data.get(key, "(unset)"), default=str)) for key in differing)
        raise SelectionError(f"the jobs were fitted on different data ({details}); {why}")


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value is not the same in every job, in the order they first appear."""
    keys = list(dict.fromkeys(key for job in jobs for key in job.overrides))
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


def _sort_key(criterion: str):
    def key(indexed):
        index, job = indexed
        value = job.criteria[criterion]
        return (not math.isfinite(value), value if math.isfinite(value) else 0.0, index)
    return key


def select(sweep_dir: str | Path, criterion: str = "bic") -> Selection:
    """Read and check every job under ``sweep_dir`` and order them by ``criterion`` (lower first).

    Raises:
        SelectionError: a missing directory, no metrics.json, an unreadable or old metrics.json, or jobs
            fitted on different data (the message names the file or the jobs).
    """
    if criterion not in CRITERIA:
        raise SelectionError(f"unknown criterion {criterion!r}: one of {', '.join(CRITERIA)}")
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(sweep_dir, path) for path in find_metrics(sweep_dir)]
    check_same_data(jobs)
    if not any(math.isfinite(job.criteria[criterion]) for job in jobs):
        raise SelectionError(f"no job under {sweep_dir} has a finite {LABELS[criterion]}")
    jobs = [job for _, job in sorted(enumerate(jobs), key=_sort_key(criterion))]
    swept = swept_keys(jobs)
    size_keys = [key for key in SIZE_KEYS if key not in swept and any(job.size[key] is not None for job in jobs)]
    return Selection(sweep_dir, criterion, jobs, swept, size_keys)


def _cell(value) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def markdown_table(selection: Selection) -> list[str]:
    """The table, one line per row: marker, job, swept keys, size keys, k, n, log-likelihood, criteria, delta."""
    label = LABELS[selection.criterion]
    header = ["", "job", *selection.swept, *selection.size_keys, "k", "n", "log-likelihood",
              *(LABELS[c] for c in CRITERIA), f"Δ{label}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for job in selection.jobs:
        c = job.criteria
        cells = ["**best**" if job is selection.best else "", _cell(job.name),
                 *(_cell(job.overrides.get(key)) for key in selection.swept),
                 *(_cell(job.size[key]) for key in selection.size_keys),
                 str(c["num_parameters"]), str(c["num_observations"]), f"{c['log_likelihood']:.2f}",
                 *(f"{c[key]:.2f}" for key in CRITERIA), f"{selection.delta(job):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def best_line(selection: Selection) -> str:
    best, label = selection.best, LABELS[selection.criterion]
    setting = " ".join(f"{key}={best.overrides[key]}" for key in selection.swept if key in best.overrides)
    where = f"{setting} (job {best.name}, " if setting else f"job {best.name} ("
    line = (f"best by {label}: {where}k = {best.criteria['num_parameters']},"
            f" {label} {best.criteria[selection.criterion]:.2f})")
    if len(selection.jobs) > 1:
        line += f"; next best {label} is {selection.delta(selection.jobs[1]):.2f} higher (job {selection.jobs[1].name})"
    return line


def markdown(selection: Selection) -> str:
    label = LABELS[selection.criterion]
    n = selection.best.criteria["num_observations"]
    lines = [
        f"# Model selection: {selection.sweep_dir}",
        "",
        f"{len(selection.jobs)} jobs, each fitted on the same n = {n} training steps; sorted by {label} (lower is"
        f" better). k: free parameters; Δ{label}: {label} minus the best job's. Swept:"
        f" {', '.join(selection.swept) or 'nothing (the jobs share every override)'}.",
        "",
        *markdown_table(selection),
        "",
        best_line(selection),
        "",
    ]
    return "\n".join(lines)


def csv_text(selection: Selection) -> str:
    """The table at full precision (floats as Python writes them: they parse back to the same numbers)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["job", *selection.swept, *selection.size_keys, *FIELDS, f"delta_{selection.criterion}", "best"])
    for job in selection.jobs:
        writer.writerow([job.name, *(job.overrides.get(key, "") for key in selection.swept),
                         *("" if job.size[key] is None else job.size[key] for key in selection.size_keys),
                         *(job.criteria[key] for key in FIELDS), repr(float(selection.delta(job))),
                         job is selection.best])
    return buffer.getvalue()


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _plot_by_key(axes, selection: Selection) -> None:
    """Each criterion against the first swept key, one line per value of the second."""
    first = selection.swept[0]
    second = selection.swept[1] if len(selection.swept) > 1 else None
    jobs = selection.jobs
    if all(_is_number(job.values.get(first)) for job in jobs):
        position = {job.overrides[first]: job.values[first] for job in jobs}
    else:
        texts = sorted({job.overrides.get(first, "-") for job in jobs}, key=_natural_key)
        position = {text: i for i, text in enumerate(texts)}
    ticks = sorted(set(position.values()))
    labels = [next(text for text, p in position.items() if p == tick) for tick in ticks]
    lines: dict[str, list[Job]] = {}
    for job in jobs:
        lines.setdefault("" if second is None else job.overrides.get(second, "-"), []).append(job)
    for ax, criterion in zip(axes, CRITERIA, strict=True):
        for text in sorted(lines, key=_natural_key):
            members = sorted(lines[text], key=lambda job: position[job.overrides.get(first, "-")])
            xs = [position[job.overrides.get(first, "-")] for job in members]
            ys = [job.criteria[criterion] for job in members]
            ax.plot(xs, ys, marker="o", label=f"{_short(second)} = {text}" if second else None)
            for x, y, job in zip(xs, ys, members, strict=True):
                ax.annotate(f"k={job.criteria['num_parameters']}", (x, y), fontsize=7, xytext=(5, 4),
                            textcoords="offset points")
        best = min((job for job in jobs if math.isfinite(job.criteria[criterion])),
                   key=lambda job: job.criteria[criterion])
        ax.plot(position[best.overrides.get(first, "-")], best.criteria[criterion], marker="*", markersize=16,
                color="gold", markeredgecolor="black", linestyle="none", zorder=5, label="best")
        ax.set_xticks(ticks, labels)
        ax.set_xlabel(first)
        ax.margins(x=0.12)
    axes[0].set_ylabel("criterion (lower is better; k: free parameters)")
    axes[0].legend(fontsize=8)


def _plot_by_k(ax, selection: Selection) -> None:
    """Each criterion against k, one marker per job; the chosen criterion's markers carry the swept values."""
    jobs, chosen = selection.jobs, selection.criterion
    for criterion, marker in zip(CRITERIA, ("s", "o", "^"), strict=True):
        ax.scatter([job.criteria["num_parameters"] for job in jobs], [job.criteria[criterion] for job in jobs],
                   marker=marker, s=50 if criterion == chosen else 30, alpha=1.0 if criterion == chosen else 0.6,
                   label=LABELS[criterion] + (" (chosen)" if criterion == chosen else ""))
    for i, job in enumerate(jobs):
        text = ", ".join(f"{_short(key)}={job.overrides.get(key, '-')}" for key in selection.swept) or job.name
        ax.annotate(text, (job.criteria["num_parameters"], job.criteria[chosen]), fontsize=7,
                    xytext=(6, 6 if i % 2 == 0 else -10), textcoords="offset points")
    best = selection.best
    ax.plot(best.criteria["num_parameters"], best.criteria[chosen], marker="*", markersize=18, color="gold",
            markeredgecolor="black", linestyle="none", zorder=5, label=f"best by {LABELS[chosen]}")
    ax.set(xlabel="free parameters k", ylabel="criterion (lower is better)")
    ax.margins(x=0.1)
    ax.legend(fontsize=8)


def plot(path: Path, selection: Selection) -> None:
    """selection.png: by swept key when one or two keys are swept, else against k."""
    n = selection.best.criteria["num_observations"]
    title = (f"Information criteria of {len(selection.jobs)} jobs (n = {n} training steps; lower is better;"
             f" star: best)")
    if 1 <= len(selection.swept) <= 2:
        figure, axes = plt.subplots(1, 3, figsize=(14, 4.5), layout="constrained")
        _plot_by_key(axes, selection)
        for ax, criterion in zip(axes, CRITERIA, strict=True):
            ax.set_title(LABELS[criterion] + (" (selection criterion)" if criterion == selection.criterion else ""))
            ax.grid(alpha=0.3)
    else:
        figure, ax = plt.subplots(figsize=(9, 6), layout="constrained")
        _plot_by_k(ax, selection)
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def write_outputs(selection: Selection, out_dir: Path) -> list[Path]:
    """selection.md, selection.csv and selection.png in ``out_dir`` (created if needed), each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / MARKDOWN_FILE, out_dir / CSV_FILE, out_dir / PLOT_FILE]
    atomic_write_bytes(paths[0], markdown(selection).encode())
    atomic_write_bytes(paths[1], csv_text(selection).encode())
    plot(paths[2], selection)
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="the multirun's sweep directory (hydra.sweep.dir)")
    parser.add_argument("--out", default=None, help="where to write selection.md/.csv/.png (default: SWEEP_DIR)")
    parser.add_argument("--criterion", choices=CRITERIA, default="bic", help="the criterion to rank by (default: bic)")
    args = parser.parse_args(argv)
    try:
        selection = select(args.sweep_dir, args.criterion)
        out_dir = Path(args.sweep_dir if args.out is None else args.out)
        paths = write_outputs(selection, out_dir)
    except SelectionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write the selection: {error}", file=sys.stderr)
        return 2
    print("\n".join(markdown_table(selection)))
    print(best_line(selection))
    print(f"outputs in {out_dir}: {', '.join(path.name for path in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

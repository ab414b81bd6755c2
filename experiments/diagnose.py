"""Standard errors of a model saved by the main job, on the data it was trained on.

    python experiments/diagnose.py run_dir=outputs/2026-12-02/10-00-00
    python experiments/diagnose.py run_dir=... kind=sandwich profile.parameter='means[2,0,1]'

Loads <run_dir>/fhmv_model.fhmv, rebuilds its training rows from the configuration saved in the model file
(same data, seed, features, standardizer and split; the rebuilt rows must reproduce the saved training
log-likelihood), computes ``fhmv_jax.standard_errors`` with a progress bar over the Hessian chunks, prints a
table (estimate, SE, z, Wald interval) and writes, into this job's Hydra run directory: diagnostics.json (every
row, the flags, the information's smallest eigenvalues and condition number, the information criteria) and
diagnostics.png (estimates with their intervals per parameter group; the profile log-likelihood of one
parameter against its Wald interval and the likelihood-ratio cut-off).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import jax
import matplotlib
import numpy as np
import pipeline
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from scipy.stats import chi2

import fhmv_jax
from fhmv_jax import diagnostics
from fhmv_jax.data import Standardizer
from fhmv_jax.io import atomic_write_bytes

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DIAGNOSTICS_FILE = "diagnostics.json"
FIGURE_FILE = "diagnostics.png"
_LOG_LIKELIHOOD_RTOL = 1e-8
_PROFILE_RISE = 0.01
"""Nats by which the profile may exceed the model's log-likelihood before the model is called no maximum."""


@dataclass
class ProfileConfig:
    parameter: str | None = None
    points: int = 9
    width: float = 3.0


@dataclass
class DiagnoseConfig:
    run_dir: str = MISSING
    kind: str = "hessian"
    level: float = 0.95
    chunk_size: int = 16
    bound_tolerance: float = 1e-6
    profile: ProfileConfig = field(default_factory=ProfileConfig)


ConfigStore.instance().store(name="diagnose_schema", node=DiagnoseConfig)


def training_rows(saved: fhmv_jax.SavedModel) -> np.ndarray:
    """[T, D] the training rows of a model saved by the main job, rebuilt from its saved configuration."""
    metadata = saved.metadata
    if "config" not in metadata or "training" not in metadata:
        raise ValueError("the model file was not written by experiments/train.py (no saved configuration)")
    cfg = OmegaConf.create(metadata["config"])
    key_data = jax.random.split(jax.random.key(cfg.seed), 3)[0]
    data = pipeline.load_dataset(cfg, key_data)
    standardizer = Standardizer.from_dict(metadata["standardizer"])
    y = standardizer.transform(data.features)[: metadata["training"]["num_steps"]]
    expected = metadata["training"]["log_likelihood"]
    got = float(saved.model.log_likelihood(y))
    if not np.isclose(got, expected, rtol=_LOG_LIKELIHOOD_RTOL, atol=0.0):
        raise ValueError(f"the rebuilt training data do not reproduce the saved log-likelihood ({got:.10g} vs"
                         f" {expected:.10g}): the data source changed since training")
    return y


def profile_parameter(errors: diagnostics.StandardErrors, chosen: str | None) -> str:
    """The parameter to profile: ``chosen``, else the first mean with a standard error."""
    if chosen is not None:
        return chosen
    for label, se in zip(errors.labels, errors.standard_errors(), strict=True):
        if label.startswith("means[") and np.isfinite(se):
            return label
    raise ValueError("no mean has a standard error to profile; name one with profile.parameter")


_MAX_TICKS = 30


def _is_variance(label: str) -> bool:
    """Whether a ``covariances[g,k,i,j]`` label is a diagonal entry."""
    index = label[label.index("[") + 1:-1].split(",")
    return index[-1] == index[-2]


def draw(path: Path, errors: diagnostics.StandardErrors, rows: list[dict], profile: diagnostics.Profile | None,
         maximum: float, level: float) -> None:
    """Estimates with Wald intervals per parameter group (covariances: the variances), and the profile
    log-likelihood of one parameter relative to ``maximum``."""
    groups = sorted({row["parameter"].split("[")[0] for row in rows if np.isfinite(row["se"])})
    panels = max(len(groups) + (profile is not None), 1)
    columns = min(3, panels)
    figure, axes = plt.subplots(-(-panels // columns), columns, figsize=(5.5 * columns, 3.6 * -(-panels // columns)),
                                squeeze=False)
    for ax, group in zip(axes.flat, groups, strict=False):
        chosen = [row for row in rows if row["parameter"].split("[")[0] == group and np.isfinite(row["se"])
                  and (group != "covariances" or _is_variance(row["parameter"]))]
        positions = np.arange(len(chosen))
        estimates = np.array([row["estimate"] for row in chosen])
        ax.errorbar(estimates, positions, xerr=[estimates - [r["low"] for r in chosen],
                                                [r["high"] for r in chosen] - estimates], fmt="o", ms=3, capsize=2)
        stride = -(-len(chosen) // _MAX_TICKS)
        ax.set_yticks(positions[::stride], [row["parameter"].removeprefix(group) for row in chosen][::stride],
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{'variances' if group == 'covariances' else group} ({level:.0%} Wald)")
        ax.grid(alpha=0.3)
    if profile is not None:
        ax = axes.flat[len(groups)]
        row = next(r for r in rows if r["parameter"] == profile.parameter)
        ax.plot(profile.values, profile.log_likelihoods - maximum, "o-", label="profile log-likelihood")
        cut = -0.5 * chi2.ppf(level, 1)
        ax.axhline(cut, color="grey", ls="--", label=f"likelihood-ratio {level:.0%} cut-off")
        ax.axvspan(row["low"], row["high"], color="tab:orange", alpha=0.2, label=f"{level:.0%} Wald interval")
        quadratic = -0.5 * ((profile.values - row["estimate"]) / row["se"]) ** 2
        ax.plot(profile.values, quadratic, color="tab:orange", lw=1, label="Wald (quadratic)")
        ax.set_xlabel(profile.parameter)
        ax.set_ylabel("log L - max of the profile")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if not groups:
        axes.flat[0].text(0.5, 0.5, "no standard errors: the observed information is not positive definite\n"
                          f"(smallest eigenvalues {np.array2string(errors.information_eigenvalues[:3], precision=3)})",
                          ha="center", va="center", wrap=True)
        axes.flat[0].set_axis_off()
    for ax in list(axes.flat)[panels:]:
        ax.set_visible(False)
    figure.suptitle(f"{errors.kind} standard errors: {errors.num_identified} identified directions, condition number"
                    f" {errors.condition_number:.3g}")
    figure.tight_layout()
    from io import BytesIO

    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def print_table(rows: list[dict]) -> None:
    print(f"{'parameter':<28}{'estimate':>12}{'SE':>11}{'z':>9}{'low':>12}{'high':>12}  flag")
    for row in rows:
        print(f"{row['parameter']:<28}{row['estimate']:>12.5g}{row['se']:>11.4g}{row['z']:>9.3g}{row['low']:>12.5g}"
              f"{row['high']:>12.5g}  {row['flag']}")


def run(cfg: DictConfig, output_dir: Path) -> dict:
    """Compute, print, write; returns what diagnostics.json holds."""
    model_path = Path(cfg.run_dir) / pipeline.MODEL_FILE
    saved = fhmv_jax.load(model_path)
    y = training_rows(saved)
    errors = fhmv_jax.standard_errors(saved.model, y, kind=cfg.kind, chunk_size=cfg.chunk_size,
                                      bound_tolerance=cfg.bound_tolerance, progress=True)
    rows = errors.table(cfg.level)
    print_table(rows)
    criteria = fhmv_jax.information_criteria(saved.model, y)
    profile = None
    if errors.positive_definite:
        parameter = profile_parameter(errors, cfg.profile.parameter)
        row = next((r for r in rows if r["parameter"] == parameter), None)
        if row is None or not np.isfinite(row["se"]):
            raise ValueError(f"profile.parameter {parameter!r} has no standard error to compare with")
        values = row["estimate"] + np.linspace(-cfg.profile.width, cfg.profile.width, cfg.profile.points) * row["se"]
        profile = diagnostics.profile_log_likelihood(saved.model, y, parameter=parameter, values=values,
                                                     progress=True)
        rise = float(profile.log_likelihoods.max() - criteria.log_likelihood)
        if rise > _PROFILE_RISE:
            print(f"warning: the profile rises {rise:.3g} nats above the model's log-likelihood: the fit is not at the"
                  " maximum of the log-likelihood (EM's tolerance, or its covariance prior); refit with a smaller"
                  " train.tol for standard errors that describe a maximum", file=sys.stderr)
    result = {
        "model": str(model_path), "kind": errors.kind, "level": cfg.level, "num_observations": errors.num_observations,
        "num_identified": errors.num_identified, "positive_definite": errors.positive_definite,
        "information_smallest_eigenvalues": errors.information_eigenvalues.tolist(),
        "condition_number": errors.condition_number, "newton_gain_per_step": errors.newton_gain,
        "flagged": errors.flagged, "information_criteria": criteria.to_dict(), "parameters": rows,
        "profile": None if profile is None else {"parameter": profile.parameter, "values": profile.values.tolist(),
                                                 "log_likelihoods": profile.log_likelihoods.tolist(),
                                                 "rise_above_model": rise},
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output_dir / DIAGNOSTICS_FILE, json.dumps(result, indent=2, allow_nan=True).encode())
    maximum = criteria.log_likelihood if profile is None else max(criteria.log_likelihood,
                                                                     float(profile.log_likelihoods.max()))
    draw(output_dir / FIGURE_FILE, errors, rows, profile, maximum, cfg.level)
    print(f"wrote {output_dir / DIAGNOSTICS_FILE} and {output_dir / FIGURE_FILE}")
    return result


def validate(cfg: DictConfig) -> DictConfig:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DiagnoseConfig), OmegaConf.to_container(cfg))
        OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid configuration: {error}") from None
    if merged.kind not in diagnostics.KINDS:
        raise ValueError(f"kind must be one of {list(diagnostics.KINDS)}, got {merged.kind!r}")
    return merged


@hydra.main(version_base="1.3", config_path="../conf", config_name="diagnose")
def main(cfg: DictConfig) -> None:
    fhmv_jax.enable_x64()
    try:
        run(validate(cfg), Path(HydraConfig.get().runtime.output_dir))
    except (ValueError, fhmv_jax.ModelFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

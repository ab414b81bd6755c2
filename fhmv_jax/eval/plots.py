"""The training dashboard (the only module that imports matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


class DashboardData(NamedTuple):
    """What the dashboard shows; every regime index is already in the named (aligned) order.

    Attributes:
        log_likelihoods: training log-likelihood history (``FitResult.log_likelihoods``).
        split_merge_iterations: history indices after which a split-merge move was accepted.
        names: [G] regime names.
        confusion: [G, G] test counts, rows true regimes, columns predicted.
        true_regimes: [T] true test regimes.
        predicted_regimes: [T] predicted test regimes.
        probabilities: [T, G] test regime probabilities.
        factor_parameters: scalar fitted factor parameters (c1, p, q, ...) by name.
        dof: [G, K] fitted degrees of freedom (``None`` for Gaussian emissions).
        title: the figure title.
    """

    log_likelihoods: np.ndarray
    split_merge_iterations: Sequence[int]
    names: Sequence[str]
    confusion: np.ndarray
    true_regimes: np.ndarray
    predicted_regimes: np.ndarray
    probabilities: np.ndarray
    factor_parameters: Mapping[str, float]
    dof: np.ndarray | None
    title: str


def _convergence(ax, data: DashboardData) -> None:
    iterations = np.arange(len(data.log_likelihoods))
    ax.plot(iterations, data.log_likelihoods, marker="o", markersize=3)
    for number, index in enumerate(data.split_merge_iterations):
        ax.axvline(index + 0.5, color="tab:red", linestyle="--", linewidth=1,
                   label="split-merge move (new start)" if number == 0 else None)
    if data.split_merge_iterations:
        ax.legend(loc="lower right", fontsize="small")
    ax.set(title="Log-likelihood convergence (train)", xlabel="EM iteration (history entry)", ylabel="log-likelihood")
    ax.grid(alpha=0.3)


def _confusion(ax, data: DashboardData) -> None:
    counts = np.asarray(data.confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = counts / counts.sum(axis=1, keepdims=True)
    image = ax.imshow(np.nan_to_num(rates), cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(data.names))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=data.names, yticklabels=data.names)
    ax.set(title="Confusion matrix (test, row-normalised)", xlabel="predicted", ylabel="true")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if rates[i, j] > 0.6 else "black")
    plt.colorbar(image, ax=ax, fraction=0.046)


def _sequence(ax, data: DashboardData) -> None:
    steps = np.arange(len(data.true_regimes))
    ax.step(steps, data.true_regimes, where="post", label="true", linewidth=2, alpha=0.6)
    ax.step(steps, data.predicted_regimes, where="post", label="predicted", linewidth=1)
    ax.set(title="True vs predicted regime (test)", xlabel="step", yticks=np.arange(len(data.names)))
    ax.set_yticklabels(data.names)
    ax.legend(loc="upper right", fontsize=8)


def _heatmap(ax, data: DashboardData) -> None:
    image = ax.imshow(np.asarray(data.probabilities).T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                      interpolation="nearest")
    ax.set(title="Regime probabilities (test)", xlabel="step", yticks=np.arange(len(data.names)))
    ax.set_yticklabels(data.names)
    plt.colorbar(image, ax=ax, fraction=0.046)


def _distribution(ax, data: DashboardData) -> None:
    num = len(data.names)
    positions = np.arange(num)
    true_share = np.bincount(data.true_regimes, minlength=num) / max(len(data.true_regimes), 1)
    predicted_share = np.bincount(data.predicted_regimes, minlength=num) / max(len(data.predicted_regimes), 1)
    ax.bar(positions - 0.2, true_share, width=0.4, label="true")
    ax.bar(positions + 0.2, predicted_share, width=0.4, label="predicted")
    ax.set(title="Regime distribution (test)", ylabel="share of steps", xticks=positions)
    ax.set_xticklabels(data.names)
    ax.legend(fontsize=8)


def _factors(ax, data: DashboardData) -> None:
    lines = [f"{name:>10} = {value:.4g}" for name, value in data.factor_parameters.items()]
    if data.dof is not None:
        lines.append("")
        lines.append("degrees of freedom (per component):")
        lines += [f"{name:>10}: " + ", ".join(f"{v:.1f}" for v in row)
                  for name, row in zip(data.names, data.dof, strict=True)]
    ax.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9,
            transform=ax.transAxes)
    ax.set(title="Fitted factor parameters")
    ax.axis("off")


def training_dashboard(path: str | os.PathLike, data: DashboardData) -> str:
    """Draw the six-panel training dashboard to a PNG, written atomically.

    Panels: log-likelihood convergence, named confusion matrix, true vs predicted regime
    path, regime-probability heat map, predicted regime distribution, fitted factor
    parameters.

    Returns:
        The path written.
    """
    figure, axes = plt.subplots(3, 2, figsize=(15, 14))
    panels = (_convergence, _confusion, _sequence, _heatmap, _distribution, _factors)
    for draw, ax in zip(panels, axes.ravel(), strict=True):
        draw(ax, data)
    figure.suptitle(data.title, fontsize=14)
    figure.tight_layout()
    path = os.fspath(path)
    temporary = path + ".tmp.png"
    try:
        figure.savefig(temporary, dpi=90)
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.remove(temporary)
    return path

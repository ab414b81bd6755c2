"""The dashboards: ``training_dashboard`` (labelled runs) and ``regime_dashboard`` (unlabelled runs).

The only module that imports matplotlib (backend Agg: files only, no display).
"""

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

    The G regimes here are the alignment's reference indices (``RegimeAlignment.reference_names``):
    the true labels, then any extra fitted regimes. A label without a fitted regime has
    probability 0, is never predicted and has a NaN row of ``dof``.

    Attributes:
        log_likelihoods: training log-likelihood history (``FitResult.log_likelihoods``).
        split_merge_iterations: history indices after which a split-merge move was accepted.
        names: [G] regime names.
        confusion: [G, G] test counts, rows true regimes, columns predicted.
        true_regimes: [T] true test regimes.
        predicted_regimes: [T] predicted test regimes.
        probabilities: [T, G] test regime probabilities.
        factor_parameters: scalar fitted factor parameters (c1, p, q, ...) by name.
        dof: [G, K] fitted degrees of freedom (``None`` for Gaussian emissions; NaN rows: no fitted regime).
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
    if len(data.names) > 6:   # e.g. "extra 1", "extra 2" after six labels: keep the tick labels apart
        ax.tick_params(axis="x", labelrotation=30)
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
        lines += [f"{name:>10}: " + (", ".join(f"{v:.1f}" for v in row) if not np.isnan(row).all()
                                      else "(no fitted regime)")
                  for name, row in zip(data.names, np.asarray(data.dof, dtype=float), strict=True)]
    ax.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9,
            transform=ax.transAxes)
    ax.set(title="Fitted factor parameters")
    ax.axis("off")


def _save(figure, path: str | os.PathLike) -> str:
    """Write a figure to a PNG atomically and close it."""
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
    return _save(figure, path)


class RegimeDashboardData(NamedTuple):
    """What the unlabelled dashboard shows: one series, its training rows then its held-out rows.

    Attributes:
        log_likelihoods: training log-likelihood history (``FitResult.log_likelihoods``).
        split_merge_iterations: history indices after which a split-merge move was accepted.
        names: [G] regime names; naming: one line saying where they come from.
        timestamps: [T] datetime64 of each step (or step numbers).
        num_train: the first ``num_train`` steps are training rows.
        regimes: [T] the regime of each step (smoothed on training rows, filtered on held-out rows).
        probabilities: [T, G] the matching regime probabilities.
        volatility: [T] E[s_t | y] (same read-outs), or ``None`` for a spec without volatility factors.
        level: [T] a price level or cumulative return to draw the regimes over, or ``None``.
        level_label: what ``level`` is.
        series: [T] the first model feature (before standardisation); series_label: its name.
        feature_names: [D]; means: [G, D] fitted regime means in feature units.
        factor_parameters: scalar fitted factor parameters (c1, p, q, ...) by name.
        title: the figure title.
    """

    log_likelihoods: np.ndarray
    split_merge_iterations: Sequence[int]
    names: Sequence[str]
    naming: str
    timestamps: np.ndarray
    num_train: int
    regimes: np.ndarray
    probabilities: np.ndarray
    volatility: np.ndarray | None
    level: np.ndarray | None
    level_label: str
    series: np.ndarray
    series_label: str
    feature_names: Sequence[str]
    means: np.ndarray
    factor_parameters: Mapping[str, float]
    title: str


def _colours(num: int) -> list:
    palette = plt.get_cmap("tab10" if num <= 10 else "tab20")
    return [palette(g % palette.N) for g in range(num)]


def _split(ax, data: RegimeDashboardData) -> None:
    if 0 < data.num_train < len(data.timestamps):
        ax.axvline(data.timestamps[data.num_train], color="black", linestyle=":", linewidth=1,
                   label="train | held out")


def _regime_path(ax, data: RegimeDashboardData) -> None:
    x = data.timestamps
    if len(data.names) > 1:
        for g, (name, colour) in enumerate(zip(data.names, _colours(len(data.names)), strict=True)):
            ax.fill_between(x, 0, 1, where=np.asarray(data.regimes) == g, step="mid", color=colour, alpha=0.3,
                            linewidth=0, transform=ax.get_xaxis_transform(), label=name)
    if data.level is not None:
        level = np.asarray(data.level)
        ax.plot(x, level, color="black", linewidth=0.8)
        ax.set_ylabel(data.level_label)
        if level.min() > 0 and level.max() > 10 * level.min():
            ax.set_yscale("log")
    else:
        ax.set_yticks([])
    _split(ax, data)
    ax.legend(loc="upper left", fontsize=8, ncol=min(len(data.names) + 1, 8))
    if len(data.names) > 1:
        title = "Regime path (smoothed on training rows, filtered on held-out rows)"
        title += "" if data.level is not None else ": no price level in the data"
    else:
        title = f"{data.level_label}: one regime, nothing to colour" if data.level is not None else "One regime"
    ax.set(title=title)
    ax.margins(x=0)


def _probabilities(ax, data: RegimeDashboardData) -> None:
    x = data.timestamps
    if len(data.names) > 1:
        ax.stackplot(x, np.asarray(data.probabilities).T, labels=data.names, colors=_colours(len(data.names)),
                     alpha=0.8, step="mid")
        ax.set(title="Regime probabilities", ylabel="P(R_t | y)", ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=7, ncol=min(len(data.names), 6))
    else:
        ax.plot(x, data.series, color="tab:gray", linewidth=0.5)
        ax.set(title=f"{data.series_label}: the model's input (one regime: P(R_t) = 1)", ylabel=data.series_label)
    _split(ax, data)
    ax.margins(x=0)


def _volatility(ax, data: RegimeDashboardData) -> None:
    if data.volatility is None:
        ax.text(0.5, 0.5, "no volatility factors in this spec: s_t = 1", ha="center", va="center",
                transform=ax.transAxes)
        ax.axis("off")
        return
    ax.plot(data.timestamps, data.volatility, color="tab:red", linewidth=0.8)
    ax.set_yscale("log")
    _split(ax, data)
    ax.set(title="Expected volatility scale E[s_t | y] (multiplies the variance; 1 = baseline state)",
           ylabel="E[s_t | y]")
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0)


def _means(ax, data: RegimeDashboardData) -> None:
    means = np.asarray(data.means)
    if means.shape[1] == 1:
        positions = np.arange(len(data.names))
        ax.bar(positions, means[:, 0], color=_colours(len(data.names)))
        for g, value in enumerate(means[:, 0]):
            ax.annotate(f"{value:.4g}", (g, value), ha="center", va="bottom" if value >= 0 else "top", fontsize=9)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(xticks=positions, title=f"Fitted regime means of {data.feature_names[0]} (feature units)",
               ylabel=data.feature_names[0])
        ax.set_xticklabels(data.names)
        return
    spread = means.std(axis=0, keepdims=True)
    z = np.where(spread > 0, (means - means.mean(axis=0, keepdims=True)) / np.where(spread > 0, spread, 1.0), 0.0)
    image = ax.imshow(z, cmap="coolwarm", vmin=-2, vmax=2, aspect="auto")
    ax.set(xticks=np.arange(len(data.feature_names)), yticks=np.arange(len(data.names)))
    ax.set_xticklabels(data.feature_names)
    ax.set_yticklabels(data.names)
    for (g, d), value in np.ndenumerate(means):
        ax.text(d, g, f"{value:.3g}", ha="center", va="center", fontsize=8)
    ax.set(title="Fitted regime means (feature units; colour: z across regimes)")
    plt.colorbar(image, ax=ax, fraction=0.046)


def _summary(ax, data: RegimeDashboardData) -> None:
    regimes = np.asarray(data.regimes)
    share = np.bincount(regimes, minlength=len(data.names)) / max(len(regimes), 1)
    switches = int(np.count_nonzero(np.diff(regimes)))
    lines = [data.naming, "", "share of steps (all rows):"]
    lines += [f"{name:>10}: {s:.1%}" for name, s in zip(data.names, share, strict=True)]
    lines += [f"{'switches':>10}: {switches}", "", "fitted factor parameters:"]
    lines += [f"{name:>10} = {value:.4g}" for name, value in data.factor_parameters.items()]
    ax.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=9, transform=ax.transAxes)
    ax.set(title="Regimes and factor parameters")
    ax.axis("off")


def regime_dashboard(path: str | os.PathLike, data: RegimeDashboardData) -> str:
    """Draw the dashboard of an unlabelled run to a PNG, written atomically.

    Panels: the regime path over the price level (or cumulative return), regime
    probabilities (with one regime: the model's input series), the expected volatility
    scale E[s_t | y], the fitted regime means, the log-likelihood convergence, and a
    summary (naming, shares, factor parameters). Time runs over the training rows and then
    the held-out rows, split by a dotted line.

    Returns:
        The path written.
    """
    figure = plt.figure(figsize=(15, 16))
    grid = figure.add_gridspec(4, 2, height_ratios=(1.2, 1, 1, 1))
    _regime_path(figure.add_subplot(grid[0, :]), data)
    _probabilities(figure.add_subplot(grid[1, 0]), data)
    _volatility(figure.add_subplot(grid[1, 1]), data)
    _means(figure.add_subplot(grid[2, 0]), data)
    _convergence(figure.add_subplot(grid[2, 1]), data)
    _summary(figure.add_subplot(grid[3, :]), data)
    figure.suptitle(data.title, fontsize=14)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    return _save(figure, path)

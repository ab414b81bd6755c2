"""Incremental retraining: monitors that trigger a refit, warm-started ECM, validate-then-deploy.

A deployed model is never replaced blindly. New observations (already standardised with
the deployed model's feature transform) accumulate in a bounded history; monitors decide
when to refit; the candidate is warm-started from the current model on recent plus
retained history, its regimes are matched to the current model's (so names stay with the
same market behaviour), and it is deployed as a new numbered version only if its
log-likelihood on a held-out tail is not worse than the current model's by a margin.
Every version stays on disk; ``ModelRegistry.rollback`` restores any of them.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .em import fit_em
from .eval.regimes import align_to_reference, reorder_regimes
from .io import SavedModel, atomic_write_bytes, load, save
from .model.fhmv import FHMV


class TriggerSettings(NamedTuple):
    """When to retrain; each monitor can be switched off with ``None``.

    Attributes:
        every: data volume: retrain after this many new observations.
        log_likelihood_drop: performance: mean per-step log-likelihood of the recent window
            below the deployed model's validation baseline by more than this (nats).
        accuracy_drop: performance, when labels are given: filtered accuracy of the recent
            window below the baseline accuracy by more than this.
        drift_psi: feature drift: population stability index of any standardised feature,
            recent window against the training window. Sticky regimes make 250-row windows
            differ by chance: on the simulated market the max over 10 features stays mostly
            below 0.3 on stationary data and exceeds 0.5 after a frequency shift.
        anomaly_z: regime anomaly: |z| of the number of regime switches in the recent
            window against the number the model's transition matrix implies.
        recent: rows in the recent window the monitors look at.
    """

    every: int | None = 250
    log_likelihood_drop: float | None = 2.0
    accuracy_drop: float | None = 0.10
    drift_psi: float | None = 0.5
    anomaly_z: float | None = 4.0
    recent: int = 250


class RetrainSettings(NamedTuple):
    """How a candidate is fitted and validated.

    Attributes:
        max_iters: EM iterations of the warm start (fewer than a cold fit needs).
        tol: EM tolerance.
        window: rows of history (retained plus new) the candidate is fitted on, tail included.
        validation: rows at the end of the window held out to validate the candidate.
        margin: the candidate is deployed if its mean per-step log-likelihood on the held-out
            tail is at least the current model's minus this (nats per step).
    """

    max_iters: int = 15
    tol: float = 1e-4
    window: int = 2000
    validation: int = 100
    margin: float = 0.02


DEFAULT_TRIGGERS = TriggerSettings()
DEFAULT_RETRAIN = RetrainSettings()


class Trigger(NamedTuple):
    """One monitor's reading: fired when ``value`` crosses ``threshold``."""

    name: str
    fired: bool
    value: float
    threshold: float

    @classmethod
    def reading(cls, name: str, fired, value, threshold) -> Trigger:
        """A reading with plain Python values (numpy scalars converted)."""
        return cls(name, bool(fired), float(value), float(threshold))


class UpdateReport(NamedTuple):
    """What one ``IncrementalTrainer.observe`` call saw and decided.

    Attributes:
        num_new: observations received since the last refit (this call included).
        triggers: every monitor's reading.
        decision: ``"no retrain"``, ``"deployed"`` or ``"rejected"``.
        version: the deployed version after the call.
        current_score, candidate_score: mean per-step validation log-likelihoods (NaN when
            no candidate was fitted).
        num_iters: EM iterations of the candidate (0 without one).
        seconds: wall time of the call.
    """

    num_new: int
    triggers: tuple[Trigger, ...]
    decision: str
    version: int
    current_score: float
    candidate_score: float
    num_iters: int
    seconds: float

    def describe(self) -> str:
        """One line for logs."""
        fired = [t.name for t in self.triggers if t.fired] or ["none"]
        line = f"v{self.version}: {self.decision} (triggers: {', '.join(fired)}; {self.num_new} new rows"
        if self.num_iters:
            line += (f"; validation log-lik/step current {self.current_score:.4f}"
                     f" vs candidate {self.candidate_score:.4f}")
            line += f", {self.num_iters} EM iterations"
        return line + f"; {self.seconds:.1f} s)"


def population_stability_index(reference, recent, num_bins: int = 10) -> np.ndarray:
    """PSI per feature: sum_b (r_b - e_b) log(r_b / e_b) over quantile bins of ``reference``.

    Args:
        reference: [N, D] rows the bins come from; recent: [M, D].

    Returns:
        [D] PSI values (0 for identical distributions; bin shares are floored at 1e-4).
    """
    reference, recent = np.asarray(reference, float), np.asarray(recent, float)
    if reference.ndim != 2 or recent.ndim != 2 or reference.shape[1] != recent.shape[1]:
        raise ValueError(f"reference and recent must be [N, D] and [M, D], got {reference.shape} and {recent.shape}")
    edges = np.quantile(reference, np.linspace(0, 1, num_bins + 1)[1:-1], axis=0)

    def shares(rows):
        bins = np.stack([np.searchsorted(edges[:, d], rows[:, d], side="right") for d in range(rows.shape[1])], 1)
        counts = np.stack([np.bincount(bins[:, d], minlength=num_bins) for d in range(rows.shape[1])], 1)
        return np.maximum(counts / rows.shape[0], 1e-4)

    expected, actual = shares(reference), shares(recent)
    return np.sum((actual - expected) * np.log(actual / expected), axis=0)


def switch_count_z(model: FHMV, regimes) -> float:
    """z-score of the number of regime switches in a path against the model's chain.

    Under the stationary law pi of A, each step switches with probability
    s = sum_i pi_i (1 - A_ii); the count over M steps is compared to M s with the binomial
    standard deviation (a Markov chain's count is not binomial, so read it as a scale).
    """
    regimes = np.asarray(regimes)
    A = np.asarray(model.natural_parameters()["regime_transition"])
    values, vectors = np.linalg.eig(A.T)
    stationary = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    stationary = stationary / stationary.sum()
    rate = float(np.sum(stationary * (1 - np.diag(A))))
    steps = len(regimes) - 1
    observed = int(np.sum(regimes[1:] != regimes[:-1]))
    return (observed - steps * rate) / max(np.sqrt(steps * rate * (1 - rate)), 1e-12)


def mean_log_likelihood(model: FHMV, y) -> float:
    """Mean per-step log-likelihood of one sequence."""
    return float(model.log_likelihood(y)) / len(y)


class ModelRegistry:
    """Numbered model versions in a directory, one current; every write atomic.

    ``v0001.fhmv, v0002.fhmv, ...`` hold the versions (``fhmv_jax.save`` files); ``CURRENT``
    (JSON) names the deployed one. A crash while deploying leaves the previous current
    version in place.
    """

    _pattern = re.compile(r"^v(\d{4,})\.fhmv$")

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.directory / f"v{version:04d}.fhmv"

    def versions(self) -> list[int]:
        """Version numbers on disk, ascending."""
        found = (self._pattern.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    @property
    def current_version(self) -> int:
        """The deployed version (0 when none was deployed)."""
        pointer = self.directory / "CURRENT"
        if not pointer.exists():
            return 0
        return int(json.loads(pointer.read_text())["version"])

    def _point_to(self, version: int) -> None:
        atomic_write_bytes(self.directory / "CURRENT", json.dumps({"version": version}).encode())

    def deploy(self, model: FHMV, **metadata) -> int:
        """Save ``model`` as the next version and make it current; returns its number."""
        version = max(self.versions(), default=0) + 1
        save(self.path(version), model, version=version, **metadata)
        self._point_to(version)
        return version

    def load(self, version: int | None = None) -> SavedModel:
        """A stored version (the current one by default)."""
        version = self.current_version if version is None else version
        if version not in self.versions():
            raise ValueError(f"no model version {version} in {self.directory}; versions: {self.versions()}")
        return load(self.path(version))

    def rollback(self, version: int) -> None:
        """Make an earlier (or any stored) version current again."""
        if version not in self.versions():
            raise ValueError(f"cannot roll back to version {version}: versions are {self.versions()}")
        self._point_to(version)


class IncrementalTrainer:
    """Feeds new observations to a deployed model and retrains when a monitor fires.

    Args:
        registry: where versions live; its current version is the starting model.
        history: [N, D] standardised observations the current model was trained on; its
            last ``retrain.window`` rows are the drift reference and the retained history.
        labels: optional [N] true regime names' indices into ``label_names``.
        label_names: names the labels index (the model's ``regime_names`` metadata maps
            its regimes to them; a regime whose name is not a label, such as an ``"extra 1"``
            of ``align_to_labels``, matches no label: a step read as it counts as an error).
        triggers, retrain: settings.
        log: called with each report's line (e.g. ``print``; the default is silent).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        history,
        *,
        labels=None,
        label_names: Sequence[str] | None = None,
        triggers: TriggerSettings = DEFAULT_TRIGGERS,
        retrain: RetrainSettings = DEFAULT_RETRAIN,
        log: Callable[[str], None] | None = None,
    ):
        if registry.current_version == 0:
            raise ValueError(f"the registry {registry.directory} has no deployed model")
        if retrain.validation >= retrain.window // 2:
            raise ValueError(f"retrain.validation ({retrain.validation}) must be under half the window "
                             f"({retrain.window})")
        self.registry, self.triggers, self.settings, self.log = registry, triggers, retrain, log
        self.current = registry.load()
        self.history = np.asarray(history, float)
        self.labels = None if labels is None else np.asarray(labels)
        self.label_names = None if label_names is None else list(label_names)
        self.reference = self.history[-retrain.window:]
        self.num_new = 0
        self.baseline = self._baseline(self.reference)

    def _model_labels(self) -> np.ndarray:
        names = self.current.metadata.get("regime_names")
        if self.label_names is None or names is None:
            raise ValueError("labels need label_names and a model saved with regime_names")
        if not set(names) & set(self.label_names):
            raise ValueError(f"none of the model's regime names {list(names)} is a label name {self.label_names}")
        return np.array([self.label_names.index(n) if n in self.label_names else -1 for n in names])

    def _read(self, y) -> tuple[float, np.ndarray]:
        """Mean per-step log-likelihood and filtered regimes of ``y`` under the current model (one pass)."""
        filtered = self.current.model.filter(y)
        return float(filtered.log_likelihood) / len(y), np.asarray(filtered.marginals.regime).argmax(-1)

    def _accuracy(self, regimes, labels) -> float:
        return float(np.mean(self._model_labels()[regimes] == labels))

    def _baseline(self, window) -> dict:
        tail = window[-self.settings.validation:]
        log_likelihood, regimes = self._read(tail)
        baseline = {"log_likelihood": log_likelihood}
        if self.labels is not None:
            baseline["accuracy"] = self._accuracy(regimes, self.labels[-len(tail):])
        return baseline

    def check(self) -> tuple[Trigger, ...]:
        """Every monitor's reading on the recent window."""
        t, recent = self.triggers, self.history[-self.triggers.recent:]
        readings = []
        if t.every is not None:
            readings.append(Trigger.reading("data volume", self.num_new >= t.every, self.num_new, t.every))
        log_likelihood, regimes = self._read(recent)
        if t.log_likelihood_drop is not None:
            drop = self.baseline["log_likelihood"] - log_likelihood
            threshold = t.log_likelihood_drop
            readings.append(Trigger.reading("log-likelihood drop", drop > threshold, drop, threshold))
        if t.accuracy_drop is not None and self.labels is not None:
            drop = self.baseline["accuracy"] - self._accuracy(regimes, self.labels[-len(recent):])
            readings.append(Trigger.reading("accuracy drop", drop > t.accuracy_drop, drop, t.accuracy_drop))
        if t.drift_psi is not None:
            psi = float(population_stability_index(self.reference, recent).max())
            readings.append(Trigger.reading("feature drift (max PSI)", psi > t.drift_psi, psi, t.drift_psi))
        if t.anomaly_z is not None:
            path = np.asarray(self.current.model.smooth(recent).marginals.regime).argmax(-1)
            z = switch_count_z(self.current.model, path)
            readings.append(Trigger.reading("regime switches (z)", abs(z) > t.anomaly_z, z, t.anomaly_z))
        return tuple(readings)

    def observe(self, y_new, labels_new=None, *, force: bool = False) -> UpdateReport:
        """Append new standardised rows, check the monitors, retrain if one fires (or ``force``).

        Args:
            y_new: [M, D] new observations.
            labels_new: [M] their true labels (required if the trainer has labels).
            force: refit regardless of the monitors.
        """
        start = time.perf_counter()
        y_new = np.asarray(y_new, float)
        if y_new.ndim != 2 or y_new.shape[1] != self.history.shape[1]:
            raise ValueError(f"y_new must be [M, {self.history.shape[1]}], got shape {y_new.shape}")
        if not np.all(np.isfinite(y_new)):
            raise ValueError(f"y_new has NaN or inf values in rows {np.flatnonzero(~np.isfinite(y_new).all(1))[:5]}")
        if (self.labels is None) != (labels_new is None):
            raise ValueError("labels_new must be given exactly when the trainer was built with labels")
        self.history = np.concatenate([self.history, y_new])[-max(self.settings.window, self.triggers.recent):]
        if self.labels is not None:
            self.labels = np.concatenate([self.labels, np.asarray(labels_new)])[-len(self.history):]
        self.num_new += len(y_new)
        triggers = self.check()
        if not (force or any(t.fired for t in triggers)):
            return self._report(triggers, "no retrain", start)
        return self._retrain(triggers, start)

    def _retrain(self, triggers, start) -> UpdateReport:
        window = self.history[-self.settings.window:]
        fit_rows, tail = window[: -self.settings.validation], window[-self.settings.validation:]
        fit = fit_em(self.current.model, fit_rows, max_iters=self.settings.max_iters, tol=self.settings.tol)
        candidate = self.align(fit.model, fit_rows)
        current_score = mean_log_likelihood(self.current.model, tail)
        candidate_score = mean_log_likelihood(candidate, tail)
        if candidate_score < current_score - self.settings.margin:
            return self._report(triggers, "rejected", start, current_score, candidate_score, fit.num_iters)
        metadata = {k: v for k, v in self.current.metadata.items() if k not in ("version", "incremental")}
        metadata["incremental"] = {"parent_version": self.registry.current_version, "num_iters": fit.num_iters,
                                   "validation_log_likelihood": candidate_score, "fit_rows": len(fit_rows),
                                   "triggers": [t.name for t in triggers if t.fired]}
        self.registry.deploy(candidate, **metadata)
        self.current = self.registry.load()
        self.reference = window
        self.baseline = self._baseline(window)
        return self._report(triggers, "deployed", start, current_score, candidate_score, fit.num_iters)

    def align(self, candidate: FHMV, y) -> FHMV:
        """The candidate with its regimes put in the current model's order (matched on ``y``)."""
        reference = np.asarray(self.current.model.smooth(y).marginals.regime)
        probs = np.asarray(candidate.smooth(y).marginals.regime)
        names = [str(g) for g in range(reference.shape[1])]
        alignment = align_to_reference(probs, reference, names)
        return reorder_regimes(candidate, np.argsort(alignment.mapping))

    def _report(self, triggers, decision, start, current=float("nan"), candidate=float("nan"), iters=0):
        report = UpdateReport(self.num_new, triggers, decision, self.registry.current_version, current, candidate,
                              iters, time.perf_counter() - start)
        if decision != "no retrain":
            self.num_new = 0
        if self.log is not None:
            self.log(report.describe())
        return report

"""Split-merge moves between regimes (Ueda et al. 2000, adapted to the regime chain).

EM for a regime-switching mixture has a typical local optimum: one true regime whose
observations are bimodal is covered by two fitted regimes that switch back and forth
between themselves, while two true regimes share a single fitted regime (one mixture
component each). No EM step leaves it, since each move would first lower the likelihood.

A split-merge candidate repairs exactly that in one jump: two regimes i, j (a pair that
switches between itself often, A_ij + A_ji high, or a pair with alike emissions) become one regime
(their 2K components reduced to K by
Runnalls' moment-preserving merges), and the freed slot takes half of another regime r
(r's components divided into two groups, each expanded back to K by moment-preserving
splits). The chain laws are lumped and duplicated the same way. ``fit_em`` runs a few EM
iterations on every candidate and keeps one only if it ends above the current model.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from ..model.fhmv import FHMV

_SPLIT_OFFSET = 0.5
"""Moment-preserving split of a Gaussian: means mu +- a sqrt(lambda) v, covariance Sigma - a^2 lambda v v^T."""


_TRANSITION_FLOOR = 0.01
"""Mixed uniformly into the candidate's A: EM never revives a transition probability of exactly zero."""


class Component(NamedTuple):
    """One mixture component: weight (unnormalised), mean [D], covariance [D, D], degrees of freedom."""

    weight: float
    mean: np.ndarray
    covariance: np.ndarray
    dof: float


def collapse(components: list[Component]) -> Component:
    """The single component with the total weight, mean and covariance of a group (moment matching)."""
    weights = np.array([c.weight for c in components])
    total = weights.sum()
    share = weights / total if total > 0 else np.full(len(components), 1 / len(components))
    mean = sum(s * c.mean for s, c in zip(share, components, strict=True))
    covariance = sum(s * (c.covariance + np.outer(c.mean - mean, c.mean - mean))
                     for s, c in zip(share, components, strict=True))
    return Component(total, mean, covariance, float(sum(s * c.dof for s, c in zip(share, components, strict=True))))


def _merge_cost(a: Component, b: Component) -> float:
    """Runnalls' (2007) upper bound on the KL divergence a merge of a and b causes."""
    merged = collapse([a, b])
    return 0.5 * sum(sign * c.weight * np.linalg.slogdet(c.covariance)[1]
                     for sign, c in ((1, merged), (-1, a), (-1, b)))


def reduce_groups(components: list[Component], target: int) -> list[list[Component]]:
    """Greedy Runnalls merging down to ``target`` groups; returns the members of each group."""
    groups = [[c] for c in components]
    while len(groups) > target:
        merged = [collapse(g) for g in groups]
        i, j = min(itertools.combinations(range(len(groups)), 2), key=lambda p: _merge_cost(merged[p[0]], merged[p[1]]))
        groups[i] += groups.pop(j)
    return groups


def split_component(component: Component) -> tuple[Component, Component]:
    """Two equal-weight halves along the principal axis, with the same mean and covariance together."""
    eigenvalues, eigenvectors = np.linalg.eigh(component.covariance)
    offset = _SPLIT_OFFSET * np.sqrt(eigenvalues[-1]) * eigenvectors[:, -1]
    covariance = component.covariance - np.outer(offset, offset)
    half = component.weight / 2
    return (Component(half, component.mean + offset, covariance, component.dof),
            Component(half, component.mean - offset, covariance, component.dof))


def expand(components: list[Component], target: int) -> list[Component]:
    """Split the most spread component (weight x largest eigenvalue) until there are ``target``."""
    components = list(components)
    while len(components) < target:
        spread = [c.weight * np.linalg.eigvalsh(c.covariance)[-1] for c in components]
        components += split_component(components.pop(int(np.argmax(spread))))
    return components


def stationary_law(transition: np.ndarray) -> np.ndarray:
    """Stationary distribution of a stochastic matrix (left eigenvector of eigenvalue 1)."""
    eigenvalues, eigenvectors = np.linalg.eig(transition.T)
    law = np.abs(np.real(eigenvectors[:, np.argmin(np.abs(eigenvalues - 1))]))
    return law / law.sum()


class SplitMerge(NamedTuple):
    """An accepted move: regimes ``merged`` joined into ``merged[0]``; ``split`` divided between
    itself and ``merged[1]``; ``iteration``, the index in ``FitResult.log_likelihoods`` of the
    last value before the move; the penalised log-likelihood before and after (at convergence)."""

    merged: tuple[int, int]
    split: int
    iteration: int
    objective_before: float
    objective_after: float


def candidate_moves(model: FHMV, num_pairs: int = 2) -> list[tuple[tuple[int, int], int]]:
    """(merge pair, split regime) candidates: the ``num_pairs`` pairs that switch between each other
    most (A_ij + A_ji) and the ``num_pairs`` most alike (least Runnalls cost of merging the regimes'
    collapsed, occupancy-weighted emissions), each pair with every other regime to split."""
    natural = _natural_arrays(model)
    transition = natural["regime_transition"]
    G = transition.shape[0]
    occupancy = stationary_law(transition)
    collapsed = [collapse(_regime_components(natural, g, occupancy[g])) for g in range(G)]
    pairs = list(itertools.combinations(range(G), 2))
    switching = sorted(pairs, key=lambda p: -(transition[p] + transition[p[::-1]]))[:num_pairs]
    alike = sorted(pairs, key=lambda p: _merge_cost(collapsed[p[0]], collapsed[p[1]]))[:num_pairs]
    chosen = list(dict.fromkeys(switching + alike))
    return [(pair, r) for pair in chosen for r in range(G) if r not in pair]


def _natural_arrays(model: FHMV) -> dict[str, np.ndarray]:
    """The model's natural parameters as float64 numpy copies (safe to modify)."""
    return {name: np.array(value, dtype=np.float64) for name, value in model.natural_parameters().items()}


def _regime_components(natural: dict, g: int, scale: float = 1.0) -> list[Component]:
    """Regime g's mixture as ``Component`` s, weights multiplied by ``scale``."""
    K = natural["weights"].shape[1]
    dof = natural.get("dof", np.full(natural["weights"].shape, np.inf))
    return [Component(scale * natural["weights"][g, k], natural["means"][g, k], natural["covariances"][g, k],
                      dof[g, k]) for k in range(K)]


def print_split_merge(move: tuple[tuple[int, int], int], before: float, after: float) -> None:
    """Progress line of an accepted move (printed with ``fit_em``'s default progress)."""
    (i, j), r = move
    print(f"split-merge: regimes {i}+{j} merged, regime {r} split; penalised log-lik {before:.6f} -> {after:.6f}"
          " after the trial iterations; continuing", flush=True)


def _relabelled_chain(transition: np.ndarray, initial: np.ndarray, i: int, j: int, r: int):
    """Lump regimes i and j (into slot i) and duplicate r into slot j: stationary flows pi_a A_ab are
    summed over lumped regimes, and r's flows are shared equally by r and j (its self-flow kept on the
    diagonal); then ``_TRANSITION_FLOOR`` of every row is spread uniformly."""
    G = transition.shape[0]
    lump = np.eye(G)
    lump[j] = 0.0
    lump[j, i] = 1.0
    flows = lump.T @ (stationary_law(transition)[:, None] * transition) @ lump
    spread = np.eye(G)
    spread[r, j] = spread[r, r] = 0.5
    new_flows = spread.T @ flows @ spread
    new_flows[[r, r, j, j], [r, j, r, j]] = flows[r, r] / 2 * np.array([1.0, 0.0, 0.0, 1.0])
    rows = new_flows.sum(axis=1, keepdims=True)
    new_transition = np.where(rows > 0, new_flows / np.where(rows > 0, rows, 1.0), np.eye(G))
    new_initial = spread.T @ lump.T @ initial
    return (1 - _TRANSITION_FLOOR) * new_transition + _TRANSITION_FLOOR / G, new_initial / new_initial.sum()


def merge_split_candidate(model: FHMV, merged: tuple[int, int], r: int) -> FHMV:
    """Regimes i and j merged into slot i; regime r divided between slots r and j.

    Args:
        model: a fitted model with at least 3 regimes.
        merged: (i, j), the regimes to merge; r: the regime to split (not i or j).

    Returns:
        A new ``FHMV`` with the same factor parameters.
    """
    i, j = merged
    if len({i, j, r}) != 3:
        raise ValueError(f"merge pair ({i}, {j}) and split regime {r} must be three different regimes")
    spec = model.spec
    natural = _natural_arrays(model)
    K = spec.num_components
    occupancy = stationary_law(natural["regime_transition"])
    pooled = _regime_components(natural, i, occupancy[i]) + _regime_components(natural, j, occupancy[j])
    merged = [collapse(group) for group in reduce_groups(pooled, K)]
    halves = [expand(group, K) for group in reduce_groups(expand(_regime_components(natural, r), 2), 2)]
    for slot, regime_components in ((i, merged), (r, halves[0]), (j, halves[1])):
        total = sum(c.weight for c in regime_components)
        natural["weights"][slot] = [c.weight / total for c in regime_components]
        natural["means"][slot] = [0 * c.mean if spec.zero_mean else c.mean for c in regime_components]
        natural["covariances"][slot] = [c.covariance for c in regime_components]
        if "dof" in natural:
            natural["dof"][slot] = [c.dof for c in regime_components]
    natural["regime_transition"], natural["initial_regime"] = _relabelled_chain(
        natural["regime_transition"], natural["initial_regime"], i, j, r
    )
    return FHMV.from_natural_parameters(spec, dtype=model.dtype, **natural)

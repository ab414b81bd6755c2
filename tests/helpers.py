"""Independent references for the tests: numpy/scipy only, no fhmv_jax internals.

The brute-force references build the full S x S transition from natural parameters
(Kronecker products), emissions from ``scipy.stats`` and enumerate every joint path.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats
from scipy.special import logsumexp


def random_natural(spec, rng: np.random.Generator, *, separation: float = 1.0) -> dict[str, np.ndarray]:
    """Valid random natural parameters for ``spec`` (means spread by ``separation``)."""
    G, K, D, N, M = spec.num_regimes, spec.num_components, spec.num_features, spec.num_chains, spec.num_jump_states
    transition = rng.uniform(0.2, 1.0, (G, G)) + np.eye(G) * 2
    weights = rng.uniform(0.3, 1.0, (G, K))
    factor = rng.normal(size=(G, K, D, D)) * 0.3
    natural = {
        "initial_regime": rng.dirichlet(np.ones(G) * 2),
        "regime_transition": transition / transition.sum(1, keepdims=True),
        "weights": weights / weights.sum(1, keepdims=True),
        "means": rng.normal(size=(G, K, D)) * separation,
        "covariances": factor @ np.swapaxes(factor, -1, -2) + np.eye(D) * rng.uniform(0.5, 1.5, (G, K, 1, 1)),
    }
    if not spec.gaussian:
        natural["dof"] = rng.uniform(3.0, 20.0, (G, K))
    if N:
        p = rng.uniform(0.6, 0.95, N)
        natural["persistence_stay"] = np.full(N, p[0]) if spec.tied_persistence else p
        natural["c1"] = np.array(rng.uniform(1.5, 3.0))
    if N >= 2:
        natural["theta_c"] = np.array(rng.uniform(0.2, 0.8))
    if M >= 2:
        natural["jump_transition"] = jump_matrix(spec, rng)
        natural["m1"] = np.array(rng.uniform(2.0, 4.0))
    if M >= 3:
        natural["theta_m"] = np.array(rng.uniform(0.2, 0.8))
    if spec.leverage == "predictable":
        natural["l1"] = np.array(rng.uniform(0.5, 2.0))
        if spec.num_leverage_lags >= 2:
            natural["theta_l"] = np.array(rng.uniform(0.2, 0.8))
    if spec.leverage == "markov":
        natural["l1"] = np.array(rng.uniform(1.5, 3.0))
        logits = np.zeros((2, 2, 2))
        logits[..., 1] = rng.normal(size=(2, 2))
        natural["leverage_logits"] = logits
    return natural


def jump_matrix(spec, rng) -> np.ndarray:
    M = spec.num_jump_states
    if spec.jump_mode == "markov":
        q, q_back = rng.uniform(0.05, 0.4), rng.uniform(0.2, 0.7)
        return np.array([[1 - q, q], [q_back, 1 - q_back]])
    q = rng.uniform(0.05, 0.4)
    phi = 0.0 if spec.jump_mode == "iid" else rng.uniform(0.1, 0.8)
    law = np.concatenate([[1 - q], np.full(M - 1, q / (M - 1))])
    return phi * np.eye(M) + (1 - phi) * law[None, :]


# ----------------------------------------------------------------------------------------
# an independent numpy/scipy implementation of the model on the flattened state space


def _factor_values(spec, natural, x):
    """Per-axis scale contributions and initial laws, written from MODEL.md directly."""
    N, M = spec.num_chains, spec.num_jump_states
    axes = [("regime", natural["initial_regime"], None)]
    for n in range(N):
        c_n = 1 + natural.get("theta_c", 1.0) ** n * (natural["c1"] - 1)
        axes.append(("chain", np.array([0.5, 0.5]), np.array([1.0, c_n])))
    if M >= 2:
        P = natural["jump_transition"]
        w, v = np.linalg.eig(P.T)
        stationary = np.real(v[:, np.argmin(np.abs(w - 1))])
        m = [1.0] + [1 + natural.get("theta_m", 1.0) ** (j - 1) * (natural["m1"] - 1) for j in range(1, M)]
        axes.append(("jump", stationary / stationary.sum(), np.array(m)))
    if spec.leverage == "markov":
        axes.append(("leverage", np.array([0.5, 0.5]), np.array([1.0, natural["l1"]])))
    return axes


def reference_leverage(spec, natural, x, T) -> np.ndarray:
    """L_t for predictable leverage by a plain loop (ones otherwise)."""
    L = np.ones(T)
    if spec.leverage != "predictable":
        return L
    g = np.zeros(T)
    theta = natural.get("theta_l", 1.0)
    for t in range(T):
        for i in range(1, min(spec.num_leverage_lags, t) + 1):
            L[t] *= 1 + natural["l1"] * theta ** (i - 1) * g[t - i]
        g[t] = abs(x[t]) * (x[t] < 0) / math.sqrt(L[t])
    return L


def reference_transitions(spec, natural, x, T) -> np.ndarray:
    """[T, S, S] full transition matrices (entry t maps t-1 -> t) by Kronecker products."""
    mats = [natural["regime_transition"]]
    for p in natural.get("persistence_stay", []):
        mats.append(np.array([[p, 1 - p], [1 - p, p]]))
    if spec.num_jump_states >= 2:
        mats.append(natural["jump_transition"])
    full = []
    for t in range(T):
        current = list(mats)
        if spec.leverage == "markov":
            a, b = natural["leverage_logits"]
            x_prev = x[t - 1] if t >= 1 else 0.0
            logits = a + b * x_prev
            current.append(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
        kron = np.ones((1, 1))
        for m in current:
            kron = np.kron(kron, m)
        full.append(kron)
    return np.stack(full)


def reference_log_emissions(spec, natural, y, x) -> np.ndarray:
    """[T, S] log p(y_t | h) with scipy densities and the covariance Lambda Sigma Lambda."""
    T, D = y.shape
    axes = _factor_values(spec, natural, x)
    scales = np.ones(1)
    for _, _, values in axes[1:]:
        scales = np.multiply.outer(scales, values).reshape(-1)
    L = reference_leverage(spec, natural, x, T)
    mask = np.ones(D) if spec.scale_mask is None else np.asarray(spec.scale_mask, float)
    out = np.empty((T, spec.num_regimes, scales.size))
    for t in range(T):
        for g in range(spec.num_regimes):
            for v, base in enumerate(scales):
                s = base * L[t]
                lam = np.diag(s ** (mask / 2))
                comps = []
                for k in range(spec.num_components):
                    cov = lam @ natural["covariances"][g, k] @ lam
                    mean = natural["means"][g, k]
                    if spec.gaussian:
                        dens = stats.multivariate_normal(mean, cov).logpdf(y[t])
                    else:
                        dens = stats.multivariate_t(mean, cov, df=natural["dof"][g, k]).logpdf(y[t])
                    comps.append(np.log(natural["weights"][g, k]) + dens)
                out[t, g, v] = logsumexp(comps)
    return out.reshape(T, -1)


def reference_initial(spec, natural, x) -> np.ndarray:
    law = np.ones(1)
    for _, initial, _ in _factor_values(spec, natural, x):
        law = np.multiply.outer(law, initial).reshape(-1)
    return law


def brute_force(spec, natural, y, x):
    """Enumerate every joint path: log-likelihood, filtered/smoothed marginals, pairwise, Viterbi.

    Returns a dict with ``loglik``, ``filtered`` [T, S], ``smoothed`` [T, S],
    ``pairwise`` [T-1, S, S] (the full xi, for the test only) and ``viterbi`` [T] flat states.
    """
    T = y.shape[0]
    log_b = reference_log_emissions(spec, natural, y, x)
    log_P = np.log(reference_transitions(spec, natural, x, T))
    log_pi = np.log(reference_initial(spec, natural, x))
    S = log_b.shape[1]
    paths = np.array(list(itertools.product(range(S), repeat=T)))
    log_joint = log_pi[paths[:, 0]] + log_b[0, paths[:, 0]]
    for t in range(1, T):
        log_joint = log_joint + log_P[t, paths[:, t - 1], paths[:, t]] + log_b[t, paths[:, t]]
    loglik = logsumexp(log_joint)
    weights = np.exp(log_joint - loglik)
    smoothed = np.zeros((T, S))
    pairwise = np.zeros((max(T - 1, 0), S, S))
    for t in range(T):
        np.add.at(smoothed[t], paths[:, t], weights)
        if t:
            np.add.at(pairwise[t - 1], (paths[:, t - 1], paths[:, t]), weights)
    filtered = np.zeros((T, S))
    for t in range(T):
        prefix = log_pi[paths[:, 0]] + log_b[0, paths[:, 0]]
        for u in range(1, t + 1):
            prefix = prefix + log_P[u, paths[:, u - 1], paths[:, u]] + log_b[u, paths[:, u]]
        # every prefix appears S^(T-1-t) times with equal weight, which normalising removes
        w = np.exp(prefix - logsumexp(prefix))
        np.add.at(filtered[t], paths[:, t], w)
    return {
        "loglik": loglik,
        "filtered": filtered,
        "smoothed": smoothed,
        "pairwise": pairwise,
        "viterbi": paths[np.argmax(log_joint)],
        "viterbi_log_prob": np.max(log_joint),
    }


def path_log_prob(spec, natural, y, x, path) -> float:
    """log p(h_{1:T} = path, y_{1:T}) of one joint path (flat states [T])."""
    log_b = reference_log_emissions(spec, natural, y, x)
    log_P = np.log(reference_transitions(spec, natural, x, y.shape[0]))
    log_pi = np.log(reference_initial(spec, natural, x))
    total = log_pi[path[0]] + log_b[0, path[0]]
    for t in range(1, len(path)):
        total += log_P[t, path[t - 1], path[t]] + log_b[t, path[t]]
    return float(total)


FIT_OPTIONS = {"block_steps": None, "method": "auto", "batch_chunk": None, "mesh": None}
"""The objective's options as ``fit_em`` passes them to ``check_score``'s gradient and to its evaluation: called
with these, a test reuses the fit's compiled programs."""

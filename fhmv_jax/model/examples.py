"""A default-spec model with plausible parameters, for demos, benchmarks and recovery tests."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

from .._compile import llvm_o2
from .._types import Array, PRNGKeyArray
from .fhmv import FHMV
from .spec import ModelSpec


def example_model(key: PRNGKeyArray) -> FHMV:
    """The default spec (G=6, N=2, N_M=2, K=2, D=10, markov leverage) with plausible parameters.

    Regime means are spread out (sd 1.5 per feature); each regime's two components sit close
    to its mean (sd 0.3), so the regimes are what separates the data and the components
    shape it.
    """
    spec = ModelSpec(driver_feature=5)
    G, K, D = spec.num_regimes, spec.num_components, spec.num_features
    means, factor = (np.asarray(a) for a in _draws(key, G, K, D))
    A = np.full((G, G), 0.05 / (G - 1)) + np.eye(G) * (0.95 - 0.05 / (G - 1))
    factor = factor * 0.2
    return FHMV.from_natural_parameters(
        spec,
        initial_regime=np.full(G, 1 / G),
        regime_transition=A,
        weights=np.full((G, K), 1 / K),
        means=means,
        covariances=factor @ np.swapaxes(factor, -1, -2) + 0.5 * np.eye(D),
        dof=np.full((G, K), 8.0),
        persistence_stay=np.full(2, 0.98),
        c1=2.0,
        theta_c=0.5,
        jump_transition=np.array([[0.95, 0.05], [0.3, 0.7]]),
        m1=3.0,
        l1=1.5,
        leverage_logits=np.stack([np.array([[0.0, -2.0], [0.0, 2.0]]), np.array([[0.0, -1.0], [0.0, -1.0]])]),
    )


@partial(jax.jit, static_argnums=(1, 2, 3), compiler_options=llvm_o2())
def _draws(key: PRNGKeyArray, G: int, K: int, D: int) -> tuple[Array, Array]:
    """The example's random means [G, K, D] and covariance factors [G, K, D, D] (one compiled program, at LLVM
    -O2: 0.6 s to compile instead of 4.9 s at -O3, the same draws; docs/benchmarks.md)."""
    k_regime, k_component, k_cov = jax.random.split(key, 3)
    means = 1.5 * jax.random.normal(k_regime, (G, 1, D)) + 0.3 * jax.random.normal(k_component, (G, K, D))
    return means, jax.random.normal(k_cov, (G, K, D, D))

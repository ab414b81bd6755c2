"""Run JAX strictly in every test: float64 and no implicit rank promotion."""

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import fhmv_jax  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(20261124)


TINY_SPECS = {
    "markov": fhmv_jax.ModelSpec(num_features=2, num_regimes=2, num_chains=1, num_jump_states=2, num_components=2),
    "predictable": fhmv_jax.ModelSpec(
        num_features=2, num_regimes=2, num_chains=1, num_jump_states=2, num_components=2,
        leverage="predictable", num_leverage_lags=2,
    ),
    "none": fhmv_jax.ModelSpec(
        num_features=2, num_regimes=2, num_chains=1, num_jump_states=2, num_components=2, leverage="none"
    ),
    "family-mask-gaussian": fhmv_jax.ModelSpec(
        num_features=3, num_regimes=2, num_chains=1, num_jump_states=3, num_components=2, leverage="predictable",
        num_leverage_lags=3, jump_mode="family", gaussian=True, scale_mask=(True, False, True),
    ),
    "iid-untied": fhmv_jax.ModelSpec(
        num_features=2, num_regimes=2, num_chains=2, num_jump_states=2, num_components=1, leverage="none",
        jump_mode="iid", tied_persistence=False,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop each module's compiled executables: hundreds of specs and shapes otherwise exhaust
    the process's memory maps (LLVM then fails with "Cannot allocate memory")."""
    yield
    jax.clear_caches()

"""Run JAX strictly in every test: float64, no implicit rank or dtype promotion.

Compiled programs persist in ``$FHMV_TEST_CACHE_ROOT`` (JAX's compilation cache; default ``.pytest_cache/jax``),
one directory for every xdist worker and the entry-point subprocesses they start, so a program compiled by one
is loaded by the others. The cache is bounded (``jax_compilation_cache_max_size``), which makes JAX read and write
its entries under a file lock (the ``filelock`` package): without it, two processes reading and writing the same
entry at once crashed JAX's cache (an abort in a read, a segfault in a write).

Every compiled program holds a few memory mappings of its machine code (one spec's ``init_model`` and
``fit_em``: about 180 programs, 2,700 mappings), and a worker that kept every program of the suite would pass
the kernel's limit of 65,530 and crash inside XLA. So after a test module, once the process holds more than
``MAPPING_BUDGET`` mappings, compiled programs are released; a later module that needs one again loads it from
the cache directory.
"""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(os.environ.get("FHMV_TEST_CACHE_ROOT", Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(ROOT)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
jax.config.update("jax_compilation_cache_dir", str(ROOT))
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import fhmv_jax  # noqa: E402

MAPPING_BUDGET = 30_000


def _mappings() -> int:
    """Memory mappings of this process (Linux); where unknown, more than ``MAPPING_BUDGET``."""
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return MAPPING_BUDGET + 1


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    if _mappings() > MAPPING_BUDGET:
        jax.clear_caches()


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

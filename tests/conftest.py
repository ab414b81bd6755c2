"""Run JAX strictly in every test: float64, no implicit rank or dtype promotion.

Compiled programs persist in ``$FHMV_TEST_CACHE_ROOT/<worker>`` (JAX's compilation cache; the root defaults
to ``.pytest_cache/jax``), one directory per xdist worker, shared with the entry-point subprocesses it starts:
two workers reading and writing the same entries at once crashed JAX's cache (an abort in a read, a segfault in
a write) on a fresh clone. The worker's name is known from ``pytest_configure`` on, before anything compiles.

Every compiled program holds a few memory mappings of its machine code (one spec's ``init_model`` and
``fit_em``: about 180 programs, 2,700 mappings), and a worker that keeps every program of the suite passes
the kernel's limit of 65,530 and crashes inside XLA. So compiled programs are released after each test module;
a later module that needs one again loads it from the worker's cache directory.

XLA compilation is about 70% of the suite's time (1,900 of 2,750 worker-seconds, measured with JAX's
compile events), mostly small kernels: XLA:CPU builds each fusion in an MLIR context of its own. The suite
and its subprocesses compile with XLA's classic LLVM emitters instead (``--xla_cpu_use_fusion_emitters=false``,
unless ``XLA_FLAGS`` already names the option): ``tests/test_inference.py`` alone took 198 s (226 CPU-seconds)
with the default and 140 s (126) with them (docs/benchmarks.md).
"""

import os
from pathlib import Path

if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(os.environ.get("FHMV_TEST_CACHE_ROOT", Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import fhmv_jax  # noqa: E402


def pytest_configure(config):
    """Point JAX's compilation cache (and the subprocesses' environment) at this worker's own directory."""
    directory = str(ROOT / getattr(config, "workerinput", {}).get("workerid", "main"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    jax.config.update("jax_compilation_cache_dir", directory)


SHARED_PROGRAMS = {"test_em.py": "tiny-specs", "test_same_numbers.py": "tiny-specs", "test_streaming.py": "tiny-specs"}
"""Modules that compile the same programs (the tiny specs' ECM step on the [2, 60] ragged batch, their filter on
60 steps), so one worker runs them one after the other and the later ones find those programs in its cache.
Every other module is a work unit of its own, as with ``--dist loadscope``."""


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` with the modules of ``SHARED_PROGRAMS`` in one scope. (xdist's own ``loadgroup`` cannot
    do this with this pytest: it renames ``item._nodeid``, which ``item.nodeid`` no longer reads.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedProgramScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return SHARED_PROGRAMS.get(module, module)

    return SharedProgramScheduling(config, log)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
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

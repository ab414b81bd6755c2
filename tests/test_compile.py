"""The compiler settings of the jitted ECM step (and the diagnostics): probed, optional, and without effect on
the numbers."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import TINY_SPECS
from helpers import random_natural

from fhmv_jax import FHMV, _compile
from fhmv_jax.em import em_step
from fhmv_jax.em.m_step import CovariancePrior


def _fresh_options():
    _compile.compiler_options.cache_clear()
    try:
        return _compile.compiler_options()
    finally:
        _compile.compiler_options.cache_clear()


def test_options_are_probed():
    assert jax.default_backend() == "cpu"
    assert "ELTWISE" in _fresh_options()[_compile._OPTION]


def test_the_diagnostics_compile_with_the_classic_emitters():
    assert _compile.classic_emitters() == {"xla_cpu_use_fusion_emitters": False}


def test_an_option_this_jaxlib_rejects_is_left_out(monkeypatch):
    monkeypatch.setattr(_compile, "_FUSIONS", "LIBRARY_FUSION_TYPE_NO_SUCH_KIND")
    assert _fresh_options() == {}


def test_em_step_matches_the_default_compilation(rng):
    spec = TINY_SPECS["markov"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    T = 300
    y = jnp.asarray(rng.normal(size=(2, T, spec.num_features)))
    x = jnp.asarray(rng.normal(size=(2, T)))
    mask = jnp.arange(T)[None, :] < jnp.array([[T], [T - 50]])
    y = jnp.where(mask[..., None], y, 0.0)
    prior = CovariancePrior(jnp.asarray(1e-2), jnp.asarray(1e-2))
    assert _compile.compiler_options(), "the tuned compilation is what this test compares"
    tuned, tuned_info = em_step(model, y, x, mask, prior)
    plain, plain_info = em_step.plain(model, y, x, mask, prior)
    np.testing.assert_allclose(tuned_info.log_likelihood, plain_info.log_likelihood, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    compiled = em_step.lower(model, y, x, mask, prior).compile()
    np.testing.assert_allclose(compiled(model, y, x, mask, prior)[1].log_likelihood, tuned_info.log_likelihood, rtol=0)
    default = em_step.plain.lower(model, y, x, mask, prior).compile()
    library_fusions = [c.compiled.as_text().count("__ynn_fusion") for c in (compiled, default)]
    assert library_fusions[0] > library_fusions[1], "elementwise fusions go to YNNPACK only with the options"


def test_inside_a_callers_jit_the_plain_compilation_runs(rng):
    spec = TINY_SPECS["none"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y = jnp.asarray(rng.normal(size=(1, 50, spec.num_features)))
    mask = jnp.ones((1, 50), bool)
    prior = CovariancePrior(jnp.asarray(1e-2), jnp.asarray(1e-2))
    nested = jax.jit(lambda m: em_step(m, y, None, mask, prior)[1].log_likelihood)(model)
    np.testing.assert_allclose(nested, em_step(model, y, None, mask, prior)[1].log_likelihood, rtol=1e-12)

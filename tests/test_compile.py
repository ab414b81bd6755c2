"""The compiler settings of the jitted ECM step: probed, optional, and without effect on the numbers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural

from fhmv_jax import FHMV, _compile
from fhmv_jax.em import em_step
from fhmv_jax.em.loop import _em_step
from fhmv_jax.em.m_step import CovariancePrior


def _fresh_options(monkeypatch, **env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _compile.compiler_options.cache_clear()
    try:
        return _compile.compiler_options()
    finally:
        _compile.compiler_options.cache_clear()


def test_options_are_probed_and_can_be_switched_off(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert "ELTWISE" in _fresh_options(monkeypatch)[_compile._OPTION]
    assert _fresh_options(monkeypatch, FHMV_JAX_XLA_DEFAULTS="1") == {}


def test_an_option_this_jaxlib_rejects_is_left_out(monkeypatch):
    monkeypatch.setattr(_compile, "_FUSIONS", "LIBRARY_FUSION_TYPE_NO_SUCH_KIND")
    assert _fresh_options(monkeypatch) == {}


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
    plain, plain_info = eqx.filter_jit(_em_step)(model, y, x, mask, prior)
    np.testing.assert_allclose(tuned_info.log_likelihood, plain_info.log_likelihood, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(tuned.params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    compiled = em_step.lower(model, y, x, mask, prior).compile()
    np.testing.assert_allclose(compiled(model, y, x, mask, prior)[1].log_likelihood, tuned_info.log_likelihood, rtol=0)
    default = eqx.filter_jit(_em_step).lower(model, y, x, mask, prior).compile()
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


def test_a_failed_library_fusion_falls_back_to_the_default_compilation():
    calls = []

    def failing(*args):
        calls.append(args)
        raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: Instruction with unsupported layout in YNN fusion")

    doubled = _compile.fast_jit(lambda a: 2 * a, lambda a: True)
    doubled.tuned = failing
    np.testing.assert_array_equal(doubled(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(doubled(jnp.arange(2.0)), [0.0, 2.0])
    assert len(calls) == 1, "after one failure the default compilation is used from then on"

    other = _compile.fast_jit(lambda a: a, lambda a: True)
    other.tuned = lambda *args: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory"))
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        other(jnp.ones(2))

"""ModelSpec validation and the natural <-> unconstrained parameter maps."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import random_natural
from jax.flatten_util import ravel_pytree

import fhmv_jax
from fhmv_jax import FHMV, ModelSpec
from fhmv_jax.model import JumpChain, NoLeverage


def test_default_spec_sizes():
    spec = ModelSpec()
    assert spec.state_shape == (6, 2, 2, 2, 2)
    assert spec.num_states == 96
    assert spec.factor_names == ("regime", "chain_1", "chain_2", "jump", "leverage")
    assert ModelSpec(leverage="predictable").num_states == 48


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_components": 0}, "num_components"),
        ({"num_jump_states": 0}, "num_jump_states"),
        ({"num_regimes": 0}, "num_regimes"),
        ({"num_chains": -1}, "num_chains"),
        ({"num_features": 2.5}, "num_features"),
        ({"scale_mask": (True, False)}, "scale_mask has 2 entries"),
        ({"scale_mask": (False,) * 10}, "flags no feature"),
        ({"leverage": "trend"}, "leverage must be one of"),
        ({"jump_mode": "poisson"}, "jump_mode must be one of"),
        ({"num_jump_states": 3}, "needs jump_mode='family' or 'iid'"),
        ({"driver_feature": 10}, "driver_feature=10"),
        ({"dof_bounds": (5.0, 2.0)}, "dof_bounds"),
    ],
)
def test_inconsistent_spec_raises(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**changes)


def test_full_scale_mask_is_normalised_to_none():
    assert ModelSpec(scale_mask=(1,) * 10).scale_mask is None
    assert hash(ModelSpec(scale_mask=(1, 0) * 5)) == hash(ModelSpec(scale_mask=(True, False) * 5))


ROUND_TRIP_SPECS = [*TINY_SPECS.values(), ModelSpec(), ModelSpec(leverage="predictable", num_chains=3)]


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS, ids=lambda s: f"{s.leverage}-{s.jump_mode}-{s.num_chains}")
def test_natural_round_trip(spec, rng):
    natural = random_natural(spec, rng)
    model = FHMV.from_natural_parameters(spec, **natural)
    back = model.natural_parameters()
    assert set(back) == set(natural)
    for key, value in natural.items():
        np.testing.assert_allclose(back[key], value, rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS, ids=lambda s: f"{s.leverage}-{s.jump_mode}-{s.num_chains}")
def test_any_unconstrained_vector_is_valid(spec, rng):
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    flat, unravel = ravel_pytree(model)
    shaken = unravel(jnp.asarray(rng.normal(scale=1.0, size=flat.shape)))
    natural = {k: np.asarray(v) for k, v in shaken.natural_parameters().items()}
    FHMV.from_natural_parameters(spec, **natural)  # validates every constraint
    for key in ("initial_regime", "regime_transition", "weights"):
        np.testing.assert_allclose(natural[key].sum(-1), 1.0, rtol=1e-12)
    if "dof" in natural:
        assert np.all((natural["dof"] >= spec.dof_bounds[0]) & (natural["dof"] <= spec.dof_bounds[1]))
    assert np.all(np.linalg.eigvalsh(natural["covariances"]) > 0)


def _invalid(spec, rng, key, value):
    natural = random_natural(spec, rng)
    natural[key] = value(natural[key]) if callable(value) else value
    return natural


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("regime_transition", lambda a: a * 1.2, "regime_transition must sum to one"),
        ("initial_regime", lambda a: np.abs(a) * -1, "negative"),
        ("weights", lambda a: a + 0.1, "weights must sum to one"),
        ("c1", 1.0, "c1 must lie in"),
        ("c1", 0.5, "c1 must lie in"),
        ("dof", lambda a: a.at[0, 0].set(1.5) if hasattr(a, "at") else np.where(np.eye(*a.shape), 1.5, a), "dof"),
        ("dof", lambda a: np.full_like(a, 150.0), "dof must lie in"),
        ("covariances", lambda a: a - 5 * np.eye(a.shape[-1]), "not positive definite"),
        ("covariances", lambda a: a + np.triu(np.ones(a.shape[-2:]), 1), "symmetric"),
        ("means", lambda a: a[..., :1], "shape"),
        ("means", lambda a: np.full_like(a, np.nan), "non-finite"),
        ("persistence_stay", lambda a: np.array([1.2]), "persistence_stay"),
        ("theta_c", 1.0, "theta_c"),
        ("jump_transition", lambda a: np.array([[0.5, 0.6], [0.2, 0.8]]), "jump_transition must sum to one"),
        ("l1", 0.9, "l1 must lie in"),
        ("leverage_logits", lambda a: a + 1.0, "must be zero"),
    ],
)
def test_invalid_natural_values_raise(rng, key, value, message):
    spec = ModelSpec(num_features=3, num_regimes=2, num_chains=2)
    with pytest.raises(ValueError, match=message):
        FHMV.from_natural_parameters(spec, **_invalid(spec, rng, key, value))


def test_missing_and_unknown_keys_raise(rng):
    spec = ModelSpec(num_features=2, num_regimes=2, num_chains=1, leverage="none")
    natural = random_natural(spec, rng)
    with pytest.raises(ValueError, match=r"missing natural parameters .*'c1'"):
        FHMV.from_natural_parameters(spec, **{k: v for k, v in natural.items() if k != "c1"})
    with pytest.raises(ValueError, match=r"not used by this spec: \['theta_m'\]"):
        FHMV.from_natural_parameters(spec, **natural, theta_m=0.5)


def test_jump_family_membership_is_checked(rng):
    family = ModelSpec(num_features=2, num_regimes=1, num_chains=0, num_jump_states=3, jump_mode="family",
                       leverage="none")
    natural = random_natural(family, rng)
    natural["jump_transition"] = np.array([[0.8, 0.15, 0.05], [0.3, 0.6, 0.1], [0.3, 0.1, 0.6]])
    with pytest.raises(ValueError, match="not of the form"):
        FHMV.from_natural_parameters(family, **natural)
    iid = dataclasses.replace(family, jump_mode="iid")
    natural = random_natural(family, rng)
    with pytest.raises(ValueError, match="phi = 0"):
        FHMV.from_natural_parameters(iid, **natural)


def test_untied_persistence_needs_no_equal_values_but_tied_does(rng):
    spec = ModelSpec(num_features=2, num_regimes=2, num_chains=2, leverage="none")
    natural = random_natural(spec, rng)
    natural["persistence_stay"] = np.array([0.9, 0.8])
    with pytest.raises(ValueError, match="tied_persistence"):
        FHMV.from_natural_parameters(spec, **natural)
    untied = dataclasses.replace(spec, tied_persistence=False)
    back = FHMV.from_natural_parameters(untied, **natural).natural_parameters()
    np.testing.assert_allclose(back["persistence_stay"], [0.9, 0.8], rtol=1e-12)


def test_float32_option(rng):
    spec = TINY_SPECS["markov"]
    model = FHMV.from_natural_parameters(spec, dtype=jnp.float32, **random_natural(spec, rng))
    y, x = rng.normal(size=(50, 2)), rng.normal(size=50)
    ll32 = model.log_likelihood(y, x)
    assert ll32.dtype == jnp.float32
    ll64 = model.astype(jnp.float64).log_likelihood(y, x)
    np.testing.assert_allclose(ll32, ll64, rtol=1e-5)


def test_public_api_is_the_documented_one():
    """ARCHITECTURE.md's binding names, with the methods and fields it documents."""
    assert set(fhmv_jax.__all__) >= {"ModelSpec", "FHMV", "init_model", "fit_em", "FitResult", "save", "load",
                                     "Standardizer", "enable_x64"}
    for name in fhmv_jax.__all__:
        assert getattr(fhmv_jax, name) is not None, name
    for method in ("log_likelihood", "filter", "smooth", "viterbi", "sample", "from_natural_parameters",
                   "natural_parameters"):
        assert callable(getattr(FHMV, method)), method
    assert {"model", "log_likelihoods", "converged", "num_iters"} <= set(fhmv_jax.FitResult._fields)
    assert fhmv_jax.data.simulate_market is fhmv_jax.data.synthetic.simulate_market
    for method in ("fit", "transform", "inverse_transform"):
        assert callable(getattr(fhmv_jax.Standardizer, method)), method


def test_importing_changes_no_jax_setting():
    code = ("import fhmv_jax, jax; print(jax.config.jax_enable_x64); fhmv_jax.enable_x64();"
            " print(jax.config.jax_enable_x64)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"})
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS, ids=lambda s: f"{s.leverage}-{s.jump_mode}-{s.num_chains}")
def test_free_parameter_count_is_the_rank_of_the_natural_map(spec, rng):
    """Every block's count of free parameters equals the rank of the Jacobian of the natural parameters in the
    unconstrained ones: ties, fixed values (leverage logits of state 0) and implied ones (softmax rows, the
    unused Cholesky upper triangle) are counted out."""
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    flat, unravel = ravel_pytree(model)
    natural = jax.jit(lambda v: ravel_pytree(unravel(v).natural_parameters())[0])
    rank = np.linalg.matrix_rank(np.asarray(jax.jacfwd(natural)(flat)), tol=1e-8)
    assert model.num_free_parameters == rank
    assert model.num_free_parameters == sum(block.num_free_parameters for block in model.blocks().values())


def test_blocks_must_fit_the_spec(rng):
    spec = TINY_SPECS["markov"]
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    blocks = model.blocks()
    with pytest.raises(ValueError, match="persistence must be a PersistenceChains"):
        FHMV(spec, **(blocks | {"persistence": None}))
    with pytest.raises(ValueError, match="leverage must be a MarkovLeverage"):
        FHMV(spec, **(blocks | {"leverage": NoLeverage()}))
    with pytest.raises(ValueError, match=r"emission.means has shape \(2, 2, 3\), the spec implies \(2, 2, 2\)"):
        FHMV(spec, **(blocks | {"emission": blocks["emission"].replace(means=jnp.zeros((2, 2, 3)))}))
    with pytest.raises(ValueError, match="jump.mode is 'iid', the spec implies 'markov'"):
        FHMV(spec, **(blocks | {"jump": JumpChain(2, "iid", *list(blocks["jump"].raw_arrays().values()))}))

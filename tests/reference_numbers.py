"""The numbers the library computed before the structure refactor (issue 15), for ``test_same_numbers.py``.

(``init_model``'s starting models were compared too, by a copy of ``compute`` that added them, before and
after the refactor: equal to 1e-12 relative; they are not re-checked on every run.)

``python tests/reference_numbers.py`` rewrites ``tests/data/reference_numbers.npz`` from the
code checked out; it was run once on the commit before the refactor. ``python tests/reference_numbers.py em``
rewrites only the EM entries (checking that the others still hold): done once for issue 14's M-step
(trust-region Newton to convergence, joint magnitudes and covariance scales). Only the public API is
used, so the same functions compute the numbers again after any internal change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fhmv_jax
from fhmv_jax.model import example_model

PATH = Path(__file__).parent / "data" / "reference_numbers.npz"


def tiny_specs() -> dict[str, fhmv_jax.ModelSpec]:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import TINY_SPECS

    return TINY_SPECS


def _flat_factors(prefix: str, factors) -> dict[str, np.ndarray]:
    return {f"{prefix}.{name}": np.asarray(value) for name, value in factors._asdict().items() if value is not None}


def _natural_arrays(prefix: str, model) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": np.asarray(v) for k, v in model.natural_parameters().items()}


def compute(name: str, natural: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every recorded number of one spec: a sample, the read-outs on it, one EM iteration.

    Args:
        name: a tiny spec's name (conftest) or ``"default"`` (``example_model``).
        natural: the tiny spec's natural parameters (recorded as ``input.*``; drawn when omitted).
    """
    out = {}
    if name == "default":
        model = example_model(jax.random.key(0))
        spec, x_given, num_steps = model.spec, None, 120
    else:
        spec = tiny_specs()[name]
        if natural is None:
            from helpers import random_natural

            natural = random_natural(spec, np.random.default_rng(15))
        out |= {f"input.{k}": np.asarray(v) for k, v in natural.items()}
        model = fhmv_jax.FHMV.from_natural_parameters(spec, **natural)
        num_steps = 60
        driver = np.random.default_rng(16).normal(scale=0.7, size=num_steps)
        x_given = jnp.asarray(driver) if spec.needs_driver else None
    out |= _natural_arrays("natural", model)
    sample = model.sample(jax.random.key(7), num_steps, x=x_given)
    y, x = sample.observations, sample.driver
    out |= {"sample.observations": np.asarray(y), "sample.components": np.asarray(sample.components),
            "sample.log_scale": np.asarray(sample.log_scale)}
    out |= _flat_factors("sample.states", sample.states)
    if x is not None:
        out["sample.driver"] = np.asarray(x)
    out["log_likelihood"] = np.asarray(model.log_likelihood(y, x))
    filtered = model.filter(y, x)
    out["filter.joint"] = np.asarray(filtered.joint)
    smoothed = model.smooth(y, x)
    out["smooth.log_likelihood"] = np.asarray(smoothed.log_likelihood)
    out["smooth.joint"] = np.asarray(smoothed.joint)
    out |= _flat_factors("smooth.pairwise", smoothed.pairwise)
    out |= _flat_factors("viterbi", model.viterbi(y, x))
    lengths = np.array([num_steps, num_steps - 7])
    y_batch = np.stack([np.asarray(y), np.roll(np.asarray(y), 3, axis=0)])
    x_batch = None if x is None else np.stack([np.asarray(x), np.roll(np.asarray(x), 3)])
    fit = fhmv_jax.fit_em(model, y_batch, x_batch, lengths=lengths, max_iters=1, tol=0.0, callback=None)
    out["em.log_likelihoods"] = np.asarray(fit.log_likelihoods)
    out["em.objectives"] = np.asarray(fit.objectives)
    out |= _natural_arrays("em.natural", fit.model)
    return out


def names() -> list[str]:
    return [*tiny_specs(), "default"]


def record() -> None:
    arrays = {f"{name}/{key}": value for name in names() for key, value in compute(name).items()}
    PATH.parent.mkdir(exist_ok=True)
    np.savez_compressed(PATH, **arrays)
    print(f"wrote {len(arrays)} arrays to {PATH}")


def record_em() -> None:
    """Record the EM entries again (after an intended change of the ECM step, e.g. issue 14's M-step), keeping
    every other entry, which must still agree to 1e-10 relative."""
    recorded = dict(np.load(PATH, allow_pickle=False))
    for name in names():
        prefix = f"{name}/"
        given = {k[len(prefix) + 6:]: v for k, v in recorded.items() if k.startswith(prefix + "input.")}
        for key, value in compute(name, given or None).items():
            if key.startswith("em."):
                recorded[prefix + key] = value
            else:
                np.testing.assert_allclose(value, recorded[prefix + key], rtol=1e-10,
                                           atol=1e-10 * np.max(np.abs(value), initial=0.0), err_msg=key)
    np.savez_compressed(PATH, **recorded)
    print(f"rewrote the EM entries of {PATH}")


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    record_em() if sys.argv[1:] == ["em"] else record()

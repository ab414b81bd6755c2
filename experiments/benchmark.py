"""Speed measurements of fhmv_jax; figures are recorded in docs/benchmarks.md, never asserted in tests.

Usage:
    python experiments/benchmark.py log_likelihood --steps 1000 10000 100000
    python experiments/benchmark.py inference --steps 100000
    python experiments/benchmark.py em --steps 800 10000 100000
    python experiments/benchmark.py gmm --steps 10000 100000    # needs: pip install hmmlearn dynamax
    python experiments/benchmark.py stream --steps 1000 10000 100000

Every figure is the best of ``--repeats`` runs after compilation; compile time is
measured separately with ahead-of-time lowering and compilation.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import fhmv_jax
from fhmv_jax import init_stream, stream_filter, stream_step
from fhmv_jax.em import CovariancePrior, em_step, init_model
from fhmv_jax.model import example_model
from fhmv_jax.model.inputs import check_sequences


def best_of(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def compile_seconds(fn, args) -> float:
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


ROUTINES = {
    "log_likelihood": lambda model, y, x: model.log_likelihood(y, x),
    "smooth": lambda model, y, x: model.smooth(y, x),
    "viterbi": lambda model, y, x: model.viterbi(y, x),
}


def run(which: str, steps: list[int], repeats: int) -> list[str]:
    model = example_model(jax.random.key(0))
    names = ["log_likelihood"] if which == "log_likelihood" else list(ROUTINES)
    rows = ["| routine | T | compile (s) | run (s) | us / step |", "|---|---|---|---|---|"]
    for T in steps:
        sample = model.sample(jax.random.key(T), T)
        args = (model, sample.observations, sample.driver)
        for name in names:
            fn = ROUTINES[name]
            compiled = compile_seconds(fn, args)
            seconds = best_of(jax.jit(fn), args, repeats)
            rows.append(f"| {name} | {T} | {compiled:.2f} | {seconds:.4f} | {1e6 * seconds / T:.2f} |")
            print(rows[-1], flush=True)
    return rows


def run_em(steps: list[int], repeats: int) -> list[str]:
    """Seconds per ECM iteration (E-step + M-step) of the default spec on data it generated."""
    model = example_model(jax.random.key(0))
    prior = CovariancePrior(jnp.asarray(1e-2), jnp.asarray(1e-2))
    rows = ["| T | compile (s) | s / EM iteration |", "|---|---|---|"]
    for T in steps:
        sample = model.sample(jax.random.key(T), T)
        start = init_model(jax.random.key(1), model.spec, sample.observations)
        args = (start, *check_sequences(model.spec, sample.observations, sample.driver), prior)
        begin = time.perf_counter()
        em_step.lower(*args).compile()
        compiled = time.perf_counter() - begin
        seconds = best_of(em_step, args, repeats)
        rows.append(f"| {T} | {compiled:.2f} | {seconds:.4f} |")
        print(rows[-1], flush=True)
    return rows


def run_gmm(steps: list[int], repeats: int) -> list[str]:
    """fhmv_jax as a plain Gaussian-mixture HMM vs hmmlearn GMMHMM and dynamax GaussianMixtureHMM.

    16 states x 2 components, full covariances, D = 10, float64; one EM iteration each on the
    same data from the same parameters; compile time reported separately.
    """
    from dynamax.hidden_markov_model import GaussianMixtureHMM
    from hmmlearn.hmm import GMMHMM

    G, K, D = 16, 2, 10
    spec = fhmv_jax.ModelSpec(
        num_features=D, num_regimes=G, num_chains=0, num_jump_states=1, num_components=K, leverage="none", gaussian=True
    )
    peer = GaussianMixtureHMM(num_states=G, num_components=K, emission_dim=D)
    dx_params, dx_props = peer.initialize(jax.random.key(0))
    natural = {
        "initial_regime": np.asarray(dx_params.initial.probs),
        "regime_transition": np.asarray(dx_params.transitions.transition_matrix),
        "weights": np.asarray(dx_params.emissions.weights),
        "means": np.asarray(dx_params.emissions.means),
        "covariances": np.asarray(dx_params.emissions.covs),
    }
    model = fhmv_jax.FHMV.from_natural_parameters(spec, **natural)
    prior = CovariancePrior(jnp.asarray(0.0), jnp.asarray(0.0))

    def dynamax_step(params, y):
        stats, log_lik = peer.e_step(params, y)
        batched = jax.tree.map(lambda a: a[None], stats)
        new, _ = peer.m_step(params, dx_props, batched, peer.initialize_m_step_state(params, dx_props))
        return new, log_lik

    dynamax_step = jax.jit(dynamax_step)
    rows = [
        "| T | fhmv_jax (s) | hmmlearn (s) | dynamax (s) | fhmv_jax / hmmlearn | fhmv_jax / dynamax"
        " | compile fhmv_jax / dynamax (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for T in steps:
        y = np.asarray(model.sample(jax.random.key(T), T).observations)
        args = (model, *check_sequences(spec, y), prior)
        begin = time.perf_counter()
        em_step.lower(*args).compile()
        ours_compile = time.perf_counter() - begin
        ours = best_of(em_step, args, repeats)
        begin = time.perf_counter()
        dynamax_step.lower(dx_params, jnp.asarray(y)).compile()
        theirs_compile = time.perf_counter() - begin
        theirs = best_of(dynamax_step, (dx_params, jnp.asarray(y)), repeats)
        reference = GMMHMM(n_components=G, n_mix=K, covariance_type="full", n_iter=1, init_params="", params="stmcw")

        def hmmlearn_iteration(reference=reference, y=y):
            reference.startprob_, reference.transmat_ = natural["initial_regime"], natural["regime_transition"]
            reference.weights_, reference.means_, reference.covars_ = (
                natural["weights"], natural["means"], natural["covariances"]
            )
            return reference.fit(y)

        hmmlearn_seconds = best_of(hmmlearn_iteration, (), max(1, repeats // 2))
        rows.append(
            f"| {T} | {ours:.4f} | {hmmlearn_seconds:.3f} | {theirs:.4f} | {ours / hmmlearn_seconds:.3f} | "
            f"{ours / theirs:.3f} | {ours_compile:.2f} / {theirs_compile:.2f} |"
        )
        print(rows[-1], flush=True)
    return rows


LIVE_STEPS = 2000
"""Observations fed one call at a time in the ``stream`` mode (its cost per observation does not depend on T)."""


def run_stream(steps: list[int], repeats: int) -> list[str]:
    """Observations per second of the streaming filter for the default spec.

    ``stream_step`` is timed as in live use: one jitted call per observation, from numpy rows,
    input checks included, over the first ``LIVE_STEPS`` observations; ``stream_filter`` over
    the whole block of T observations.
    """
    model = example_model(jax.random.key(0))
    start = init_stream(model)

    def feed(model, y, x):
        state = start
        for y_t, x_t in zip(y, x, strict=True):
            state, _ = stream_step(model, state, y_t, x_t)
        return state

    rows = [
        "| T | block compile (s) | block (s) | block obs / s | step: obs fed | step us / obs | step obs / s |",
        "|---|---|---|---|---|---|---|",
    ]
    for T in steps:
        sample = model.sample(jax.random.key(T), T)
        y, x = np.asarray(sample.observations), np.asarray(sample.driver)
        compiled = compile_seconds(lambda m, y, x: stream_filter(m, start, y, x), (model, y, x))
        block = best_of(stream_filter, (model, start, y, x), repeats)
        live = min(T, LIVE_STEPS)
        step = best_of(feed, (model, y[:live], x[:live]), repeats) / live
        rows.append(
            f"| {T} | {compiled:.2f} | {block:.4f} | {T / block:,.0f} | {live} | {1e6 * step:.1f} | {1 / step:,.0f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["log_likelihood", "inference", "em", "gmm", "stream"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fhmv_jax.enable_x64()
    print(
        f"# fhmv_jax {fhmv_jax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{platform.processor() or platform.machine()}, float64={jnp.zeros(()).dtype == jnp.float64}"
    )
    if args.which == "em":
        rows = run_em(args.steps, args.repeats)
    elif args.which == "gmm":
        rows = run_gmm(args.steps, args.repeats)
    elif args.which == "stream":
        rows = run_stream(args.steps, args.repeats)
    else:
        rows = run(args.which, args.steps, args.repeats)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Speed measurements of fhmv_jax; figures are recorded in docs/benchmarks.md, never asserted in tests.

Usage:
    python experiments/benchmark.py log_likelihood --steps 1000 10000 100000
    python experiments/benchmark.py inference --steps 100000

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
from fhmv_jax import inference
from fhmv_jax.model import example_model, inference_inputs


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


def _routines(spec):
    def loglik(params, y, x):
        return inference.forward_filter(*inference_inputs(spec, params, y, x)).marginal_loglik

    def smooth(params, y, x):
        return inference.smoother(*inference_inputs(spec, params, y, x))

    def viterbi(params, y, x):
        return inference.most_likely_states(*inference_inputs(spec, params, y, x))

    return {"log_likelihood": loglik, "smooth": smooth, "viterbi": viterbi}


def run(which: str, steps: list[int], repeats: int) -> list[str]:
    model = example_model(jax.random.key(0))
    routines = _routines(model.spec)
    names = ["log_likelihood"] if which == "log_likelihood" else list(routines)
    rows = [f"| routine | T | compile (s) | run (s) | us / step |", "|---|---|---|---|---|"]
    for T in steps:
        sample = model.sample(jax.random.key(T), T)
        args = (model.params, sample.observations, sample.driver)
        for name in names:
            fn = routines[name]
            compiled = compile_seconds(fn, args)
            seconds = best_of(jax.jit(fn), args, repeats)
            rows.append(f"| {name} | {T} | {compiled:.2f} | {seconds:.4f} | {1e6 * seconds / T:.2f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["log_likelihood", "inference"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"# fhmv_jax {fhmv_jax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{platform.processor() or platform.machine()}, float64={jnp.zeros(()).dtype == jnp.float64}"
    )
    for row in run(args.which, args.steps, args.repeats)[:2]:
        print(row)


if __name__ == "__main__":
    main()

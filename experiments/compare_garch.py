"""The published FHMV on S&P 500 daily returns against GARCH peers (arch), recorded in docs/benchmarks.md.

Usage (needs the ``data`` extra: pip install -e '.[data]'):
    python experiments/compare_garch.py --chains 2 4

For each N: ``fit_em`` from ``init_model`` (the published spec, MODEL.md section 7: zero mean,
Gaussian, tied p, i.i.d. jumps with N_M = N, predictable leverage on the return with N_L = 70),
then a direct maximisation of ``log_likelihood`` (scipy L-BFGS on the exact gradient, started
from the EM fit) to show how far EM stopped from the maximum. The peers are arch's
GARCH(1,1) and GJR-GARCH(1,1,1) with Student-t innovations and zero mean, on the same returns.
Prints one markdown table: log-likelihood, free parameters k, BIC = -2 l + k log T, seconds.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import fhmv_jax
from fhmv_jax.data import sp500_prices


def published_spec(num_chains: int) -> fhmv_jax.ModelSpec:
    return fhmv_jax.ModelSpec(num_features=1, num_regimes=1, num_chains=num_chains, num_jump_states=num_chains,
                              num_components=1, leverage="predictable", jump_mode="iid", gaussian=True,
                              driver_feature=0, zero_mean=True)


def direct_maximum(model: fhmv_jax.FHMV, y: np.ndarray, x: np.ndarray | None = None) -> tuple[float, int]:
    """max log_likelihood(y, x) over the free unconstrained arrays by L-BFGS from ``model``: (value, iterations)."""
    spec, arrays = model.spec, model.raw_arrays()
    free = list(model.free_arrays())
    shapes = [np.shape(arrays[k]) for k in free]
    sizes = [int(np.prod(s)) for s in shapes]
    observations, driver = jnp.asarray(y), None if x is None else jnp.asarray(x)

    def negative(flat):
        pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
        raw = arrays | {k: p.reshape(s) for k, p, s in zip(free, pieces, shapes, strict=True)}
        return -fhmv_jax.FHMV.from_raw_arrays(spec, raw).log_likelihood(observations, driver)

    value_and_grad = jax.jit(jax.value_and_grad(negative))
    start = np.concatenate([np.ravel(np.asarray(arrays[k])) for k in free])
    result = scipy.optimize.minimize(lambda v: tuple(np.asarray(a, np.float64) for a in value_and_grad(v)), start,
                                     jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-8})
    return -float(result.fun), int(result.nit)


def garch_rows(returns: np.ndarray) -> list[tuple[str, float, int, float]]:
    from arch import arch_model

    rows = []
    for name, o in (("GARCH(1,1)-t", 0), ("GJR-GARCH(1,1,1)-t", 1)):
        start = time.perf_counter()
        fit = arch_model(returns, mean="Zero", vol="GARCH", p=1, o=o, q=1, dist="t").fit(disp="off")
        rows.append((name, float(fit.loglikelihood), int(fit.num_params), time.perf_counter() - start))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    fhmv_jax.enable_x64()
    _, prices = sp500_prices()
    returns = 100 * np.diff(np.log(prices))
    y, T = returns[:, None], returns.shape[0]
    print(f"# S&P 500 daily log returns in percent, T = {T}; fhmv_jax {fhmv_jax.__version__}, jax {jax.__version__},"
          f" {platform.processor() or platform.machine()}")
    print("| model | log-likelihood | k | BIC | seconds | notes |\n|---|---|---|---|---|---|")
    for N in args.chains:
        spec = published_spec(N)
        start = time.perf_counter()
        fit = fhmv_jax.fit_em(fhmv_jax.init_model(jax.random.key(0), spec, y), y, max_iters=1000, tol=args.tol)
        seconds = time.perf_counter() - start
        log_lik = float(fit.log_likelihoods[-1])
        k = fit.model.num_free_parameters
        best, iterations = direct_maximum(fit.model, y)
        print(f"| FHMV N = {N} ({spec.num_states} states), fit_em tol {args.tol:g} | {log_lik:.2f} | {k} |"
              f" {-2 * log_lik + k * np.log(T):.1f} | {seconds:.1f} | {fit.num_iters} iterations,"
              f" converged={fit.converged}; L-BFGS from the fit: {best:.2f} ({iterations} it.),"
              f" {best - log_lik:.2f} nats above |", flush=True)
    for name, log_lik, k, seconds in garch_rows(returns):
        print(f"| {name}, zero mean (arch) | {log_lik:.2f} | {k} | {-2 * log_lik + k * np.log(T):.1f} |"
              f" {seconds:.2f} | |", flush=True)


if __name__ == "__main__":
    main()

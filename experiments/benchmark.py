"""Speed measurements of fhmv_jax; figures are recorded in docs/benchmarks.md, never asserted in tests.

Usage:
    python experiments/benchmark.py log_likelihood --steps 1000 10000 100000
    python experiments/benchmark.py inference --steps 100000
    python experiments/benchmark.py em --steps 800 10000 100000
    python experiments/benchmark.py gmm --steps 10000 100000    # needs: pip install hmmlearn dynamax
    python experiments/benchmark.py stream --steps 1000 10000 100000
    python experiments/benchmark.py published --chains 2 4 8 10 --steps 5000   # S&P 500 returns (needs arch)
    python experiments/benchmark.py standard_errors --steps 10000   # the default spec's standard errors
    python experiments/benchmark.py score --steps 2000 20000 100000   # the score: autodiff vs forward-backward
    python experiments/benchmark.py coverage --replications 200 --steps 2000   # Wald intervals' coverage
    python experiments/benchmark.py scale --scale-parts inference --states 16 48 96 --steps 1000 100000 1000000
    python experiments/benchmark.py scale --scale-parts em --steps 1000 10000      # one EM iteration, both backends
    python experiments/benchmark.py scale --scale-parts batch --batches 1000 --steps 1000   # B x T fits
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python experiments/benchmark.py scale --scale-parts devices \
        --batches 64 --steps 1000

Every figure is the best of ``--repeats`` runs after compilation (``published``: the median and
the best); compile time is measured separately with ahead-of-time lowering and compilation.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fhmv_jax
from fhmv_jax import FHMV, init_stream, stream_filter, stream_step
from fhmv_jax.em import CovariancePrior, em_step, init_model
from fhmv_jax.em.convergence import check_score
from fhmv_jax.em.loop import batch_objective
from fhmv_jax.em.m_step import m_step
from fhmv_jax.em.stats import batch_e_step
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


def _default_spec_starts(steps: list[int]):
    """Per length T: (T, the example model, its k-means start on T steps it generated, their (y, x, mask))."""
    model = example_model(jax.random.key(0))
    for T in steps:
        sample = model.sample(jax.random.key(T), T)
        start = init_model(jax.random.key(1), model.spec, sample.observations)
        yield T, model, start, check_sequences(model.spec, sample.observations, sample.driver)


def run_em(steps: list[int], repeats: int) -> list[str]:
    """Seconds per ECM iteration (E-step + M-step) of the default spec on data it generated."""
    prior = CovariancePrior(jnp.asarray(1e-2), jnp.asarray(1e-2))
    rows = ["| T | compile (s) | s / EM iteration |", "|---|---|---|"]
    for T, _, start, data in _default_spec_starts(steps):
        args = (start, *data, prior)
        begin = time.perf_counter()
        em_step.lower(*args).compile()
        compiled = time.perf_counter() - begin
        seconds = best_of(em_step, args, repeats)
        rows.append(f"| {T} | {compiled:.2f} | {seconds:.4f} |")
        print(rows[-1], flush=True)
    return rows


def _penalised(raw, spec, y, x, mask, prior, scored: bool):
    info = batch_objective(FHMV.from_raw_arrays(spec, raw), y, x, mask, prior, scored=scored)
    return info.log_likelihood + info.log_prior


def run_score(steps: list[int], repeats: int) -> list[str]:
    """The gradient of the penalised log-likelihood in the unconstrained arrays (what ``check_score`` and
    ``fit_gradient`` take) of the default spec at a k-means start, by reverse-mode differentiation through the
    filter and by one forward-backward pass (``scored_log_likelihood``), and one ``check_score``."""
    prior = CovariancePrior(jnp.asarray(1e-2), jnp.asarray(1e-2))
    rows = ["| T | gradient | compile (s) | run (s) | max relative difference |", "|---|---|---|---|---|"]
    for T, model, start, (y, x, mask) in _default_spec_starts(steps):
        gradients = {}
        for name, scored in (("autodiff", False), ("forward-backward", True)):
            gradient = jax.grad(functools.partial(_penalised, spec=model.spec, y=y, x=x, mask=mask, prior=prior,
                                                  scored=scored))
            args = (start.raw_arrays(),)
            compiled = compile_seconds(gradient, args)
            seconds = best_of(jax.jit(gradient), args, repeats)
            gradients[name] = jax.jit(gradient)(*args)
            difference = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(
                jax.tree.leaves(gradients["autodiff"]), jax.tree.leaves(gradients[name]), strict=True) if a.size)
            rows.append(f"| {T} | {name} | {compiled:.2f} | {seconds:.4f} | {difference:.1e} |")
            print(rows[-1], flush=True)
        check_score(start, y, x, mask, prior)
        begin = time.perf_counter()
        for _ in range(repeats):
            check = check_score(start, y, x, mask, prior)
        seconds = (time.perf_counter() - begin) / repeats
        rows.append(f"| {T} | check_score ({len(check.score)} arrays) | | {seconds:.4f} | |")
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


def published_returns(num_steps: int) -> np.ndarray:
    """[T, 1] daily S&P 500 log returns in percent (``arch``'s sp500, 1999-2018), the first ``num_steps``."""
    from arch.data import sp500

    prices = sp500.load()["Adj Close"].to_numpy()
    returns = 100 * np.diff(np.log(prices))[:, None]
    if num_steps > returns.shape[0]:
        raise ValueError(f"the S&P 500 series has {returns.shape[0]} returns, fewer than --steps {num_steps}")
    return returns[:num_steps]


def published_spec(num_chains: int) -> fhmv_jax.ModelSpec:
    """MODEL.md section 7: D = 1, G = 1, K = 1, Gaussian, tied p, N_M = N i.i.d. jump states, predictable leverage."""
    return fhmv_jax.ModelSpec(num_features=1, num_regimes=1, num_chains=num_chains, num_jump_states=num_chains,
                              num_components=1, leverage="predictable", jump_mode="iid", gaussian=True,
                              driver_feature=0)


def timed(fn, args, repeats: int) -> tuple[float, float, float]:
    """(compile seconds, median and best seconds per call after a warm-up call) of ``jax.jit``-like ``fn``."""
    begin = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_seconds = time.perf_counter() - begin
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_seconds, statistics.median(times), min(times)


PUBLISHED_PARTS = ("em", "e", "m", "loglik", "fit")


def fit_iteration_seconds(model, y: np.ndarray, iterations: int = 10) -> tuple[float, float, float]:
    """(median, fastest, slowest) wall seconds between ``fit_em``'s callbacks over ``iterations`` ECM iterations
    (``tol=0``, compilation and the final score check excluded): iterations as a fit runs them."""
    stamps = []
    fhmv_jax.fit_em(model, y, max_iters=iterations, tol=0.0, callback=lambda info: stamps.append(time.perf_counter()))
    seconds = np.diff(stamps)
    return float(np.median(seconds)), float(seconds.min()), float(seconds.max())


def run_published(chains: list[int], steps: list[int], repeats: int, parts: tuple[str, ...],
                  plain: bool = False) -> list[str]:
    """One ECM iteration (``em_step``, as ``fit_em`` runs it), its E-step and M-step alone, ``log_likelihood``
    and the iterations of a short ``fit_em`` (``fit``), for the published model with N = ``chains`` (2^N N states)
    on S&P 500 returns.

    The model is ``init_model``'s start. ``em_step`` compiles with ``fit_em``'s options (``fast_jit``; with
    ``plain``, XLA's defaults as ``fit_em(tuned_compilation=False)``); the E-step (``batch_e_step``), M-step
    (``m_step``) and log-likelihood with ``jax.jit``'s defaults.
    """
    prior = CovariancePrior(jnp.asarray(1e-2), jnp.asarray(1e-2))
    header = "| N | states | T | part | compile (s) | median (s) | best (s) |"
    rows = [header, "|---|---|---|---|---|---|---|"]
    e_step_jit = jax.jit(batch_e_step, static_argnames=("block_steps",))
    m_step_jit = jax.jit(m_step)
    loglik_jit = jax.jit(lambda model, y, x: model.log_likelihood(y, x))
    for T in steps:
        y = published_returns(T)
        for num_chains in chains:
            spec = published_spec(num_chains)
            model = init_model(jax.random.key(0), spec, y)
            ys, xs, mask = check_sequences(spec, y)
            for part in parts:
                if part == "fit":
                    median, best, slowest = fit_iteration_seconds(model, y)
                    rows.append(f"| {num_chains} | {spec.num_states} | {T} | fit iteration (slowest {slowest:.3f}) | - "
                                f"| {median:.4f} | {best:.4f} |")
                    print(rows[-1], flush=True)
                    continue
                if part == "em":
                    fn, args = em_step.plain if plain else em_step, (model, ys, xs, mask, prior)
                elif part == "e":
                    fn, args = e_step_jit, (model, ys, xs, mask)
                elif part == "m":  # its statistics computed here, after the E-step's compilation was timed
                    fn, args = m_step_jit, (model, e_step_jit(model, ys, xs, mask), prior)
                else:
                    fn, args = loglik_jit, (model, jnp.asarray(y), jnp.asarray(y[:, 0]))
                try:
                    compiled, median, best = timed(fn, args, repeats)
                except Exception as error:  # e.g. an XLA:CPU fusion this jaxlib rejects: record it, go on
                    rows.append(f"| {num_chains} | {spec.num_states} | {T} | {part} | failed: "
                                f"{type(error).__name__}: {str(error).splitlines()[0][:80]} | | |")
                    print(rows[-1], flush=True)
                    continue
                rows.append(f"| {num_chains} | {spec.num_states} | {T} | {part} | {compiled:.2f} | {median:.4f} "
                            f"| {best:.4f} |")
                print(rows[-1], flush=True)
    return rows


def run_standard_errors(steps: list[int], repeats: int, kinds: tuple[str, ...]) -> list[str]:
    """Wall time of ``standard_errors`` for the default spec, first call (compilation included) and the best of
    ``repeats`` later calls (none with ``repeats`` 0)."""
    import warnings

    model = example_model(jax.random.key(0))
    rows = ["| T | kind | identified directions | first call (s) | later call, best (s) |", "|---|---|---|---|---|"]
    for num_steps in steps:
        sample = model.sample(jax.random.key(1), num_steps)
        for kind in kinds:
            times = []
            for _ in range(1 + repeats):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    errors = fhmv_jax.standard_errors(model, sample.observations, sample.driver, kind=kind)
                times.append(time.perf_counter() - start)
            later = f"{min(times[1:]):.1f}" if repeats else "-"
            rows.append(f"| {num_steps} | {kind} | {errors.num_identified} | {times[0]:.1f} | {later} |")
            print(rows[-1], flush=True)
    return rows


COVERAGE_SPEC = fhmv_jax.ModelSpec(num_features=2, num_regimes=2, num_chains=1, num_jump_states=1, num_components=1,
                                   leverage="none", gaussian=True)


def coverage_truth() -> fhmv_jax.FHMV:
    """Two regimes apart in mean and covariance, one persistence chain (c_1 = 2.5) on top."""
    return fhmv_jax.FHMV.from_natural_parameters(
        COVERAGE_SPEC, initial_regime=np.array([0.5, 0.5]), regime_transition=np.array([[0.97, 0.03], [0.05, 0.95]]),
        weights=np.ones((2, 1)), means=np.array([[[-0.8, 0.4]], [[0.8, -0.4]]]),
        covariances=np.array([[[[1.0, 0.3], [0.3, 0.8]]], [[[0.5, -0.1], [-0.1, 0.7]]]]),
        persistence_stay=np.array([0.98]), c1=np.array(2.5))


def run_coverage(replications: int, num_steps: int, level: float = 0.95) -> list[str]:
    """Simulate ``replications`` series from ``coverage_truth``, fit each by EM from the truth (no prior), and
    count how often each kind's Wald interval (``StandardErrors.table``) covers the true value, per group."""
    import warnings

    truth = coverage_truth()
    layout = fhmv_jax.diagnostics.natural_layout(truth)
    true_values = np.asarray(layout.ravel(truth.natural_parameters()))
    groups = [label.split("[")[0] for label in layout.labels()]
    mirrored = np.array([g == "covariances" and label[-4] > label[-2] for g, label in zip(groups, layout.labels(),
                                                                                      strict=True)])
    kinds = ("hessian", "sandwich")
    covered = {kind: np.zeros(len(groups)) for kind in kinds}
    counted = {kind: np.zeros(len(groups)) for kind in kinds}
    skipped, start = 0, time.perf_counter()
    for r in range(replications):
        y = truth.sample(jax.random.key(1000 + r), num_steps).observations
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = fhmv_jax.fit_em(truth, y, max_iters=500, tol=1e-8, covariance_ridge=0.0,
                                  covariance_prior_count=0.0)
            results = {kind: fhmv_jax.standard_errors(fit.model, y, kind=kind) for kind in kinds}
        if not fit.converged or not results["hessian"].positive_definite:
            skipped += 1
            continue
        for kind, errors in results.items():
            rows = errors.table(level)
            low, high = (np.array([row[side] for row in rows]) for side in ("low", "high"))
            finite = np.isfinite(errors.standard_errors()) & ~mirrored
            covered[kind] += finite & (low <= true_values) & (true_values <= high)
            counted[kind] += finite
        if (r + 1) % 20 == 0:
            print(f"# {r + 1} replications, {time.perf_counter() - start:.0f} s", flush=True)
    rows = [f"| parameter group | intervals | {' | '.join(f'{k} coverage' for k in kinds)} |",
            "|---|---|" + "---|" * len(kinds)]
    for group in dict.fromkeys(groups):
        members = np.array([g == group for g in groups])
        if counted["hessian"][members].sum() == 0:
            continue
        cells = [f"{covered[k][members].sum() / counted[k][members].sum():.3f}" for k in kinds]
        rows.append(f"| {group} | {int(counted['hessian'][members].sum())} | {' | '.join(cells)} |")
    rows.append(f"\n{replications - skipped} of {replications} replications used ({skipped} not converged or without"
                f" a positive definite information); T = {num_steps}, nominal {level:.0%};"
                f" {time.perf_counter() - start:.0f} s")
    return rows


SCALE_PARTS = ("inference", "em", "batch", "devices")


def scale_spec(num_states: int) -> fhmv_jax.ModelSpec:
    """The specs of the ``scale`` table: 16 states (G = 4, one chain, two jump states, no leverage: time-invariant),
    48 (G = 6, Markov leverage: time-varying) and 96 (the default spec)."""
    if num_states == 96:
        return fhmv_jax.ModelSpec(driver_feature=5)
    if num_states == 48:
        return fhmv_jax.ModelSpec(num_regimes=6, num_chains=1, driver_feature=5)
    if num_states == 16:
        return fhmv_jax.ModelSpec(num_regimes=4, num_chains=1, leverage="none")
    raise ValueError(f"scale: --states takes 16, 48 or 96, got {num_states}")


def scale_model(num_states: int, dtype) -> fhmv_jax.FHMV:
    """A model of ``scale_spec(num_states)`` initialised (k-means) on 2000 steps of the example model's data."""
    y = example_model(jax.random.key(0)).sample(jax.random.key(1), 2000).observations
    spec = scale_spec(num_states)
    return init_model(jax.random.key(2), spec, y).astype(dtype)


def _core_log_likelihood(initial, transitions, log_densities, method: str):
    """The inference core's filter on precomputed log-densities [T, *shape] (what dynamax's filter takes)."""
    def likelihoods(rows):
        shift = jnp.max(rows.reshape(rows.shape[0], -1), axis=1)
        return jnp.exp(rows - shift.reshape((-1,) + (1,) * (rows.ndim - 1))), shift

    mask = jnp.ones(log_densities.shape[0], bool)
    return fhmv_jax.inference.forward_filter(initial, transitions, likelihoods, log_densities, mask,
                                             method=method).log_likelihood


def run_scale_inference(states: list[int], steps: list[int], repeats: int, dtype) -> list[str]:
    """ns per step of the filter (log-likelihood) by both backends, and dynamax's parallel filter (16 states)."""
    from fhmv_jax.model import sequence_inputs

    rows = ["| S | T | method | compile (s) | run (s) | ns / step | relative difference to sequential |",
            "|---|---|---|---|---|---|---|"]
    for num_states in states:
        model = scale_model(num_states, dtype)
        for T in steps:
            sample = model.sample(jax.random.key(T), T)
            y = sample.observations
            x = y[:, model.spec.driver_feature] if model.spec.needs_driver else None
            values = {}
            for method in ("sequential", "parallel"):
                fn = jax.jit(lambda m, y, x, method=method: m.log_likelihood(y, x, method=method))
                compiled = compile_seconds(fn, (model, y, x))
                seconds = best_of(fn, (model, y, x), repeats)
                values[method] = float(fn(model, y, x))
                difference = abs(values[method] / values["sequential"] - 1)
                rows.append(f"| {num_states} | {T} | {method} | {compiled:.2f} | {seconds:.4f} | "
                            f"{1e9 * seconds / T:.0f} | {difference:.1e} |")
                print(rows[-1], flush=True)
            if num_states != 16:
                continue
            s = sequence_inputs(model, y, x)
            log_densities = s.emissions.log_densities(s.rows)
            transition = fhmv_jax.inference.parallel.joint_matrix(s.transitions)
            initial = s.initial.reshape(-1)
            flat = log_densities.reshape(T, -1)
            core = jax.jit(lambda i, t, ld: _core_log_likelihood(i, t, ld, "parallel"))
            peers = {"core (log-densities given)": (core, (s.initial, s.transitions, log_densities))}
            try:
                from dynamax.hidden_markov_model import parallel_hmm_filter
                peer = jax.jit(lambda i, a, ld: parallel_hmm_filter(i, a, ld).marginal_loglik)
                peers["dynamax parallel_hmm_filter"] = (peer, (initial, transition, flat))
            except ImportError:
                print("dynamax not installed: no peer row (pip install -e '.[bench]')")
            for name, (fn, args) in peers.items():
                compiled = compile_seconds(fn, args)
                seconds = best_of(fn, args, repeats)
                difference = abs(float(fn(*args)) / values["sequential"] - 1)
                rows.append(f"| {num_states} | {T} | {name} | {compiled:.2f} | {seconds:.4f} | "
                            f"{1e9 * seconds / T:.0f} | {difference:.1e} |")
                print(rows[-1], flush=True)
    return rows


def run_scale_em(steps: list[int], repeats: int, dtype) -> list[str]:
    """Seconds per ECM iteration of the default spec by both inference backends."""
    model = example_model(jax.random.key(0)).astype(dtype)
    prior = CovariancePrior(jnp.asarray(1e-2, dtype), jnp.asarray(1e-2, dtype))
    rows = ["| T | method | compile (s) | s / EM iteration |", "|---|---|---|---|"]
    for T in steps:
        y = model.sample(jax.random.key(T), T).observations
        args = (model, *check_sequences(model.spec, y, dtype=dtype), prior, None)
        for method in ("sequential", "parallel"):
            begin = time.perf_counter()
            em_step.lower(*args, method).compile()
            compiled = time.perf_counter() - begin
            seconds = best_of(em_step, (*args, method), repeats)
            rows.append(f"| {T} | {method} | {compiled:.2f} | {seconds:.4f} |")
            print(rows[-1], flush=True)
    return rows


class _Timed(Exception):
    """Stops ``fit_em`` after the timed iterations: its final convergence check (a few gradients of the whole
    batch) is not part of an iteration."""


def run_scale_batch(num_sequences: int, num_steps: int, chunk: int, dtype, mesh=None, iterations: int = 3) -> str:
    """Series per second of ``fit_em`` on a batch [B, T] of the default spec's series (the mean of the iterations
    after the first two ECM steps, the first of which compiles), chunks of ``chunk`` sequences; a table row."""
    model = example_model(jax.random.key(0)).astype(dtype)
    y = jax.vmap(lambda k: model.sample(k, num_steps).observations)(jax.random.split(jax.random.key(1),
                                                                                     num_sequences))
    stamps = []

    def stamp(info):
        stamps.append(time.perf_counter())
        if info.iteration == iterations:
            raise _Timed

    begin = time.perf_counter()
    try:
        fhmv_jax.fit_em(model, y, max_iters=iterations, tol=0.0, batch_chunk=chunk, mesh=mesh, acceleration=None,
                        callback=stamp)
    except _Timed:
        pass
    seconds = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    devices = 1 if mesh is None else mesh.shape["batch"]
    return (f"| {num_sequences} x {num_steps} | {chunk} | {devices} | {stamps[1] - begin:.1f} | {seconds:.3f} |"
            f" {num_sequences / seconds:.0f} |")


def run_scale_batches(num_sequences: list[int], num_steps: int, chunk: int, dtype, devices: list[int]) -> list[str]:
    """``run_scale_batch`` for every batch size and every device count (meshes over the first devices)."""
    rows = ["| B x T | batch_chunk | devices | first two ECM steps incl. compile (s) | s / EM iteration | series / s |",
            "|---|---|---|---|---|---|"]
    for count in devices:
        mesh = None if count == 1 else jax.sharding.Mesh(np.array(jax.devices()[:count]), ("batch",))
        for B in num_sequences:
            rows.append(run_scale_batch(B, num_steps, chunk, dtype, mesh))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["log_likelihood", "inference", "em", "gmm", "stream", "published",
                                          "standard_errors", "coverage", "scale", "score"])
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="sequence lengths (default 1000 10000 100000; published: 5000)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--replications", type=int, default=200, help="coverage: simulated series")
    parser.add_argument("--kinds", nargs="+", default=list(fhmv_jax.diagnostics.KINDS),
                        choices=fhmv_jax.diagnostics.KINDS, help="standard_errors: the kinds to time")
    parser.add_argument("--chains", type=int, nargs="+", default=[2, 4, 8, 10], help="published: values of N")
    parser.add_argument("--parts", nargs="+", default=list(PUBLISHED_PARTS), choices=PUBLISHED_PARTS,
                        help="published: em (one ECM iteration), e (E-step), m (M-step), loglik, fit (the iterations "
                             "of a 10-iteration fit_em)")
    parser.add_argument("--plain", action="store_true",
                        help="published: compile em_step with XLA's defaults (fit_em(tuned_compilation=False))")
    parser.add_argument("--states", type=int, nargs="+", default=[16, 48, 96], help="scale: state counts")
    parser.add_argument("--scale-parts", nargs="+", default=["inference"], choices=SCALE_PARTS,
                        help="scale: inference (both backends' filter, dynamax's on 16 states), em (one EM iteration"
                             " of the default spec by both backends), batch (B x T fits), devices (meshes of 1, 2, 4"
                             " devices)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1000], help="scale batch/devices: values of B")
    parser.add_argument("--chunk", type=int, default=100, help="scale batch/devices: fit_em(batch_chunk=...)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default=None,
                        help="scale: precision (default float64 on CPU, float32 on an accelerator)")
    args = parser.parse_args()
    fhmv_jax.enable_x64()
    print(
        f"# fhmv_jax {fhmv_jax.__version__}, jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{platform.processor() or platform.machine()}, float64={jnp.zeros(()).dtype == jnp.float64}"
    )
    if args.steps is None:
        args.steps = {"published": [5000], "standard_errors": [10000], "coverage": [2000]}.get(
            args.which, [1000, 10000, 100000])
    if args.which == "scale":
        dtype = args.dtype or ("float64" if jax.default_backend() == "cpu" else "float32")
        print(f"# scale: {dtype}, {jax.device_count()} device(s): {jax.devices()[0].device_kind}")
        rows = []
        if "inference" in args.scale_parts:
            rows += run_scale_inference(args.states, args.steps, args.repeats, jnp.dtype(dtype))
        if "em" in args.scale_parts:
            rows += run_scale_em(args.steps, args.repeats, jnp.dtype(dtype))
        if "batch" in args.scale_parts:
            rows += run_scale_batches(args.batches, args.steps[0], args.chunk, jnp.dtype(dtype), [1])
        if "devices" in args.scale_parts:
            counts = [n for n in (1, 2, 4) if n <= jax.device_count()]
            rows += run_scale_batches(args.batches, args.steps[0], args.chunk, jnp.dtype(dtype), counts)
    elif args.which == "published":
        rows = run_published(args.chains, args.steps, args.repeats, tuple(args.parts), args.plain)
    elif args.which == "standard_errors":
        rows = run_standard_errors(args.steps, args.repeats, tuple(args.kinds))
    elif args.which == "coverage":
        rows = run_coverage(args.replications, args.steps[0])
    elif args.which == "em":
        rows = run_em(args.steps, args.repeats)
    elif args.which == "score":
        rows = run_score(args.steps, args.repeats)
    elif args.which == "gmm":
        rows = run_gmm(args.steps, args.repeats)
    elif args.which == "stream":
        rows = run_stream(args.steps, args.repeats)
    else:
        rows = run(args.which, args.steps, args.repeats)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Compiler settings of the hot jitted functions (the ECM step).

XLA:CPU hands reductions and dots to YNNPACK but compiles elementwise fusions itself, and
its float64 exp and log there are scalar. The E- and M-steps store a few elementwise
intermediates with exp and log1p in them; routing elementwise fusions through YNNPACK as
well makes one ECM step of the default spec about 12% faster at T = 1e5 (docs/benchmarks.md).
Models without volatility sub-states have no such passes, and there the option costs time
(a plain Gaussian-mixture HMM: 0.26 s -> 0.33 s), so ``em_step`` uses it only when V > 1, and
only for one model at a time: XLA rejects YNNPACK fusions of some layouts of the restarts'
vmapped programs ("Instruction with unsupported layout in YNN fusion").

The option is experimental in XLA, so it is probed once, at the first compilation, and left
out where this jaxlib does not know it or the backend is not a CPU. ``fit_em(tuned_compilation=False)``
compiles with XLA's defaults instead (``fast_jit.plain``).

The standard errors' programs (``information``, ``diagnostics``) compile with ``classic_emitters()``.

The sampler's scan is long straight-line code (threefry, gamma draws) that LLVM's -O3 spends its time on:
``llvm_o2()`` compiles it 20-40% faster into a program that draws the same numbers, as fast (docs/benchmarks.md);
the example model's draws, 8 times faster.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_FUSIONS = ",".join(f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("INDIVIDUAL_DOT", "ELTWISE", "REDUCE"))


def _on_cpu_if_supported(options: dict) -> dict:
    """``options`` when the backend is a CPU and this jaxlib compiles with them, else empty."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(jnp.exp, compiler_options=options).lower(jnp.zeros(2)).compile()
    except jax.errors.JaxRuntimeError:
        return {}
    return options


@functools.cache
def compiler_options() -> dict[str, str]:
    """The options ``fast_jit`` compiles with: empty off CPU or when unsupported."""
    return _on_cpu_if_supported({_OPTION: _FUSIONS})


@functools.cache
def classic_emitters() -> dict[str, bool]:
    """XLA:CPU's classic LLVM emitters instead of its fusion emitters, which build each fusion in an MLIR context
    of its own: the diagnostics' two large programs compile in about half the time and run as fast
    (docs/benchmarks.md). Empty off CPU or when unsupported."""
    return _on_cpu_if_supported({"xla_cpu_use_fusion_emitters": False})


def llvm_o2() -> dict[str, int]:
    """The options that compile with LLVM at -O2 instead of XLA's default -O3."""
    return {"xla_backend_optimization_level": 2}


class fast_jit:
    """``eqx.filter_jit(fn)`` compiled with ``options()`` (default ``compiler_options()``) when called at top
    level with arguments for which ``wanted(*args)`` holds (default: always); ``plain`` is ``eqx.filter_jit(fn)``.

    The options are chosen at the first call, not at import (the probe initialises the
    backend). Inside another trace (a caller's ``jax.jit``, ``grad``, ``vmap``) the plain
    ``eqx.filter_jit`` runs, since compiler options belong to the outermost compilation.
    """

    def __init__(self, fn: Callable, wanted: Callable[..., bool] = lambda *args, **kwargs: True,
                 options: Callable[[], dict] = compiler_options):
        self._fn = fn
        self._wanted = wanted
        self._options = options
        self.plain = eqx.filter_jit(fn)
        functools.update_wrapper(self, fn)

    @functools.cached_property
    def tuned(self) -> Callable:
        options = self._options()
        return eqx.filter_jit(self._fn, compiler_options=options) if options else self.plain

    def _choose(self, args, kwargs) -> Callable:
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return self.plain if traced or not self._wanted(*args, **kwargs) else self.tuned

    def __call__(self, *args, **kwargs):
        return self._choose(args, kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """Ahead-of-time lowering, as ``jax.jit(...).lower``."""
        return self._choose(args, kwargs).lower(*args, **kwargs)

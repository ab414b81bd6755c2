"""A short demo until the training job exists: sample from a default FHMV model and read its regimes back.

    python experiments/demo.py [num_steps]
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from fhmv_jax.model import example_model


def main(num_steps: int = 2000) -> None:
    model = example_model(jax.random.key(0))
    sample = model.sample(jax.random.key(1), num_steps)
    start = time.perf_counter()
    filtered = model.filter(sample.observations)
    smoothed = model.smooth(sample.observations)
    path = model.viterbi(sample.observations)
    seconds = time.perf_counter() - start
    truth = np.asarray(sample.states.regime)
    print(f"FHMV default spec: {model.spec.num_states} joint states, {num_steps} sampled steps")
    print(f"log-likelihood per step: {float(filtered.log_likelihood) / num_steps:.4f}")
    for name, regimes in (
        ("filtered", filtered.marginals.regime.argmax(-1)),
        ("smoothed", smoothed.marginals.regime.argmax(-1)),
        ("viterbi", path.regime),
    ):
        print(f"{name:>9} regime accuracy vs the true path: {np.mean(np.asarray(regimes) == truth):.3f}")
    print(f"filter + smooth + viterbi (with compilation): {seconds:.1f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

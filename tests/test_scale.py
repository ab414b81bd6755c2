"""Scale (issue 17): chunked E-step statistics, a mesh of devices, several processes, the inference backend.

Every fit is a short ECM run (``FIT``) on one ragged batch of five sequences (``problem``) of a small spec with
predictable leverage, whose per-step statistics (``StepMoments``) cannot be summed over sequences; the
chunked, sharded and multi-process fits must reproduce the plain one-device history to 1e-10. The device
count is fixed when JAX starts, so the mesh runs in a subprocess with four host devices and the multi-process
run in two processes with two each, on the loopback address.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from fhmv_jax import ModelSpec, fit_em, init_model
from fhmv_jax.em.fit import ConvergenceWarning
from fhmv_jax.em.sharding import batch_layout, pad_sequences
from fhmv_jax.em.stats import batch_e_step
from fhmv_jax.model.inputs import check_sequences

SPEC = ModelSpec(num_features=2, num_regimes=2, num_chains=1, num_jump_states=2, num_components=1,
                 leverage="predictable", num_leverage_lags=1)
LENGTHS = np.array([50, 43, 50, 37, 50])
FIT = {"lengths": LENGTHS, "max_iters": 4, "tol": 0.0}
RTOL = 1e-10
TESTS = Path(__file__).resolve().parent
TIMEOUT = 600


def problem_data() -> tuple[np.ndarray, np.ndarray]:
    """y [5, 50, 2] (Student-t noise, padding left as it is) and the driver x [5, 50]."""
    rng = np.random.default_rng(17)
    return rng.standard_t(5, size=(5, 50, 2)), rng.normal(scale=0.7, size=(5, 50))


def fitted(**kwargs):
    """The short fit of ``problem_data`` from ``init_model``'s start (key 1), its ConvergenceWarning silenced."""
    y, x = problem_data()
    start = init_model(jax.random.key(1), SPEC, y, x, lengths=LENGTHS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit_em(start, y, x, **FIT, **kwargs)


RESTARTS = {"num_restarts": 2, "key": (3,)}
"""Two restarts, the second's start from ``jax.random.key(*RESTARTS["key"])``."""


def restarts() -> dict:
    return RESTARTS | {"key": jax.random.key(*RESTARTS["key"])}


@pytest.fixture(scope="module")
def reference():
    return fitted()


@pytest.fixture(scope="module")
def reference_restarts():
    return fitted(**restarts())


def test_chunks_equal_the_whole_batch(reference):
    chunked = fitted(batch_chunk=2)  # 5 sequences: 3 chunks, the last padded with one of length zero
    assert chunked.num_iters == reference.num_iters == 4
    np.testing.assert_allclose(chunked.log_likelihoods, reference.log_likelihoods, rtol=RTOL)
    np.testing.assert_allclose(chunked.objectives, reference.objectives, rtol=RTOL)
    np.testing.assert_allclose(chunked.score_norm, reference.score_norm, rtol=1e-8)  # the chunked gradient
    for a, b in zip(jax.tree.leaves(chunked.model), jax.tree.leaves(reference.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_parallel_inference_equals_sequential(reference):
    parallel = fitted(inference="parallel")
    np.testing.assert_allclose(parallel.log_likelihoods, reference.log_likelihoods, rtol=1e-9)


def test_zero_length_sequences_contribute_nothing():
    y, x = problem_data()
    y, x, mask = check_sequences(SPEC, y, x, LENGTHS)
    model = init_model(jax.random.key(1), SPEC, y, x, lengths=LENGTHS)
    stats = eqx.filter_jit(batch_e_step)
    plain = stats(model, y, x, mask)
    padded = stats(model, *pad_sequences(y, x, mask, 7))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(padded), strict=True):
        np.testing.assert_allclose(b[:5], a, rtol=1e-12, atol=1e-12 * np.max(np.abs(a)))
        np.testing.assert_array_equal(b[5:], np.zeros_like(b[5:]))


def test_batch_layout_pads_to_chunks_and_devices():
    assert batch_layout(5, None, None) == (5, None, 1)
    assert batch_layout(5, 2, None) == (6, 2, 1)
    assert batch_layout(5, 8, None) == (5, 5, 1)
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    assert batch_layout(5, 2, mesh) == (6, 2, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inference": "fastest"}, "method must be one of"),
        ({"batch_chunk": 0}, "batch_chunk must be None or a positive integer"),
        ({"mesh": ("data",)}, "needs an axis named 'batch'"),
        ({"model": jnp.float16}, "float16 is not supported: use float32 or float64"),
        ({"y": np.float16}, "float16 is not supported: use float32 or float64"),
    ],
)
def test_bad_arguments_raise(change, message):
    y, x = problem_data()
    model = init_model(jax.random.key(1), SPEC, y, x, lengths=LENGTHS)
    if "model" in change:
        model = model.astype(change.pop("model"))
    if "y" in change:
        y = y.astype(change.pop("y"))
    if "mesh" in change:
        change["mesh"] = Mesh(np.array(jax.devices()[:1]), change["mesh"])
    with pytest.raises(ValueError, match=message):
        fit_em(model, y, x, **FIT, **change)


_PRELUDE = f"""
import json, sys, warnings
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
sys.path.insert(0, {str(TESTS)!r})
import numpy as np
from jax.sharding import Mesh
"""

_MESH = _PRELUDE + """
from fhmv_jax import fit_em
from test_scale import fitted, restarts
mesh = Mesh(np.array(jax.devices()), ("batch",))
four, four_restarts = fitted(mesh=mesh), fitted(mesh=mesh, batch_chunk=1, **restarts())
errors = []
y, x = np.zeros((5, 50, 2)), np.zeros((5, 50))
for y, x, bad in ((y[:3], x[:3], mesh), (y, x, Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b")))):
    try:
        fit_em(four.model, y, x, max_iters=1, mesh=bad)
    except ValueError as error:
        errors.append(str(error))
print(json.dumps({"devices": len(jax.devices()), "history": four.log_likelihoods.tolist(),
                  "score_norm": four.score_norm,
                  "restarts": four_restarts.log_likelihoods.tolist(),
                  "restart_finals": four_restarts.restart_log_likelihoods.tolist(),
                  "local": str(four.model.emission.means.sharding), "errors": errors}))
"""


def _environment(devices: int, cache: str) -> dict[str, str]:
    """This environment (its XLA flags kept) with ``devices`` host devices, the CPU backend and a compilation
    cache of its own."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    if "JAX_COMPILATION_CACHE_DIR" in env:
        env["JAX_COMPILATION_CACHE_DIR"] = str(Path(env["JAX_COMPILATION_CACHE_DIR"]) / cache)
    return env


def _last_json_line(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def test_a_mesh_of_four_devices_reproduces_one_device(reference, reference_restarts):
    """Against the one-device fits of this process (the same program as one of a process with four devices)."""
    done = subprocess.run([sys.executable, "-c", _MESH], env=_environment(4, "mesh4"), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    got = _last_json_line(done.stdout)
    assert got["devices"] == 4
    np.testing.assert_allclose(got["history"], reference.log_likelihoods, rtol=RTOL)
    np.testing.assert_allclose(got["score_norm"], reference.score_norm, rtol=1e-8)  # the gradient over devices
    np.testing.assert_allclose(got["restarts"], reference_restarts.log_likelihoods, rtol=RTOL)
    np.testing.assert_allclose(got["restart_finals"], reference_restarts.restart_log_likelihoods, rtol=RTOL)
    assert "SingleDeviceSharding" in got["local"]  # the fitted model comes back as an ordinary one
    assert len(got["errors"]) == 2
    assert "the batch has 3 sequences but the mesh's 'batch' axis has 4 devices" in got["errors"][0]
    assert "needs an axis named 'batch'" in got["errors"][1]


_WORKER = _PRELUDE + """
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from fhmv_jax import fit_em
from test_scale import LENGTHS, fitted, problem_data
mesh = Mesh(np.array(jax.devices()), ("batch",))
fit = fitted(mesh=mesh)
y, x = problem_data()
try:  # the data must be the same on every process
    fit_em(fit.model, y + jax.process_index(), x, lengths=LENGTHS, max_iters=1, mesh=mesh)
    mismatch = ""
except ValueError as error:
    mismatch = str(error)
print(json.dumps({"process": jax.process_index(), "devices": len(jax.devices()),
                  "local_devices": len(jax.local_devices()), "history": fit.log_likelihoods.tolist(),
                  "mismatch": mismatch}))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_reproduce_one(reference, tmp_path):
    """Each worker writes to files, not pipes: a worker blocked on a full pipe would stall the other's collectives."""
    address = f"127.0.0.1:{_free_port()}"
    logs = [(tmp_path / f"{i}.out", tmp_path / f"{i}.err") for i in range(2)]
    environment, workers = _environment(2, "processes"), []
    with contextlib.ExitStack() as files:
        for i, (out, err) in enumerate(logs):
            workers.append(subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i)], env=environment,
                                            stdout=files.enter_context(out.open("w")),
                                            stderr=files.enter_context(err.open("w"))))
        try:
            for worker in workers:
                worker.wait(timeout=TIMEOUT)
        finally:
            for worker in workers:
                worker.kill()
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-4000:]
        got = _last_json_line(stdout)
        assert (got["devices"], got["local_devices"]) == (4, 2)
        np.testing.assert_allclose(got["history"], reference.log_likelihoods, rtol=RTOL)
        assert "needs the data (y, x, lengths) to be the same on every process: processes [1]" in got["mismatch"]

"""ECM: monotonicity, degrees of freedom, a peer library on the reduced model, batches, tracing, robustness."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SPECS
from helpers import FIT_OPTIONS, random_natural
from hmmlearn.hmm import GMMHMM
from scipy import stats

import fhmv_jax
from fhmv_jax import FHMV, ModelSpec, fit_em, init_model
from fhmv_jax.em import loop as loop_module
from fhmv_jax.em.convergence import _score, check_score
from fhmv_jax.em.fit import ConvergenceWarning
from fhmv_jax.em.m_step import CovariancePrior
from fhmv_jax.em.stats import LeverageStats
from fhmv_jax.model.inputs import check_sequences

LENGTHS = np.array([60, 53])
"""The ragged batch of the monotonicity checks, shaped as tests/reference_numbers.py's EM batch so that both
use the same compiled ECM programs."""


def _ragged_batch(spec, rng, truth, data):
    """[2, 60, D] observations and a [2, 60] driver, of lengths ``LENGTHS``: sampled from ``truth`` or t noise.

    A shorter sequence is the start of a 60-step sample (one sampler program for both)."""
    y = np.zeros((2, 60, spec.num_features))
    x = rng.normal(scale=0.7, size=(2, 60))
    for b, n in enumerate(LENGTHS):
        if data == "sampled":
            y[b, :n] = truth.sample(jax.random.key(b), 60, x=jnp.asarray(x[b])).observations[:n]
        else:
            y[b, :n] = rng.standard_t(5, size=(n, spec.num_features))
    return y, x if spec.needs_driver else None


@pytest.mark.parametrize("name", list(TINY_SPECS))
@pytest.mark.parametrize("data", ["sampled", "random"])
def test_log_likelihood_never_decreases(rng, name, data):
    spec = TINY_SPECS[name]
    truth = FHMV.from_natural_parameters(spec, **random_natural(spec, rng, separation=2.0))
    y, x = _ragged_batch(spec, rng, truth, data)
    start = init_model(jax.random.key(1), spec, y, x, lengths=LENGTHS)
    for prior, acceleration in (((1e-2, 1e-2), None), ((0.0, 0.0), "squarem")):
        with pytest.warns(ConvergenceWarning):
            result = fit_em(start, y, x, lengths=LENGTHS, max_iters=8, tol=0.0, covariance_ridge=prior[0],
                            covariance_prior_count=prior[1], acceleration=acceleration)
        assert len(result.log_likelihoods) == result.num_iters + 1 and not result.converged
        assert result.num_iters == 8 if acceleration is None else result.num_iters <= 8
        assert np.all(np.diff(result.objectives) >= -1e-9 * np.abs(result.objectives[1:]))
        assert result.objectives[-1] > result.objectives[0]
        if prior == (0.0, 0.0):
            np.testing.assert_array_equal(result.objectives, result.log_likelihoods)
        for value in jax.tree.leaves(result.model.natural_parameters()):
            assert np.all(np.isfinite(value))


@pytest.mark.parametrize("name", ["markov", "family-mask-gaussian"])
def test_the_predicted_gain_is_the_newton_gain_of_the_curvature(rng, name):
    """``check_score``'s remaining gain (forward differences along its directions: all 48 coordinates of the
    markov spec, one per array of family-mask-gaussian's 66) is 0.5 g^T (-D H D^T)^+ D g / n, with the Hessian
    H from central differences of the exact gradient along every coordinate (error O(h^2), h = 1e-4)."""
    spec = TINY_SPECS[name]
    truth = FHMV.from_natural_parameters(spec, **random_natural(spec, rng, separation=2.0))
    y, x = _ragged_batch(spec, rng, truth, "sampled")
    with pytest.warns(ConvergenceWarning):
        fit = fit_em(init_model(jax.random.key(1), spec, y, x, lengths=LENGTHS), y, x, lengths=LENGTHS,
                     max_iters=40, tol=0.0)
    yb, xb, mask = check_sequences(spec, y, x, LENGTHS)
    prior = CovariancePrior(jnp.asarray(1e-2, jnp.float64), jnp.asarray(1e-2, jnp.float64))  # as fit_em makes it
    check = check_score(fit.model, yb, xb, mask, prior, **FIT_OPTIONS)
    raw = fit.model.raw_arrays()
    names = list(check.score)
    sizes = [int(np.size(raw[k])) for k in names]

    def gradient(flat):
        pieces = dict(zip(names, np.split(flat, np.cumsum(sizes)[:-1]), strict=True))
        point = raw | {k: jnp.asarray(pieces[k].reshape(np.shape(raw[k]))) for k in names}
        score = _score(point, spec, yb, xb, mask, prior, *FIT_OPTIONS.values())
        return np.concatenate([np.ravel(score[k]) for k in names])

    at = np.concatenate([np.ravel(raw[k]) for k in names])
    g, h = gradient(at), 1e-4
    hessian = np.stack([(gradient(at + h * e) - gradient(at - h * e)) / (2 * h) for e in np.eye(at.size)])
    if at.size <= 64:
        directions = np.eye(at.size)[g != 0]
    else:
        parts = [np.where(np.repeat(np.arange(len(names)), sizes) == i, g, 0.0) for i in range(len(names))]
        directions = np.stack([p / np.linalg.norm(p) for p in parts if np.any(p)])
    assert len(directions) == (43 if name == "markov" else 13)
    curvature = -directions @ (0.5 * (hessian + hessian.T)) @ directions.T
    eigvals = np.linalg.eigvalsh(curvature)
    assert eigvals[0] > -1e-8 * eigvals[-1], "the fit is not a maximum along these directions"
    slopes = directions @ g
    exact = 0.5 * slopes @ np.linalg.lstsq(curvature, slopes, rcond=1e-10)[0] / int(mask.sum())
    assert exact > 1e-8, "a gain of rounding size would make the comparison empty"
    np.testing.assert_allclose(check.remaining_gain, exact, rtol=1e-3)
    np.testing.assert_allclose(check.norm, np.linalg.norm(g), rtol=1e-12)


def _t_spec():
    return ModelSpec(num_features=10, num_regimes=1, num_chains=0, num_jump_states=1, num_components=1, leverage="none")


@pytest.mark.parametrize(("nu", "bounds"), [(5.0, (4.5, 5.5)), (30.0, (20.0, 45.0))])
def test_degrees_of_freedom_are_recovered(rng, nu, bounds):
    scale = stats.wishart(df=12, scale=np.eye(10) / 12).rvs(random_state=rng)
    y = stats.multivariate_t(np.zeros(10), scale, df=nu).rvs(size=20_000, random_state=rng)
    result = fit_em(init_model(jax.random.key(0), _t_spec(), y), y, max_iters=200, tol=1e-7)
    fitted = float(result.model.natural_parameters()["dof"][0, 0])
    assert bounds[0] <= fitted <= bounds[1], fitted


def _reduced_spec(G=3, K=2, D=3):
    return ModelSpec(num_features=D, num_regimes=G, num_chains=0, num_jump_states=1, num_components=K,
                     leverage="none", gaussian=True)


def _peer(natural, n_iter):
    G, K = natural["weights"].shape
    peer = GMMHMM(n_components=G, n_mix=K, covariance_type="full", init_params="", params="stmcw", n_iter=n_iter,
                  tol=-np.inf)
    peer.startprob_ = natural["initial_regime"].copy()
    peer.transmat_ = natural["regime_transition"].copy()
    peer.weights_ = natural["weights"].copy()
    peer.means_ = natural["means"].copy()
    peer.covars_ = natural["covariances"].copy()
    return peer


def _assert_matches_peer(natural, model, peer, atol=1e-9):
    got = {k: np.asarray(v) for k, v in model.natural_parameters().items()}
    np.testing.assert_allclose(got["initial_regime"], peer.startprob_, atol=atol)
    np.testing.assert_allclose(got["regime_transition"], peer.transmat_, atol=atol)
    np.testing.assert_allclose(got["weights"], peer.weights_, atol=atol)
    np.testing.assert_allclose(got["means"], peer.means_, atol=atol)
    # hmmlearn accumulates the scatter about the previous means; the exact M-step uses the
    # new ones: Sigma_exact = Sigma_hmmlearn - (mu_new - mu_old)(mu_new - mu_old)^T.
    shift = peer.means_ - natural["means"]
    np.testing.assert_allclose(got["covariances"], peer.covars_ - shift[..., :, None] * shift[..., None, :], atol=atol)


def test_one_iteration_equals_hmmlearn(rng):
    spec = _reduced_spec()
    natural = random_natural(spec, rng, separation=1.0)
    model = FHMV.from_natural_parameters(spec, **natural)
    y = np.asarray(model.sample(jax.random.key(4), 500).observations) + rng.normal(size=(500, 3)) * 0.3
    peer = _peer(natural, 1).fit(y)
    result = fit_em(model, y, max_iters=1, tol=0.0, covariance_ridge=0.0, covariance_prior_count=0.0)
    _assert_matches_peer(natural, result.model, peer)


def test_ragged_batch_with_nan_padding_equals_hmmlearn_with_lengths(rng):
    spec = _reduced_spec(G=2, K=2, D=2)
    natural = random_natural(spec, rng)
    model = FHMV.from_natural_parameters(spec, **natural)
    lengths = np.array([120, 200, 75])
    parts = [np.asarray(model.sample(jax.random.key(i), n).observations) for i, n in enumerate(lengths)]
    padded = np.full((3, 200, 2), np.nan)
    for b, part in enumerate(parts):
        padded[b, : len(part)] = part
    peer = _peer(natural, 1).fit(np.concatenate(parts), lengths)
    kwargs = dict(max_iters=1, tol=0.0, covariance_ridge=0.0, covariance_prior_count=0.0)
    result = fit_em(model, padded, lengths=lengths, **kwargs)
    _assert_matches_peer(natural, result.model, peer)
    np.testing.assert_allclose(
        result.log_likelihoods[0], sum(model.log_likelihood(p) for p in parts), rtol=1e-12
    )
    other_padding = np.where(np.isnan(padded), 1e6, padded)
    again = fit_em(model, other_padding, lengths=lengths, **kwargs)
    assert eqx.tree_equal(again.model, result.model)


def test_batch_equals_sum_of_sequences(rng):
    spec = ModelSpec(num_features=3, num_regimes=2, num_chains=2, driver_feature=0)
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng, separation=2.0))
    ys = np.stack([np.asarray(model.sample(jax.random.key(i), 150).observations) for i in range(3)])
    stats = eqx.filter_jit(fhmv_jax.em.batch_e_step)(model, *check_sequences(spec, ys))
    single = jax.jit(lambda y: fhmv_jax.em.e_step(model, y, y[:, 0], jnp.ones(150, bool)))
    singles = [single(jnp.asarray(y)) for y in ys]
    for field in ("counts", "second", "dof_terms"):
        np.testing.assert_allclose(getattr(stats.components, field).sum(0),
                                   sum(getattr(s.components, field) for s in singles), rtol=1e-10)


def test_em_step_traces_once(rng, monkeypatch):
    spec = ModelSpec(num_features=2, num_regimes=2, num_chains=1, leverage="none")
    traced = eqx.debug.assert_max_traces(loop_module.batch_e_step, max_traces=1)
    monkeypatch.setattr(loop_module, "batch_e_step", traced)
    y = rng.normal(size=(37, 2))
    result = fit_em(init_model(jax.random.key(0), spec, y), y, max_iters=6, tol=0.0)
    assert result.num_iters == 6
    assert eqx.debug.get_num_traces(traced) == 1


RESTART_SPEC = ModelSpec(num_features=2, num_regimes=3, num_chains=1, leverage="none")


def test_empty_regime_fits_without_nan(rng):
    """A regime far from every observation; the spec and length of ``test_restarts_keep_the_best`` (same programs)."""
    spec = RESTART_SPEC
    y = np.concatenate([rng.normal(size=(150, 2)) * 0.1, rng.normal(size=(150, 2)) * 0.1 + 5])
    model = init_model(jax.random.key(0), spec, y)
    natural = {k: np.array(v) for k, v in model.natural_parameters().items()}
    natural["means"][2] = 50.0
    result = fit_em(FHMV.from_natural_parameters(spec, **natural), y, max_iters=10)
    for value in jax.tree.leaves(result.model.natural_parameters()):
        assert np.all(np.isfinite(value))
    assert np.all(np.linalg.eigvalsh(np.asarray(result.model.natural_parameters()["covariances"])) > 0)
    dof = np.asarray(result.model.natural_parameters()["dof"])
    assert np.all((dof >= spec.dof_bounds[0]) & (dof <= spec.dof_bounds[1]))


def test_a_decreasing_step_raises(rng, monkeypatch):
    """A patched, harmful M-step is caught. The data have a length no other test uses: a compiled ECM step is
    cached by shape, so the patched step must neither reuse another test's program nor leave one behind."""
    spec = ModelSpec(num_features=2, num_regimes=2, num_chains=0, num_jump_states=1, leverage="none")
    original = loop_module.m_step

    def harmful(*args):
        model, stalled = original(*args)
        return eqx.tree_at(lambda m: m.emission.means, model, model.emission.means + 3.0), stalled

    monkeypatch.setattr(loop_module, "m_step", harmful)
    y = rng.normal(size=(41, 2))
    with pytest.raises(RuntimeError, match="decreased the penalised log-likelihood"):
        fit_em(init_model(jax.random.key(0), spec, y), y, max_iters=3)


def test_restarts_keep_the_best(rng):
    spec = RESTART_SPEC
    truth = FHMV.from_natural_parameters(spec, **random_natural(spec, rng, separation=3.0))
    y = np.asarray(truth.sample(jax.random.key(0), 300).observations)
    start = init_model(jax.random.key(1), spec, y)
    result = fit_em(start, y, max_iters=5, num_restarts=3, key=jax.random.key(2))
    assert result.restart_log_likelihoods.shape == (3,)
    assert result.model.emission.means.shape == (3, 2, 2)
    np.testing.assert_allclose(result.model.log_likelihood(y), result.log_likelihoods[-1], rtol=1e-10)
    single = fit_em(start, y, max_iters=5)
    np.testing.assert_allclose(result.restart_log_likelihoods[0], single.log_likelihoods[-1], rtol=1e-9)
    assert result.log_likelihoods[-1] >= result.restart_log_likelihoods.max() - 1e-6


def test_progress_lines_and_silence(rng, capsys):
    """On the monotonicity checks' ragged batch of the tiny ``none`` spec (their programs)."""
    spec = TINY_SPECS["none"]
    y, _ = _ragged_batch(spec, rng, None, "random")
    start = init_model(jax.random.key(1), spec, y, None, lengths=LENGTHS)
    fit_em(start, y, lengths=LENGTHS, max_iters=2, tol=0.0)
    assert capsys.readouterr().out == ""
    fit_em(start, y, lengths=LENGTHS, max_iters=2, tol=0.0, verbose=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "log-lik" in lines[1] and "gain/step" in lines[1]
    seen = []
    fit_em(start, y, lengths=LENGTHS, max_iters=2, tol=0.0, callback=seen.append)
    assert [i.iteration for i in seen] == [0, 1, 2] and capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(y=np.zeros((2, 10, 2)), lengths=[10, 11]), "must not exceed"),
        (dict(y=np.zeros((2, 10, 2)), lengths=[10, 1]), "sequence 1: y has 1 time steps"),
        (dict(y=np.where(np.eye(10, 2) > 0, np.nan, 0.0)), "NaN or inf"),
        (dict(y=np.zeros((10, 3))), "3 features"),
        (dict(y=np.zeros((10, 2)), max_iters=0), "max_iters"),
        (dict(y=np.zeros((10, 2)), num_restarts=2), "needs a PRNG key"),
    ],
)
def test_fit_rejects_bad_input(rng, kwargs, message):
    spec = ModelSpec(num_features=2, num_regimes=2, num_chains=0, num_jump_states=1, leverage="none")
    model = FHMV.from_natural_parameters(spec, **random_natural(spec, rng))
    y = kwargs.pop("y")
    with pytest.raises(ValueError, match=message):
        fit_em(model, y, **kwargs)


def test_recovers_a_known_default_spec_model():
    """Refit data drawn from a known default-spec model (T = 20000) from ``init_model``.

    Tolerances: regimes must agree on >= 95% of steps after Hungarian alignment. The
    persistence chains switch ~400 times each, so p is pinned to +-0.005; the jump chain
    enters its burst state ~900 times, so q gets +-0.015. The magnitudes are confounded
    with the Student-t tails (nu ~ 8) and, for m_1, with 3-step bursts, so c_1 gets +-7.5%
    and m_1 +-12%.
    """
    from scipy.optimize import linear_sum_assignment

    from fhmv_jax.model import example_model

    truth = example_model(jax.random.key(0))
    sample = truth.sample(jax.random.key(1), 20_000)
    y = np.asarray(sample.observations)
    result = fit_em(init_model(jax.random.key(2), truth.spec, y), y, max_iters=60)
    assert result.converged
    predicted = np.asarray(result.model.smooth(y).marginals.regime).argmax(-1)
    confusion = np.zeros((6, 6))
    np.add.at(confusion, (np.asarray(sample.states.regime), predicted), 1)
    rows, cols = linear_sum_assignment(-confusion)
    assert confusion[rows, cols].sum() / len(y) >= 0.95
    fitted = result.model.natural_parameters()
    assert abs(float(fitted["c1"]) - 2.0) <= 0.15
    assert abs(float(fitted["m1"]) - 3.0) <= 0.35
    np.testing.assert_allclose(fitted["persistence_stay"], 0.98, atol=0.005)
    assert abs(float(fitted["jump_transition"][0, 1]) - 0.05) <= 0.015
    assert result.log_likelihoods[-1] >= float(truth.log_likelihood(y))


def test_leverage_regression_derivatives_match_autodiff(rng):
    """The closed-form logistic gradient and Hessian equal jax.grad / jax.hessian of the softmax objective."""
    import importlib

    m_step_module = importlib.import_module("fhmv_jax.em.m_step")
    pairwise = jnp.asarray(rng.dirichlet(np.ones(4), size=(2, 60)).reshape(2, 60, 2, 2))
    x = jnp.asarray(rng.normal(size=(2, 61)))
    raw = jnp.asarray(rng.normal(size=(2, 2)))

    def softmax_objective(flat):
        a, b = flat.reshape(2, 2)
        zeros = jnp.zeros(2)
        logits = jnp.stack([zeros, a], -1)[None, None] + jnp.stack([zeros, b], -1)[None, None] * x[:, :-1, None, None]
        return jnp.sum(pairwise * jax.nn.log_softmax(logits, axis=-1))

    data = m_step_module._leverage_inputs(LeverageStats(pairwise, x[:, :-1]))
    np.testing.assert_allclose(m_step_module.leverage_log_likelihood(raw, *data), softmax_objective(raw.reshape(-1)),
                               rtol=1e-12)
    grad, hess = m_step_module.leverage_derivatives(raw, *data)
    np.testing.assert_allclose(grad, jax.grad(softmax_objective)(raw.reshape(-1)), atol=1e-10)
    np.testing.assert_allclose(hess, jax.hessian(softmax_objective)(raw.reshape(-1)), atol=1e-10)


def test_a_float32_fit_on_the_cpu_warns(rng):
    spec = ModelSpec(num_features=2, num_regimes=2, num_chains=0, num_jump_states=1, leverage="none")
    model = FHMV.from_natural_parameters(spec, dtype=jnp.float32, **random_natural(spec, rng))
    y = rng.normal(size=(50, 2))
    with pytest.warns(UserWarning, match="float32 on the CPU"):
        result = fit_em(model, y, max_iters=2)
    assert result.model.dtype == jnp.float32 and np.all(np.diff(result.objectives) > -1e-3)

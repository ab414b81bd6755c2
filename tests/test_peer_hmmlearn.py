"""The reduced model (no factors, Gaussian mixtures) equals hmmlearn's GMMHMM."""

import numpy as np
import pytest
from helpers import random_natural
from hmmlearn.hmm import GMMHMM

from fhmv_jax import FHMV, ModelSpec


@pytest.mark.parametrize(("G", "K", "D"), [(3, 2, 3), (4, 1, 2)])
def test_reduced_model_equals_gmmhmm(rng, G, K, D):
    spec = ModelSpec(num_features=D, num_regimes=G, num_chains=0, num_jump_states=1, num_components=K,
                     leverage="none", gaussian=True)
    natural = random_natural(spec, rng, separation=2.0)
    model = FHMV.from_natural_parameters(spec, **natural)
    peer = GMMHMM(n_components=G, n_mix=K, covariance_type="full", init_params="", params="")
    peer.startprob_ = natural["initial_regime"]
    peer.transmat_ = natural["regime_transition"]
    peer.weights_ = natural["weights"]
    peer.means_ = natural["means"]
    peer.covars_ = natural["covariances"]
    y = model.sample(np.asarray([0, 7], dtype=np.uint32), 400).observations
    y = np.asarray(y) + rng.normal(size=y.shape) * 0.5

    np.testing.assert_allclose(model.log_likelihood(y), peer.score(y), rtol=1e-8)
    np.testing.assert_allclose(model.smooth(y).marginals.regime, peer.predict_proba(y), rtol=1e-8, atol=1e-10)
    _, peer_path = peer.decode(y, algorithm="viterbi")
    np.testing.assert_array_equal(model.viterbi(y).regime, peer_path)

"""The DP popularity release that starts the item bias: its sensitivity to one user, its noise, its place in the
accountant's history, and where it is refused."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fl_client.dp.engine import PrivacyConfig, calibrate_noise, composed_epsilon
from fl_client.dp.popularity import private_popularity, user_normalised_counts
from fl_client.site import SiteConfig
from fl_client.train import TrainConfig, release_popularity, train
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import POPULARITY_FLOOR, FedRecModel


def biased_model(item_bias: bool = True) -> FedRecModel:
    torch.manual_seed(0)
    return FedRecModel(FedRecConfig(num_items=30, hidden_size=16, max_len=8, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, item_bias=item_bias))


def test_one_user_moves_the_released_counts_by_exactly_one_in_l2(seqs):
    rows = 31
    full = user_normalised_counts(seqs, rows)
    for u in (0, 7, len(seqs) - 1):
        without = user_normalised_counts(seqs.subset([v for v in range(len(seqs)) if v != u]), rows)
        assert np.linalg.norm(full - without) == pytest.approx(1.0)  # the Gaussian mechanism's sensitivity
    # A user who repeats an item weighs it more, still within norm 1; events past the training part never count.
    raw = seqs.item_counts(rows)
    assert np.array_equal(full > 0, raw > 0)


def test_the_release_adds_noise_of_the_asked_sigma_to_every_row(seqs):
    exact = torch.from_numpy(user_normalised_counts(seqs, 31)).float()
    draws = torch.stack([private_popularity(seqs, 31, 5.0, generator=torch.Generator().manual_seed(s)) - exact
                         for s in range(200)])
    assert draws.std().item() == pytest.approx(5.0, rel=0.05)
    secure = private_popularity(seqs, 31, 5.0, secure_mode=True) - exact
    assert 2.0 < secure.std().item() < 8.0
    with pytest.raises(ValueError, match="popularity_noise"):
        private_popularity(seqs, 31, 0.0)


def test_the_release_alone_is_accounted_as_the_gaussian_mechanism_it_is():
    """Opacus' PRV accountant on (σ, 1, 1) against the exact ε of the Gaussian mechanism at sensitivity 1
    (Balle & Wang 2018): never below it (PRV bounds from above), within 0.02."""
    for sigma in (3.0, 7.0):
        mu = 1 / sigma

        def delta_at(eps: float, mu: float = mu) -> float:
            return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - 1e-5

        exact = brentq(delta_at, 1e-6, 50)
        assert exact <= composed_epsilon([(sigma, 1.0, 1)], 1e-5, "prv") <= exact + 0.02


def test_dp_sgd_gets_what_the_release_leaves_of_epsilon():
    config = PrivacyConfig(enabled=True, epsilon=1.0)
    alone = calibrate_noise(config, 0.25, 40, 1e-5)
    after = calibrate_noise(config, 0.25, 40, 1e-5, before=[(7.0, 1.0, 1)])
    assert after > alone  # the release's share of ε is taken from the steps
    total = composed_epsilon([(7.0, 1.0, 1), (after, 0.25, 40)], 1e-5, "prv")
    assert 0.99 <= total <= 1.0
    with pytest.raises(ValueError, match="already spend"):
        calibrate_noise(config, 0.25, 40, 1e-5, before=[(0.5, 1.0, 1)])


def test_training_starts_the_bias_from_the_release_and_accounts_for_it(seqs):
    privacy = PrivacyConfig(enabled=True, epsilon=2.0, popularity_noise=3.0)
    model = biased_model()
    assert release_popularity(model, seqs, privacy, torch.Generator().manual_seed(0)) == [(3.0, 1.0, 1)]
    released = private_popularity(seqs, 31, 3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model.output.bias, released.clamp(min=POPULARITY_FLOOR).log())
    assert release_popularity(model, seqs, replace(privacy, popularity_noise=0.0), torch.Generator()) == []

    model = biased_model()
    result = train(model, seqs, TrainConfig(epochs=2, batch_size=16, lr=1e-3), privacy)
    assert result.privacy is not None
    history = result.privacy.history
    assert history[0] == (3.0, 1.0, 1) and sum(n for _, _, n in history[1:]) == 2 * 4
    assert result.privacy.epsilon == pytest.approx(2.0, rel=0.02)  # the release and the steps together
    assert composed_epsilon(history[1:], result.privacy.delta, "prv") < 1.95  # the steps alone spend less
    claim = result.privacy.claim()
    assert "over 8 DP-SGD steps" in claim and "one release of item popularity (σ = 3.000)" in claim


def test_the_release_needs_an_item_bias_and_dp(seqs):
    with pytest.raises(ValueError, match="item_bias"):
        train(biased_model(item_bias=False), seqs, TrainConfig(epochs=1, batch_size=16),
              PrivacyConfig(enabled=True, popularity_noise=3.0))
    with pytest.raises(ValueError, match="popularity_noise"):
        PrivacyConfig(enabled=True, popularity_noise=-1.0)
    model = biased_model()
    before = model.output.bias.detach().clone()
    result = train(model, seqs, TrainConfig(epochs=1, batch_size=16, lr=0.0),
                   PrivacyConfig(enabled=False, popularity_noise=3.0))
    assert torch.equal(model.output.bias, before) and result.privacy is None  # without DP: no release, no claim


def test_a_federated_site_refuses_the_release():
    site = SiteConfig(data_path="d", catalog_path="c", state_dir="s")
    with pytest.raises(ValueError, match="popularity_noise"):
        replace(site, privacy=PrivacyConfig(enabled=True, popularity_noise=3.0))

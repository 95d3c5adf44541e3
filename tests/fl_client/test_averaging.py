"""Iterate averaging: the EMA is the debiased closed form, leaves training untouched, and costs no ε."""

import pytest
import torch

from fl_client.averaging import WeightAverage
from fl_client.privacy import PrivacyConfig
from fl_client.train import TrainConfig, train
from shared_model import wire
from tests.fl_client.test_privacy import tiny_model


def test_the_average_is_the_debiased_exponential_average_of_the_steps_and_ignores_frozen_weights():
    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    average, decay, steps = WeightAverage(model, 0.8), 0.8, [1.0, 4.0, -2.0]
    assert average.averaged() == {}  # nothing to average before a step
    for value in steps:
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
    expected = sum(decay ** (len(steps) - 1 - i) * (1 - decay) * v for i, v in enumerate(steps)) / (
        1 - decay ** len(steps))
    assert set(average.averaged()) == {"weight"}
    assert torch.allclose(average.averaged()["weight"], torch.full((1, 2), expected))
    with average.applied(model):
        assert torch.allclose(model.weight, torch.full((1, 2), expected))
    assert torch.equal(model.weight, torch.full((1, 2), -2.0))  # the trained weights come back
    average.copy_to(model)
    assert torch.allclose(model.weight, torch.full((1, 2), expected))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_a_decay_outside_zero_one_is_refused_by_name(decay):
    with pytest.raises(ValueError, match=r"train\.ema_decay"):
        WeightAverage(torch.nn.Linear(2, 1), decay)


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp"])
def test_averaging_changes_neither_the_training_nor_the_privacy_spent(seqs, dp):
    privacy = PrivacyConfig(enabled=dp, epsilon=3.0, max_grad_norm=1.0)
    plain_config = TrainConfig(epochs=3, batch_size=16, lr=0.01, seed=4)
    plain, averaged = tiny_model(True), tiny_model(True)
    plain_result = train(plain, seqs, plain_config, privacy, valid=seqs)
    result = train(averaged, seqs, TrainConfig(**{**vars(plain_config), "ema_decay": 0.5}), privacy, valid=seqs)
    assert plain_result.last_iterate is None
    # The same steps were taken: the last iterate of the averaged run is the plain run's final model.
    assert result.last_iterate is not None
    for name, weight in wire.trainable_state(plain).items():
        assert torch.allclose(result.last_iterate[name], weight, atol=1e-6), name
    # The model that is kept (and was validated) is the average, not the last iterate.
    kept = wire.trainable_state(averaged)
    assert any(not torch.allclose(kept[n], w) for n, w in result.last_iterate.items())
    assert result.valid_history != plain_result.valid_history
    if dp:  # post-processing: the same ε, σ and steps
        assert result.privacy == plain_result.privacy
    else:
        assert result.privacy is None

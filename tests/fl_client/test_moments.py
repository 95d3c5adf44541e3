"""Shared optimiser state at a site: moments to the wire and back, and a round that starts from them."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_client.moments import from_named_moments, to_named_moments, trainable_names
from fl_client.round_config import RoundConfig, build_global_model
from fl_client.site import load_site_data
from fl_client.train import TrainConfig, build_optimizer
from fl_client.training_round import train_round
from shared_model import wire
from tests.fl_client.server_round import round_record


def stepped_model_and_optimizer(record: dict, state: dict):
    """The round's model after two Adam steps on a made-up loss, and its optimiser."""
    model = build_global_model(RoundConfig.from_record(record), state)
    optimizer = build_optimizer(model, TrainConfig(lr=0.01))
    for _ in range(2):
        optimizer.zero_grad()
        sum((p**2).sum() for p in model.parameters() if p.requires_grad).backward()
        optimizer.step()
    return model, optimizer


def test_moments_go_to_named_tensors_and_back_unchanged(site):
    record, state = round_record(load_site_data(site).catalog)
    model, optimizer = stepped_model_and_optimizer(record, state)
    names = trainable_names(model)
    moments = to_named_moments(optimizer.state_dict(), names)
    assert set(moments) == {wire.MOMENTS_STEP} | {f"{n}:{m}" for n in names for m in ("exp_avg", "exp_avg_sq")}
    assert float(moments[wire.MOMENTS_STEP][0]) == 2.0
    fresh = build_optimizer(model, TrainConfig(lr=0.01))
    fresh.load_state_dict(from_named_moments(moments, model, fresh.state_dict()))
    for index, name in enumerate(names):
        restored = fresh.state_dict()["state"][index]
        assert torch.equal(restored["exp_avg_sq"], moments[f"{name}:exp_avg_sq"]) and float(restored["step"]) == 2.0
    assert to_named_moments(build_optimizer(model, TrainConfig()).state_dict(), names) == {}  # nothing stepped yet


def test_moments_that_do_not_fit_the_model_are_refused_by_name(site):
    record, state = round_record(load_site_data(site).catalog)
    model, optimizer = stepped_model_and_optimizer(record, state)
    template = optimizer.state_dict()
    moments = to_named_moments(template, trainable_names(model))
    with pytest.raises(ValueError, match=r"item_embeddings.weight:exp_avg has shape \(3, 3\)"):
        from_named_moments({**moments, "item_embeddings.weight:exp_avg": torch.zeros(3, 3)}, model, template)
    with pytest.raises(ValueError, match=r"no moments for final_norm\.bias"):
        from_named_moments({k: v for k, v in moments.items() if not k.startswith("final_norm.bias")}, model,
                           template)
    with pytest.raises(ValueError, match=r"does not train.*extra\.weight"):
        from_named_moments({**moments, "extra.weight:exp_avg": torch.zeros(1)}, model, template)
    with pytest.raises(ValueError, match="no step count"):
        from_named_moments({k: v for k, v in moments.items() if k != wire.MOMENTS_STEP}, model, template)


def test_a_site_sends_its_moments_and_starts_from_the_shared_ones_when_asked(site):
    data = load_site_data(site)
    plain = replace(site, privacy=replace(site.privacy, enabled=False))
    record, state = round_record(data.catalog)
    assert train_round(plain, data, RoundConfig.from_record(record), state).moments is None  # not asked
    record[wire.SHARE_OPTIMIZER_STATE] = True
    first = train_round(plain, data, RoundConfig.from_record(record), state)  # round 1: nothing shared yet
    per_round = -(-len(data.sequences.trainable_users()) // 32)  # batch 32, one local epoch
    assert first.moments is not None and float(first.moments[wire.MOMENTS_STEP][0]) == per_round
    shared = {k: v * 0.5 if k != wire.MOMENTS_STEP else v for k, v in first.moments.items()}
    record[wire.SERVER_ROUND] = 2
    second = train_round(plain, data, RoundConfig.from_record(record), first.state, shared)
    assert float(second.moments[wire.MOMENTS_STEP][0]) == 2 * per_round  # continued from the shared state
    restarted = train_round(plain, data, RoundConfig.from_record(record), first.state)  # same round, no moments
    assert not torch.equal(second.state["item_embeddings.weight"], restarted.state["item_embeddings.weight"])
    assert not Path(plain.state_dir, "optimizer").exists()  # the site keeps no state of its own for this


def test_a_dp_site_shares_moments_of_its_noised_gradients_and_still_spends_its_accounted_epsilon(site):
    data = load_site_data(site)
    record, state = round_record(data.catalog)
    record[wire.SHARE_OPTIMIZER_STATE] = True
    first = train_round(site, data, RoundConfig.from_record(record), state)
    assert first.dp and 0 < first.epsilon < site.privacy.epsilon and first.moments is not None
    record[wire.SERVER_ROUND] = 2
    second = train_round(site, data, RoundConfig.from_record(record), first.state, first.moments)
    assert first.epsilon < second.epsilon <= site.privacy.epsilon * 1.01  # sharing changes nothing about the accounting
    assert float(second.moments[wire.MOMENTS_STEP][0]) > float(first.moments[wire.MOMENTS_STEP][0])

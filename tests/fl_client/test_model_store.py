"""What a site process keeps between messages: an untouched model per config, and the last message's model,
reused only when nothing of the message that used it is left on it."""

from dataclasses import replace

import pytest
import torch

from fl_client import model_store, training_round
from fl_client.dp.settings import PrivacyConfig
from fl_client.round_config import RoundConfig, build_global_model, config_shapes, global_model
from fl_client.site import load_site_data
from fl_client.training_round import train_round
from tests.fl_client.server_round import round_record


def empty_store(monkeypatch) -> None:
    """The store of a process that has built nothing yet."""
    for name in ("MODEL_TEMPLATES", "BUILT_ONCE", "SPARE_MODELS", "TEMPLATE_SIGNATURES"):
        monkeypatch.setattr(model_store, name, type(getattr(model_store, name))())


@pytest.fixture
def store(monkeypatch):
    empty_store(monkeypatch)
    return model_store


def test_a_process_that_builds_a_config_again_copies_an_untouched_model_and_only_then(site, store, monkeypatch):
    """A simulated site's worker builds each message's model from a kept untrained copy (from the config's second
    build on); what one message's training does to its model never reaches the next, and a process that builds
    once (a deployed site's) keeps no copy."""
    record, state = round_record(load_site_data(site).catalog)
    cfg = RoundConfig.from_record(record)
    first = build_global_model(cfg, state)
    assert store.MODEL_TEMPLATES == {}  # one build: nothing kept
    second = build_global_model(cfg, state)
    with torch.no_grad():  # what training does to a message's model
        for tensor in [*first.parameters(), *second.parameters()]:
            tensor.add_(1.0)
    models = [build_global_model(cfg, {k: v + step for k, v in state.items()}) for step in (0.0, 2.0)]
    assert len({id(m) for m in [first, second, *models]}) == 4
    for step, model in zip((0.0, 2.0), models, strict=True):
        assert all(torch.equal(model.state_dict()[k], v + step) for k, v in state.items())
        assert model.output.weight is model.item_embeddings.weight  # tied, as a built model
        assert all(p.grad is None for p in model.parameters()) and model.training == first.training
    [template] = store.MODEL_TEMPLATES.values()
    assert not any(p is q for p in template.parameters() for m in models for q in m.parameters())
    # a model over TEMPLATE_MAX_NUMBERS is built every time, never held twice
    monkeypatch.setattr(store, "MODEL_TEMPLATES", {})
    monkeypatch.setattr(store, "TEMPLATE_MAX_NUMBERS", config_shapes(cfg.model_config)[0] - 1)
    for _ in range(3):
        with global_model(cfg, state):
            pass
    assert store.MODEL_TEMPLATES == {} and store.SPARE_MODELS == {}


def test_a_reused_model_trains_another_site_bit_for_bit_as_a_fresh_one(site, store, tmp_path, monkeypatch):
    """Site A's DP round leaves its gradients, Opacus' clipped sums and its trained weights on its model; the
    process takes the model back clean and site B's round on it equals B's round on a freshly built model: the
    same weights, loss and ε, to the bit (with the round's seed fixed: under DP it is fresh entropy)."""
    monkeypatch.setattr(training_round, "round_seed", lambda _site, _cfg: 7)
    data = load_site_data(site)
    records = [round_record(data.catalog, server_round=r, num_rounds=3) for r in (1, 2)]
    for record, state in records:  # two messages: the second keeps a template, then its model comes back
        train_round(site, data, RoundConfig.from_record(record), state)
    config = RoundConfig.from_record(records[0][0]).model_config
    spare = store.SPARE_MODELS[config]
    assert all(p.grad is None and vars(p) == {} for p in spare.parameters())  # no summed_grad left on it
    replies = []
    for name in ("reused", "fresh"):
        other = replace(site, state_dir=str(tmp_path / name))
        if name == "fresh":
            empty_store(monkeypatch)
        record, state = records[0]
        replies.append(train_round(other, load_site_data(other), RoundConfig.from_record(record), state))
        if name == "reused":
            assert store.SPARE_MODELS[config] is spare  # B's round ran on A's model, and gave it back
    reused, fresh = replies
    assert reused.state.keys() == fresh.state.keys()
    assert all(torch.equal(reused.state[k], fresh.state[k]) for k in fresh.state)
    assert (reused.train_loss, reused.epsilon, reused.num_examples) == (fresh.train_loss, fresh.epsilon,
                                                                        fresh.num_examples)


def test_opacus_hooks_mode_leaves_its_hooks_on_the_model_so_it_is_not_reused(site, store):
    hooks = replace(site, privacy=PrivacyConfig(enabled=True, epsilon=4.0, grad_sample_mode="hooks"))
    data = load_site_data(hooks)
    for server_round in (1, 2):
        record, state = round_record(data.catalog, server_round=server_round, num_rounds=3)
        train_round(hooks, data, RoundConfig.from_record(record), state)
    assert store.MODEL_TEMPLATES and store.SPARE_MODELS == {}


def leave_a_hook(model: torch.nn.Module) -> None:
    model.layers[0].attention.self.query.register_forward_hook(lambda *args: None)


def leave_a_field(model: torch.nn.Module) -> None:
    model.layers[0].intermediate.activations = [torch.zeros(2)]  # what Opacus' hooks keep on a layer


def change_a_setting(model: torch.nn.Module) -> None:
    model.layers[0].attention.self.heads += 1


def freeze_a_weight(model: torch.nn.Module) -> None:
    model.position_embeddings.weight.requires_grad_(False)


def untie_the_item_table(model: torch.nn.Module) -> None:
    model.output.weight = torch.nn.Parameter(model.item_embeddings.weight.detach().clone())


def retype_a_weight(model: torch.nn.Module) -> None:
    model.position_embeddings.weight.data = model.position_embeddings.weight.data.double()


@pytest.mark.parametrize("change", [leave_a_hook, leave_a_field, change_a_setting, freeze_a_weight,
                                    untie_the_item_table, retype_a_weight])
def test_a_model_that_comes_back_unlike_its_template_is_let_go(site, store, change):
    record, state = round_record(load_site_data(site).catalog)
    cfg = RoundConfig.from_record(record)
    for _ in range(2):
        build_global_model(cfg, state)
    with global_model(cfg, state) as model:
        change(model)
    assert store.SPARE_MODELS == {}
    with global_model(cfg, state) as again:
        assert again is not model


def test_a_model_that_comes_back_with_gradients_and_optimiser_fields_is_cleaned_and_reused(site, store):
    record, state = round_record(load_site_data(site).catalog)
    cfg = RoundConfig.from_record(record)
    for _ in range(2):
        build_global_model(cfg, state)
    with global_model(cfg, state) as model:
        model.eval()
        for p in model.parameters():
            p.grad, p.summed_grad = torch.ones_like(p), torch.ones_like(p)
        with torch.no_grad():
            model.item_embeddings.weight.add_(1.0)
    with global_model(cfg, {k: v + 2.0 for k, v in state.items()}) as again:
        assert again is model and again.training
        assert all(p.grad is None and not hasattr(p, "summed_grad") for p in again.parameters())
        assert all(torch.equal(again.state_dict()[k], v + 2.0) for k, v in state.items())
        assert again.output.weight is again.item_embeddings.weight

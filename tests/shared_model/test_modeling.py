"""Behaviour of the transformer model: shapes, causality, padding invariance, save/load, Opacus validity."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator

from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel, draw_negatives, sequence_loss
from shared_model.serialization import load_model_dir


def tiny(**overrides) -> FedRecModel:
    config = dict(num_items=99, hidden_size=32, num_hidden_layers=2, max_len=10, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    config.update(overrides)
    torch.manual_seed(0)
    return FedRecModel(FedRecConfig(**config)).eval()


def inputs(item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    present = (item_ids != 0).long()
    return item_ids, present * 4, present * 2


def test_opacus_accepts_every_layer():
    assert ModuleValidator.validate(tiny().train(), strict=False) == []
    full = tiny(tie_item_embeddings=False, feature_dim=8, feature_scoring=True, item_bias=True)
    assert ModuleValidator.validate(full.train(), strict=False) == []


def test_shapes_and_padding_row_never_scores():
    model = tiny()
    ids = torch.randint(1, 100, (3, 7))
    hidden = model(*inputs(ids))
    assert hidden.shape == (3, 7, 32)
    scores = model.score_next(*inputs(ids))
    assert scores.shape == (3, 100)
    assert torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


def test_causal_future_events_do_not_change_the_past():
    model = tiny()
    ids = torch.randint(1, 100, (2, 6))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] % 99) + 1
    before, after = model(*inputs(ids)), model(*inputs(changed))
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-5)
    assert not torch.allclose(before[:, -1], after[:, -1], atol=1e-5)


def test_extra_left_padding_leaves_predictions_unchanged():
    model = tiny()
    ids = torch.randint(1, 100, (2, 5))
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], dim=1)
    assert torch.allclose(model.score_next(*inputs(ids)), model.score_next(*inputs(padded)), atol=1e-4)


def test_time_gap_and_event_type_inputs_matter():
    model = tiny()
    ids = torch.randint(1, 100, (2, 5))
    a = model.score_next(ids, torch.ones_like(ids), torch.ones_like(ids))
    b = model.score_next(ids, torch.full_like(ids, 4), torch.ones_like(ids))
    c = model.score_next(ids, torch.ones_like(ids), torch.full_like(ids, 9))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    no_time = tiny(use_time_gaps=False)
    assert torch.allclose(no_time.score_next(ids, torch.ones_like(ids), torch.ones_like(ids)),
                          no_time.score_next(ids, torch.ones_like(ids), torch.full_like(ids, 9)))


def test_loss_ignores_padding_and_per_user_mean():
    model = tiny()
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    labels = torch.tensor([[0, 0, 6, 7], [2, 3, 4, 5]])
    batch = dict(zip(("item_ids", "event_types", "time_buckets"), inputs(ids), strict=True), labels=labels)
    per_user = sequence_loss(model, batch, per_user=True)
    assert per_user.shape == (2,) and torch.isfinite(per_user).all()
    assert torch.allclose(sequence_loss(model, batch, per_user=True, padded=True), per_user, atol=1e-6)
    token_mean = sequence_loss(model, batch)
    expected = (per_user[0] * 2 + per_user[1] * 4) / 6
    assert torch.allclose(token_mean, expected, atol=1e-5)
    sampled = sequence_loss(model, batch, negatives=draw_negatives(model.config.num_item_rows, 20, 2))
    assert torch.isfinite(sampled)
    every_item = draw_negatives(model.config.num_item_rows, model.config.num_item_rows - 1, 2)
    assert torch.allclose(sequence_loss(model, batch, negatives=every_item), token_mean, atol=1e-5)


def test_save_and_load_round_trip_keeps_ties_and_outputs(tmp_path):
    for tie in (True, False):
        model = tiny(tie_item_embeddings=tie)
        model.save_pretrained(tmp_path / str(tie))
        loaded = FedRecModel.from_pretrained(tmp_path / str(tie)).eval()
        assert (loaded.output.weight is loaded.item_embeddings.weight) == tie
        ids = torch.randint(1, 100, (2, 4))
        assert torch.allclose(model.score_next(*inputs(ids)), loaded.score_next(*inputs(ids)))
        assert (tmp_path / str(tie) / "model.safetensors").exists()


def test_public_item_features_feed_inputs_and_scores():
    ids = torch.randint(1, 100, (2, 4))
    for scoring in (False, True):
        model = tiny(feature_dim=8, feature_scoring=scoring)
        before = model.score_next(*inputs(ids))
        features = torch.randn(100, 8)
        model.set_item_features(features)
        assert not torch.allclose(before, model.score_next(*inputs(ids)))
    # With feature scoring, two items with equal features and equal id rows score the same.
    model.item_embeddings.weight.data[7] = model.item_embeddings.weight.data[8]
    features[7] = features[8]
    model.set_item_features(features)
    scores = model.score_next(*inputs(ids))
    assert torch.allclose(scores[:, 7], scores[:, 8])


def test_item_bias_shifts_every_users_scores_equally():
    model = tiny(item_bias=True)
    ids = torch.randint(1, 100, (3, 4))
    before = model.score_next(*inputs(ids))
    model.output.bias.data[5] += 10.0
    delta = model.score_next(*inputs(ids)) - before
    assert torch.allclose(delta[:, 5], torch.full((3,), 10.0)) and torch.allclose(delta[:, 6], torch.zeros(3))


def test_sampled_logits_agree_with_full_logits_on_the_positive():
    model = tiny(feature_dim=8, feature_scoring=True, item_bias=True)
    model.set_item_features(torch.randn(100, 8))
    hidden = model(*inputs(torch.randint(1, 100, (2, 3))))
    labels = torch.randint(1, 100, (2, 3))
    negatives = draw_negatives(100, 5, 2)
    negatives[0, 0] = labels[0, 0] if labels[0, 0] not in negatives[0] else negatives[0, 0]  # one is a label
    sampled = model.sampled_logits(hidden, labels, negatives)
    full = model.logits(hidden)
    assert torch.allclose(sampled[..., :1], full.gather(-1, labels.unsqueeze(-1)), atol=1e-5)
    own = negatives.unsqueeze(1) == labels.unsqueeze(-1)  # (2, 3, 5)
    assert torch.equal(torch.isinf(sampled[..., 1:]), own) and bool(own.any())  # a label is no negative of itself
    expected = full.gather(-1, negatives.unsqueeze(1).expand(-1, 3, -1)) + math.log(99 / 5)  # each stands for 99/5
    assert torch.allclose(sampled[..., 1:][~own], expected[~own], atol=1e-5)


@pytest.mark.parametrize("count", [3, 7], ids=["redrawn repeats", "a permutation"])
def test_each_users_negatives_are_distinct_items_every_subset_equally_likely(count):
    draws = draw_negatives(9, count, 40_000, generator=torch.Generator().manual_seed(0))  # 8 items
    assert draws.shape == (40_000, count) and int(draws.min()) >= 1 and int(draws.max()) <= 8
    assert bool((draws[:, 1:] > draws[:, :-1]).all())  # distinct (sorted)
    subsets = torch.unique(draws, dim=0, return_counts=True)[1].float()
    assert len(subsets) == math.comb(8, count)  # C(8, 3) = 56, C(8, 7) = 8 subsets
    assert float((subsets / subsets.mean() - 1).abs().max()) < 0.15  # 714 or 5,000 draws each expected
    for bad in (0, 9, -1):
        with pytest.raises(ValueError, match=rf"train.num_negatives={bad}: .* 1 to 8 negatives"):
            draw_negatives(9, bad, 1)


@pytest.mark.parametrize("name,value", [("item_embedding_size", 8), ("position_encoding", "sinusoidal"),
                                        ("trained_item_rows", 5)])
def test_a_saved_model_that_used_a_removed_option_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=rf"{name}={value!r} is no longer supported \(docs/tried.md\)"):
        FedRecConfig(hidden_size=32, **{name: value})  # what an older fedrec wrote for that option


def test_a_saved_model_that_left_a_removed_option_at_todays_behaviour_still_loads():
    old = FedRecConfig(hidden_size=32, item_embedding_size=32, position_encoding="learned", trained_item_rows=0)
    assert not any(hasattr(old, k) for k in ("item_embedding_size", "position_encoding", "trained_item_rows"))


def test_without_event_types_the_model_ignores_them_and_round_trips(tmp_path):
    model = tiny(use_event_types=False)
    assert not any(name.startswith("event_type_embeddings") for name, _ in model.named_parameters())
    assert ModuleValidator.validate(model.train(), strict=False) == []
    model.eval()
    ids = torch.randint(1, 100, (2, 4))
    _, types, gaps = inputs(ids)
    assert torch.equal(model.score_next(ids, types, gaps), model.score_next(ids, (types % 4) + 1, gaps))
    model.save_pretrained(tmp_path)
    loaded = FedRecModel.from_pretrained(tmp_path).eval()
    assert loaded.config.use_event_types is False
    assert torch.allclose(model.score_next(ids, types, gaps), loaded.score_next(ids, types, gaps))
    assert tiny().config.use_event_types is True  # the default keeps them


EXPORTED = Path(__file__).parent / "exported_v5"  # written by fedrec 0.x through transformers 5.24's save_pretrained


def test_a_model_that_transformers_saved_for_an_older_fedrec_loads_and_scores_exactly_as_it_did():
    model, catalog = load_model_dir(EXPORTED)
    expected = json.loads((EXPORTED / "expected_scores.json").read_text())
    scores = model.score_next(*(torch.tensor(expected[k]) for k in ("item_ids", "event_types", "time_buckets")))
    assert torch.isinf(scores[:, 0]).all()
    # bit for bit on the machine that saved it; another CPU's kernels may round the last bit differently
    assert torch.allclose(scores[:, 1:], torch.tensor(expected["scores"])[:, 1:], rtol=0, atol=1e-6)
    assert model.output.weight is model.item_embeddings.weight and len(catalog.item_ids) == model.config.num_items


def test_a_model_directory_that_does_not_describe_the_model_is_refused_naming_the_file(tmp_path):
    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(EXPORTED, folder)
        return folder

    config = json.loads((EXPORTED / "config.json").read_text())
    cases = {"model_type": {**config, "model_type": "bert"}, "field": {**config, "num_layers": 3},
             "type": {**config, "hidden_size": "8"}, "list": [config]}
    for name, bad in cases.items():
        (copy(name) / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"{name}/config.json: not a fedrec model config"):
            FedRecModel.from_pretrained(tmp_path / name)
    (copy("garbage") / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"garbage/model\.safetensors: not a safetensors file"):
        FedRecModel.from_pretrained(tmp_path / "garbage")
    (copy("wider") / "config.json").write_text(json.dumps({**config, "hidden_size": 16, "intermediate_size": 64}))
    with pytest.raises(ValueError, match=r"wider/model.safetensors does not fit .*other shapes .*item_embeddings"):
        FedRecModel.from_pretrained(tmp_path / "wider")
    (copy("no_bias") / "config.json").write_text(json.dumps({**config, "item_bias": False}))
    with pytest.raises(ValueError, match=r"unexpected \['output.bias'\]"):
        FedRecModel.from_pretrained(tmp_path / "no_bias")


def test_the_config_travels_as_json_and_comes_back_equal():
    config = FedRecConfig(num_items=12, feature_dim=3, item_bias=True, catalog_fingerprint="ab")
    again = FedRecConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config and again.num_item_rows == 13
    assert FedRecConfig.from_dict({**config.to_dict(), "hidden_dropout_prob": 0}).hidden_dropout_prob == 0
    with pytest.raises(TypeError, match="item_bias=1: expected bool"):
        FedRecConfig.from_dict({**config.to_dict(), "item_bias": 1})
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        FedRecConfig(hidden_act="relu")

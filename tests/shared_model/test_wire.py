"""Which tensors cross the wire: trainable weights once each, frozen public tensors only downstream."""

import pytest
import torch

from shared_model import wire
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel


def model(**overrides) -> FedRecModel:
    torch.manual_seed(0)
    return FedRecModel(FedRecConfig(num_items=30, hidden_size=16, num_attention_heads=2, max_len=8,
                                    feature_dim=4, **overrides))


def test_a_tied_item_table_travels_once_and_frozen_features_only_downstream():
    m = model()
    up, down = wire.trainable_state(m), wire.full_state(m)
    assert "item_embeddings.weight" in up and "output.weight" not in up and "output.weight" not in down
    assert set(down) - set(up) == {"item_features"}
    bytes_up = sum(t.numel() * t.element_size() for t in up.values())
    bytes_state = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert bytes_up < bytes_state - 31 * 16 * 4  # at least the duplicate table name is gone


def test_a_frozen_item_table_is_never_sent_back():
    m = model(train_item_embeddings=False, feature_scoring=True, item_bias=True)
    up = wire.trainable_state(m)
    assert "item_embeddings.weight" not in up and "output.bias" in up
    assert "item_embeddings.weight" in wire.full_state(m)


def test_loading_restores_the_model_and_names_what_is_missing():
    source, target = model(), model()
    with torch.no_grad():
        source.item_features.fill_(0.5)
        source.item_embeddings.weight.add_(1.0)
    wire.load_state(target, wire.full_state(source))
    assert torch.equal(target.output.weight, source.item_embeddings.weight)  # the tie survives
    assert torch.equal(target.item_features, source.item_features)
    wire.load_state(target, wire.trainable_state(source), trainable_only=True)
    with pytest.raises(ValueError, match="missing \\['item_features'\\]"):
        wire.load_state(model(), wire.trainable_state(source))
    with pytest.raises(ValueError, match="unexpected \\['bogus'\\]"):
        wire.load_state(model(), {**wire.full_state(source), "bogus": torch.zeros(1)})


def test_tensors_digest_is_equal_only_for_bit_identical_tensors_under_the_same_names():
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    digest = wire.tensors_digest(state)
    assert digest == wire.tensors_digest({"b": state["b"].clone(), "a": state["a"].clone()})  # order-free
    assert digest != wire.tensors_digest({**state, "a": state["a"].reshape(3, 2)})  # shape
    assert digest != wire.tensors_digest({**state, "a": state["a"].double()})  # dtype
    assert digest != wire.tensors_digest({"c": state["a"], "b": state["b"]})  # name
    nudged = state["a"].clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(100.0))
    assert digest != wire.tensors_digest({**state, "a": nudged})  # one ulp in one value


def test_non_finite_names_every_nan_or_infinite_tensor_and_no_finite_one():
    state = {"ok": torch.ones(3), "nan": torch.tensor([1.0, float("nan")]), "ids": torch.arange(3),
             "half": torch.full((1000,), 60000.0, dtype=torch.float16),  # finite, though its norm overflows
             "huge": torch.full((4,), 3e38), "minus_inf": torch.tensor([float("-inf")], dtype=torch.float64),
             "empty": torch.zeros(0)}
    assert wire.non_finite(state) == ["nan", "minus_inf"]
    assert wire.non_finite({k: state[k] for k in ("ok", "ids", "half", "huge", "empty")}) == []
    assert wire.non_finite({}) == []

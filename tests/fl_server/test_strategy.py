"""Strategy construction and the privacy summary the server logs each round."""

import pytest

from fl_server.config import StrategyConfig, server_config_from_run_config
from fl_server.strategy import build_strategy, privacy_report
from shared_model import wire


@pytest.mark.parametrize("name,base", [("fedavg", "FedAvg"), ("fedprox", "FedProx"), ("fedadam", "FedAdam"),
                                       ("fedyogi", "FedYogi"), ("fedavgm", "FedAvgM"),
                                       ("fedtrimmedavg", "FedTrimmedAvg"), ("fedmedian", "FedMedian"),
                                       ("krum", "Krum")])
def test_every_strategy_is_built_from_flowers_own_class(name, base):
    strategy = build_strategy(StrategyConfig(name=name, min_nodes=3))
    assert base in [cls.__name__ for cls in type(strategy).__mro__]
    assert strategy.min_available_nodes == 3 and strategy.round_offset == 0


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_server_optimisers_take_every_knob(name):
    config = server_config_from_run_config({"out-dir": "/abs/out", "catalog-path": "/abs/catalog.json",
                                            "strategy.name": name, "strategy.server-lr": 0.02,
                                            "strategy.server-beta-1": 0.5, "strategy.server-beta-2": 0.9,
                                            "strategy.server-tau": 1e-6})
    strategy = build_strategy(config.strategy)
    assert (strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau) == (0.02, 0.5, 0.9, 1e-6)


def test_unknown_strategy_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="fedavg, fedprox"):
        build_strategy(StrategyConfig(name="fedsgd"))


def test_privacy_report_takes_max_and_mean_over_dp_sites_only():
    sites = [{wire.DP_ENABLED: 1.0, wire.EPSILON: 2.0, wire.DELTA: 1e-4},
             {wire.DP_ENABLED: 1.0, wire.EPSILON: 4.0, wire.DELTA: 1e-5},
             {wire.DP_ENABLED: 0.0, wire.EPSILON: 0.0, wire.DELTA: 0.0}]
    report = privacy_report(sites)
    assert report["epsilon_max"] == 4.0 and report["epsilon_mean"] == 3.0 and report["delta_max"] == 1e-4
    assert report["sites_without_dp"] == 1
    assert "epsilon_max" not in privacy_report([sites[2]])  # no DP claim when no site had DP


def test_server_config_is_parsed_from_a_flat_run_config():
    config = server_config_from_run_config({"out-dir": "/abs/out", "catalog-path": "/abs/catalog.json",
                                            "num-rounds": 5, "strategy.name": "fedadam",
                                            "model.hidden-size": 32, "model.item-features": "text,attributes"})
    assert config.num_rounds == 5 and config.strategy.name == "fedadam"
    assert config.model.hidden_size == 32 and config.model.item_features == ["text", "attributes"]
    with pytest.raises(ValueError, match="out-dir"):
        server_config_from_run_config({"catalog-path": "/abs/catalog.json"})


def test_frozen_tensors_ride_along_without_entering_the_aggregate(monkeypatch):
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_server.strategy import with_frozen

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):  # what a running ServerApp has
        monkeypatch.setattr(TaskIdentity, name, value)
    trainable = ArrayRecord({"w": torch.ones(3)})
    frozen = ArrayRecord({"item_features": torch.zeros(4, 2)})
    shared = RecordDict({wire.ARRAYS: trainable, wire.CONFIG: ConfigRecord({"lr": 0.1})})
    sent = with_frozen([Message(content=shared, message_type="train", dst_node_id=n) for n in (7, 8)], frozen)
    assert [m.metadata.dst_node_id for m in sent] == [7, 8]
    assert all(set(m.content.array_records[wire.ARRAYS]) == {"w", "item_features"} for m in sent)
    assert sent[0].content.config_records[wire.CONFIG]["lr"] == 0.1
    assert set(trainable) == {"w"}  # the strategy's own copy (FedOpt/FedAvgM keep it) is untouched
    assert with_frozen(sent, ArrayRecord()) == sent

"""The federation's step decay: the sites' lr and the server's step size change at a global round."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fl_server.config import StrategyConfig
from fl_server.schedule import Decay
from fl_server.strategy import build_strategy
from shared_model import wire
from tests.fl_server.test_strategy import Grid


def sent_rates(monkeypatch, name: str, decay: Decay, rounds: range, offset: int = 0) -> list[tuple]:
    """(site lr in the train message, server lr, the round log's rates) for each round configured."""
    for attribute, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):  # what a running ServerApp has
        monkeypatch.setattr(TaskIdentity, attribute, value)
    strategy = build_strategy(StrategyConfig(name=name, server_lr=1.5, server_momentum=0.0, min_nodes=1))
    decay.check(strategy)
    strategy.decay, strategy.round_offset = decay, offset
    config = ConfigRecord({wire.LEARNING_RATE: 1e-3})
    out = []
    for server_round in rounds:
        messages = list(strategy.configure_train(server_round, ArrayRecord(), config, Grid()))
        server_lr = getattr(strategy, "server_learning_rate", getattr(strategy, "eta", None))
        out.append((messages[0].content.config_records[wire.CONFIG][wire.LEARNING_RATE], server_lr,
                    strategy.round_rates))
    return out


def test_the_sites_lr_and_the_server_step_drop_from_the_decay_round(monkeypatch):
    rates = sent_rates(monkeypatch, "fedavgm", Decay(3, 3e-4, 1.0), range(1, 5))
    assert [(lr, server) for lr, server, _ in rates] == [(1e-3, 1.5), (1e-3, 1.5), (3e-4, 1.0), (3e-4, 1.0)]
    assert rates[2][2] == (3e-4, 1.0)  # what the round's record holds (lr, server_lr)
    # A run resumed after round 2 numbers its first round 3: it decays at once, as the uninterrupted run did.
    assert [lr for lr, _, _ in sent_rates(monkeypatch, "fedavgm", Decay(3, 3e-4, 1.0), range(1, 3), 2)] == [3e-4] * 2
    assert sent_rates(monkeypatch, "fedadam", Decay(2, 0.0, 0.05), range(1, 3))[1][:2] == (1e-3, 0.05)  # lr kept
    assert [lr for lr, _, _ in sent_rates(monkeypatch, "fedavg", Decay(), range(1, 3))] == [1e-3, 1e-3]  # never


def test_a_decay_the_strategy_cannot_take_is_refused():
    with pytest.raises(ValueError, match="FedRecFedAvg takes no server step"):
        Decay(3, 3e-4, 1.0).check(build_strategy(StrategyConfig(name="fedavg")))
    Decay(3, 3e-4, 0.0).check(build_strategy(StrategyConfig(name="fedavg")))  # the sites' lr alone is fine
    with pytest.raises(ValueError, match=">= 0"):
        Decay(3, -1.0, 0.0).check(build_strategy(StrategyConfig(name="fedavg")))

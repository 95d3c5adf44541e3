"""The server's side of a popularity release without secure aggregation: the sites' shares sum to the counts, a
share beyond what its users could add is clipped, one that fails the reply checks is left out, and too few shares
stop the run before any training (tests/simulations/test_federation.py runs it under secure aggregation)."""

import numpy as np
import pytest
import torch

from fl_server.config import ServerConfig, StrategyConfig
from fl_server.popularity_release import release_popularity
from fl_server.strategy import RoundsFailedError, RunSetup, build_strategy
from shared_model import wire
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.factory import ModelConfig
from shared_model.modeling_fedrec import FedRecModel
from tests.fl_server.test_strategy import site_reply


class SitesGrid:
    """Three connected sites; each answers the release with the global bias plus its counts over its users."""

    def __init__(self, counts: list[np.ndarray], users: list[int], broken: int | None = None) -> None:
        self.counts, self.users, self.broken = counts, users, broken
        self.sent: list = []

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def send_and_receive(self, messages, timeout=None):
        self.sent = list(messages)
        replies = []
        for i, msg in enumerate(self.sent):
            state = {k: v.numpy() for k, v in msg.content.array_records[wire.ARRAYS].items()}
            share = (self.counts[i] / self.users[i]).astype(np.float32)
            state["output.bias"] = state["output.bias"] + (np.full_like(share, np.nan) if i == self.broken else share)
            replies.append(site_reply(state, self.users[i], node=msg.metadata.dst_node_id))
        return replies


def setup(tmp_path, min_nodes: int = 2):
    torch.manual_seed(0)
    model = FedRecModel(FedRecConfig(num_items=5, hidden_size=8, max_len=4, item_bias=True))
    strategy_cfg = StrategyConfig(name="fedadam", min_nodes=min_nodes, distributed_dp=True, dp_popularity_noise=3.0)
    cfg = ServerConfig(out_dir=str(tmp_path), catalog_path="", model=ModelConfig(item_bias=True),
                       strategy=strategy_cfg)
    strategy = build_strategy(strategy_cfg, RunSetup(item_row_names=model.item_row_parameters()))
    trainable = wire.trainable_state(model)
    return model, strategy, trainable, cfg


def test_the_shares_sum_to_the_counts_and_a_share_beyond_its_users_is_clipped(tmp_path, serverapp_identity):
    from flwr.app import ConfigRecord

    model, strategy, trainable, cfg = setup(tmp_path)
    counts = [np.array([0.0, 4.0, 2.0, 0.5, 9.0, 1.0]), np.array([0.0, 6.0, 1.0, 0.2, 3.0, 2.0]),
              np.array([0.0, 1e6, 1.0, 1.0, 1.0, 1.0])]
    strategy.accepted_norms = [0.25]  # a training round's history, which the release must neither use nor change
    grid = SitesGrid(counts, users=[10, 30, 20])  # the third site claims 1e6 for item 1 with 20 users
    state, figures = release_popularity(grid, strategy, model, trainable, ConfigRecord({"x": 1}), cfg)
    assert all(m.content.config_records["config"][wire.DDP_POPULARITY] == 3.0 for m in grid.sent)
    third = counts[2].copy()
    third[1] = 20 + 6 * 3.0  # its 20 users' most, plus 6 σ_p for its noise
    expected = torch.tensor(counts[0] + counts[1] + third).clamp(min=1.0).log().float()
    torch.testing.assert_close(model.output.bias.detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state["output.bias"], expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(state[k], trainable[k]) for k in trainable if k != "output.bias")
    assert figures == {"noise_multiplier": 3.0, "sites": 3, "users": 60, "rows_above_floor": 5}
    assert strategy.last_round.round == 0 and strategy.last_round.dropped == 0
    assert strategy.accepted_norms == [0.25] and strategy.norm_bound_factor == 3.0


def test_too_few_usable_shares_stop_the_run_before_training(tmp_path, serverapp_identity):
    from flwr.app import ConfigRecord

    model, strategy, trainable, cfg = setup(tmp_path, min_nodes=3)
    before = model.output.bias.detach().clone()
    grid = SitesGrid([np.ones(6)] * 3, users=[10, 10, 10], broken=0)  # the first share holds NaN: dropped
    with pytest.raises(RoundsFailedError, match=r"popularity release \(round 0\) got 2 usable shares"):
        release_popularity(grid, strategy, model, trainable, ConfigRecord({}), cfg)
    assert torch.equal(model.output.bias, before)

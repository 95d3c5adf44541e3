"""Strategy construction and the privacy summary the server logs each round."""

import pytest

from fl_server.config import StrategyConfig, server_config_from_run_config
from fl_server.replies import privacy_report, site_cost
from fl_server.strategy import RunSetup, build_strategy
from shared_model import wire


@pytest.mark.parametrize("name,base", [("fedavg", "FedAvg"), ("fedprox", "FedProx"), ("fedadam", "FedAdam"),
                                       ("fedyogi", "FedYogi"), ("fedavgm", "FedAvgM"),
                                       ("fedtrimmedavg", "FedTrimmedAvg"), ("fedmedian", "FedMedian"),
                                       ("krum", "Krum"), ("multikrum", "MultiKrum"), ("bulyan", "Bulyan")])
def test_every_strategy_is_built_from_flowers_own_class(name, base):
    """Each rule is a class of fl_server.strategy (fedrec's hooks before Flower's rule), built from the config
    alone: not a class made at run time with its attributes set from outside."""
    import fl_server.strategy as module

    strategy = build_strategy(StrategyConfig(name=name, min_nodes=3))
    mro = [cls.__name__ for cls in type(strategy).__mro__]
    assert mro[:2] == [f"FedRec{base}", "RoundHooks"] and base in mro
    assert getattr(module, f"FedRec{base}") is type(strategy) is module.STRATEGIES[name]
    assert type(strategy)(StrategyConfig(name=name, min_nodes=3)).min_available_nodes == 3
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
    with pytest.raises(ValueError, match=r"fedavg, fedprox.*multikrum, bulyan"):
        build_strategy(StrategyConfig(name="fedsgd"))


def test_robust_aggregation_and_reply_check_settings_reach_the_strategy_and_nonsense_is_refused():
    config = server_config_from_run_config({"out-dir": "/abs/out", "catalog-path": "/abs/c.json",
                                            "strategy.name": "multikrum", "strategy.num-malicious": 1,
                                            "strategy.num-selected": 3, "strategy.norm-bound-factor": 4.0,
                                            "strategy.max-update-norm": 2.5, "strategy.max-site-users": 900,
                                            "strategy.max-failed-rounds": 5})
    strategy = build_strategy(config.strategy)
    assert (strategy.num_malicious_nodes, strategy.num_nodes_to_select) == (1, 3)
    assert (strategy.norm_bound_factor, strategy.max_update_norm, strategy.max_site_users,
            strategy.max_failed_rounds) == (4.0, 2.5, 900, 5)
    for bad, says in [({"norm_bound_factor": 0.5}, "norm_bound_factor=0.5: use 0"),
                      ({"max_update_norm": -1.0}, "max_update_norm=-1.0 must be >= 0"),
                      ({"max_failed_rounds": -1}, "max_failed_rounds=-1"), ({"max_site_users": 0}, "max_site_users=0"),
                      ({"name": "multikrum", "num_selected": -1}, "num_selected=-1")]:
        with pytest.raises(ValueError, match=says):
            build_strategy(StrategyConfig(**bad))


def test_privacy_report_takes_max_and_mean_over_dp_sites_only():
    sites = [{wire.DP_ENABLED: 1.0, wire.EPSILON: 2.0, wire.DELTA: 1e-4},
             {wire.DP_ENABLED: 1.0, wire.EPSILON: 4.0, wire.DELTA: 1e-5},
             {wire.DP_ENABLED: 0.0, wire.EPSILON: 0.0, wire.DELTA: 0.0}]
    report = privacy_report(sites)
    assert report["epsilon_max"] == 4.0 and report["epsilon_mean"] == 3.0 and report["delta_max"] == 1e-4
    assert report["sites_without_dp"] == 1
    assert "epsilon_max" not in privacy_report([sites[2]])  # no DP claim when no site had DP


def test_site_cost_is_the_slowest_and_largest_site_that_trained():
    sites = [{wire.DECLINED: 0.0, wire.TRAIN_SECONDS: 2.0, wire.PEAK_MEMORY_MB: 900.0},
             {wire.DECLINED: 0.0, wire.TRAIN_SECONDS: 6.0, wire.PEAK_MEMORY_MB: 300.0},
             {wire.DECLINED: 1.0, wire.TRAIN_SECONDS: 0.0, wire.PEAK_MEMORY_MB: 0.0}]  # declined: not counted
    assert site_cost(sites) == {"train_seconds_max": 6.0, "train_seconds_mean": 4.0, "peak_memory_mb_max": 900.0}
    assert site_cost([sites[2]]) == {} and site_cost([{wire.DECLINED: 0.0}]) == {}  # older sites send none


def test_server_config_is_parsed_from_a_flat_run_config():
    config = server_config_from_run_config({"out-dir": "/abs/out", "catalog-path": "/abs/catalog.json",
                                            "num-rounds": 5, "strategy.name": "fedadam",
                                            "model.hidden-size": 32, "model.item-features": "text,attributes"})
    assert config.num_rounds == 5 and config.strategy.name == "fedadam"
    assert config.model.hidden_size == 32 and config.model.item_features == ["text", "attributes"]
    with pytest.raises(ValueError, match="out-dir"):
        server_config_from_run_config({"catalog-path": "/abs/catalog.json"})


def test_every_kth_round_and_the_last_are_evaluated():
    config = server_config_from_run_config({"out-dir": "/abs/out", "catalog-path": "/abs/c.json", "num-rounds": 7,
                                            "eval-every": 3})
    assert [r for r in range(1, 8) if config.evaluates(r)] == [3, 6, 7]
    with pytest.raises(ValueError, match="eval_every must be at least 1"):
        server_config_from_run_config({"out-dir": "/abs/out", "catalog-path": "/abs/c.json", "eval-every": 0})


def test_a_negative_number_of_negatives_is_refused_at_start():
    with pytest.raises(ValueError, match="num-negatives must be 0"):
        server_config_from_run_config({"out-dir": "/abs/out", "catalog-path": "/abs/c.json", "num-negatives": -5})


def test_frozen_tensors_go_beside_the_weights_to_sites_that_do_not_keep_them(serverapp_identity):
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from fl_server.frozen import with_frozen

    trainable = ArrayRecord({"w": torch.ones(3)})
    frozen = ArrayRecord({"item_features": torch.zeros(4, 2)})
    shared = RecordDict({wire.ARRAYS: trainable, wire.CONFIG: ConfigRecord({"lr": 0.1})})
    sent = with_frozen([Message(content=shared, message_type="train", dst_node_id=n) for n in (7, 8)], frozen,
                       held={8})
    assert [m.metadata.dst_node_id for m in sent] == [7, 8]
    assert all(set(m.content.array_records[wire.ARRAYS]) == {"w"} for m in sent)  # never mixed into the weights
    assert set(sent[0].content.array_records[wire.FROZEN]) == {"item_features"}
    assert wire.FROZEN not in sent[1].content.array_records  # node 8 keeps them
    assert all(m.content.config_records[wire.CONFIG]["lr"] == 0.1 for m in sent)
    assert set(trainable) == {"w"}  # the strategy's own copy (FedOpt/FedAvgM keep it) is untouched
    assert with_frozen(sent, ArrayRecord()) == sent


class FakeNodes:
    """The one Grid call a strategy's configure_* makes: which nodes are connected."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_the_server_sends_frozen_tensors_until_a_site_says_it_keeps_them_and_again_after_it_fails(
        serverapp_identity):
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

    from fl_server.strategy import build_strategy

    strategy = build_strategy(StrategyConfig(min_nodes=1))
    frozen = {"item_features": torch.ones(4, 2)}
    strategy.frozen, strategy.frozen_digest = ArrayRecord(frozen), wire.tensors_digest(frozen)
    start = ArrayRecord({"w": torch.ones(3)})

    def ask(nodes: list[int]) -> dict[int, bool]:
        grid = FakeNodes(nodes)
        sent = strategy.configure_train(1, start, ConfigRecord({wire.FROZEN_DIGEST: strategy.frozen_digest}), grid)
        return {m.metadata.dst_node_id: wire.FROZEN in m.content.array_records for m in sent}

    def reply(node: int, held: str) -> Message:
        request = Message(content=RecordDict(), message_type="train", dst_node_id=node)
        content = RecordDict({wire.ARRAYS: ArrayRecord({"w": torch.zeros(3)}),
                              wire.METRICS: MetricRecord(train_metrics(5)),
                              wire.NOTES: ConfigRecord({wire.WIRE_VERSION: wire.VERSION, wire.DECLINED_REASON: "",
                                                        wire.CATALOG_FINGERPRINT: "", wire.FROZEN_HELD: held})})
        return Message(content=content, reply_to=request)  # a reply comes from the request's node

    assert ask([1, 2, 3]) == {1: True, 2: True, 3: True}
    failed = Message(Error(code=4003, reason="lost"), reply_to=Message(RecordDict(), 3, "train"))
    assert failed.metadata.src_node_id == 3
    strategy.aggregate_train(1, [reply(1, strategy.frozen_digest), reply(2, "another digest"), failed])
    assert strategy.last_round.frozen_sent_to == 3
    assert ask([1, 2, 3]) == {1: False, 2: True, 3: True}  # only node 1 named the run's digest
    lost = Message(Error(code=4003, reason="lost"), reply_to=Message(RecordDict(), 1, "evaluate"))
    strategy.aggregate_evaluate(1, [lost])
    assert ask([1, 2, 3]) == {1: True, 2: True, 3: True}  # a failed node is sent them again


def item_rows_strategy(name: str, mode: str, start: dict, **knobs):
    """A strategy set up as after configure_train (round start weights known), without a Grid (the test
    asks for `serverapp_identity`)."""
    from flwr.app import Array, ArrayRecord

    strategy = build_strategy(StrategyConfig(name=name, item_rows=mode, min_nodes=1, **knobs),
                              RunSetup(item_row_names=["item_embeddings.weight", "output.bias"]))
    strategy.round_start = ArrayRecord({k: Array(v) for k, v in start.items()})
    if name == "fedavgm":
        strategy.current_arrays = strategy.round_start
    if name in ("fedadam", "fedyogi"):
        strategy.current_arrays = dict(start)  # as FedOpt's configure_train keeps them
    return strategy


def train_metrics(users: float, declined: float = 0.0) -> dict[str, float]:
    """Every metric a site's training reply carries (fl_client.training_round.RoundReply.metrics)."""
    return {wire.NUM_EXAMPLES: float(users), wire.TRAIN_LOSS: 1.0, wire.DP_ENABLED: 0.0, wire.EPSILON: 0.0,
            wire.DELTA: 0.0, wire.DECLINED: declined, wire.TRAIN_SECONDS: 1.0, wire.PEAK_MEMORY_MB: 100.0}


NODES = iter(range(100, 100_000))  # each reply from its own node (the server pins a node's declared users)


def site_reply(state: dict, users: int, weights=None, moments=None, node: int | None = None):
    """A trained site's reply as the ClientApp builds it."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
                          wire.METRICS: MetricRecord(train_metrics(users)),
                          wire.NOTES: ConfigRecord({wire.WIRE_VERSION: wire.VERSION, wire.DECLINED_REASON: "",
                                                    wire.CATALOG_FINGERPRINT: ""})})
    if weights is not None:
        content[wire.ITEM_WEIGHTS] = ArrayRecord({wire.ITEM_WEIGHTS: Array(weights)})
    if moments is not None:
        content[wire.OPTIMIZER_STATE] = ArrayRecord({k: Array(v) for k, v in moments.items()})
    request = Message(content=RecordDict(), message_type="train", dst_node_id=next(NODES) if node is None else node)
    return Message(content=content, reply_to=request)


def three_sites():
    """Round start weights, three sites' trained weights, their users, and which items each holds."""
    import numpy as np

    rng = np.random.default_rng(0)
    start = {"item_embeddings.weight": rng.normal(size=(4, 2)).astype(np.float32),
             "output.bias": rng.normal(size=4).astype(np.float32), "w": rng.normal(size=3).astype(np.float32)}
    local = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in start.items()} for _ in range(3)]
    users = np.array([10.0, 30.0, 60.0])
    holds = np.array([[0, 1, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=np.float64)  # row 0: padding, nobody
    return start, local, users, holds


def test_item_rows_are_averaged_over_the_sites_that_hold_them_by_their_counts(serverapp_identity):
    import numpy as np

    mode = "counts"
    start, local, users, holds = three_sites()
    weights = holds * np.array([[1, 5, 1, 2]] * 3) * [[1], [3], [2]]
    strategy = item_rows_strategy("fedavg", mode, start)
    arrays, _ = strategy.aggregate_train(1, [site_reply(s, n, a.astype(np.float32))
                                             for s, n, a in zip(local, users, weights, strict=True)])
    plain = {k: sum(n * s[k] for s, n in zip(local, users, strict=True)) / users.sum() for k in start}
    for name in ("item_embeddings.weight", "output.bias"):
        got, g = arrays[name].numpy(), start[name]
        for r in range(4):
            if weights[:, r].sum() == 0:  # held by nobody: the plain user-weighted average
                expected = plain[name][r]
            else:
                expected = g[r] + sum(a[r] * (s[name][r] - g[r]) for s, a in zip(local, weights, strict=True)
                                      ) / weights[:, r].sum()
            np.testing.assert_allclose(got[r], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays["w"].numpy(), plain["w"], rtol=1e-5, atol=1e-6)  # every other tensor
    np.testing.assert_allclose(arrays["item_embeddings.weight"].numpy()[2], local[2]["item_embeddings.weight"][2],
                               rtol=1e-5)  # a row one site holds is that site's row
    assert strategy.last_round.item_rows == {"mode": mode, "sites": 3, "left_out": []}


def test_a_server_step_is_taken_from_the_row_weighted_average(serverapp_identity):
    import numpy as np

    start, local, users, holds = three_sites()
    weights = (holds * users[:, None]).astype(np.float32)
    replies = lambda: [site_reply(s, n, a) for s, n, a in zip(local, users, weights, strict=True)]  # noqa: E731
    averaged, _ = item_rows_strategy("fedavg", "counts", start).aggregate_train(1, replies())
    stepped, _ = item_rows_strategy("fedavgm", "counts", start, server_lr=2.0,
                                    server_momentum=0.0).aggregate_train(1, replies())
    for name, g in start.items():
        np.testing.assert_allclose(stepped[name].numpy(), g + 2.0 * (averaged[name].numpy() - g), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_an_adaptive_server_step_keeps_the_weights_float32(serverapp_identity, name):
    import numpy as np

    start, local, users, _ = three_sites()
    replies = [site_reply(s, n) for s, n in zip(local, users, strict=True)]
    stepped, _ = item_rows_strategy(name, "average", start, server_lr=0.1).aggregate_train(1, replies)
    for key, value in start.items():  # FedAdam's float64 step size would double the model on the wire
        assert stepped[key].dtype == "float32"
        assert not np.allclose(stepped[key].numpy(), value)  # a step was taken


def test_a_site_without_usable_item_weights_is_left_out_and_named(serverapp_identity):
    import numpy as np

    start, local, users, holds = three_sites()
    strategy = item_rows_strategy("fedavg", "counts", start)
    replies = [site_reply(local[0], users[0], (holds[0] * users[0]).astype(np.float32)),
               site_reply(local[1], users[1]), site_reply(local[2], users[2], np.ones(5, dtype=np.float32))]
    arrays, _ = strategy.aggregate_train(1, replies)
    report = strategy.last_round.item_rows
    assert report["sites"] == 1 and len(report["left_out"]) == 1 and "sent no item weights" in report["left_out"][0]
    assert "expected one finite, non-negative vector of 4 rows" in strategy.last_round.dropped_reasons[0]
    np.testing.assert_allclose(arrays["w"].numpy(), local[0]["w"])  # only the usable site is averaged


def test_item_rows_need_a_known_mode_and_an_averaging_strategy():
    with pytest.raises(ValueError, match="average, counts"):
        build_strategy(StrategyConfig(item_rows="rows"))
    for name in ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"):
        with pytest.raises(ValueError, match=f"{name} does not average"):
            build_strategy(StrategyConfig(name=name, item_rows="counts"))
    with pytest.raises(ValueError, match="this model trains no per-item tensor"):
        build_strategy(StrategyConfig(item_rows="counts"), RunSetup(item_row_names=[]))


def site_moments(local: list[dict]) -> list[dict]:
    """Made-up Adam moments for each site's tensors (named as fl_client.moments names them), and a step."""
    import numpy as np

    return [{**{f"{k}:exp_avg": v * 0.1 for k, v in s.items()}, **{f"{k}:exp_avg_sq": v**2 for k, v in s.items()},
             wire.MOMENTS_STEP: np.array([10.0 * (i + 1)], dtype=np.float32)} for i, s in enumerate(local)]


def test_moments_are_averaged_by_users_and_item_rows_by_their_weights():
    import numpy as np

    from fl_server.item_rows import average_moments

    _, local, users, holds = three_sites()
    moments = site_moments(local)
    plain = average_moments([(m, n, None) for m, n in zip(moments, users, strict=True)], ["output.bias"])
    for key in moments[0]:
        np.testing.assert_allclose(plain[key], sum(n * m[key] for m, n in zip(moments, users, strict=True))
                                   / users.sum(), rtol=1e-5)
    assert plain[wire.MOMENTS_STEP][0] == pytest.approx((10 * 10 + 20 * 30 + 30 * 60) / 100)
    rows = average_moments([(m, n, a) for m, n, a in zip(moments, users, holds, strict=True)], ["output.bias"])
    key = "output.bias:exp_avg_sq"
    np.testing.assert_allclose(rows[key][2], moments[2][key][2], rtol=1e-6)  # only site 2 holds item 2
    np.testing.assert_allclose(rows[key][1], (moments[0][key][1] + moments[1][key][1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(rows[key][0], plain[key][0], rtol=1e-6)  # held by nobody: the user-weighted mean
    np.testing.assert_allclose(rows["w:exp_avg"], plain["w:exp_avg"], rtol=1e-6)  # not a per-item tensor
    with pytest.raises(ValueError, match="different optimiser moments"):
        average_moments([(moments[0], 1.0, None), ({"w:exp_avg": local[0]["w"]}, 1.0, None)], [])
    with pytest.raises(ValueError, match="w:exp_avg_sq is not finite"):
        average_moments([(moments[0], 1.0, None), ({**moments[1], "w:exp_avg_sq": np.full(3, np.nan)}, 1.0, None)],
                        [])


class Grid:
    """Just enough of a Flower Grid for configure_train: three connected nodes."""

    def get_node_ids(self):
        return [1, 2, 3]


def test_shared_moments_are_averaged_kept_out_of_the_weights_sent_next_round_and_checkpointed(serverapp_identity):
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord

    start, local, users, holds = three_sites()
    moments = site_moments(local)
    plain, _ = item_rows_strategy("fedavg", "counts", start).aggregate_train(
        1, [site_reply(s, n, a.astype(np.float32)) for s, n, a in zip(local, users, holds, strict=True)])
    strategy = item_rows_strategy("fedavg", "counts", start)
    arrays, _ = strategy.aggregate_train(1, [site_reply(s, n, a.astype(np.float32), m)
                                             for s, n, a, m in zip(local, users, holds, moments, strict=True)])
    for name in start:  # the moments change nothing about the weights' aggregate
        np.testing.assert_allclose(arrays[name].numpy(), plain[name].numpy(), rtol=1e-6)
    assert strategy.last_round.shared_moments == {"sites": 3, "step": pytest.approx(25.0)}
    np.testing.assert_allclose(strategy.shared_moments["output.bias:exp_avg"][2], moments[2]["output.bias:exp_avg"][2])
    sent = list(strategy.configure_train(2, arrays, ConfigRecord({}), Grid()))
    assert len(sent) == 3 and all(set(m.content.array_records) == {wire.ARRAYS, wire.OPTIMIZER_STATE} for m in sent)
    np.testing.assert_allclose(sent[0].content.array_records[wire.OPTIMIZER_STATE]["w:exp_avg_sq"].numpy(),
                               strategy.shared_moments["w:exp_avg_sq"])
    resumed = item_rows_strategy("fedavg", "counts", start)
    resumed.restore_optimiser_state(strategy.optimiser_state())  # what a checkpoint holds and a resume restores
    assert set(resumed.shared_moments) == set(moments[0])
    fresh = item_rows_strategy("fedavg", "counts", start)
    assert all(set(m.content.array_records) == {wire.ARRAYS} for m in
               fresh.configure_train(1, ArrayRecord(), ConfigRecord({}), Grid()))  # nothing to share yet


def test_sites_that_send_nothing_back_before_the_timeout_are_counted_and_named_in_the_log(serverapp_identity, caplog):
    import numpy as np
    from flwr.app import ConfigRecord

    start, local, users, holds = three_sites()
    strategy = item_rows_strategy("fedavg", "counts", start)
    asked = list(strategy.configure_train(1, strategy.round_start, ConfigRecord({}), Grid()))
    assert len(asked) == 3
    with caplog.at_level("WARNING"):  # only two of the three sites answered within federation.round_timeout
        strategy.aggregate_train(1, [site_reply(s, n, a.astype(np.float32))
                                     for s, n, a in list(zip(local, users, holds, strict=True))[:2]])
    assert strategy.last_round.train_replies == 2 and strategy.last_round.train_no_reply == 1
    assert "1 of 3 site(s) sent no train reply within federation.round_timeout" in caplog.text


def test_replies_of_another_wire_version_are_failures_never_averaged(serverapp_identity, caplog):
    import numpy as np
    from flwr.app import ConfigRecord

    start, local, users, _ = three_sites()
    strategy = item_rows_strategy("fedavg", "average", start)
    replies = [site_reply(s, n) for s, n in zip(local, users, strict=True)]
    replies[1].content[wire.NOTES] = ConfigRecord({wire.WIRE_VERSION: wire.VERSION + 1, wire.DECLINED_REASON: ""})
    replies[2].content[wire.NOTES] = ConfigRecord({wire.DECLINED_REASON: ""})  # a build from before versions
    with caplog.at_level("WARNING"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_round.train_failures == 2 and strategy.last_round.privacy["sites"] == 1
    reasons = strategy.last_round.train_failure_reasons
    assert f"speaks fedrec wire protocol version {wire.VERSION + 1}" in reasons[0]
    assert "speaks fedrec wire protocol no version" in reasons[1]
    assert "2 site(s) failed to train" in caplog.text
    for name, value in local[0].items():  # the one site of this server's version alone
        np.testing.assert_allclose(arrays[name].numpy(), value, rtol=1e-6)


def test_multikrum_by_default_keeps_all_but_the_assumed_attackers_of_each_round(serverapp_identity):
    # num_selected=0: MultiKrum averages the round's usable replies less num_malicious, so a site that drops out
    # does not let an attacker back in (a fixed num_selected of 4 would average the attacker of a 4-reply round).
    import numpy as np

    rng = np.random.default_rng(1)
    start = {"w": np.zeros(6, dtype=np.float32)}
    honest = [{"w": (1.0 + 0.01 * rng.normal(size=6)).astype(np.float32)} for _ in range(4)]
    attacker = {"w": np.full(6, -50.0, dtype=np.float32)}
    strategy = item_rows_strategy("multikrum", "average", start, num_malicious=1, norm_bound_factor=0.0)
    assert strategy.select_all_but_malicious and StrategyConfig().num_selected == 0
    for sites in ([*honest, attacker], [*honest[:3], attacker]):  # 5 replies, then one honest site dropped out
        arrays, _ = strategy.aggregate_train(1, [site_reply(s, 10) for s in sites])
        assert strategy.num_nodes_to_select == len(sites) - 1
        np.testing.assert_allclose(arrays["w"].numpy(), np.mean([s["w"] for s in sites[:-1]], axis=0), rtol=1e-5)

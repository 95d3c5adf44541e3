"""Every training reply is checked before it can touch the global model: a malformed, non-finite, foreign or
outsized reply is dropped with a reason naming its node, and the round goes on with the good ones."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_server.checkpoint import RunStore
from fl_server.config import StrategyConfig
from fl_server.strategy import RoundsFailedError, build_strategy
from shared_model import wire
from tests.fl_server.test_strategy import site_reply

RNG = np.random.default_rng(0)
START = {"item_embeddings.weight": RNG.normal(size=(4, 2)).astype(np.float32),
         "w": RNG.normal(size=3).astype(np.float32)}
GOOD = [{k: (v + 0.1 * RNG.normal(size=v.shape)).astype(np.float32) for k, v in START.items()} for _ in range(4)]
USERS = [10, 20, 30, 40]


def strategy_for(name: str = "fedavg", **knobs):
    """A strategy as after configure_train (round start known), expecting the catalog fingerprint "cat"."""
    strategy = build_strategy(StrategyConfig(name=name, min_nodes=2, **knobs))
    strategy.round_start = ArrayRecord({k: Array(v) for k, v in START.items()})
    strategy.catalog_fingerprint = ""
    if name == "fedadam":
        strategy.current_arrays = dict(START)  # as FedOpt keeps them
    return strategy


def good_replies():
    return [site_reply(state, users) for state, users in zip(GOOD, USERS, strict=True)]


def with_metric(reply, key, value):
    metrics = dict(reply.content.metric_records[wire.METRICS])
    if value is None:
        metrics.pop(key)
    else:
        metrics[key] = value
    from flwr.app import MetricRecord

    reply.content[wire.METRICS] = MetricRecord(metrics)
    return reply


def with_notes(reply, **notes):
    reply.content[wire.NOTES] = ConfigRecord({wire.WIRE_VERSION: wire.VERSION, wire.DECLINED_REASON: "", **notes})
    return reply


def changed(key, values):
    return site_reply({**GOOD[0], key: values}, 10)


BAD = {
    "nan weight": (lambda: changed("w", np.array([np.nan, 0, 0], dtype=np.float32)), "NaN or infinite"),
    "inf weight": (lambda: changed("w", np.array([np.inf, 0, 0], dtype=np.float32)), "NaN or infinite"),
    "wrong shape": (lambda: changed("w", np.zeros(4, dtype=np.float32)), "tensor w: (4,)"),
    "wrong dtype": (lambda: changed("w", np.zeros(3, dtype=np.float64)), "float64"),
    "missing tensor": (lambda: site_reply({"w": GOOD[0]["w"]}, 10), "missing ['item_embeddings.weight']"),
    "extra tensor": (lambda: changed("extra", np.zeros(2, dtype=np.float32)), "unexpected ['extra']"),
    "missing metric": (lambda: with_metric(site_reply(GOOD[0], 10), wire.TRAIN_LOSS, None), "missing ['train-loss']"),
    "extra metric": (lambda: with_metric(site_reply(GOOD[0], 10), "bonus", 1.0), "unexpected ['bonus']"),
    "nan metric": (lambda: with_metric(site_reply(GOOD[0], 10), wire.TRAIN_LOSS, float("nan")), "not finite"),
    "zero examples": (lambda: site_reply(GOOD[0], 0), "not a whole number of users >= 1"),
    "negative examples": (lambda: site_reply(GOOD[0], -5), "not a whole number of users >= 1"),
    "nan examples": (lambda: with_metric(site_reply(GOOD[0], 10), wire.NUM_EXAMPLES, float("nan")), "not finite"),
    "fractional examples": (lambda: with_metric(site_reply(GOOD[0], 10), wire.NUM_EXAMPLES, 2.5), "whole number"),
    "1e12 examples": (lambda: site_reply(GOOD[0], int(1e12)), "above strategy.max_site_users"),
    "declined not 0/1": (lambda: with_metric(site_reply(GOOD[0], 10), wire.DECLINED, 0.5), "neither 0 nor 1"),
    "no fingerprint": (lambda: with_notes(site_reply(GOOD[0], 10)), "catalog fingerprint None"),
    "other catalog": (lambda: with_notes(site_reply(GOOD[0], 10), **{wire.CATALOG_FINGERPRINT: "x"}), "'x'"),
    "1000x update": (lambda: site_reply({k: START[k] + 1000 * (GOOD[0][k] - START[k]) for k in START}, 10),
                     "above this round's bound"),
    "no arrays": (lambda: drop_record(site_reply(GOOD[0], 10), wire.ARRAYS), "missing ['arrays']"),
    "unknown record": (lambda: add_record(site_reply(GOOD[0], 10)), "unexpected ['payload']"),
}


def drop_record(reply, key):
    from flwr.app import RecordDict

    reply.content = RecordDict({k: v for k, v in reply.content.items() if k != key})
    return reply


def add_record(reply):
    reply.content["payload"] = ArrayRecord({"x": Array(np.zeros(1, dtype=np.float32))})
    return reply


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_malformed_reply_is_dropped_with_its_reason_and_the_good_ones_aggregate(serverapp_identity, kind):
    make, says = BAD[kind]
    strategy = strategy_for()
    bad = make()
    arrays, _ = strategy.aggregate_train(1, [*good_replies(), bad])
    assert strategy.last_round["dropped"] == 1
    reason = strategy.last_round["dropped_reasons"][0]
    assert reason.startswith(f"node {bad.metadata.src_node_id}:") and says in reason
    expected = sum(u * s["w"] for u, s in zip(USERS, GOOD, strict=True)) / sum(USERS)
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedmedian", "fedtrimmedavg", "multikrum", "bulyan"])
def test_a_nan_reply_never_reaches_any_strategys_global_model(serverapp_identity, name):
    knobs = {"num_malicious": 1} if name in ("multikrum", "bulyan") else {}
    strategy = strategy_for(name, **knobs)
    replies = [*good_replies(), *[site_reply(g, 10) for g in GOOD[:3]], BAD["nan weight"][0]()]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and all(np.isfinite(a.numpy()).all() for a in arrays.values())
    assert strategy.last_round["dropped"] == 1


def test_a_site_cannot_claim_more_users_than_it_declared_first(serverapp_identity):
    strategy = strategy_for()
    strategy.aggregate_train(1, [site_reply(g, u, node=7 + i) for i, (g, u) in enumerate(zip(GOOD, USERS,
                                                                                             strict=True))])
    assert strategy.declared_users == {7: 10, 8: 20, 9: 30, 10: 40}
    strategy.aggregate_train(2, [site_reply(GOOD[0], 5000, node=7), *[site_reply(g, 20, node=8 + i)
                                                                      for i, g in enumerate(GOOD[1:])]])
    assert "above the 10 users this site declared earlier" in strategy.last_round["dropped_reasons"][0]


def test_too_few_usable_replies_leave_the_model_unchanged_and_repeated_failures_stop_the_run(serverapp_identity):
    strategy = strategy_for()
    nan = BAD["nan weight"][0]
    for round_ in (1, 2):
        assert strategy.aggregate_train(round_, [site_reply(GOOD[0], 10), nan()]) == (None, None)
        assert "fewer than strategy.min_nodes=2" in strategy.last_round["unusable"]
    assert strategy.aggregate_train(3, good_replies())[0] is not None and strategy.failed_rounds == 0
    for round_ in (4, 5):
        strategy.aggregate_train(round_, [site_reply(GOOD[0], 10), nan()])
    with pytest.raises(RoundsFailedError, match=r"3 rounds in a row .* NaN or infinite"):
        strategy.aggregate_train(6, [site_reply(GOOD[0], 10), nan()])


def test_a_non_finite_aggregate_is_not_used(serverapp_identity, monkeypatch):
    strategy = strategy_for()
    from flwr.serverapp.strategy import FedAvg

    def broken(self, server_round, replies):
        return ArrayRecord({k: Array(np.full_like(v, np.nan)) for k, v in START.items()}), None

    monkeypatch.setattr(FedAvg, "aggregate_train", broken)
    assert strategy.aggregate_train(1, good_replies()) == (None, None)
    assert "aggregate holds NaN" in strategy.last_round["unusable"]


def test_a_non_finite_model_is_never_checkpointed_over_the_last_good_one(tmp_path):
    store = RunStore(tmp_path)
    good = {"w": torch.ones(3)}
    store.save(1, good, {"m_t": {"w": np.zeros(3, dtype=np.float32)}}, {"round": 1}, 0.5)
    with pytest.raises(ValueError, match="NaN or infinite values in \\['w'\\]"):
        store.save(2, {"w": torch.tensor([1.0, float("nan"), 0.0])}, {}, {"round": 2}, 0.9)
    latest = store.latest()
    assert latest.round == 1 and torch.equal(latest.state["w"], good["w"])
    assert isinstance(latest.optimiser_state["m_t"]["w"], np.ndarray)  # read back with weights_only=True

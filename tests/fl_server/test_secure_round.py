"""Secure aggregation end to end in one process: the server's SecureRound drives real ClientApps through a grid
that delivers messages by hand (no simulation engine), with local training replaced by known updates."""

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import fl_client.client_app
import fl_client.evaluation
import fl_client.training_round
from fl_client.client_app import SECURE_SUM, build_client_app
from fl_client.dp.settings import PrivacyConfig
from fl_client.round_config import RoundConfig, build_global_model
from fl_client.site import SiteConfig
from fl_client.training_round import RoundReply
from fl_server.replies import payload_bytes
from fl_server.secure_round import SECAGG_FAILED, SecureAggregationGrid, SecureRound
from shared_model import wire
from shared_model.catalog import ItemCatalog
from shared_model.secure_sum import SecureSumSettings
from simulations.synthetic import generate_events, write_events
from tests.fl_client.server_round import round_record

NODES = [11, 12, 13, 14, 15]


class HandGrid:
    """Delivers each message to its node's ClientApp at once; `silent` maps a message type to nodes that never
    answer it (a site that dropped), `tamper` rewrites a node's reply."""

    def __init__(self, apps: dict[int, object]) -> None:
        self.apps = apps
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in apps}
        self.silent: dict[str, set[int]] = {}
        self.tamper: dict[tuple[str, int], object] = {}
        self.seen: list[Message] = []  # every reply the server received

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what a real Grid sets on sending
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            if node in self.silent.get(kind, set()):
                continue
            reply = self.apps[node](msg, self.contexts[node])
            if (kind, node) in self.tamper:
                reply = self.tamper[(kind, node)](reply)
            self.seen.append(reply)
            replies.append(reply)
        return replies


@pytest.fixture
def federation(tmp_path, monkeypatch, serverapp_identity):
    """Five sites over one small events file, whose 'training' adds a known update per site."""
    log = generate_events(num_users=60, num_items=30, seed=5)
    events = write_events(log, tmp_path / "events.csv")
    catalog = ItemCatalog.from_events(log.frame)
    catalog.save(tmp_path)
    record, initial = round_record(catalog)
    model = build_global_model(RoundConfig.from_record(record), initial)
    start = wire.trainable_state(model)
    updates = {n: {k: torch.randn_like(v) * 0.01 * (i + 1) for k, v in start.items()} for i, n in enumerate(NODES)}
    users = {n: 10 + 7 * i for i, n in enumerate(NODES)}
    sites = {n: SiteConfig(data_path=str(events), catalog_path=str(tmp_path / "catalog.json"),
                           state_dir=str(tmp_path / f"state{n}"), privacy=PrivacyConfig(enabled=False), device="cpu")
             for n in NODES}
    by_dir = {s.state_dir: n for n, s in sites.items()}

    def fake_train(site, data, round_cfg, state, shared=None):
        node = by_dir[site.state_dir]
        trained = {k: state[k] + updates[node][k] for k in start}
        return RoundReply(state=trained, num_examples=users[node], train_loss=1.0, dp=False, epsilon=0.0, delta=0.0)

    def counted_train(site, *args, **kwargs):
        trained.append(by_dir[site.state_dir])
        return fake_train(site, *args, **kwargs)

    trained: list[int] = []  # nodes whose training ran, in order
    monkeypatch.setattr(fl_client.training_round, "train_round", counted_train)
    grid = HandGrid({n: build_client_app(lambda context: sites[context.node_id]) for n in NODES})
    config = ConfigRecord({**record, wire.SERVER_ROUND: 1})
    messages = [Message(content=RecordDict({wire.ARRAYS: ArrayRecord(start), wire.CONFIG: config}),
                        dst_node_id=n, message_type=MessageType.TRAIN) for n in NODES]
    grid.trained = trained
    return grid, messages, start, updates, users


def fedavg(start, updates, users, nodes):
    """The plain weighted average of the given nodes' trained weights."""
    total = sum(users[n] for n in nodes)
    return {k: start[k] + sum(updates[n][k] * users[n] for n in nodes) / total for k in start}


def assert_average(replies, expected, nodes, settings):
    assert sorted(r.metadata.src_node_id for r in replies if not r.has_error()) == sorted(nodes)
    for reply in replies:
        if reply.has_error():
            continue
        got = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
        for k, v in expected.items():
            # stochastic rounding: one step per site at most, scaled back by max weight / total weight
            assert torch.allclose(got[k], v, atol=len(nodes) * settings.step * 2, rtol=0), k
        metrics = reply.content.metric_records[wire.METRICS]
        assert metrics[wire.NUM_EXAMPLES] > 0 and wire.NOTES in reply.content.config_records


@pytest.mark.parametrize(("settings", "dtype"), [(SecureSumSettings(), np.uint32),
                                               (SecureSumSettings(bits=12, modulus_bits=16), np.uint16)],
                         ids=["mod 2^32", "mod 2^16"])
def test_the_secure_average_equals_fedavg_within_quantization_error(federation, settings, dtype):
    grid, messages, start, updates, users = federation
    replies = list(SecureAggregationGrid(grid, settings).send_and_receive(messages))
    assert_average(replies, fedavg(start, updates, users, NODES), NODES, settings)
    # no reply the server received carried a site's own weights, only masked integers (2 bytes each mod 2^16)
    trains = [r for r in grid.seen if r.metadata.message_type == MessageType.TRAIN]
    assert len(trains) == len(NODES)
    assert all(list(r.content.array_records) == [wire.MASKED] for r in trains)
    assert all(r.content.array_records[wire.MASKED][wire.MASKED].numpy().dtype == dtype for r in trains)


def test_the_round_counts_the_bytes_that_crossed_the_network_not_the_rebuilt_replies(federation):
    """The strategy sees its own train message and the replies rebuilt around the secure average; the round
    record's bytes must be the train message with the sealed shares and the masked update as sent (before: the
    rebuilt float32 replies, which hide a 64-bit modulus doubling the reply)."""
    grid, messages, start, _, _ = federation
    secure = SecureAggregationGrid(grid, SecureSumSettings(modulus_bits=64))
    replies = list(secure.send_and_receive(messages))
    masked = [r for r in grid.seen if r.metadata.message_type == MessageType.TRAIN]
    weights = sum(int(v.numel()) for v in start.values())
    assert secure.last["bytes_from_site"] == max(payload_bytes(r.content) for r in masked) >= 8 * (weights + 2)
    assert max(payload_bytes(r.content) for r in replies) < 0.7 * secure.last["bytes_from_site"]  # float32 rebuilt
    assert secure.last["bytes_to_site"] > max(payload_bytes(m.content) for m in messages)  # + the sealed shares


@pytest.mark.parametrize("stage", [f"{MessageType.QUERY}.{wire.SECAGG_KEYS_QUERY}",
                                   f"{MessageType.QUERY}.{wire.SECAGG_SHARES_QUERY}", MessageType.TRAIN,
                                   f"{MessageType.QUERY}.{wire.SECAGG_UNMASK_QUERY}"])
def test_sites_dropping_at_any_stage_leave_the_others_sum_recovered(federation, stage):
    grid, messages, start, updates, users = federation
    settings = SecureSumSettings()
    grid.silent[stage] = {12}
    replies = list(SecureAggregationGrid(grid, settings).send_and_receive(messages))
    # 12 dropping after it sent its masked update (unmask stage) is still in the sum; before that, it is not
    kept = NODES if stage.endswith(wire.SECAGG_UNMASK_QUERY) else [n for n in NODES if n != 12]
    assert_average(replies, fedavg(start, updates, users, kept), kept, settings)


def test_a_site_dropping_after_sharing_keys_is_recovered_on_a_sparse_graph(federation):
    grid, messages, start, updates, users = federation
    settings = SecureSumSettings(neighbours=2, threshold=0.6)  # each site shares with 2 of the 4 others
    grid.silent[MessageType.TRAIN] = {14}
    secure = SecureAggregationGrid(grid, settings)
    replies = list(secure.send_and_receive(messages))
    kept = [11, 12, 13, 15]
    assert_average(replies, fedavg(start, updates, users, kept), kept, settings)
    # ⌈0.6 × 3⌉ = 2 shares rebuild a site's masks, but on this ring no sum of fewer than ⌈5 × 2 / 3⌉ = 4 sites
    # can be unmasked: what distributed DP's noise shares cover
    assert secure.last["sites_summed"] == 4 and secure.last["fewest_summed"] == 4
    shares = [r for r in grid.seen if r.metadata.message_type.endswith(wire.SECAGG_SHARES_QUERY)]
    assert all(len(r.content.config_records[wire.SECAGG]["destinations"]) == 2 for r in shares)


def test_too_many_dropouts_fail_the_round_with_reasons_and_reveal_nothing(federation):
    grid, messages, *_ = federation
    grid.silent[f"{MessageType.QUERY}.{wire.SECAGG_UNMASK_QUERY}"] = {11, 12, 13}
    replies = list(SecureAggregationGrid(grid, SecureSumSettings()).send_and_receive(messages))
    assert all(r.has_error() and r.error.code == SECAGG_FAILED for r in replies)
    assert "shares" in replies[0].error.reason and "needed" in replies[0].error.reason


def shifted(part: slice, amount):
    """A tamper that adds `amount` to `part` of a reply's masked vector (integers no honest site sends)."""
    def tamper(reply):
        vector = reply.content.array_records[wire.MASKED][wire.MASKED].numpy().copy()
        vector[part] += amount
        reply.content.array_records[wire.MASKED] = ArrayRecord({wire.MASKED: Array(vector)})
        return reply

    return tamper


def test_a_site_sending_integers_out_of_range_fails_the_round_not_the_model(federation):
    grid, messages, *_ = federation
    grid.tamper[(MessageType.TRAIN, 13)] = shifted(slice(None, -2), np.uint32(2 ** 31))  # far outside any update
    replies = list(SecureAggregationGrid(grid, SecureSumSettings()).send_and_receive(messages))
    assert all(r.has_error() and "out of range" in r.error.reason for r in replies)


def test_a_masked_vector_whose_bytes_are_no_array_leaves_its_site_out_not_the_server_down(federation):
    """Such bytes crashed the server's secure sum (np.load's ValueError); now the site is left out, as one
    that dropped before sending, and the others' sum is recovered."""
    grid, messages, start, updates, users = federation

    def garbled(reply):
        declared = reply.content.array_records[wire.MASKED][wire.MASKED]
        reply.content.array_records[wire.MASKED] = ArrayRecord({wire.MASKED: Array(
            dtype=declared.dtype, shape=tuple(declared.shape), stype=declared.stype, data=b"garbage")})
        return reply

    grid.tamper[(MessageType.TRAIN, 13)] = garbled
    settings = SecureSumSettings()
    replies = list(SecureAggregationGrid(grid, settings).send_and_receive(messages))
    refused = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in refused] == [13]
    assert "tensor masked: its bytes are not a NumPy array" in refused[0].error.reason
    kept = [n for n in NODES if n != 13]
    assert_average(replies, fedavg(start, updates, users, kept), kept, settings)


def test_a_weight_out_of_range_in_a_16_bit_sum_fails_the_round(federation):
    grid, messages, *_ = federation
    settings = SecureSumSettings(bits=12, modulus_bits=16)
    grid.tamper[(MessageType.TRAIN, 13)] = shifted(slice(-2 * settings.count_digits, -settings.count_digits),
                                                  np.uint16(2 ** 12))  # a weight digit past its 11 bits
    replies = list(SecureAggregationGrid(grid, settings).send_and_receive(messages))
    assert all(r.has_error() and "out of range" in r.error.reason for r in replies)


def test_sites_refuse_a_train_message_whose_settings_no_honest_server_sends(federation, monkeypatch):
    """A rogue server that passed stage 2 with sound settings and asks for 1-bit levels in the train message:
    every site answers with a refusal naming the setting (its count digits would have 0 bits: it crashed)."""
    grid, messages, *_ = federation
    deliver = grid.send_and_receive

    def rogue(batch, *, timeout=None):
        for msg in batch:
            if msg.metadata.message_type == MessageType.TRAIN:
                record = msg.content.config_records[wire.SECAGG]
                msg.content.config_records[wire.SECAGG] = ConfigRecord({**dict(record), "bits": 1})
        return deliver(batch, timeout=timeout)

    monkeypatch.setattr(grid, "send_and_receive", rogue)
    list(SecureAggregationGrid(grid, SecureSumSettings()).send_and_receive(messages))
    trains = [r for r in grid.seen if r.metadata.message_type == MessageType.TRAIN]
    assert len(trains) == len(NODES)
    assert all(r.has_error() and r.error.code == SECURE_SUM and "secagg.bits=1" in r.error.reason for r in trains)


def test_a_round_sent_again_after_its_updates_were_sent_is_declined_by_every_site(federation):
    grid, messages, start, *_ = federation
    secure = SecureAggregationGrid(grid, SecureSumSettings())
    list(secure.send_and_receive(messages))
    again = [Message(content=m.content, dst_node_id=m.metadata.dst_node_id, message_type=MessageType.TRAIN)
             for m in messages]  # the server restarted and asks for round 1 again
    grid.silent[MessageType.TRAIN] = {15}  # a smaller group: the two sums' difference would be 15's update
    replies = list(secure.send_and_receive(again))
    assert len(replies) == 4
    for reply in replies:
        metrics = reply.content.metric_records[wire.METRICS]
        assert metrics[wire.DECLINED] == 1.0 and metrics[wire.NUM_EXAMPLES] == 0
        assert "already sent into a secure sum" in reply.content.config_records[wire.NOTES][wire.DECLINED_REASON]
        got = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
        assert all(torch.equal(got[k], start[k]) for k in start)  # nothing averaged in


def test_an_altered_share_is_refused_before_the_site_trains(federation):
    grid, messages, *_ = federation

    def alter(reply):
        record = reply.content.config_records[wire.SECAGG]
        record["sealed"] = [blob[:-1] + bytes([blob[-1] ^ 1]) for blob in record["sealed"]]
        return reply

    grid.tamper[(f"{MessageType.QUERY}.{wire.SECAGG_SHARES_QUERY}", 12)] = alter
    replies = list(SecureAggregationGrid(grid, SecureSumSettings()).send_and_receive(messages))
    refused = [r for r in replies if r.has_error() and r.error.code == SECURE_SUM]
    assert sorted(r.metadata.src_node_id for r in refused) == [11, 13, 14, 15]
    assert all("failed authentication" in r.error.reason for r in refused)
    assert grid.trained == [12]  # the sites that got an altered share never trained (nor spent ε)
    assert [r.error.reason for r in replies if r.metadata.src_node_id == 12] == [
        "secure aggregation: only one site sent a masked update"]


def test_under_distributed_dp_a_declining_site_sends_nothing_so_no_survivor_lacks_its_noise(federation, monkeypatch):
    import fl_client.distributed_dp

    grid, messages, start, updates, users = federation
    ddp = {wire.DDP_SAMPLE_RATE: 0.1, wire.DDP_NOISE: 1.0, wire.DDP_CLIP: 1.0, wire.DDP_COLLUDERS: 0}
    for msg in messages:
        msg.content.config_records[wire.CONFIG].update(ddp)
    shares: list[float] = []

    def step(site, data, round_cfg, state, share):
        shares.append(share)
        node = int(site.state_dir.rsplit("state", 1)[1])
        if node == 13:  # over its budget
            return RoundReply(state=dict(state), num_examples=0, train_loss=0.0, dp=True, epsilon=8.0, delta=1e-5,
                              declined="over its budget")
        trained = {k: state[k] + updates[node][k] for k in start}
        return RoundReply(state=trained, num_examples=users[node], train_loss=1.0, dp=True, epsilon=1.0, delta=1e-5)

    monkeypatch.setattr(fl_client.distributed_dp, "dp_step_round", step)
    replies = list(SecureAggregationGrid(grid, SecureSumSettings()).send_and_receive(messages))
    refused = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in refused] == [13] and "distributed DP: declined" in refused[0].error.reason
    kept = [n for n in NODES if n != 13]
    assert_average(replies, fedavg(start, updates, users, kept), kept, SecureSumSettings())
    # 5 sites, threshold 0.67: a sum is unmasked over at least 4, so each adds σ / √4
    assert shares == [pytest.approx(0.5)] * 5


def test_under_distributed_dp_on_a_ring_each_share_covers_the_fewest_sites_a_sum_unmasks(federation, monkeypatch):
    """5 sites on a ring of 2 neighbours at threshold 0.6: 2 of 3 shares rebuild a site's masks, but no sum of
    fewer than 4 sites can be unmasked, so each site adds σ/√4 (before: σ/√2, a sum of 5 carrying 1.58σ)."""
    import fl_client.distributed_dp

    grid, messages, start, updates, users = federation
    for msg in messages:
        msg.content.config_records[wire.CONFIG].update({wire.DDP_SAMPLE_RATE: 0.1, wire.DDP_NOISE: 1.0,
                                                        wire.DDP_CLIP: 1.0, wire.DDP_COLLUDERS: 0})
    shares: list[float] = []

    def step(site, data, round_cfg, state, share):
        shares.append(share)
        node = int(site.state_dir.rsplit("state", 1)[1])
        trained = {k: state[k] + updates[node][k] for k in start}
        return RoundReply(state=trained, num_examples=users[node], train_loss=1.0, dp=True, epsilon=1.0, delta=1e-5)

    monkeypatch.setattr(fl_client.distributed_dp, "dp_step_round", step)
    secure = SecureAggregationGrid(grid, SecureSumSettings(neighbours=2, threshold=0.6))
    replies = list(secure.send_and_receive(messages))
    assert not any(r.has_error() for r in replies)
    assert shares == [pytest.approx(0.5)] * 5
    assert secure.last["fewest_summed"] == 4 and secure.last["sites_summed"] == 5


@pytest.fixture
def evaluation(federation, monkeypatch):
    """The five sites' evaluate messages, each site's evaluation replaced by known, different per-user means."""
    grid, messages, _, _, users = federation
    metrics = {n: {"hr@10": 0.1 * (i + 1), "hr@10:m2": 0.1 * (i + 1), "ndcg@10": 0.03 * (i + 1) + 0.001,
                   wire.VALID_NDCG10: 0.05 / (i + 1), wire.TRAIN_CE: 3.0 + i / 7,
                   wire.NUM_EXAMPLES: float(users[n] - i)}
               for i, n in enumerate(NODES)}
    monkeypatch.setattr(fl_client.evaluation, "evaluate_round",  # imported by the handler
                        lambda site, *_: dict(metrics[int(Path(site.state_dir).name.removeprefix("state"))]))
    evaluate = [Message(content=m.content, dst_node_id=m.metadata.dst_node_id, message_type=MessageType.EVALUATE)
                for m in messages]
    return grid, evaluate, metrics


def assert_pooled(replies, metrics, nodes):
    """Every reply carries the user-weighted means over `nodes` (fixed point: 2^-16 a user), and the users add up."""
    assert sorted(r.metadata.src_node_id for r in replies if not r.has_error()) == sorted(nodes)
    users = sum(metrics[n][wire.NUM_EXAMPLES] for n in nodes)
    for reply in (r for r in replies if not r.has_error()):
        got = dict(reply.content.metric_records[wire.METRICS])
        for key in metrics[nodes[0]]:
            if key != wire.NUM_EXAMPLES:
                expected = sum(metrics[n][key] * metrics[n][wire.NUM_EXAMPLES] for n in nodes) / users
                assert got[key] == pytest.approx(expected, abs=1e-5), key
    assert sum(r.content.metric_records[wire.METRICS][wire.NUM_EXAMPLES] for r in replies if not r.has_error()) \
        == users


def test_the_secure_evaluation_gives_the_server_the_pooled_metrics_never_a_sites_own(evaluation):
    grid, messages, metrics = evaluation
    secure = SecureAggregationGrid(grid, SecureSumSettings())
    replies = list(secure.send_and_receive(messages))
    assert_pooled(replies, metrics, NODES)
    evaluations = [r for r in grid.seen if r.metadata.message_type == MessageType.EVALUATE]
    assert len(evaluations) == len(NODES)
    assert all(list(r.content.array_records) == [wire.MASKED] and not r.content.metric_records
               for r in evaluations)  # no site's own metric or user count crossed the wire in clear
    assert secure.last_evaluation["sites_summed"] == len(NODES)


def test_a_site_dropping_from_the_secure_evaluation_leaves_the_others_pooled(evaluation):
    grid, messages, metrics = evaluation
    grid.silent[MessageType.EVALUATE] = {12}
    assert_pooled(list(SecureAggregationGrid(grid, SecureSumSettings()).send_and_receive(messages)), metrics,
                  [11, 13, 14, 15])


def test_a_site_naming_other_metrics_is_left_out_of_the_evaluation_sum(evaluation):
    grid, messages, metrics = evaluation

    def rename(reply):
        reply.content.config_records[wire.SECAGG] = ConfigRecord({"names": ["hr@10", "x", "y", "z", "w"]})
        return reply

    grid.tamper[(MessageType.EVALUATE, 13)] = rename
    replies = list(SecureAggregationGrid(grid, SecureSumSettings()).send_and_receive(messages))
    assert [r.metadata.src_node_id for r in replies if r.has_error()] == [13]
    assert_pooled(replies, metrics, [11, 12, 14, 15])


def test_an_evaluation_sum_out_of_range_is_refused(evaluation):
    grid, messages, _ = evaluation
    grid.tamper[(MessageType.EVALUATE, 14)] = shifted(slice(None, 1), np.uint64(2 ** 62))
    replies = list(SecureAggregationGrid(grid, SecureSumSettings()).send_and_receive(messages))
    assert all(r.has_error() and "out of range" in r.error.reason for r in replies)


def test_sites_refuse_an_evaluation_sum_masked_mod_2_32_and_a_second_evaluation_of_a_round(evaluation):
    grid, messages, metrics = evaluation
    # a server asking for 32-bit masks on 64-bit sums would see each sum's upper half in clear
    weak = SecureRound(grid, SecureSumSettings(modulus_bits=32), None, evaluation=True).run(messages)
    assert len(weak) == len(NODES) and all(r.has_error() for r in weak)
    assert all("modulus-bits 64" in r.error.reason for r in weak if r.error.code == SECURE_SUM)
    secure = SecureAggregationGrid(grid, SecureSumSettings())
    assert_pooled(list(secure.send_and_receive(messages)), metrics, NODES)
    grid.silent[MessageType.EVALUATE] = {15}  # asked again over a smaller group: the difference would be 15's
    again = list(secure.send_and_receive(messages))
    refused = [r for r in again if r.has_error() and r.error.code == SECURE_SUM]
    assert len(refused) == 4 and all("already sent into a secure sum" in r.error.reason for r in refused)


def test_an_evaluation_under_the_training_sums_tag_is_refused(evaluation):
    """A site sends one secure sum per training, round and purpose: an evaluation asked under the round's
    training tag (or any tag its message's round does not name) is refused before anything is evaluated."""
    grid, messages, _ = evaluation
    replies = SecureRound(grid, SecureSumSettings(modulus_bits=64), None).run(messages)  # the train tag
    refused = [r for r in replies if r.has_error() and r.error.code == SECURE_SUM]
    assert len(refused) == len(NODES) and all("tag does not name" in r.error.reason for r in refused)

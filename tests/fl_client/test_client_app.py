"""The ClientApp handlers, driven by hand-built Flower Messages (no simulation engine, no SuperNode)."""

import json
import math
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_client.client_app import (
    CATALOG_MISMATCH,
    FROZEN_TENSORS,
    ROUND_CONFIG,
    TRAINING_DIVERGED,
    WIRE_VERSION,
    build_client_app,
)
from fl_client.frozen_cache import frozen_path
from fl_client.round_config import RoundConfig, build_global_model
from fl_client.site import SiteConfig, load_site_data
from shared_model import wire
from shared_model.catalog import ItemCatalog
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel
from tests.fl_client.server_round import round_record


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):  # what a running ServerApp process has set
        monkeypatch.setattr(TaskIdentity, name, 1)


def message(kind: str, catalog: ItemCatalog, server_round: int = 1, num_rounds: int = 2,
            fingerprint: str = "", **overrides) -> Message:
    record, initial = round_record(catalog, server_round, num_rounds)
    record.update(overrides)
    cfg = RoundConfig.from_record(record)
    config = ConfigRecord({**record, wire.CATALOG_FINGERPRINT: fingerprint or catalog.fingerprint})
    content = RecordDict({wire.ARRAYS: ArrayRecord(wire.full_state(build_global_model(cfg, initial))),
                          wire.CONFIG: config})
    return Message(content=content, message_type=kind, dst_node_id=2)


def call(site: SiteConfig, msg: Message) -> Message:
    app = build_client_app(lambda _context: site)
    return app(msg, Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={}))


def test_train_reply_carries_trainable_weights_and_the_metrics_flower_expects(site):
    catalog = ItemCatalog.load(site.catalog_path)
    msg = message("train", catalog)
    reply = call(site, msg)
    assert not reply.has_error() and reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert list(reply.content.array_records) == [wire.ARRAYS] and list(reply.content.metric_records) == [wire.METRICS]
    sent = set(msg.content.array_records[wire.ARRAYS])
    returned = set(reply.content.array_records[wire.ARRAYS])
    assert returned == sent and "output.weight" not in returned  # no frozen tensors here; tied table once
    metrics = reply.content.metric_records[wire.METRICS]
    assert metrics[wire.DP_ENABLED] == 1.0 and 0 < metrics[wire.EPSILON] <= site.privacy.epsilon
    assert metrics[wire.DECLINED] == 0
    assert metrics[wire.NUM_EXAMPLES] > 0


def test_asked_for_float16_a_site_sends_its_update_in_half_precision(site):
    catalog = ItemCatalog.load(site.catalog_path)
    msg = message("train", catalog, **{wire.UPDATE_PRECISION: "float16"})
    reply = call(site, msg)
    assert list(reply.content.array_records) == [wire.UPDATE]
    start, update = msg.content.array_records[wire.ARRAYS], reply.content.array_records[wire.UPDATE]
    assert set(update) == set(start)
    for name, array in update.items():
        assert array.dtype == "float16" and array.shape == start[name].shape
    assert any(abs(array.numpy()).max() > 0 for array in update.values())  # it trained
    assert reply.content.metric_records[wire.METRICS][wire.DECLINED] == 0
    asks_int8 = message("train", catalog)
    asks_int8.content[wire.CONFIG] = ConfigRecord({**asks_int8.content.config_records[wire.CONFIG],
                                                   wire.UPDATE_PRECISION: "int8"})
    refused = call(site, asks_int8)
    assert refused.has_error() and "update-precision='int8'" in refused.error.reason


def test_a_declined_round_replies_with_the_same_record_layout(site):
    catalog = ItemCatalog.load(site.catalog_path)
    trained = call(site, message("train", catalog, 1, num_rounds=1))
    refused = call(site, message("train", catalog, 2, num_rounds=1))  # beyond the budget planned for 1 round
    assert refused.content.metric_records[wire.METRICS][wire.DECLINED] == 1.0
    assert refused.content.metric_records[wire.METRICS][wire.NUM_EXAMPLES] == 0
    assert "over its budget" in refused.content.config_records[wire.NOTES][wire.DECLINED_REASON]
    assert trained.content.config_records[wire.NOTES][wire.DECLINED_REASON] == ""
    # Flower's strategies refuse replies whose keys differ, so a refusal must look like a trained reply.
    assert set(refused.content.array_records[wire.ARRAYS]) == set(trained.content.array_records[wire.ARRAYS])
    assert set(refused.content.metric_records[wire.METRICS]) == set(trained.content.metric_records[wire.METRICS])


def test_weights_for_another_catalog_get_an_error_reply_not_a_crash(site):
    catalog = ItemCatalog.load(site.catalog_path)
    other = ItemCatalog.from_items(["a", "b"]).fingerprint
    for kind in ("train", "evaluate"):
        reply = call(site, message(kind, catalog, fingerprint=other))
        assert reply.has_error() and reply.error.code == CATALOG_MISMATCH and "catalog" in reply.error.reason


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_server_of_another_wire_version_is_refused_naming_both_versions(site, kind):
    catalog = ItemCatalog.load(site.catalog_path)
    for version, said in ((wire.VERSION + 1, f"version {wire.VERSION + 1}"), (None, "no version")):
        msg = message(kind, catalog)
        if version is None:
            del msg.content.config_records[wire.CONFIG][wire.WIRE_VERSION]
        else:
            msg.content.config_records[wire.CONFIG][wire.WIRE_VERSION] = version
        reply = call(site, msg)
        assert reply.has_error() and reply.error.code == WIRE_VERSION
        assert f"the server speaks fedrec wire protocol {said}" in reply.error.reason
        assert f"this side version {wire.VERSION}" in reply.error.reason
    assert not site.ledger_path.exists()  # refused before anything was spent or kept
    good = call(site, message(kind, catalog))  # the same site serves a server of its own version
    assert not good.has_error()
    assert good.content.config_records[wire.NOTES][wire.WIRE_VERSION] == wire.VERSION


def test_a_diverged_round_sends_no_weights_and_is_charged_to_the_ledger(site):
    catalog = ItemCatalog.load(site.catalog_path)
    exploding = {wire.OPTIMIZER: "sgd", wire.LEARNING_RATE: 1e12}
    reply = call(site, message("train", catalog, **exploding))
    assert reply.has_error() and reply.error.code == TRAINING_DIVERGED
    assert "non-finite weights" in reply.error.reason and "lower train.lr" in reply.error.reason
    # Its failure was released, so its planned DP steps count: a resend is not trained (or paid) again.
    assert "charged to the site's ledger" in reply.error.reason
    resent = call(site, message("train", catalog, **exploding))
    assert resent.content.metric_records[wire.METRICS][wire.DECLINED] == 1.0
    assert 0 < resent.content.metric_records[wire.METRICS][wire.EPSILON] <= site.privacy.epsilon


def test_evaluate_reply_has_full_ranking_metrics_weighted_by_users(site):
    catalog = ItemCatalog.load(site.catalog_path)
    reply = call(site, message("evaluate", catalog))
    metrics = reply.content.metric_records[wire.METRICS]
    assert not reply.content.array_records  # nothing but metrics goes back
    assert {"hr@10", "ndcg@10", "mrr", wire.VALID_NDCG10, wire.TRAIN_CE, wire.NUM_EXAMPLES} <= set(metrics)
    assert metrics[wire.NUM_EXAMPLES] > 0
    assert 0 < metrics[wire.TRAIN_CE] < 2 * math.log(len(catalog.item_ids))  # an untrained model: about ln V


def featured_messages(catalog: ItemCatalog) -> tuple[dict, dict, dict]:
    """A round's config for a model with frozen public item features, its trainable and its frozen tensors."""
    record, _ = round_record(catalog)
    config = FedRecConfig(num_items=len(catalog.item_ids), hidden_size=16, max_len=10, feature_dim=4,
                          feature_scoring=True, catalog_fingerprint=catalog.fingerprint)
    model = FedRecModel(config)
    model.set_item_features(torch.randn(config.num_item_rows, 4))
    trainable = wire.trainable_state(model)
    frozen = {k: v for k, v in wire.full_state(model).items() if k not in trainable}
    record.update({wire.MODEL_CONFIG: config.to_json_string(), wire.FROZEN_DIGEST: wire.tensors_digest(frozen)})
    return record, trainable, frozen


def test_a_site_keeps_the_frozen_tensors_once_sent_and_says_so(site):
    catalog = ItemCatalog.load(site.catalog_path)
    record, trainable, frozen = featured_messages(catalog)
    assert set(frozen) == {"item_features"}

    def send(kind: str, server_round: int, tensors: dict | None, **overrides) -> Message:
        records = {wire.ARRAYS: ArrayRecord(trainable),
                   wire.CONFIG: ConfigRecord({**record, wire.SERVER_ROUND: server_round, **overrides})}
        if tensors is not None:
            records[wire.FROZEN] = ArrayRecord(tensors)
        return call(site, Message(content=RecordDict(records), message_type=kind, dst_node_id=2))

    first = send("train", 1, frozen)
    assert not first.has_error()
    assert first.content.config_records[wire.NOTES][wire.FROZEN_HELD] == record[wire.FROZEN_DIGEST]
    assert set(first.content.array_records[wire.ARRAYS]) == set(trainable)  # never sent back
    # Later messages carry the trainable weights only: the site rebuilds the model from its kept copy.
    assert not send("evaluate", 1, None).has_error()
    assert not send("train", 2, None).has_error()
    # Tensors that are not the ones named, or a digest the site never received, get an error reply.
    tampered = {"item_features": frozen["item_features"] + 1}
    wrong = send("evaluate", 1, tampered)
    assert wrong.has_error() and wrong.error.code == FROZEN_TENSORS and "do not match" in wrong.error.reason
    unknown = send("evaluate", 1, None, **{wire.FROZEN_DIGEST: wire.tensors_digest(tampered)})
    assert unknown.has_error() and unknown.error.code == FROZEN_TENSORS and "holds none" in unknown.error.reason
    # A kept copy damaged on disk is refused and removed, so the server's next resend is kept afresh.
    kept = frozen_path(site, record[wire.FROZEN_DIGEST])
    kept.write_bytes(b"damaged")
    damaged = send("evaluate", 1, None)
    assert damaged.has_error() and damaged.error.code == FROZEN_TENSORS and "damaged" in damaged.error.reason
    assert not kept.exists() and not send("evaluate", 1, frozen).has_error() and kept.exists()


WATCHED = ("pandas", "transformers", "opacus", "fl_client.dp.engine", "fl_client.train", "fl_client.training_round",
           "torch._dynamo")
TRAINING = ["fl_client.train", "fl_client.training_round", "torch._dynamo"]  # torch's optimisers import _dynamo


@pytest.mark.parametrize(("dp", "loads"), [
    (True, {"evaluate": [], "train": sorted(["fl_client.dp.engine", "opacus", *TRAINING])}),
    (False, {"train": TRAINING}),  # without DP no Opacus (about 3 s of CPU a message: it imported the DP engine)
])
def test_a_message_process_imports_only_what_it_runs(site, tmp_path, dp, loads):
    """A deployed site's every message is a fresh process, so each pays for its imports. One that reads the
    site's cached sequences imports neither pandas (0.35 s of CPU) nor transformers (2.4 s); an evaluate message
    neither Opacus nor torch._dynamo (2.2 s: the model config's meta-device skeleton imported it, see
    skip_random_init); a training without DP no Opacus. BENCHMARKS.md, "A site's message process" and after.
    (Each message's imports are read after it, in one process: an evaluate, then a train message.)"""
    catalog = ItemCatalog.load(site.catalog_path)
    load_site_data(site)  # what fedrec-client does before its SuperNode starts: parse the events, cache them
    messages = tmp_path / "messages.pickle"
    messages.write_bytes(pickle.dumps([(kind, message(kind, catalog)) for kind in loads]))
    script = f"""
import json, pickle, sys
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for name in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, name, 1)
from fl_client.client_app import build_client_app
from fl_client.dp.settings import PrivacyConfig
from fl_client.site import SiteConfig
site = SiteConfig(data_path={site.data_path!r}, catalog_path={site.catalog_path!r}, state_dir={site.state_dir!r},
                  privacy=PrivacyConfig(enabled={dp!r}, epsilon=4.0), device="cpu")
app = build_client_app(lambda _context: site)
loaded = {{}}
for kind, msg in pickle.loads(open({str(messages)!r}, "rb").read()):
    reply = app(msg, Context(run_id=1, node_id=2, node_config={{}}, state=RecordDict(), run_config={{}}))
    assert not reply.has_error(), reply.error
    assert kind == "evaluate" or reply.content.metric_records[{wire.METRICS!r}][{wire.DP_ENABLED!r}] == float({dp!r})
    loaded[kind] = sorted(m for m in {WATCHED!r} if m in sys.modules)
print(json.dumps(loaded))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == loads


@pytest.mark.parametrize(("key", "value", "says"), [
    (wire.BATCH_SIZE, 0, "batch-size=0: needs at least 1"),  # was a ZeroDivisionError in the σ plan
    (wire.LOCAL_EPOCHS, 0, "local-epochs=0: needs at least 1"),
    (wire.NUM_ROUNDS, -3, "num-rounds=-3: needs at least 1"),  # was a NaN σ
    (wire.SERVER_ROUND, -1, "server-round=-1: needs at least 0"),
    (wire.LEARNING_RATE, math.nan, "lr=nan: needs a finite number >= 0"),
    (wire.DDP_SAMPLE_RATE, -0.5, "ddp-sample-rate=-0.5: needs a finite number >= 0"),  # passed as distributed DP
    # Plans past max_plan_steps: before, the site searched σ for them for minutes (10^6 steps passed 19 GB).
    (wire.NUM_ROUNDS, 10**7, "plan is 40,000,000 steps (10000000 rounds x 1 epochs x 4 steps of batch size 32"),
    (wire.LOCAL_EPOCHS, 10**6, "plan is 8,000,000 steps (2 rounds x 1000000 epochs"),
])
def test_a_round_config_out_of_range_is_refused_before_anything_is_planned_or_spent(site, key, value, says):
    msg = message("train", ItemCatalog.load(site.catalog_path))
    msg.content.config_records[wire.CONFIG][key] = value
    reply = call(site, msg)
    assert reply.has_error() and reply.error.code == ROUND_CONFIG and says in reply.error.reason, reply.error
    assert not (Path(site.state_dir) / "sigma_plans.json").exists() and not site.ledger_path.exists()


def test_a_site_bounds_all_planned_steps_under_dp_and_one_rounds_without(site):
    catalog = ItemCatalog.load(site.catalog_path)  # 120 users, batch 32: 4 steps an epoch
    small = replace(site, max_plan_steps=8)
    assert not call(small, message("train", catalog, num_rounds=2)).has_error()  # 2 rounds x 4 steps
    refused = call(small, message("train", catalog, num_rounds=3))
    assert refused.error.code == ROUND_CONFIG and "at most max_plan_steps=8 (--max-plan-steps)" in refused.error.reason
    no_dp = replace(small, privacy=replace(site.privacy, enabled=False), state_dir=site.state_dir + "-no-dp")
    assert not call(no_dp, message("train", catalog, num_rounds=10**7)).has_error()  # one round: 4 steps
    many_epochs = call(no_dp, message("train", catalog, **{wire.LOCAL_EPOCHS: 3}))
    assert many_epochs.error.code == ROUND_CONFIG and "one round: 3 epochs x 4 steps" in many_epochs.error.reason

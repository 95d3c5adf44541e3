"""What a site refuses before it trains or spends anything: a bad global model, unsafe ids and digests, too few
users; and what it repairs or never trusts on its own disk: a damaged cache, a kept reply that would run code."""

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_client import site as site_module
from fl_client.dp.enrolment import LEDGER_FILE
from fl_client.round_config import (
    ModelMismatchError,
    ModelTooLargeError,
    NonFiniteModelError,
    RoundConfig,
    RoundConfigError,
    build_global_model,
    config_shapes,
)
from fl_client.site import SiteStartError, check_site_start, load_site_data
from fl_client.supernode import parse_args
from fl_client.training_round import load_reply, reply_path, train_round
from shared_model import wire
from shared_model.catalog import ItemCatalog
from tests.fl_client.server_round import round_record
from tests.fl_client.test_site_boundaries import Payload


def spent_rounds(site) -> list[int]:
    path = Path(site.state_dir) / LEDGER_FILE
    return [e["round"] for e in json.loads(path.read_text())["entries"]] if path.exists() else []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_global_model_is_refused_before_any_epsilon_is_spent(site, value):
    data = load_site_data(site)
    record, state = round_record(data.catalog)
    state["item_embeddings.weight"][3, 0] = value
    with pytest.raises(NonFiniteModelError, match="before training or spending any ε"):
        train_round(site, data, RoundConfig.from_record(record), state)
    assert spent_rounds(site) == []


def test_global_weights_of_the_wrong_shape_or_dtype_are_refused(site):
    data = load_site_data(site)
    record, state = round_record(data.catalog)
    cfg = RoundConfig.from_record(record)
    wide = {**state, "item_embeddings.weight": torch.zeros(state["item_embeddings.weight"].shape[0], 17)}
    with pytest.raises(ModelMismatchError, match=r"item_embeddings\.weight"):
        train_round(site, data, cfg, wide)
    doubled = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    with pytest.raises(ModelMismatchError, match="float64"):
        train_round(site, data, cfg, doubled)
    assert spent_rounds(site) == []


def test_a_process_checks_each_model_config_on_one_skeleton_and_still_checks_every_state(site):
    """A simulated site's worker answers many messages of one config: the meta-device skeleton is built once;
    each message's weights are still checked against it."""
    record, state = round_record(load_site_data(site).catalog)
    cfg = RoundConfig.from_record(record)
    config_shapes.cache_clear()
    build_global_model(cfg, state)
    with pytest.raises(NonFiniteModelError):
        build_global_model(cfg, {**state, "item_embeddings.weight": state["item_embeddings.weight"] * float("nan")})
    with pytest.raises(ModelMismatchError, match="float64"):
        build_global_model(cfg, {k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    assert (config_shapes.cache_info().misses, config_shapes.cache_info().hits) == (1, 2)


@pytest.mark.parametrize("fields", [{}, {"item_bias": True, "tie_item_embeddings": False},
                                    {"feature_dim": 8, "feature_scoring": True}])
def test_the_skeleton_built_without_random_init_has_the_models_shapes_and_leaves_init_alone(fields):
    """config_shapes skips the random fills on its meta skeleton (no values to fill; they imported torch._dynamo):
    every tensor's name, shape and dtype still equal a real model's, and models built after it are initialised."""
    from shared_model.configuration_fedrec import FedRecConfig
    from shared_model.modeling_fedrec import FedRecModel

    config = FedRecConfig(num_items=30, hidden_size=16, max_len=12, **fields)
    size, shapes = config_shapes(config.to_json_string())
    real = FedRecModel(config)
    assert dict(shapes) == {name: (tuple(t.shape), t.dtype) for name, t in real.state_dict().items()}
    assert size == sum(t.numel() for t in real.parameters()) + sum(t.numel() for t in real.buffers())
    again = FedRecModel(config)  # the mode ended with the skeleton
    assert again.item_embeddings.weight[1:].std() > 0 and again.layers[0].attention.self.query.weight.std() > 0


def test_a_model_config_over_the_sites_bound_is_refused_before_it_is_built(site):
    data = load_site_data(site)
    record, state = round_record(data.catalog)
    config = json.loads(record[wire.MODEL_CONFIG])
    record[wire.MODEL_CONFIG] = json.dumps({**config, "hidden_size": 65536, "intermediate_size": 262144})
    with pytest.raises(ModelTooLargeError, match="max_model_parameters"):  # would be tens of GB if allocated
        train_round(site, data, RoundConfig.from_record(record), state)
    small = replace(site, max_model_parameters=1000)
    record, state = round_record(data.catalog)
    with pytest.raises(ModelTooLargeError, match="1,000"):
        train_round(small, data, RoundConfig.from_record(record), state)
    assert spent_rounds(site) == []


@pytest.mark.parametrize("key,value", [(wire.FROZEN_DIGEST, "../../victim"), (wire.FROZEN_DIGEST, "A" * 64),
                                       (wire.FROZEN_DIGEST, "0" * 63), (wire.TRAINING_ID, "../../victim"),
                                       (wire.TRAINING_ID, "Train-7"), (wire.TRAINING_ID, "a/b"),
                                       (wire.SERVER_ROUND, "one")])
def test_unsafe_ids_and_digests_from_the_server_are_refused_and_touch_no_file(site, tmp_path, key, value):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"keep me")
    data = load_site_data(site)
    record, _ = round_record(data.catalog)
    record[key] = value
    with pytest.raises(RoundConfigError, match=key):
        RoundConfig.from_record(record)
    assert victim.read_bytes() == b"keep me"


@pytest.mark.parametrize("negatives", [-1, 41], ids=["negative", "more than the catalog's 40 items"])
def test_a_sampled_softmax_the_catalog_cannot_hold_is_refused_before_the_ledger(site, negatives):
    data = load_site_data(site)
    record, state = round_record(data.catalog)
    record[wire.NUM_NEGATIVES] = negatives
    with pytest.raises(RoundConfigError, match=rf"{wire.NUM_NEGATIVES}={negatives}"):
        train_round(site, data, RoundConfig.from_record(record), state)
    assert spent_rounds(site) == []
    record[wire.NUM_NEGATIVES] = 40  # every item: allowed
    assert train_round(site, data, RoundConfig.from_record(record), state).dp


def test_a_site_without_trainable_users_or_below_the_dp_minimum_is_refused_at_start(site, tmp_path):
    data = load_site_data(site)
    with pytest.raises(SiteStartError, match="min_users=500"):
        check_site_start(replace(site, min_users=500), data)
    no_dp = replace(site, min_users=500, privacy=replace(site.privacy, enabled=False))
    assert "rounds recorded" in check_site_start(no_dp, data)  # no DP, no minimum
    lonely = tmp_path / "lonely.csv"
    lonely.write_text("user_id,item_id,timestamp\nu1,a,1700000000\nu1,b,1700000060\n")
    empty = replace(site, data_path=str(lonely), state_dir=str(tmp_path / "lonely-state"),
                    privacy=replace(site.privacy, enabled=False))
    with pytest.raises(SiteStartError, match="no trainable users"):
        check_site_start(empty, load_site_data(empty))


def test_fedrec_client_needs_an_explicit_state_dir_so_renaming_the_data_keeps_the_ledger(site, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--insecure", "--data", site.data_path, "--catalog", site.catalog_path])
    assert "--state-dir" in capsys.readouterr().err
    data = load_site_data(site)
    record, state = round_record(data.catalog, 1)
    first = train_round(site, data, RoundConfig.from_record(record), state)
    renamed = Path(site.data_path).rename(tmp_path / "renamed.csv")
    moved = replace(site, data_path=str(renamed))
    record, _ = round_record(data.catalog, 2)
    second = train_round(moved, load_site_data(moved), RoundConfig.from_record(record), first.state)
    assert spent_rounds(site) == [1, 2] and second.epsilon > first.epsilon


def test_a_damaged_preprocessing_cache_is_rebuilt(site, caplog):
    first = load_site_data(site)
    cache = next(Path(site.state_dir).glob("sequences_*.npz"))
    cache.write_bytes(cache.read_bytes()[:100])  # truncated, as a full disk or a killed write would leave it
    with caplog.at_level(logging.WARNING):
        again = load_site_data(site)
    assert "damaged" in caplog.text and again.sequences.user_ids == first.sequences.user_ids
    assert load_site_data(site).sequences.user_ids == first.sequences.user_ids  # and the rebuilt cache is read


def test_a_process_reads_a_sites_files_once_and_again_whenever_one_changes(site, monkeypatch, caplog):
    reads = {"catalog": 0, "cache": 0}

    def counted(name, read):
        def wrapper(*args):
            reads[name] += 1
            return read(*args)
        return wrapper

    monkeypatch.setattr(site_module, "RACY_NS", 0)  # the files were written just now (see the next test)
    monkeypatch.setattr(site_module.ItemCatalog, "load", counted("catalog", site_module.ItemCatalog.load))
    monkeypatch.setattr(site_module, "_read_cache", counted("cache", site_module._read_cache))
    first = load_site_data(site)  # parses the events and writes the cache
    for _ in range(3):  # as a simulated sites' worker answers a site's messages
        again = load_site_data(site)
    assert reads == {"catalog": 1, "cache": 1} and again.sequences.user_ids == first.sequences.user_ids
    with pytest.raises(ValueError, match="read-only"):  # shared by the messages: nobody writes into it
        again.sequences.items[0] = 0
    cache = next(Path(site.state_dir).glob("sequences_*.npz"))
    cache.write_bytes(cache.read_bytes()[:-10])  # damaged: read again, found damaged, rebuilt
    with caplog.at_level(logging.WARNING):
        assert load_site_data(site).sequences.user_ids == first.sequences.user_ids
    assert "damaged" in caplog.text and reads["cache"] == 2
    # Another catalog in the same file: read again, and the sequences follow it.
    ItemCatalog(first.catalog.item_ids[:-1]).save(Path(site.catalog_path).parent)
    assert load_site_data(site).catalog.item_ids == first.catalog.item_ids[:-1] and reads["catalog"] == 2


def test_a_file_changed_just_before_it_was_read_is_read_again_until_it_is_settled(tmp_path, monkeypatch):
    memo, reads = site_module.FileMemo(max_bytes=100, max_entries=2), []
    path = tmp_path / "a.txt"
    path.write_text("one")

    def read(file):
        reads.append(file.name)
        return file.read_text()

    assert [memo.read(path, read, len) for _ in range(2)] == ["one", "one"] and len(reads) == 2
    monkeypatch.setattr(site_module, "RACY_NS", 0)  # as when the change is RACY_NS old
    assert [memo.read(path, read, len) for _ in range(2)] == ["one", "one"] and len(reads) == 3
    for name in ("b.txt", "c.txt"):  # at most two files: a.txt, the least recently used, is dropped
        (tmp_path / name).write_text(name)
        memo.read(tmp_path / name, read, len)
    memo.read(path, read, len)
    assert reads == ["a.txt"] * 3 + ["b.txt", "c.txt", "a.txt"]
    # A use is recorded (for cache_keep) at most once every IN_USE_TOUCH_S, as a touch makes the file new again.
    site_module.mark_in_use(path)
    assert memo.read(path, read, len) == "one" and len(reads) == 6
    os.utime(path, ns=(1, 1))
    site_module.mark_in_use(path)
    assert path.stat().st_mtime > 1 and memo.read(path, read, len) == "one" and len(reads) == 7


def test_a_kept_reply_is_read_without_running_code_from_it(site):
    path = reply_path(site, "train-7", 1)
    path.parent.mkdir(parents=True)
    torch.save({"state": {}, "payload": Payload()}, path)
    assert load_reply(path) is None and not Payload.ran

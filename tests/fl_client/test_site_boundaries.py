"""The site's boundaries end to end through its ClientApp: what a server sends that the site refuses (each with
its own Error code, the ledger unchanged), what every reply says about the site, and what the site never
trusts on its own disk (state files that would run code, a cache whose file changed under the same size and
time); plus the user-count rules of a site whose data changes, and of simulated sites."""

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_client import site as site_module
from fl_client.client_app import (
    LEDGER,
    MODEL_MISMATCH,
    MODEL_NOT_FINITE,
    MODEL_TOO_LARGE,
    ROUND_CONFIG,
    SITE_NOT_READY,
)
from fl_client.frozen_cache import frozen_path
from fl_client.round_config import RoundConfig, RoundConfigError
from fl_client.site import DIGEST_MEMO, SiteConfig, SiteStartError, data_digest, load_site_data
from fl_client.training_round import optimizer_state_path, train_round
from shared_model import wire
from shared_model.catalog import ItemCatalog
from simulations.config import DataConfig
from simulations.federation import write_sites
from simulations.prepare import prepare_data
from tests.fl_client.server_round import round_record
from tests.fl_client.test_client_app import call, message


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):  # what a running ServerApp process has set
        monkeypatch.setattr(TaskIdentity, name, 1)


def ledger_rounds(site: SiteConfig) -> list[int]:
    if not site.ledger_path.exists():
        return []
    return [e["round"] for e in json.loads(site.ledger_path.read_text())["entries"]]


def raw_message(kind: str, record: dict, state: dict) -> Message:
    """A message exactly as given (no parsing on the way: the server may send anything)."""
    content = RecordDict({wire.ARRAYS: ArrayRecord(state), wire.CONFIG: ConfigRecord(record)})
    return Message(content=content, message_type=kind, dst_node_id=2)


def test_a_bad_global_model_gets_its_own_error_code_and_spends_nothing(site):
    catalog = ItemCatalog.load(site.catalog_path)
    assert not call(site, message("train", catalog, 1)).has_error()  # one round paid for
    paid = json.loads(site.ledger_path.read_text())
    record, state = round_record(catalog, 2)
    nan = {**state, "item_embeddings.weight": state["item_embeddings.weight"].clone().fill_(float("nan"))}
    wide = {**state, "item_embeddings.weight": torch.zeros(state["item_embeddings.weight"].shape[0], 17)}
    extra = {**state, "backdoor.weight": torch.zeros(2)}
    missing = {k: v for k, v in state.items() if k != "embedding_norm.weight"}
    cases = [(nan, MODEL_NOT_FINITE, "NaN or infinite"), (wide, MODEL_MISMATCH, "item_embeddings.weight"),
             (extra, MODEL_MISMATCH, "backdoor.weight"), (missing, MODEL_MISMATCH, "embedding_norm.weight")]
    for weights, code, says in cases:
        for kind in ("train", "evaluate"):
            reply = call(site, raw_message(kind, record, weights))
            assert reply.has_error() and reply.error.code == code and says in reply.error.reason, reply.error.reason
    huge = replace(site, max_model_parameters=1000)
    reply = call(huge, raw_message("train", record, state))
    assert reply.has_error() and reply.error.code == MODEL_TOO_LARGE and "1,000" in reply.error.reason
    assert json.loads(site.ledger_path.read_text()) == paid  # ε unchanged: nothing recorded for round 2


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_global_weights_whose_bytes_are_not_what_they_declare_are_refused_not_a_crash(site, kind):
    """Bytes that were no array raised out of the handler (np.load); now they, and bytes of another shape than
    the tensor declares, are the model-mismatch refusal."""
    catalog = ItemCatalog.load(site.catalog_path)
    record, state = round_record(catalog)
    wrong_shape = io.BytesIO()
    np.save(wrong_shape, np.ones((3, 3), dtype=np.float32))
    for data, says in ((b"garbage", "tensor embedding_norm.weight: its bytes are not a NumPy array"),
                       (wrong_shape.getvalue(), "but its bytes hold (3, 3) float32")):
        msg = raw_message(kind, record, state)
        arrays = dict(msg.content.array_records[wire.ARRAYS].items())
        declared = arrays["embedding_norm.weight"]
        arrays["embedding_norm.weight"] = Array(dtype=declared.dtype, shape=tuple(declared.shape),
                                                stype=declared.stype, data=data)
        msg.content[wire.ARRAYS] = ArrayRecord(arrays)
        reply = call(site, msg)
        assert reply.has_error() and reply.error.code == MODEL_MISMATCH and says in reply.error.reason
    assert ledger_rounds(site) == []


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_every_reply_names_the_sites_catalog_fingerprint(site, kind):
    catalog = ItemCatalog.load(site.catalog_path)
    reply = call(site, message(kind, catalog))
    notes = reply.content.config_records[wire.NOTES]
    assert notes[wire.CATALOG_FINGERPRINT] == catalog.fingerprint and notes[wire.WIRE_VERSION] == wire.VERSION == 6


def test_a_traversing_frozen_digest_or_training_id_is_refused_and_no_file_outside_is_touched(site, tmp_path):
    catalog = ItemCatalog.load(site.catalog_path)
    victim = tmp_path / "victim.safetensors"  # what state/frozen/../../victim.safetensors names
    victim.write_bytes(b"keep me")
    (Path(site.state_dir) / "frozen").mkdir(parents=True)  # a site that kept frozen tensors before
    record, state = round_record(catalog)
    for key, value in ((wire.FROZEN_DIGEST, "../../victim"), (wire.TRAINING_ID, "../../victim")):
        for kind in ("train", "evaluate"):
            reply = call(site, raw_message(kind, {**record, key: value}, state))
            assert reply.has_error() and reply.error.code == ROUND_CONFIG and key in reply.error.reason
    assert victim.read_bytes() == b"keep me" and ledger_rounds(site) == []
    with pytest.raises(RoundConfigError, match="64 lowercase hex"):
        frozen_path(site, "../../victim")


class Payload:
    """Stands for code a tampered state file would run when unpickled."""

    ran = False

    def __reduce__(self):
        return (Payload.mark, ())

    @staticmethod
    def mark() -> None:
        Payload.ran = True


def test_tampered_optimiser_state_is_never_unpickled(site):
    data = load_site_data(site)
    plain = replace(site, privacy=replace(site.privacy, enabled=False))
    record, state = round_record(data.catalog)
    record[wire.KEEP_OPTIMIZER_STATE] = True
    path = optimizer_state_path(plain, "train-7")
    path.parent.mkdir(parents=True)
    torch.save({"state": {}, "payload": Payload()}, path)
    reply = train_round(plain, data, RoundConfig.from_record(record), state)  # starts afresh
    assert not Payload.ran and reply.num_examples > 0 and "payload" not in torch.load(path, weights_only=True)


def test_the_cache_follows_the_data_content_even_under_the_same_size_and_time(site):
    first = load_site_data(site)
    events = Path(site.data_path)
    stat = events.stat()
    lines = events.read_text().splitlines(keepends=True)
    lines[1] = "v" + lines[1][1:]  # the first event now belongs to another user: same size, other content
    events.write_text("".join(lines))
    assert events.stat().st_size == stat.st_size
    os.utime(events, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # what a restore from backup can leave
    again = load_site_data(site)
    assert again.sequences.offsets.tolist() != first.sequences.offsets.tolist()  # re-read, not the stale cache


def test_a_sites_events_are_hashed_once_while_the_file_is_untouched(site, tmp_path, monkeypatch):
    """Every message of a deployed site is a new process that keys its cached sequences by the events' SHA-256:
    seconds a gigabyte. The site keeps the digest with the file's facts and reads it back while they match."""
    monkeypatch.setattr(site_module, "RACY_NS", 0)  # the files have settled (the next test: just written)
    events, state = Path(site.data_path), Path(site.state_dir)
    digest = data_digest(events, state)
    assert (state / DIGEST_MEMO).exists() and digest == data_digest(events)  # the same digest as without a memo
    reads, moved = [], tmp_path / "moved.csv"
    moved.write_bytes(events.read_bytes())
    opened = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: (reads.append(self.name) if self in (events, moved)
                                                            else None) or opened(self, *a, **k))
    assert data_digest(events, state) == digest and len(load_site_data(site).sequences) > 0
    assert reads == []  # neither the digest nor the cached sequences read the events again
    (state / DIGEST_MEMO).write_text("{damaged")
    assert data_digest(events, state) == digest and reads == [events.name]  # hashed again, and kept afresh
    assert data_digest(events, state) == digest and reads == [events.name]
    assert data_digest(moved, state) == digest and reads == [events.name, "moved.csv"]  # another file: hashed
    assert json.loads((state / DIGEST_MEMO).read_text())["facts"][0] == str(moved.resolve())


def test_no_digest_is_kept_for_an_events_file_changed_just_before_it_was_hashed(site, monkeypatch):
    """Linux advances file times in ticks of a few ms: a second write of the same size within the tick keeps
    every fact the memo checks, and a digest kept for the first content would key the old cached sequences.
    A file changed less than RACY_NS before it was hashed is hashed again until it has settled."""
    events, state = Path(site.data_path), Path(site.state_dir)
    first = data_digest(events, state)
    assert not (state / DIGEST_MEMO).exists()  # the fixture wrote the events just now
    facts, identity = site_module.file_identity(events), site_module.file_identity
    monkeypatch.setattr(site_module, "file_identity", lambda path: facts if Path(path) == events else identity(path))
    lines = events.read_text().splitlines(keepends=True)
    events.write_text("".join([lines[0], "v" + lines[1][1:], *lines[2:]]))  # same size, within the same tick
    assert data_digest(events, state) == data_digest(events) != first  # the new content's
    monkeypatch.setattr(site_module, "RACY_NS", 0)  # once settled, kept
    assert data_digest(events, state) == data_digest(events) and (state / DIGEST_MEMO).exists()


def fewer_users(site: SiteConfig, tmp_path: Path, keep: int, name: str) -> SiteConfig:
    """The same site (state dir) with an events file of its first `keep` users only."""
    frame = pd.read_csv(site.data_path, dtype=str, keep_default_na=False)
    users = list(dict.fromkeys(frame["user_id"]))[:keep]
    path = tmp_path / name
    frame[frame["user_id"].isin(users)].to_csv(path, index=False)
    return replace(site, data_path=str(path))


def test_a_site_whose_user_count_changed_keeps_its_delta_and_spent_epsilon(site, tmp_path):
    data = load_site_data(site)
    record, state = round_record(data.catalog, 1, num_rounds=3)
    first = train_round(site, data, RoundConfig.from_record(record), state)
    smaller = fewer_users(site, tmp_path, 90, "smaller.csv")
    small_data = load_site_data(smaller)
    assert len(small_data.sequences) < len(data.sequences)
    record, _ = round_record(data.catalog, 2, num_rounds=3)
    second = train_round(smaller, small_data, RoundConfig.from_record(record), first.state)
    assert second.delta == first.delta and second.epsilon > first.epsilon  # the ledger's δ, ε carried on
    entries = json.loads(site.ledger_path.read_text())["entries"]
    assert entries[0]["history"][0][1] != entries[1]["history"][0][1]  # each round its own sample rate


def test_a_site_with_no_trainable_users_is_refused_not_divided_by_zero(site, tmp_path):
    frame = pd.read_csv(site.data_path, dtype=str, keep_default_na=False)
    short = frame.groupby("user_id", sort=False).head(3)  # 3 events: kept, but no training target
    path = tmp_path / "short.csv"
    short.to_csv(path, index=False)
    empty = replace(site, data_path=str(path))
    for dp in (True, False):
        config = replace(empty, privacy=replace(empty.privacy, enabled=dp))
        data = load_site_data(config)
        record, state = round_record(data.catalog)
        with pytest.raises(SiteStartError, match="no trainable users"):
            train_round(config, data, RoundConfig.from_record(record), state)
        reply = call(config, message("train", data.catalog))
        assert reply.has_error() and reply.error.code == SITE_NOT_READY
    assert ledger_rounds(site) == []


def test_a_deleted_ledger_gets_a_ledger_error_reply_naming_it(site):
    catalog = ItemCatalog.load(site.catalog_path)
    assert not call(site, message("train", catalog, 1)).has_error()
    site.ledger_path.unlink()
    reply = call(site, message("train", catalog, 2))
    assert reply.has_error() and reply.error.code == LEDGER and str(site.ledger_path) in reply.error.reason


def test_small_simulated_sites_train_while_a_deployed_one_would_refuse(tmp_path):
    data = prepare_data(DataConfig(name="synthetic", synthetic={"num_users": 150, "num_items": 30, "seed": 1}))
    parts = [np.arange(0, 20), np.arange(20, 150)]
    sites = write_sites(data, parts, tmp_path / "sites", SiteConfig(data_path="", catalog_path="", state_dir=""))
    assert [s.min_users for s in sites] == [1, 50]  # the small one is simulated anyway (and logged)


@pytest.mark.parametrize(("change", "says"), [({"model_type": "bert"}, "'bert' is not 'fedrec'"),
                                              ({"backdoor": 1}, "unknown model config field 'backdoor'"),
                                              ({"hidden_act": "relu"}, "hidden_act='relu'"),
                                              ({"item_bias": "yes"}, "item_bias='yes': expected bool")])
def test_a_model_config_the_site_does_not_know_is_refused_before_any_training(site, change, says):
    """transformers' config kept unknown fields silently; the site's own config refuses them, naming the field."""
    catalog = ItemCatalog.load(site.catalog_path)
    record, state = round_record(catalog)
    record[wire.MODEL_CONFIG] = json.dumps({**json.loads(record[wire.MODEL_CONFIG]), **change})
    for kind in ("train", "evaluate"):
        reply = call(site, raw_message(kind, record, state))
        assert reply.has_error() and reply.error.code == MODEL_MISMATCH and says in reply.error.reason, reply.error
    assert ledger_rounds(site) == []

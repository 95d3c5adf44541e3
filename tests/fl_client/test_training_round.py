"""A site's federated round: catalog check, budget refusal, cumulative ε, no double spending, cached data."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_client.dp.ledger import PrivacyLedger
from fl_client.dp.settings import PrivacyConfig
from fl_client.evaluation import evaluate_round
from fl_client.round_config import RoundConfig, build_global_model
from fl_client.site import SiteConfig, load_site_data
from fl_client.training_round import (
    drop_older_replies,
    local_train_config,
    optimizer_state_path,
    plan_round,
    reply_path,
    train_round,
)
from shared_model import wire
from shared_model.catalog import CatalogMismatchError, ItemCatalog
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel
from tests.fl_client.server_round import round_record


def round_config(catalog: ItemCatalog, server_round: int = 1, num_rounds: int = 2) -> tuple[RoundConfig, dict]:
    record, state = round_record(catalog, server_round, num_rounds)
    return RoundConfig.from_record(record), state


def test_dp_rounds_accumulate_epsilon_in_the_site_ledger(site):
    data = load_site_data(site)
    first_cfg, state = round_config(data.catalog, 1)
    first = train_round(site, data, first_cfg, state)
    assert first.dp and not first.declined and first.num_examples == len(data.sequences.trainable_users())
    assert 0 < first.epsilon < site.privacy.epsilon
    assert not torch.equal(first.state["item_embeddings.weight"], state["item_embeddings.weight"])
    second_cfg, _ = round_config(data.catalog, 2)
    second = train_round(site, data, second_cfg, first.state)
    assert first.epsilon < second.epsilon <= site.privacy.epsilon * 1.01  # two planned rounds spend the whole budget
    assert PrivacyLedger(site.ledger_path, second.delta).spent() == pytest.approx(second.epsilon)
    assert len(json.loads((Path(site.state_dir) / "sigma_plans.json").read_text())) == 1  # one σ, kept on disk
    assert set(first.metrics()) == set(second.metrics())
    assert first.train_seconds > 0 and first.peak_memory_mb > 0  # what the round cost the site, for the server
    sent_back = set(wire.trainable_state(build_global_model(first_cfg, state)))
    assert set(first.state) == set(second.state) == sent_back  # trainable weights only, tied table once


def test_a_batch_above_the_sites_users_is_one_full_site_dp_step_per_round(site):
    # fed_beauty_dp relies on this: sample rate 1, one step a round, so with SGD of lr 1 the site sends its
    # noisy mean gradient and the server's FedAdam does the optimising
    data = load_site_data(site)
    record, state = round_record(data.catalog, 1, num_rounds=3)
    record.update({wire.BATCH_SIZE: 100_000, wire.OPTIMIZER: "sgd", wire.LEARNING_RATE: 1.0})
    reply = train_round(site, data, RoundConfig.from_record(record), state)
    assert reply.dp and not reply.declined and reply.num_examples == len(data.sequences.trainable_users())
    [entry] = json.loads(site.ledger_path.read_text())["entries"]
    [(sigma, sample_rate, steps)] = entry["history"]
    assert (sample_rate, steps) == (1.0, 1) and sigma > 0
    assert not torch.equal(reply.state["item_embeddings.weight"], state["item_embeddings.weight"])


def test_a_dp_site_never_repeats_its_noise_and_sampling(site):
    # Regression: every round used to reseed torch with the same seed, so a DP site added the same noise to
    # (and sampled the same users for) every round: the noise added up instead of averaging out, and the
    # accounted ε assumed independent noise. Two rounds from identical weights must now differ.
    data = load_site_data(site)
    first_cfg, state = round_config(data.catalog, 1)
    second_cfg, _ = round_config(data.catalog, 2)
    first = train_round(site, data, first_cfg, state)
    second = train_round(site, data, second_cfg, state)
    assert not torch.equal(first.state["item_embeddings.weight"], second.state["item_embeddings.weight"])


def test_without_dp_a_round_is_reproducible_and_rounds_differ(site, tmp_path):
    data = load_site_data(site)
    replies = []
    for state_dir, server_round in (("a", 1), ("b", 1), ("c", 2)):
        plain = replace(site, privacy=replace(site.privacy, enabled=False), state_dir=str(tmp_path / state_dir))
        cfg, state = round_config(data.catalog, server_round)
        replies.append(train_round(plain, data, cfg, state).state["item_embeddings.weight"])
    assert torch.equal(replies[0], replies[1]) and not torch.equal(replies[0], replies[2])


def test_a_resent_round_is_answered_from_cache_without_spending_again(site):
    data = load_site_data(site)
    cfg, state = round_config(data.catalog, 1)
    first = train_round(site, data, cfg, state)
    again = train_round(site, data, cfg, state)
    assert again.epsilon == first.epsilon
    assert torch.equal(again.state["item_embeddings.weight"], first.state["item_embeddings.weight"])
    assert len(PrivacyLedger(site.ledger_path, first.delta).entries) == 1


def test_a_site_keeps_the_replies_of_its_last_two_rounds_and_never_retrains_an_older_one(site):
    data = load_site_data(site)
    state = round_config(data.catalog)[1]
    for server_round in range(1, 5):
        cfg = RoundConfig.from_record(round_record(data.catalog, server_round, num_rounds=4)[0])
        reply = train_round(site, data, cfg, state)
        state = reply.state
    kept = sorted(path.name for path in (Path(site.state_dir) / "replies").iterdir())
    assert kept == ["train-7_round3.pt", "train-7_round4.pt"]
    old = train_round(site, data, RoundConfig.from_record(round_record(data.catalog, 1, num_rounds=4)[0]), state)
    assert "already trained here and its reply is lost" in old.declined
    assert old.epsilon == reply.epsilon  # nothing spent again


def test_site_declines_a_round_beyond_its_budget(site):
    data = load_site_data(site)
    cfg, state = round_config(data.catalog, 1, num_rounds=1)
    spent = train_round(site, data, cfg, state).epsilon
    extra_cfg, _ = round_config(data.catalog, 2, num_rounds=1)  # the server runs more rounds than it announced
    refused = train_round(site, data, extra_cfg, state)
    assert "over its budget" in refused.declined
    assert refused.num_examples == 0 and refused.metrics()[wire.DECLINED] == 1.0
    assert refused.epsilon == pytest.approx(spent)
    assert torch.equal(refused.state["item_embeddings.weight"], state["item_embeddings.weight"])
    assert set(refused.state) == set(wire.trainable_state(build_global_model(cfg, state)))  # as a trained reply


def test_weights_for_another_catalog_are_refused(site):
    data = load_site_data(site)
    other = ItemCatalog.from_items(["x", "y"])
    cfg, state = round_config(data.catalog)
    cfg.catalog_fingerprint = other.fingerprint
    with pytest.raises(CatalogMismatchError):
        train_round(site, data, cfg, state)


def test_without_dp_nothing_claims_privacy(site):
    site.privacy.enabled = False
    data = load_site_data(site)
    cfg, state = round_config(data.catalog)
    reply = train_round(site, data, cfg, state)
    assert reply.dp is False and reply.epsilon == 0.0
    assert not site.ledger_path.exists()
    metrics = evaluate_round(site, data, cfg, reply.state)
    assert metrics[wire.NUM_EXAMPLES] == len(data.sequences) and 0 <= metrics["hr@10"] <= 1


def test_site_preprocessing_is_cached_and_invalidated_by_a_changed_file(site, tmp_path):
    first = load_site_data(site)
    caches = list((tmp_path / "state").glob("sequences_*.npz"))
    assert len(caches) == 1
    again = load_site_data(site)
    assert again.sequences.user_ids == first.sequences.user_ids
    assert (again.sequences.items == first.sequences.items).all()
    with open(site.data_path, "a") as events:
        events.write(f"{first.sequences.user_ids[0]},{first.catalog.item_ids[0]},2000000000,view,,,\n")
    load_site_data(site)
    assert len(list((tmp_path / "state").glob("sequences_*.npz"))) == 2
    # A third version of the file: the site keeps its cache_keep latest caches, the one in use among them.
    site.cache_keep = 2
    second = set((tmp_path / "state").glob("sequences_*.npz")) - set(caches)
    os.utime(caches[0], ns=(1, 1))  # the first file's cache: the least recently used
    with open(site.data_path, "a") as events:
        events.write(f"{first.sequences.user_ids[0]},{first.catalog.item_ids[1]},2000000001,view,,,\n")
    load_site_data(site)
    kept = set((tmp_path / "state").glob("sequences_*.npz"))
    assert len(kept) == 2 and caches[0] not in kept and second < kept


def test_node_config_is_parsed_with_clear_errors():
    config = SiteConfig.from_node_config({"data-path": "/d.csv", "catalog-path": "/c.json", "state-dir": "/s",
                                          "epsilon": 3.0, "dp": False, "partition-id": 0})
    assert config.privacy == PrivacyConfig(enabled=False, epsilon=3.0)  # δ None: the default for its users
    with pytest.raises(ValueError, match="catalog-path"):
        SiteConfig.from_node_config({"data-path": "/d.csv", "state-dir": "/s"})
    with pytest.raises(ValueError, match="epsilonn"):
        SiteConfig.from_node_config({"data-path": "/d", "catalog-path": "/c", "state-dir": "/s", "epsilonn": 1})


def test_round_config_reads_fedprox_mu_when_the_server_sends_it(site):
    data = load_site_data(site)
    cfg, _ = round_config(data.catalog)
    assert cfg.proximal_mu == 0.0
    record = {wire.SERVER_ROUND: 1, wire.TRAINING_ID: "t", wire.NUM_ROUNDS: 1, wire.LOCAL_EPOCHS: 1,
              wire.BATCH_SIZE: 8, wire.LEARNING_RATE: 0.1, wire.OPTIMIZER: "sgd", wire.MODEL_CONFIG: "{}",
              wire.CATALOG_FINGERPRINT: "x", wire.PROXIMAL_MU: 0.5}
    assert RoundConfig.from_record(record).proximal_mu == 0.5
    del record[wire.LOCAL_EPOCHS]
    with pytest.raises(ValueError, match="local-epochs"):
        RoundConfig.from_record(record)


def test_the_servers_recipe_and_the_sites_privacy_settings_reach_local_training(site):
    data = load_site_data(site)
    record, _ = round_record(data.catalog)
    record.update({wire.WEIGHT_DECAY: 0.01, wire.NUM_NEGATIVES: 5, wire.SEED: 9})
    cfg = RoundConfig.from_record(record)
    own = replace(site, micro_batch_users=16, privacy=replace(site.privacy, accountant="rdp", noise_multiplier=2.5))
    local = local_train_config(own, cfg)
    assert (local.weight_decay, local.num_negatives, local.micro_batch_users) == (0.01, 5, 16)
    privacy = own.round_privacy(delta=1e-3)
    assert (privacy.accountant, privacy.noise_multiplier, privacy.delta) == ("rdp", 2.5, 1e-3)
    sigma, planned = plan_round(own, data, cfg, 1e-3)
    assert sigma == 2.5 and planned[0][0] == 2.5  # a fixed σ is used as is (the ledger still checks the budget)


def test_sites_keep_their_optimiser_state_across_rounds_when_asked(site, tmp_path):
    data = load_site_data(site)
    plain = replace(site, privacy=replace(site.privacy, enabled=False))
    steps = []
    for server_round in (1, 2):
        record, state = round_record(data.catalog, server_round)
        record[wire.KEEP_OPTIMIZER_STATE] = True
        train_round(plain, data, RoundConfig.from_record(record), state)
        saved = torch.load(optimizer_state_path(plain, "train-7"), weights_only=False)
        steps.append(int(saved["state"][0]["step"]))
    per_round = -(-len(data.sequences.trainable_users()) // 32)  # batch 32, one local epoch
    assert steps == [per_round, 2 * per_round]  # Adam's moments and step count continue, not restart
    cfg, state = round_config(data.catalog, 1)  # the server did not ask: nothing is kept
    train_round(replace(plain, state_dir=str(tmp_path / "other")), data, cfg, state)
    assert not (tmp_path / "other" / "optimizer").exists()


def test_a_site_sends_per_item_weights_only_when_the_server_asks(site):
    data = load_site_data(site)
    plain = replace(site, privacy=replace(site.privacy, enabled=False))
    record, state = round_record(data.catalog)
    assert train_round(plain, data, RoundConfig.from_record(record), state).item_weights is None
    rows = FedRecModel(FedRecConfig.from_dict(json.loads(record[wire.MODEL_CONFIG]))).config.num_item_rows
    counts = torch.from_numpy(data.sequences.item_counts(rows)).float()
    record[wire.ITEM_ROWS] = "counts"
    reply = train_round(plain, data, RoundConfig.from_record(record), state)
    assert reply.item_weights.shape == (rows,) and torch.equal(reply.item_weights, counts)
    assert reply.item_weights[0] == 0  # the padding row is never counted
    for removed in ("rows", "holders"):  # holders was removed (docs/tried.md): refused by name
        record[wire.ITEM_ROWS] = removed
        with pytest.raises(ValueError, match=rf"item-rows='{removed}'.*average, counts"):
            RoundConfig.from_record(record)


def test_a_dp_site_declines_to_send_per_item_weights_and_spends_nothing(site):
    data = load_site_data(site)
    record, state = round_record(data.catalog)
    record[wire.ITEM_ROWS] = "counts"
    reply = train_round(site, data, RoundConfig.from_record(record), state)
    assert reply.num_examples == 0 and reply.item_weights is None
    assert "which items this site's users interacted with" in reply.declined
    assert reply.epsilon == 0.0 and PrivacyLedger(site.ledger_path, reply.delta).spent() == 0.0
    assert all(torch.equal(reply.state[k], state[k]) for k in reply.state)  # the weights come back unchanged


def test_a_dp_round_syncs_its_ledger_and_head_to_disk_and_neither_its_caches_nor_its_kept_reply(site, monkeypatch):
    """The ledger and the head that pins it must survive a crash of the machine before the reply leaves; the kept
    reply (a lost one declines the resent round) and the caches (checked when read, rebuilt when damaged) need
    not, and each sync costs a DP message 1-2 ms."""
    synced, sync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
                        or sync(fd))
    data = load_site_data(site)  # parses the events and writes the sequences cache
    cfg, state = round_config(data.catalog, 1)
    reply = train_round(site, data, cfg, state)  # also searches σ and keeps it (sigma_plans.json)
    assert not reply.declined and (Path(site.state_dir) / "sigma_plans.json").exists()
    assert (Path(site.state_dir) / "replies").is_dir() and any(Path(site.state_dir).glob("sequences_*.npz"))
    kinds = sorted({name.split(".tmp")[0].rsplit(".", 1)[0].lstrip(".") for name in synced})
    assert kinds == ["privacy_ledger.json", "site.json"]


def test_a_site_keeps_the_replies_of_a_trainings_last_two_rounds_and_every_other_trainings(site):
    kept = {(t, r): reply_path(site, t, r) for t in ("train-1", "train-10") for r in (1, 2, 3, 5, 12)}
    for path in kept.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"reply")
    drop_older_replies(site, "train-1", 13)  # rounds before 12 go: a sparse site trained 1, 2, 3, 5 and 12
    left = sorted(p.name for p in kept[("train-1", 1)].parent.iterdir())
    assert left == sorted(["train-1_round12.pt", *(f"train-10_round{r}.pt" for r in (1, 2, 3, 5, 12))])


@pytest.mark.parametrize("left", [0, 0.5], ids=["empty", "half"])
def test_a_kept_reply_a_machine_crash_damaged_declines_the_resent_round_and_spends_nothing(site, left):
    """The kept reply is not synced to disk: after a crash of the machine it may be empty or cut short. A round
    the server then resends is declined, never trained (or paid for) a second time."""
    data = load_site_data(site)
    cfg, state = round_config(data.catalog, 1)
    first = train_round(site, data, cfg, state)
    kept = reply_path(site, cfg.training_id, 1)
    kept.write_bytes(kept.read_bytes()[:int(kept.stat().st_size * left)])
    again = train_round(site, data, cfg, state)
    assert "already trained here and its reply is lost" in again.declined and again.num_examples == 0
    assert again.epsilon == pytest.approx(first.epsilon)
    assert len(PrivacyLedger(site.ledger_path, first.delta).entries) == 1

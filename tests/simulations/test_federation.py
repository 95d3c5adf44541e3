"""End to end on Flower's simulation engine: 3 sites with DP, 2 rounds, checkpoints, resume, export (and a
training from an exported model)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fl_client.dp.settings import PrivacyConfig
from fl_client.site import SiteConfig
from fl_server.config import ServerConfig, StrategyConfig
from fl_server.round_record import undocumented
from shared_model import wire
from shared_model.factory import ModelConfig
from shared_model.serialization import load_model_dir
from simulations.config import DataConfig
from simulations.federation import Resources, run_federation, write_sites
from simulations.partition import PartitionConfig, partition_users
from simulations.prepare import prepare_data

# One worker (Ray actor) for the simulated sites: xdist's two test workers already keep CI's two cores busy, and
# a second worker only adds its start (10 s of CPU: Ray, Flower, torch, Opacus) to these small runs. One test keeps
# the default two, so the engine's concurrent workers stay tested.
ONE_WORKER = Resources(num_cpus=1)


def round_records(out):
    """A run's metrics.jsonl, every key of every round described in fl_server.round_record (docs)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [undocumented(r) for r in rows] == [[]] * len(rows)
    return rows


def synthetic_sites(tmp_path, users: int, items: int, seed: int, num_sites: int, **privacy):
    """Synthetic events for `users` users split iid over `num_sites` sites with DP (`privacy`: PrivacyConfig
    fields that differ), written as site files."""
    data = prepare_data(DataConfig(name="synthetic", synthetic={"num_users": users, "num_items": items, "seed": seed}))
    parts = partition_users(data.sequences, PartitionConfig(kind="iid", num_partitions=num_sites))
    template = SiteConfig(data_path="", catalog_path="", state_dir="", device="cpu",
                          privacy=PrivacyConfig(**{"enabled": True, **privacy}))
    return data, parts, write_sites(data, parts, tmp_path / "sites", template)


def server_config(tmp_path, **settings) -> ServerConfig:
    """A small, quick server run writing to tmp_path/server."""
    paths = {"out_dir": str(tmp_path / "server"), "catalog_path": str(tmp_path / "sites" / "catalog.json")}
    return ServerConfig(**{**paths, "local_epochs": 1, "batch_size": 32, "lr": 0.005, "round_timeout": 600, **settings})


@pytest.mark.slow
def test_three_dp_sites_two_rounds_then_a_resumed_third_round_is_declined_by_budget(tmp_path):
    data, parts, sites = synthetic_sites(tmp_path, users=240, items=50, seed=2, num_sites=3, epsilon=8.0)
    out = tmp_path / "server"
    server = server_config(tmp_path, num_rounds=2, central_eval_path=sites[0].data_path,
                           model=ModelConfig(hidden_size=16, max_len=20, item_features=["text"], feature_dim=8,
                                             feature_scoring=True, item_bias=True),
                           strategy=StrategyConfig(min_nodes=3))
    run_federation(sites, server, ONE_WORKER)
    rows = round_records(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["train_replies"] == 3 and r["train_failures"] == 0 and r["declined"] == 0 for r in rows)
    assert rows[1]["privacy"]["sites_with_dp"] == 3 and 0 < rows[1]["privacy"]["epsilon_max"] <= 8.0 * 1.01
    assert rows[1]["federated_eval"]["hr@10"] > 0
    # Sites send means and second moments; the server pools them into standard errors over all their users.
    fed, central = rows[1]["federated_eval"], rows[1]["central_eval"]
    assert fed["users"] == len(data.sequences) and 0 < fed["hr@10:se"] < 0.1 and "hr@10:m2" not in fed
    assert central["users"] == len(parts[0]) and central["hr@10:se"] > fed["hr@10:se"]  # one site's users only
    # The best round is picked on validation events, not on the test split the report shows.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["popularity"]["users"] == len(parts[0]) > 0  # the baseline on the server's events, drawn
    valid = [r["central_eval"]["valid-ndcg@10"] for r in rows]
    assert summary["best_round"] == 1 + valid.index(max(valid))
    # Public title features travel to the sites but never back, and to each site once: the sites keep them
    # (by digest) and say so, so round 2 sends the trainable weights only. The tied item table travels once.
    features = 51 * 8 * 4
    assert rows[0]["bytes_to_each_site"] - rows[0]["bytes_from_each_site"] > features - 200
    assert [r["frozen_sent_to"] for r in rows] == [3, 0]
    assert rows[0]["bytes_to_each_site"] - rows[1]["bytes_to_each_site"] > features - 200
    report = (out / "report.md").read_text()
    assert "ε max" in report and "no differential privacy" not in report
    assert f"HR@10 {fed['hr@10']:.4f} ± {fed['hr@10:se']:.4f}" in report
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "privacy.png").stat().st_size > 0
    model, catalog = load_model_dir(out / "model")
    assert catalog.fingerprint == data.catalog.fingerprint and model.config.num_items == len(catalog.item_ids)
    assert model.output.bias.abs().max() > 0  # trained
    for site in sites:
        ledger = json.loads(site.ledger_path.read_text())
        assert [e["round"] for e in ledger["entries"]] == [1, 2]
    # A restarted server asking for a third round continues after round 2 (nothing repeated); the sites
    # planned their whole budget for the two announced rounds, so each declines rather than overspend.
    run_federation(sites, ServerConfig(**{**server.__dict__, "num_rounds": 3}), ONE_WORKER)
    rows = round_records(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[2]["declined"] == 3 and rows[2]["privacy"]["epsilon_max"] == rows[1]["privacy"]["epsilon_max"]
    assert len(rows[2]["declined_reasons"]) == 3 and all("budget" in r for r in rows[2]["declined_reasons"])
    for site in sites:
        ledger = json.loads(site.ledger_path.read_text())
        assert [e["round"] for e in ledger["entries"]] == [1, 2]


@pytest.mark.slow
def test_sites_send_which_items_they_hold_and_share_their_optimiser_moments_when_asked(tmp_path):
    _, _, sites = synthetic_sites(tmp_path, users=180, items=40, seed=4, num_sites=3, enabled=False)
    out = tmp_path / "server"
    server = server_config(tmp_path, num_rounds=2, share_optimizer_state=True,
                           model=ModelConfig(hidden_size=16, max_len=20, item_features=[], item_bias=False),
                           strategy=StrategyConfig(name="fedavgm", server_lr=1.5, server_momentum=0.0, min_nodes=3,
                                                   item_rows="counts"))
    run_federation(sites, server)  # Resources(): two workers, as by default
    rows = round_records(out)
    assert [r["item_rows"] for r in rows] == [{"mode": "counts", "sites": 3, "left_out": []}] * 2
    assert all(r["train_replies"] == 3 and r["declined"] == 0 and r["train_failures"] == 0 for r in rows)
    # The per-item weights (one float per catalog row) and Adam's two moments travel up beside the trained
    # weights; the averaged moments travel down from the second round on.
    model, catalog = load_model_dir(out / "model")
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert rows[0]["bytes_from_each_site"] >= 3 * trained + catalog.num_rows * 4
    assert trained <= rows[0]["bytes_to_each_site"] < 2 * trained <= 3 * trained <= rows[1]["bytes_to_each_site"]
    # Round 2 started from the averaged moments, so its step count continues round 1's instead of restarting.
    shared = [r["shared_moments"] for r in rows]
    assert [m["sites"] for m in shared] == [3, 3] and shared[0]["step"] > 0
    assert shared[1]["step"] == pytest.approx(2 * shared[0]["step"])
    assert rows[1]["federated_eval"]["train-ce"] < rows[0]["federated_eval"]["train-ce"]


@pytest.mark.slow
def test_rounds_between_evaluations_are_not_scored_and_a_training_from_the_export_scores_it_as_round_zero(tmp_path):
    """Two trainings (each a start of the simulation engine, so they share one test): 3 rounds evaluated every
    2nd and the last, then a training that starts from the first one's exported model."""
    from fl_server.report import progress_line

    data, parts, sites = synthetic_sites(tmp_path, users=120, items=30, seed=5, num_sites=2, enabled=False)
    model = ModelConfig(hidden_size=16, max_len=20, item_features=["text"], feature_dim=8, feature_scoring=True)
    out = tmp_path / "server"
    server = server_config(tmp_path, num_rounds=3, eval_every=2, central_eval_path=sites[0].data_path, model=model,
                           strategy=StrategyConfig(min_nodes=2, update_precision="float16"))
    run_federation(sites, server, ONE_WORKER)
    rows = round_records(out)
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["train_replies"] == 2 for r in rows)
    # float16 updates: the server sends float32 weights and its config, each site 2 bytes a weight and its metrics
    assert all(r["dropped"] == 0 and r["bytes_from_each_site"] < 0.6 * r["bytes_to_each_site"] for r in rows)
    assert "federated_eval" not in rows[0] and "central_eval" not in rows[0] and rows[0]["evaluate_failures"] == 0
    assert all(r["federated_eval"]["hr@10"] >= 0 and "hr@10" in r["central_eval"] for r in rows[1:])  # 2nd and last
    assert json.loads((out / "summary.json").read_text())["best_round"] in (2, 3)
    assert "not evaluated (eval-every)" in progress_line(rows[0], 3) and "HR@10 0." in progress_line(rows[1], 3)
    assert "| 1 | 2 | 0 | 0 |" in (out / "report.md").read_text()

    exported, fine_tuned = out / "model", tmp_path / "fine_tuned"
    run_federation(sites, server_config(tmp_path, out_dir=str(fine_tuned), num_rounds=1, model=model,
                                        initial_model=str(exported), central_eval_path=sites[0].data_path,
                                        strategy=StrategyConfig(min_nodes=2)), ONE_WORKER)
    scored_before, rows = rows[-1], round_records(fine_tuned)
    assert [r["round"] for r in rows] == [0, 1] and rows[0]["starting_model"] and "train_replies" not in rows[0]
    start = rows[0]
    # Both sites scored the exported model (the frozen title features went with the evaluate message): the
    # same figures the first training's last round gave for those weights; the server scored its users too.
    assert start["evaluate_failures"] == 0 and start["federated_eval"]["users"] == len(data.sequences)
    assert start["federated_eval"]["hr@10"] == pytest.approx(scored_before["federated_eval"]["hr@10"])
    assert start["central_eval"]["users"] == len(parts[0])
    assert rows[1]["train_replies"] == 2 and rows[1]["frozen_sent_to"] == 2  # evaluate replies name no digest
    valid = [r["central_eval"]["valid-ndcg@10"] for r in rows]
    summary = json.loads((fine_tuned / "summary.json").read_text())
    assert summary["best_round"] == valid.index(max(valid)) and summary["rounds"] == 1
    best, _ = load_model_dir(fine_tuned / "best_model")  # the starting model itself when round 1 did not beat it
    expected = wire.trainable_state(load_model_dir(exported if summary["best_round"] == 0 else fine_tuned / "model")[0])
    assert all(torch.equal(t, expected[k]) for k, t in wire.trainable_state(best).items())
    assert (fine_tuned / "report.md").read_text().count("| 0 (start) | 0 | 0 | 0 |") == 1


def test_secure_aggregation_with_a_rule_that_needs_each_sites_update_is_refused(tmp_path):
    from fl_server.secure_round import secure_settings

    for strategy, extra in (("fedmedian", {}), ("multikrum", {}), ("fedavg", {"share_optimizer_state": True})):
        cfg = server_config(tmp_path, strategy=StrategyConfig(name=strategy, secure_aggregation=True), **extra)
        with pytest.raises(ValueError, match="secure_aggregation"):
            secure_settings(cfg)
    with pytest.raises(ValueError, match="threshold"):
        secure_settings(server_config(tmp_path, strategy=StrategyConfig(secure_aggregation=True,
                                                                        secagg_threshold=0.4)))


@pytest.mark.slow
def test_distributed_dp_rounds_are_one_dp_sgd_step_of_the_union_under_secure_aggregation(tmp_path):
    """Secure aggregation on the simulation engine (with DP sites), distributed DP on top, and its popularity
    release in round 0 (strategy.dp_popularity_noise): every site sends its users' unit-norm item counts with its
    share of σ_p, only as a secure sum; the global bias starts at the log of the total, each ledger holds the
    release as (σ_p, 1, 1) before the steps, and a resumed run does not release again."""
    from fl_client.dp.popularity import user_normalised_counts

    data, _, sites = synthetic_sites(tmp_path, users=180, items=40, seed=8, num_sites=3, epsilon=8.0)
    out = tmp_path / "server"
    server = server_config(tmp_path, num_rounds=2, model=ModelConfig(hidden_size=16, max_len=20, item_features=[],
                                                                     item_bias=True),
                           strategy=StrategyConfig(name="fedadam", server_lr=0.01, server_tau=1e-8, min_nodes=3,
                                                   secure_aggregation=True, distributed_dp=True, dp_sample_rate=0.1,
                                                   dp_noise_multiplier=1.0, dp_popularity_noise=1.0))
    run_federation(sites, server, ONE_WORKER)
    model, _ = load_model_dir(out / "model")  # two server steps of at most 0.01 a weight after the release
    exact = torch.from_numpy(user_normalised_counts(data.sequences, model.config.num_item_rows,
                                                    data.sequences.trainable_users()))
    popular = exact > 8  # the noise (σ_p = 1) moves their log count by under 0.75 (4 σ_p at a count of 8)
    assert popular.sum() >= 10
    assert torch.allclose(model.output.bias.detach().double()[popular], exact[popular].log(), atol=0.75)
    run_federation(sites, replace(server, num_rounds=3), ONE_WORKER)  # resumed: one more step, and no second release
    release, *rows = round_records(out)  # round 0 (the release, checkpointed), then the steps
    assert release["round"] == 0 and {k: v for k, v in release["popularity_release"].items()
                                      if k != "rows_above_floor"} == {"noise_multiplier": 1.0, "sites": 3, "users": 180}
    assert 30 <= release["popularity_release"]["rows_above_floor"] <= 40
    assert release["secure_aggregation"]["sites_summed"] == 3 and release["privacy"]["epsilon_max"] > 0
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["train_replies"] == 3 and r["train_failures"] == 0 and r["dropped"] == 0 for r in rows)
    secure = [r["secure_aggregation"] for r in rows]
    assert [{k: v for k, v in s.items() if k != "protocol_bytes_max"} for s in secure] == [
        {"sites_summed": 3, "dropped_after_sharing": 0, "fewest_summed": 3, "clipped_coordinates": 0}] * 3
    # ⌈0.67 × 3⌉ = 3 of 3: each site's σ/√3 adds up to exactly σ (none to spare for a dropout)
    assert all(r["distributed_dp"]["sum_noise_multiplier"] == 1.0 for r in rows)
    assert all(r["distributed_dp"]["popularity_noise"] == 1.0 for r in rows)
    # keys, shares and unmask: about 1.4 kB a site with 3 sites, next to the model's (masked) update
    assert all(0 < s["protocol_bytes_max"] < 5000 < r["bytes_from_each_site"]
               for s, r in zip(secure, rows, strict=True))
    # the evaluation too is a secure sum: the server pools the sites' metrics without seeing one site's
    assert all(r["secure_evaluation"]["sites_summed"] == 3 for r in rows)
    assert all(r["federated_eval"]["users"] == 180 and 0 < r["federated_eval"]["hr@10:se"] < 0.1 for r in rows)
    report = (out / "report.md").read_text()
    assert "the server saw only the sum of the sites' masked, quantized updates, at least 3 sites a round" in report
    assert "evaluation figures too" in report
    assert "Distributed DP: (ε ≤ " in report and "per user of any site, over the union" in report  # not per site
    assert "q = 0.1, σ = 1, C = 1" in report and "at most 0 sites collude with the server" in report
    assert "after one release of item popularity in round 0 (σ = 1, every user)" in report
    assert "noise multipliers" not in report  # the sums carried exactly σ
    for site in sites:  # the release, then the sum's (σ, q) for one step a round; each round sent once
        entries = json.loads(Path(site.ledger_path).read_text())["entries"]
        assert [(e["round"], e["history"]) for e in entries] == [(0, [[1.0, 1.0, 1]])] + [
            (r, [[1.0, 0.1, 1]]) for r in (1, 2, 3)]
        assert len(json.loads(Path(site.state_dir, "secagg_released.json").read_text())) == 1 + 3 + 3  # + evaluations
    eps = [e["epsilon_after"] for e in entries]
    assert eps[0] < eps[1] < eps[2] < eps[3] == pytest.approx(rows[-1]["privacy"]["epsilon_max"], rel=1e-6)


def test_a_popularity_release_needs_distributed_dp_and_an_item_bias(tmp_path):
    from fl_server.server_app import check_run

    with pytest.raises(ValueError, match="distributed_dp"):
        check_run(server_config(tmp_path, strategy=StrategyConfig(dp_popularity_noise=1.0)))
    with pytest.raises(ValueError, match="item_bias"):
        check_run(server_config(tmp_path, strategy=StrategyConfig(distributed_dp=True, dp_popularity_noise=1.0)))

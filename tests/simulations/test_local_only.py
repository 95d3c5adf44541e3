"""The local-only baseline (`federation.mode=local`): each site trains alone on its own users, is scored on
their test events, and the summary averages the sites weighted by users."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fl_client.dp.settings import default_delta
from simulations.local_only import METRIC_KEYS, site_seed, weighted_mean
from simulations.simulate import SimulateConfig, check_federation, register_simulate_schemas, run_simulate

TINY = ["data.synthetic.num_users=160", "data.synthetic.num_items=40", "model.hidden_size=16", "model.max_len=12",
        "model.num_hidden_layers=1", "train.batch_size=32", "train.num_threads=1", "federation.mode=local",
        "federation.num_rounds=2", "federation.local_epochs=1", "partition=iid", "partition.num_partitions=3"]


def local_config(tmp_path: Path, overrides: list[str]) -> SimulateConfig:
    register_simulate_schemas()
    with initialize_config_module(config_module="simulations.conf", version_base="1.3"):
        cfg = compose(config_name="simulate", overrides=[*TINY, *overrides, f"output_dir={tmp_path}"])
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def test_weighted_mean_counts_each_user_once():
    rows = [dict.fromkeys(METRIC_KEYS, 1.0), dict.fromkeys(METRIC_KEYS, 0.0)]
    assert weighted_mean(rows, [3, 1])["hr@10"] == 0.75


def test_every_site_trains_with_its_own_reproducible_seed():
    seeds = [site_seed(0, i) for i in range(10)]
    assert len(set(seeds)) == 10 and seeds == [site_seed(0, i) for i in range(10)]
    assert site_seed(1, 0) != site_seed(0, 0)


def test_local_only_without_dp_trains_every_site_for_all_rounds_and_averages_by_users(tmp_path):
    summary = run_simulate(local_config(tmp_path, ["privacy=disabled"]))
    sites = summary["per_site"]
    assert summary["mode"] == "local" and len(sites) == 3 and summary["epochs_per_site"] == 2
    assert sum(s["users"] for s in sites) == summary["users"] == 160
    means = weighted_mean([s["test"] for s in sites], [s["users"] for s in sites])
    assert {k: summary["test"][k] for k in METRIC_KEYS} == pytest.approx(means)
    assert summary["test"]["users"] == 160 and 0 < summary["test"]["hr@10:se"] < 0.1  # over all sites' users
    assert all(s["test"]["users"] == s["users"] for s in sites)  # scored on the site's own users only
    assert summary["privacy"] == {"dp": False, "claim": "no differential privacy (DP was off)"}
    on_disk = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert on_disk["test"] == pytest.approx(summary["test"])
    report = (tmp_path / "local" / "report.md").read_text()
    assert "local-only model" in report and "no differential privacy" in report
    assert f"{summary['test']['hr@10']:.4f} ± {summary['test']['hr@10:se']:.4f}" in report
    assert not (tmp_path / "server").exists()  # no federation ran
    assert json.loads((tmp_path / "popularity.json").read_text())["users"] == 160


def test_local_only_with_dp_spends_each_sites_budget_with_delta_below_one_over_its_users(tmp_path):
    summary = run_simulate(local_config(tmp_path, ["privacy=dp", "privacy.epsilon=3", "privacy.accountant=gdp"]))
    for site in summary["per_site"]:
        assert 2.9 < site["epsilon"] <= 3.0 * 1.01
        assert site["delta"] == pytest.approx(default_delta(site["users"])) and site["delta"] < 1.0 / site["users"]
    assert summary["privacy"]["dp"] and summary["privacy"]["epsilon_max"] <= 3.0 * 1.01


def test_a_federation_waiting_for_more_sites_than_exist_is_refused(tmp_path):
    overrides = ["federation.mode=federated", "partition.num_partitions=1", "privacy=disabled"]
    with pytest.raises(ValueError, match=r"strategy\.min_nodes=2, but the partition has only 1 site"):
        run_simulate(local_config(tmp_path, overrides))


def test_an_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"federation\.mode"):
        run_simulate(local_config(tmp_path, ["federation.mode=solo", "privacy=disabled"]))


def test_item_rows_weighted_by_counts_are_refused_with_dp(tmp_path):
    overrides = ["federation.mode=federated", "privacy=dp", "strategy.item_rows=counts"]
    with pytest.raises(ValueError, match=r"strategy\.item_rows=counts needs per-item weights.*DP"):
        run_simulate(local_config(tmp_path, overrides))


def test_a_server_lr_decay_for_a_strategy_without_server_step_is_refused_before_the_work(tmp_path):
    overrides = ["federation.mode=federated", "privacy=disabled", "federation.decay_from_round=2",
                 "federation.decay_server_lr=1.0"]
    with pytest.raises(ValueError, match=r"decay_server_lr=1\.0, but FedRecFedAvg takes no server step"):
        run_simulate(local_config(tmp_path, overrides))
    assert not (tmp_path / "sites").exists()


def test_every_site_alone_starts_from_the_initial_model_when_one_is_given(tmp_path, monkeypatch):
    import simulations.local_only as local_only
    from shared_model.serialization import save_model_dir
    from simulations.prepare import build_model, prepare_data

    cfg = local_config(tmp_path / "run", ["privacy=disabled"])
    data = prepare_data(cfg.data)
    directory = save_model_dir(build_model(cfg.model, data), data.catalog, tmp_path / "exported")
    loaded = []

    def spy(model, catalog, path):
        loaded.append(path)
        return real(model, catalog, path)

    real = local_only.load_initial_model
    monkeypatch.setattr(local_only, "load_initial_model", spy)
    start = f"federation.initial_model={directory}"
    summary = run_simulate(local_config(tmp_path / "run", ["privacy=disabled", start]))
    assert loaded == [str(directory)] * 3 and summary["initial_model"] == str(directory)


def test_a_site_keeps_the_initial_model_when_its_training_scores_lower_on_validation(tmp_path):
    from fl_client.dp.engine import PrivacyConfig
    from fl_client.train import TrainConfig, train
    from shared_model.metrics import evaluate_model
    from shared_model.serialization import save_model_dir
    from simulations.partition import partition_users
    from simulations.prepare import build_model, prepare_data

    cfg = local_config(tmp_path / "run", ["privacy=disabled", "train.lr=50.0"])  # a step size that wrecks a model
    data = prepare_data(cfg.data)
    good = build_model(cfg.model, data)
    train(good, data.sequences, TrainConfig(epochs=3, batch_size=32, lr=0.01, num_threads=1), PrivacyConfig())
    directory = save_model_dir(good, data.catalog, tmp_path / "exported")
    cfg.federation.initial_model = str(directory)
    summary = run_simulate(cfg)
    assert summary["sites_kept_initial_model"] == 3
    parts = partition_users(data.sequences, cfg.partition)
    for site, users in zip(summary["per_site"], parts, strict=True):  # each site's figures are the start's
        assert site["kept_start"] and site["test"]["hr@10"] == pytest.approx(
            evaluate_model(good, data.sequences.subset(users), "test")["hr@10"])
    report = (tmp_path / "run" / "local" / "report.md").read_text()
    assert "3 of 3 kept it because their training scored lower" in report


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=fedmedian"], r"secure_aggregation needs an averaging strategy"),
    (["federation.share_optimizer_state=true"], r"secure_aggregation sums only the weights"),
    (["strategy.secagg_threshold=0.3"], r"secagg.threshold=0.3"),
])
def test_a_secure_aggregation_setting_the_server_cannot_serve_is_refused_before_any_site_is_written(
        tmp_path, overrides, message):
    base = ["federation.mode=federated", "privacy=disabled", "strategy.secure_aggregation=true"]
    with pytest.raises(ValueError, match=message):
        run_simulate(local_config(tmp_path, [*base, *overrides]))
    assert not (tmp_path / "sites").exists() and not (tmp_path / "server").exists()


def test_item_rows_by_counts_pass_the_start_checks_without_dp(tmp_path):
    # the tuned presets' lever: refused at start as "no per-item tensor" before the model was known (fe10425);
    # tests/simulations/test_federation.py trains with it
    overrides = ["federation.mode=federated", "privacy=disabled", "strategy.item_rows=counts"]
    check_federation(local_config(tmp_path, overrides), tmp_path)
    with pytest.raises(ValueError, match="needs per-item weights from the sites, which DP does not cover"):
        check_federation(local_config(tmp_path, [*overrides, "privacy=dp"]), tmp_path)

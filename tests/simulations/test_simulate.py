"""fedrec-simulate's Hydra config: groups compose into the typed schema; presets and sweeps use real keys."""

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from simulations.simulate import SimulateConfig, register_simulate_schemas


def typed(overrides: list[str]) -> SimulateConfig:
    register_simulate_schemas()
    with initialize_config_module(config_module="simulations.conf", version_base="1.3"):
        cfg = compose(config_name="simulate", overrides=[*overrides, "output_dir=/tmp/unused"])
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def test_defaults_are_a_dp_federation_over_regions():
    cfg = typed([])
    assert cfg.privacy.enabled and cfg.privacy.epsilon == 8.0
    assert (cfg.partition.kind, cfg.partition.by) == ("natural", "region")
    assert cfg.strategy.name == "fedavg" and cfg.federation.num_rounds == 5
    assert cfg.model.item_features == ["text"]  # the demo leans on public titles under DP


def test_federated_presets_do_not_inherit_the_demos_title_features():
    for preset in ("fed_movielens", "fed_beauty"):
        assert typed([f"+experiment={preset}"]).model.item_features == []


def test_groups_and_overrides_compose():
    cfg = typed(["partition=dirichlet", "strategy.name=fedadam", "privacy=disabled", "federation.num_rounds=7"])
    assert cfg.partition.kind == "dirichlet" and cfg.partition.num_partitions == 10
    assert cfg.strategy.name == "fedadam" and not cfg.privacy.enabled and cfg.federation.num_rounds == 7


def test_a_misspelt_key_is_refused():
    with pytest.raises(Exception, match="num_round"):
        typed(["federation.num_round=5"])


def test_training_settings_only_the_centralized_trainer_uses_are_refused_not_ignored():
    from simulations.simulate import refuse_centralized_only

    refuse_centralized_only(typed([]).train)  # the defaults pass
    with pytest.raises(ValueError, match=r"train\.epochs=3 .*federation\.num_rounds.*train\.patience=0"):
        refuse_centralized_only(typed(["train.epochs=3", "train.patience=0"]).train)


def test_a_popularity_release_is_refused_for_a_federation_of_dp_sites(tmp_path):
    """privacy.popularity_noise is centralized training's (sites would not record it in their ledgers); a
    federation releases popularity under distributed DP (strategy.dp_popularity_noise) instead."""
    from simulations.simulate import check_federation

    with pytest.raises(ValueError, match="popularity_noise"):
        check_federation(typed(["privacy.popularity_noise=5"]), tmp_path)


def test_a_secure_sum_the_sites_would_overflow_is_refused_before_the_run(tmp_path):
    """The embedded data's 4 regions at 14 bits would wrap a 16-bit sum (4 x 2^13 = 2^15): refused once the sites
    are known, before Ray starts; 13 bits fit."""
    from simulations.simulate import run_simulate

    cfg = typed(["strategy.secure_aggregation=true", "strategy.secagg_modulus_bits=16", "strategy.secagg_bits=14"])
    cfg.output_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r"4 sites x 2\^13 overflows a sum mod 2\^16"):
        run_simulate(cfg)
    assert not (tmp_path / "server").exists()


def centralized(overrides: list[str]):
    from simulations.config import CentralizedConfig, register_schemas

    register_schemas()
    with initialize_config_module(config_module="simulations.conf", version_base="1.3"):
        cfg = compose(config_name="centralized", overrides=[*overrides, "output_dir=/tmp/unused"])
    typed_cfg: CentralizedConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    return typed_cfg


# The architecture; the DP presets may regularise differently (under DP the model underfits: no dropout).
SIZE = ("max_len", "hidden_size", "num_hidden_layers", "num_attention_heads", "tie_item_embeddings")


@pytest.mark.parametrize(("preset", "centralized_preset"), [
    ("fed_movielens", "movielens"), ("fed_movielens_dp", "movielens"),
    ("fed_beauty", "beauty"), ("fed_beauty_dp", "beauty"), ("fed_beauty_tuned", "beauty"),
    ("fed_movielens_tuned", "movielens")])
def test_federated_presets_use_the_centralized_data_and_model_size(preset, centralized_preset):
    fed, central = typed([f"+experiment={preset}"]), centralized([f"+experiment={centralized_preset}"])
    assert fed.data == central.data
    assert [getattr(fed.model, k) for k in SIZE] == [getattr(central.model, k) for k in SIZE]
    if not preset.endswith("_dp"):  # the non-private rows use exactly the centralized model
        assert fed.model == central.model
    assert fed.privacy.enabled == preset.endswith("_dp")
    assert fed.federation.central_eval and fed.federation.mode == "federated"


def test_federated_presets_partition_movielens_by_region_and_beauty_into_ten_dirichlet_merchants():
    movielens, beauty = typed(["+experiment=fed_movielens"]), typed(["+experiment=fed_beauty_dp"])
    assert (movielens.partition.kind, movielens.partition.by) == ("natural", "region")
    assert (beauty.partition.kind, beauty.partition.by, beauty.partition.num_partitions) == ("dirichlet",
                                                                                             "attribute", 10)
    assert beauty.model.item_features == ["attributes"] and beauty.model.feature_scoring and beauty.model.item_bias


TUNED_LEVERS = ["federation.share_optimizer_state=true", "federation.decay_lr=0.0003",
                "federation.decay_server_lr=1.0", "strategy.name=fedavgm", "strategy.server_lr=1.5",
                "strategy.server_momentum=0.0", "strategy.item_rows=counts"]


@pytest.mark.parametrize(("preset", "base", "levers"), [
    ("fed_beauty_tuned", "fed_beauty", ["federation.num_rounds=40", "federation.decay_from_round=31"]),
    ("fed_movielens_tuned", "fed_movielens", ["federation.decay_from_round=21"])])
def test_tuned_presets_are_their_base_preset_with_the_measured_levers(preset, base, levers):
    # BENCHMARKS.md records the runs as these overrides; the preset must be exactly that run
    assert typed([f"+experiment={preset}"]) == typed([f"+experiment={base}", *TUNED_LEVERS, *levers])


def test_the_start_log_says_what_distributed_dps_dropout_margin_costs_in_noise():
    from fl_server.config import ServerConfig, StrategyConfig
    from simulations.simulate import dropout_margin_note

    def note(sites, **strategy):
        return dropout_margin_note(ServerConfig(out_dir="/x", catalog_path="c", strategy=StrategyConfig(
            name="fedadam", secure_aggregation=True, distributed_dp=True, **strategy)), sites)

    # 10 merchants at the default threshold: each adds σ/√7, so all 10 summed carry √(10/7) σ
    assert "σ/√7" in note(10) and "all 10 carries 1.195σ: less accurate" in note(10)
    assert "carries 1.000σ" in note(10, secagg_threshold=1.0) and "less accurate" not in note(10, secagg_threshold=1.0)
    assert "σ/√6" in note(10, dp_colluders=1) and "1.225σ" in note(10, dp_colluders=1)
    # a SecAgg+ ring of 4 neighbours: 4 of 5 shares rebuild a site's masks, and no sum of fewer than 80 sites can
    # be unmasked (shared_model.secure_sum.fewest_unmasked), so each site adds σ/√80, not σ/√4
    sparse = note(100, secagg_neighbours=4)
    assert "σ/√80" in sparse and "as few as 80 of the 100 sites" in sparse and "carries 1.118σ" in sparse

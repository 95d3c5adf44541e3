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
    assert cfg.strategy.name == "fedavg" and cfg.federation.num_rounds == 3


def test_groups_and_overrides_compose():
    cfg = typed(["partition=dirichlet", "strategy.name=fedadam", "privacy=disabled", "federation.num_rounds=5"])
    assert cfg.partition.kind == "dirichlet" and cfg.partition.num_partitions == 10
    assert cfg.strategy.name == "fedadam" and not cfg.privacy.enabled and cfg.federation.num_rounds == 5


def test_a_misspelt_key_is_refused():
    with pytest.raises(Exception, match="num_round"):
        typed(["federation.num_round=5"])

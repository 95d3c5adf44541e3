"""The pyproject [tool.flwr.app] config (used by `flwr run`) keeps the same defaults as fedrec-simulate."""

import tomllib
from pathlib import Path

from fl_server.config import server_config_from_run_config
from fl_server.deploy import app_defaults
from simulations.simulate import SimulateConfig, register_simulate_schemas

ROOT = Path(__file__).resolve().parents[2]


def flat_flwr_config() -> dict:
    """[tool.flwr.app.config] flattened with '.', as Flower does for run_config (and fedrec-server reads it)."""
    return app_defaults(ROOT)


def hydra_defaults() -> SimulateConfig:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    register_simulate_schemas()
    with initialize_config_module(config_module="simulations.conf", version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="simulate", overrides=["output_dir=/tmp/x"]))


def test_flwr_app_components_point_at_the_real_apps():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fl_server.server_app:app", "clientapp": "fl_client.client_app:app"}


def test_flwr_defaults_equal_the_hydra_defaults():
    flat = flat_flwr_config()
    server = server_config_from_run_config({**flat, "out-dir": "/abs/out", "catalog-path": "/abs/catalog.json"})
    hydra = hydra_defaults()
    assert server.model == hydra.model
    assert server.strategy == hydra.strategy
    assert (server.num_rounds, server.local_epochs, server.round_timeout, server.eval_every) == (
        hydra.federation.num_rounds, hydra.federation.local_epochs, hydra.federation.round_timeout,
        hydra.federation.eval_every)
    assert (server.batch_size, server.lr, server.optimizer, server.weight_decay, server.num_negatives,
            server.seed) == (hydra.train.batch_size, hydra.train.lr, hydra.train.optimizer,
                             hydra.train.weight_decay, hydra.train.num_negatives, hydra.train.seed)
    assert server.keep_optimizer_state == hydra.federation.keep_optimizer_state


def dataclass_defaults(cls) -> dict:
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_every_setting_has_one_default_in_its_dataclass_the_yaml_and_the_run_config():
    """Each typed dataclass field is the one source of a default: its Hydra YAML and (for the server) the
    Flower run config must list the same value, field by field (no hand-picked subset)."""
    import yaml

    from fl_client.train import TrainConfig
    from fl_server.config import ServerConfig, StrategyConfig
    from shared_model.factory import ModelConfig

    conf = ROOT / "simulations" / "conf"
    checked = 0
    for cls, path, absent in (
            (ModelConfig, conf / "model" / "sasrec.yaml", set()),
            (TrainConfig, conf / "train" / "default.yaml", {"proximal_mu"}),  # set by the server's FedProx only
            (StrategyConfig, conf / "strategy" / "fedavg.yaml", set())):
        listed = yaml.safe_load(path.read_text())
        for name, default in dataclass_defaults(cls).items():
            if name in absent:
                continue
            assert name in listed, f"{cls.__name__}.{name} is missing from {path.name}"
            assert listed[name] == default, \
                f"{cls.__name__}.{name}: {default!r} in the dataclass, {listed[name]!r} in {path.name}"
            checked += 1
    flat = flat_flwr_config()
    for name, default in dataclass_defaults(ServerConfig).items():
        if name in ("model", "strategy"):
            continue
        key = name.replace("_", "-")
        assert key in flat, f"ServerConfig.{name} is missing from pyproject's [tool.flwr.app.config]"
        assert flat[key] == default, f"ServerConfig.{name}: {default!r} in the dataclass, {flat[key]!r} in pyproject"
        checked += 1
    assert checked > 60  # (the run config's model and strategy sections: test_flwr_defaults_equal_the_hydra_defaults)

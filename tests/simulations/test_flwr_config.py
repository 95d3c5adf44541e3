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

"""The centralized baseline end to end on the embedded synthetic data, configured through Hydra's compose()."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fl_client.dp.settings import default_delta
from shared_model.serialization import load_model_dir
from simulations.centralized import run_centralized
from simulations.config import CentralizedConfig, register_schemas

SMALL = ["data.synthetic.num_users=300", "data.synthetic.num_items=60", "model.hidden_size=32", "model.max_len=20",
         "train.batch_size=64", "train.lr=0.003", "train.patience=0"]


def typed_config(tmp_path: Path, overrides: list[str]) -> CentralizedConfig:
    register_schemas()
    with initialize_config_module(config_module="simulations.conf", version_base="1.3"):
        cfg = compose(config_name="centralized", overrides=[*SMALL, *overrides, f"output_dir={tmp_path}"])
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def test_defaults_compose_into_the_typed_schema(tmp_path):
    cfg = typed_config(tmp_path, [])
    assert cfg.data.name == "synthetic" and cfg.privacy.enabled is False
    assert cfg.model.tie_item_embeddings and cfg.train.epochs == 30


def test_schema_rejects_a_misspelt_setting(tmp_path):
    with pytest.raises(Exception, match="epoch"):
        typed_config(tmp_path, ["train.epoch=3"])


@pytest.mark.slow
def test_centralized_run_learns_beyond_popularity_and_exports_a_model(tmp_path):
    metrics = run_centralized(typed_config(tmp_path, ["train.epochs=8"]))
    assert metrics["test"]["hr@10"] > 1.5 * metrics["popularity_test"]["hr@10"]
    test, users = metrics["test"], metrics["data"]["users"]
    assert test["users"] == users and 0 < test["hr@10:se"] <= (0.25 / (users - 1)) ** 0.5  # p(1-p) <= 1/4
    assert metrics["training"]["epoch_losses"][-1] < metrics["training"]["epoch_losses"][0]
    assert metrics["privacy"] == {"dp": False, "claim": "no differential privacy (DP was off)"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"] == metrics["test"]
    model, catalog = load_model_dir(tmp_path / "model")
    assert model.config.num_items == len(catalog.item_ids) == metrics["data"]["items"]
    assert model.config.catalog_fingerprint == catalog.fingerprint


@pytest.mark.slow
def test_centralized_dp_run_reports_the_spent_budget_per_user(tmp_path):
    metrics = run_centralized(typed_config(tmp_path, ["privacy=dp", "privacy.epsilon=3", "train.epochs=2",
                                                      "train.clip_stats=true"]))
    privacy = metrics["privacy"]
    assert privacy["dp"] is True and privacy["unit"] == "one user"
    assert privacy["epsilon"] == pytest.approx(3.0, rel=0.02)
    assert privacy["delta"] == pytest.approx(default_delta(metrics["data"]["users"]))
    assert "per user" in privacy["claim"]
    clipping = metrics["clipping"]  # asked for: the norms before clipping, labelled as outside the guarantee
    assert "not covered by the DP guarantee" in clipping["note"] and clipping["max_grad_norm"] == 1.0
    assert clipping["user_steps"] > metrics["data"]["users"] and 0 <= clipping["clipped_fraction"] <= 1


def test_a_centralized_multirun_ends_with_a_comparison_of_its_jobs(tmp_path, monkeypatch):
    import sys

    from simulations.centralized import main

    argv = ["fedrec-centralized", "-m", "train.epochs=1,2", "data.synthetic.num_users=80",
            "data.synthetic.num_items=30", "model.hidden_size=16", "model.max_len=12", f"hydra.sweep.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    main()
    compared = json.loads((tmp_path / "comparison.json").read_text())
    assert [(c["mode"], c["overrides"][0]) for c in compared] == [("centralized", "train.epochs=1"),
                                                                   ("centralized", "train.epochs=2")]
    assert all(c["privacy"] == "no differential privacy (DP was off)" and c["best"]["hr@10"] > 0 for c in compared)
    assert "| run | train.epochs | mode |" in (tmp_path / "comparison.md").read_text()

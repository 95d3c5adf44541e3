"""Typed schemas of the Hydra config groups, registered with Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from fl_client.dp.settings import PrivacyConfig
from fl_client.train import TrainConfig
from shared_model.factory import ModelConfig


@dataclass
class DataConfig:
    """Which events to load and how (paths are resolved against the directory the command runs in)."""

    name: str = "synthetic"  # (str) synthetic, events, movielens, s3rec or tianchi
    path: str | None = None  # (str) file or folder of the data set; unused for synthetic
    options: dict[str, Any] = field(default_factory=dict)  # (dict) adapter options (e.g. column mapping)
    synthetic: dict[str, Any] = field(default_factory=dict)  # (dict) generator settings for synthetic
    min_events: int = 3  # (int) users with fewer events are dropped (counted)
    item_attributes: str | None = None  # (str) public {item: [attribute ids]} JSON added to the catalog
    user_share: float = 1.0  # (float) keep this share of users, drawn at random (e.g. a panel that opted in); 1 = all
    user_share_seed: int = 0  # (int) seeds that draw (the catalog keeps every item of the file either way)


@dataclass
class EvalConfig:
    """How ranking metrics are computed."""

    mask_history: bool = False  # (bool) exclude already-seen items from the ranking (off = stricter)
    batch_size: int = 512  # (int) users per evaluation batch


@dataclass
class RunConfig:
    """The groups every entry point shares: what data, which model, how to train, what privacy."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output_dir: str = "."  # (str) where outputs go (Hydra's run dir by default)


@dataclass
class CentralizedConfig(RunConfig):
    """Root schema of `fedrec-centralized`: metrics.json and model/ go to output_dir."""

    eval: EvalConfig = field(default_factory=EvalConfig)


def register_schemas() -> None:
    """Register the schemas so YAML files are validated against them."""
    store = ConfigStore.instance()
    store.store(name="centralized_schema", node=CentralizedConfig)
    store.store(group="data", name="data_schema", node=DataConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="train", name="train_schema", node=TrainConfig)
    store.store(group="privacy", name="privacy_schema", node=PrivacyConfig)

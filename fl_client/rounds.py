"""What the server asks of a site for one round, and the site's evaluation of the global model.

Nothing here trains or imports Opacus: a deployment starts a fresh process for every message, and an evaluate
message's process never pays for importing the DP machinery (fl_client.federated trains).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fl_client.site import SiteConfig, SiteData
from shared_model import wire
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.device import resolve_device
from shared_model.metrics import evaluate_model, training_loss
from shared_model.modeling_fedrec import FedRecModel

# RoundConfig field -> (wire key, type it is parsed to).
ROUND_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "server_round": (wire.SERVER_ROUND, int), "training_id": (wire.TRAINING_ID, str),
    "num_rounds": (wire.NUM_ROUNDS, int), "local_epochs": (wire.LOCAL_EPOCHS, int),
    "batch_size": (wire.BATCH_SIZE, int), "lr": (wire.LEARNING_RATE, float), "optimizer": (wire.OPTIMIZER, str),
    "model_config": (wire.MODEL_CONFIG, str), "catalog_fingerprint": (wire.CATALOG_FINGERPRINT, str),
}
OPTIONAL_ROUND_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "proximal_mu": (wire.PROXIMAL_MU, float), "weight_decay": (wire.WEIGHT_DECAY, float),
    "num_negatives": (wire.NUM_NEGATIVES, int), "seed": (wire.SEED, int),
    "keep_optimizer_state": (wire.KEEP_OPTIMIZER_STATE, bool), "item_rows": (wire.ITEM_ROWS, str),
    "share_optimizer_state": (wire.SHARE_OPTIMIZER_STATE, bool), "frozen_digest": (wire.FROZEN_DIGEST, str),
}


@dataclass
class RoundConfig:
    """What the server asks of a site for one round (never noise, clipping or budget)."""

    server_round: int
    training_id: str  # the same across server restarts, so a resent round is recognised
    num_rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    model_config: str  # FedRecConfig JSON
    catalog_fingerprint: str
    proximal_mu: float = 0.0  # sent by Flower's FedProx; absent for every other strategy
    weight_decay: float = 0.0
    num_negatives: int = 0
    seed: int = 0  # seeds sampling and dropout without DP (a DP site draws fresh entropy every round)
    keep_optimizer_state: bool = False  # the site carries its optimiser state (Adam moments) across rounds
    item_rows: str = "average"  # wire.ITEM_ROW_MODES: holders/counts ask the site for per-item weights
    share_optimizer_state: bool = False  # start from the server's average of the sites' moments; send ours back
    frozen_digest: str = ""  # names the run's frozen tensors, which the site keeps once sent (fl_client.frozen)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundConfig:
        """Parse the round's ConfigRecord, naming any missing key (the optional keys have defaults)."""
        missing = [key for key, _ in ROUND_FIELDS.values() if key not in record]
        if missing:
            raise ValueError(f"round config from the server lacks {missing}")
        values = {name: cast(record[key]) for name, (key, cast) in ROUND_FIELDS.items()}
        optional = {name: cast(record[key]) for name, (key, cast) in OPTIONAL_ROUND_FIELDS.items() if key in record}
        parsed = cls(**values, **optional)
        if parsed.item_rows not in wire.ITEM_ROW_MODES:
            raise ValueError(f"round config asks for {wire.ITEM_ROWS}={parsed.item_rows!r}; this site knows "
                             f"{', '.join(wire.ITEM_ROW_MODES)}")
        return parsed


class TrainingDivergedError(ValueError):
    """Training produced non-finite weights (NaN or inf): nothing trained this way should be sent or saved."""


def build_global_model(round_cfg: RoundConfig, state: Mapping[str, torch.Tensor]) -> FedRecModel:
    """The server's model, rebuilt from its config and weights."""
    model = FedRecModel(FedRecConfig.from_dict(json.loads(round_cfg.model_config)))
    wire.load_state(model, state)
    return model


def site_delta(site: SiteConfig, data: SiteData) -> float:
    """The site's δ: configured, or 1 / its number of users."""
    return site.delta if site.delta is not None else 1.0 / max(len(data.sequences), 1)


def evaluate_round(site: SiteConfig, data: SiteData, round_cfg: RoundConfig,
                   state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Full-catalog metrics of the global model on the site's own test events, plus validation NDCG@10
    (what the server selects the best round by) and its cross-entropy on the site's training events (how
    well the averaged model fits them: the sites' own training loss is measured on their local models)."""
    data.catalog.check_matches(round_cfg.catalog_fingerprint)
    device = resolve_device(site.device)
    model = build_global_model(round_cfg, state)
    torch.nn.Module.to(model, device)  # scored where the batches go (a GPU site's batches are on its GPU)
    metrics = evaluate_model(model, data.sequences, "test", device=device)
    valid = evaluate_model(model, data.sequences, "valid", device=device)
    return {**{k: v for k, v in metrics.items() if k != "users"}, wire.VALID_NDCG10: valid["ndcg@10"],
            wire.TRAIN_CE: training_loss(model, data.sequences, device=device),
            wire.NUM_EXAMPLES: metrics.get("users", 0.0)}

"""A site's evaluation of the global model (an evaluate message): no training, no Opacus, nothing spent."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fl_client.round_config import RoundConfig, global_model
from fl_client.site import SiteConfig, SiteData
from shared_model import wire
from shared_model.device import resolve_device
from shared_model.metrics import evaluate_model, training_loss


def evaluate_round(site: SiteConfig, data: SiteData, round_cfg: RoundConfig,
                   state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Full-catalog metrics of the global model on the site's own test events, plus validation NDCG@10
    (what the server selects the best round by) and its cross-entropy on the site's training events (how
    well the averaged model fits them: the sites' own training loss is measured on their local models)."""
    data.catalog.check_matches(round_cfg.catalog_fingerprint)
    device = resolve_device(site.device)
    with global_model(round_cfg, state, site.max_model_parameters) as model:
        torch.nn.Module.to(model, device)  # scored where the batches go (a GPU site's batches are on its GPU)
        metrics = evaluate_model(model, data.sequences, "test", device=device)
        valid = evaluate_model(model, data.sequences, "valid", device=device)
        train_ce = training_loss(model, data.sequences, device=device)
    return {**{k: v for k, v in metrics.items() if k != "users"}, wire.VALID_NDCG10: valid["ndcg@10"],
            wire.TRAIN_CE: train_ce, wire.NUM_EXAMPLES: metrics.get("users", 0.0)}

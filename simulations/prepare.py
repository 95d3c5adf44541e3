"""Turning a data config into a catalog, per-user sequences and a fresh model (shared by every entry point)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from hydra.utils import to_absolute_path

from shared_model.catalog import ItemCatalog
from shared_model.events import EventLog
from shared_model.factory import ModelConfig, create_model
from shared_model.modeling_fedrec import FedRecModel
from shared_model.sequences import UserSequences, to_user_sequences
from simulations.config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Everything derived from one events source."""

    events: EventLog
    catalog: ItemCatalog
    sequences: UserSequences


def absolute(path: str) -> str:
    """A config path made absolute against the directory the command was started from."""
    try:
        return to_absolute_path(path)
    except ValueError:  # outside a Hydra run (tests, plain Python)
        return str(Path(path).resolve())


def load_configured_events(config: DataConfig) -> EventLog:
    """Load the events a data config names (the synthetic generator or a file adapter)."""
    if config.name == "synthetic":
        from simulations.synthetic import generate_events  # heavy only when used

        return generate_events(**dict(config.synthetic))
    if not config.path:
        raise ValueError(f"data.path is required for data.name={config.name!r}")
    from shared_model.adapters import load_dataset

    return load_dataset(config.name, absolute(config.path), **dict(config.options))


def prepare_data(config: DataConfig, num_time_buckets: int = 32) -> PreparedData:
    """Events -> public catalog -> one sequence per user, logging counts of everything filtered."""
    events = load_configured_events(config)
    catalog = ItemCatalog.from_events(events.frame)
    if config.item_attributes:
        from shared_model.adapters import load_item_attributes

        attributes = load_item_attributes(absolute(config.item_attributes))
        catalog.attributes = {item: [str(a) for a in attributes[item]] for item in catalog.item_ids
                              if item in attributes}
        log.info("public attributes for %d of %d items", len(catalog.attributes), len(catalog.item_ids))
    sequences = to_user_sequences(events, catalog, num_time_buckets=num_time_buckets, min_events=config.min_events)
    log.info("%s", events.report.summary())
    log.info("filtered while building sequences (events): %s", sequences.dropped or "none")
    if config.user_share != 1.0:
        events, sequences = user_sample(events, sequences, config.user_share, config.user_share_seed)
    log.info("%d users, %d items, %d events in sequences (catalog %s)", len(sequences), len(catalog.item_ids),
             len(sequences.items), catalog.fingerprint[:12])
    return PreparedData(events=events, catalog=catalog, sequences=sequences)


def user_sample(events: EventLog, sequences: UserSequences, share: float,
                seed: int) -> tuple[EventLog, UserSequences]:
    """Keep a random `share` of the users (their sequences and events); the catalog is left whole, so models
    trained on the sample fit runs on all users."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"data.user_share must be in (0, 1], got {share}")
    total = len(sequences)
    keep = np.sort(np.random.default_rng(seed).choice(total, size=max(1, round(share * total)), replace=False))
    sample = sequences.subset(keep)
    frame = events.frame[events.frame["user_id"].isin(set(sample.user_ids))].reset_index(drop=True)
    log.info("data.user_share=%s (seed %d): kept %d of %d users and %d of %d events; %d users left out", share, seed,
             len(sample), total, len(frame), len(events.frame), total - len(sample))
    return replace(events, frame=frame), sample


def build_model(config: ModelConfig, data: PreparedData, cache_dir: str | None = None) -> FedRecModel:
    """A fresh model for the prepared data's catalog (time gaps only when the data has timestamps)."""
    return create_model(config, data.catalog, data.events.has_timestamps, cache_dir)

"""Model settings (the architecture a run asks for) and building a fresh model for a catalog."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared_model.catalog import ItemCatalog
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.item_features import item_feature_table
from shared_model.modeling_fedrec import FedRecModel


@dataclass
class ModelConfig:
    """Architecture of the behaviour model (see shared_model.configuration_fedrec)."""

    max_len: int = 50  # (int) most recent events read per user
    hidden_size: int = 64  # (int) width d
    num_hidden_layers: int = 2  # (int) transformer blocks
    num_attention_heads: int = 2  # (int) heads per block
    hidden_dropout_prob: float = 0.5  # (float) dropout on embeddings and block outputs
    attention_probs_dropout_prob: float = 0.5  # (float) dropout on attention weights
    use_time_gaps: bool = True  # (bool) time-gap embedding (ignored when the data has no timestamps)
    use_event_types: bool = True  # (bool) event-type embedding (false: for data with one event type)
    item_features: list[str] = field(default_factory=list)  # (list) public feature sources: text, attributes
    feature_dim: int = 64  # (int) principal components kept from the public item features
    feature_scoring: bool = False  # (bool) also score items through their public features
    item_bias: bool = False  # (bool) learned per-item score offset (popularity)
    train_item_embeddings: bool = True  # (bool) false: no per-item vectors (public features + bias only)
    tie_item_embeddings: bool = True  # (bool) score items with the input item table


def create_model(config: ModelConfig, catalog: ItemCatalog, has_timestamps: bool = True,
                 cache_dir: str | None = None) -> FedRecModel:
    """A freshly initialised model sized to the catalog, with public item features installed if asked for."""
    feature_dim = config.feature_dim if config.item_features else 0
    model = FedRecModel(FedRecConfig(
        num_items=len(catalog.item_ids), max_len=config.max_len, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        use_time_gaps=config.use_time_gaps and has_timestamps, use_event_types=config.use_event_types,
        feature_dim=feature_dim,
        feature_scoring=config.feature_scoring and feature_dim > 0, item_bias=config.item_bias,
        train_item_embeddings=config.train_item_embeddings,
        tie_item_embeddings=config.tie_item_embeddings, catalog_fingerprint=catalog.fingerprint))
    if feature_dim:
        model.set_item_features(item_feature_table(catalog, config.item_features, feature_dim, cache_dir))
    return model

"""Hyperparameters of the behaviour model (a SASRec-family causal transformer), HF-style."""

from __future__ import annotations

from typing import Any

from transformers import BertConfig, PretrainedConfig

from shared_model.events import EVENT_TYPES


class FedRecConfig(PretrainedConfig):
    """Configuration of FedRecModel; tiny test configs use hidden_size=32, num_hidden_layers=2, num_items=99."""

    model_type = "fedrec"

    def __init__(
        self,
        num_items: int = 99,
        max_len: int = 50,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 2,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.2,
        attention_probs_dropout_prob: float = 0.2,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        num_event_types: int = len(EVENT_TYPES) + 1,
        num_time_buckets: int = 32,
        use_time_gaps: bool = True,
        use_event_types: bool = True,
        feature_dim: int = 0,
        feature_scoring: bool = False,
        item_bias: bool = False,
        train_item_embeddings: bool = True,
        tie_item_embeddings: bool = True,
        catalog_fingerprint: str = "",
        **kwargs: Any,
    ) -> None:
        # Fields an older fedrec saved, now removed (docs/tried.md), and the values that mean today's model.
        removed = {"item_embedding_size": (None, hidden_size), "position_encoding": (None, "learned"),
                   "trained_item_rows": (None, 0)}
        for name, same in removed.items():
            value = kwargs.pop(name, None)
            if value not in same:
                raise ValueError(f"model config field {name}={value!r} is no longer supported (docs/tried.md): "
                                 "this model was saved by an older fedrec")
        super().__init__(**kwargs)
        self.num_items = num_items  # (int) catalog size without the padding row
        self.max_len = max_len  # (int) most recent events the model reads per user
        self.hidden_size = hidden_size  # (int) width d of every embedding and layer
        self.num_hidden_layers = num_hidden_layers  # (int) transformer blocks
        self.num_attention_heads = num_attention_heads  # (int) heads per block
        self.intermediate_size = intermediate_size or 4 * hidden_size  # (int) feed-forward width
        self.hidden_act = hidden_act  # (str) feed-forward activation
        self.hidden_dropout_prob = hidden_dropout_prob  # (float) dropout on embeddings and block outputs
        self.attention_probs_dropout_prob = attention_probs_dropout_prob  # (float) dropout on attention
        self.layer_norm_eps = layer_norm_eps  # (float) LayerNorm epsilon
        self.initializer_range = initializer_range  # (float) std of the normal init
        self.num_event_types = num_event_types  # (int) event-type codes incl. padding 0
        self.num_time_buckets = num_time_buckets  # (int) log2-minute gap buckets incl. 0 = none
        self.use_time_gaps = use_time_gaps  # (bool) add the time-gap embedding (needs real timestamps)
        # (bool) add the event-type embedding; with one type in the data it is a constant input vector
        # that still takes its share of every user's clipped gradient under DP
        self.use_event_types = use_event_types
        self.feature_dim = feature_dim  # (int) width of frozen public item features (text/attributes); 0 = none
        self.feature_scoring = feature_scoring  # (bool) also score items through their public features
        self.item_bias = item_bias  # (bool) a learned per-item score offset (popularity)
        self.train_item_embeddings = train_item_embeddings  # (bool) False: item table fixed at 0, no noise on it
        self.tie_item_embeddings = tie_item_embeddings  # (bool) score with the input item table
        self.tie_word_embeddings = tie_item_embeddings  # HF's name for the same switch (save/load ties)
        self.catalog_fingerprint = catalog_fingerprint  # (str) the catalog the item rows refer to

    @property
    def num_item_rows(self) -> int:
        """Rows of the item table: the catalog plus padding row 0."""
        return self.num_items + 1

    def to_bert_config(self) -> BertConfig:
        """The config HF's BertLayer reads for our blocks (bidirectional layer, causal mask passed in)."""
        settings: dict[str, Any] = {
            "hidden_size": self.hidden_size, "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size, "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout_prob,
            "attention_probs_dropout_prob": self.attention_probs_dropout_prob,
            "layer_norm_eps": self.layer_norm_eps, "attn_implementation": "sdpa"}
        return BertConfig(**settings)

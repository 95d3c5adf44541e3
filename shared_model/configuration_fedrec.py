"""Hyperparameters of the behaviour model (a SASRec-family causal transformer), saved as config.json.

A plain class, not transformers' PretrainedConfig: a site's train or evaluate message runs in a fresh process
(deployment) and importing transformers' modelling code cost it about 2.4 s of CPU (BENCHMARKS.md, "A site's
message process without transformers or pandas"). The JSON is the one `save_pretrained` wrote before, and a config.json
that transformers wrote still loads (its bookkeeping keys are read and dropped)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from shared_model.event_log import EVENT_TYPES

# Keys transformers' PretrainedConfig writes into config.json (always, or when a value differs from its
# default) that say nothing about this model: read and dropped.
HF_BOOKKEEPING = frozenset({
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "tie_word_embeddings",
    "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "torchscript", "pruned_heads", "add_cross_attention", "is_decoder",
    "tie_encoder_decoder", "cross_attention_hidden_size", "finetuning_task", "tokenizer_class", "prefix",
    "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "use_cache"})
# Fields an older fedrec saved, now removed (docs/tried.md), and the values that mean today's model.
REMOVED_FIELDS: dict[str, tuple[Any, Any]] = {"item_embedding_size": (None, "hidden_size"),
                                              "position_encoding": (None, "learned"), "trained_item_rows": (None, 0)}


class FedRecConfig:
    """Configuration of FedRecModel; tiny test configs use hidden_size=32, num_hidden_layers=2, num_items=99."""

    model_type: ClassVar[str] = "fedrec"

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
        **removed: Any,
    ) -> None:
        for name, value in removed.items():
            if name not in REMOVED_FIELDS:
                raise TypeError(f"unknown model config field {name!r}")
            same = REMOVED_FIELDS[name]
            if value not in (same[0], hidden_size if same[1] == "hidden_size" else same[1]):
                raise ValueError(f"model config field {name}={value!r} is no longer supported (docs/tried.md): "
                                 "this model was saved by an older fedrec")
        if hidden_act != "gelu":
            raise ValueError(f"model config field hidden_act={hidden_act!r}: the blocks use GELU only")
        self.num_items = num_items  # (int) catalog size without the padding row
        self.max_len = max_len  # (int) most recent events the model reads per user
        self.hidden_size = hidden_size  # (int) width d of every embedding and layer
        self.num_hidden_layers = num_hidden_layers  # (int) transformer blocks
        self.num_attention_heads = num_attention_heads  # (int) heads per block
        self.intermediate_size = intermediate_size or 4 * hidden_size  # (int) feed-forward width
        self.hidden_act = hidden_act  # (str) feed-forward activation (GELU, the exact one)
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
        self.catalog_fingerprint = catalog_fingerprint  # (str) the catalog the item rows refer to

    @property
    def num_item_rows(self) -> int:
        """Rows of the item table: the catalog plus padding row 0."""
        return self.num_items + 1

    def to_dict(self) -> dict[str, Any]:
        """Every field, and the model type (what config.json holds)."""
        return {"model_type": self.model_type, **vars(self)}

    def to_json_string(self) -> str:
        """config.json's text, keys sorted (what the server sends each site as the round's model config)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FedRecConfig:
        """A config from config.json's object (this class's or transformers' writing of it). Another model type, a
        field this model does not have or a value of the wrong type is a ValueError or TypeError naming it."""
        if not isinstance(values, dict):
            raise TypeError(f"a model config is a JSON object, not {type(values).__name__}")
        model_type = values.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"model config: model_type {model_type!r} is not {cls.model_type!r}")
        fields = {k: v for k, v in values.items() if k != "model_type" and k not in HF_BOOKKEEPING}
        config = cls(**fields)
        for name, value in vars(config).items():
            expected = FIELD_TYPES[name]
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, NUMBERS.get(expected, expected)):
                raise TypeError(f"model config field {name}={value!r}: expected {expected.__name__}")
        return config

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FedRecConfig) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"FedRecConfig({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


FIELD_TYPES = {name: type(value) for name, value in vars(FedRecConfig()).items()}  # each field's default's type
NUMBERS: dict[type, tuple[type, ...]] = {float: (int, float)}  # JSON writes 0.0 as 0 in some writers

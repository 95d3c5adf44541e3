"""The behaviour model: a causal transformer over (item, position, event type, time gap) that scores
every catalog item as the user's next one. Only Opacus-supported layers: Embedding, Linear, LayerNorm,
Dropout (post-LayerNorm blocks laid out as BERT's, attention through SDPA). Saved as config.json and
model.safetensors, the files transformers' save_pretrained wrote for it before (those still load)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shared_model.configuration_fedrec import FedRecConfig

POPULARITY_FLOOR = 1.0  # one user's whole weight in a popularity release: noisier counts start the bias level
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TIED_OUTPUT = "output.weight"  # the item table itself when the item embeddings are tied: saved once


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention under an additive mask. # (B, T, d) -> (B, T, d)"""

    def __init__(self, config: FedRecConfig) -> None:
        super().__init__()
        d, heads = config.hidden_size, config.num_attention_heads
        if d % heads:
            raise ValueError(f"model config: hidden_size {d} is not a multiple of num_attention_heads {heads}")
        self.heads, self.dropout = heads, config.attention_probs_dropout_prob
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (layer(x).view(B, T, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, d/H)
                   for layer in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, T, d)


class Residual(nn.Module):
    """LayerNorm(x + dropout(dense(h))): a sub-layer's projection back onto the residual stream."""

    def __init__(self, config: FedRecConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class Attention(nn.Module):
    """Self-attention and its residual sub-layer (`self`, `output`: BERT's tensor names, which saved models use)."""

    def __init__(self, config: FedRecConfig) -> None:
        super().__init__()
        self.self = SelfAttention(config)
        self.output = Residual(config, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    """The feed-forward's widening: GELU(dense(x)). # (B, T, d) -> (B, T, intermediate_size)"""

    def __init__(self, config: FedRecConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Block(nn.Module):
    """One post-LayerNorm transformer block: attention, then the feed-forward, each with a residual LayerNorm."""

    def __init__(self, config: FedRecConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = Residual(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class FedRecModel(nn.Module):
    """Next-item recommender: hidden states per position, and logits over all catalog rows."""

    item_features: torch.Tensor  # (V, F) frozen public features, present when config.feature_dim > 0

    def __init__(self, config: FedRecConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.item_embeddings = nn.Embedding(config.num_item_rows, d, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_len, d)
        if config.use_event_types:
            self.event_type_embeddings = nn.Embedding(config.num_event_types, d, padding_idx=0)
        if config.use_time_gaps:  # unused parameters would get no per-user gradient under Opacus
            self.time_embeddings = nn.Embedding(config.num_time_buckets, d, padding_idx=0)
        if config.feature_dim:
            # Frozen public item features (title embeddings, catalog attributes): items that share them share
            # signal, which matters under DP where each item row alone sees few users.
            self.register_buffer("item_features", torch.zeros(config.num_item_rows, config.feature_dim))
            self.feature_projection = nn.Linear(config.feature_dim, d, bias=False)
            if config.feature_scoring:
                self.feature_output = nn.Linear(d, config.feature_dim, bias=False)
        self.embedding_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.output = nn.Linear(d, config.num_item_rows, bias=config.item_bias)
        self.candidate_scores = CandidateScores()  # the sampled softmax's use of the output layer
        self.apply(self._init_weights)
        if config.tie_item_embeddings:
            # One Parameter in two modules: Opacus' hook mode sums both per-sample parts.
            self.output.weight = self.item_embeddings.weight
        if not config.train_item_embeddings:
            # Items are then known only through public features and the bias: under DP this removes the
            # largest noised block (items x d) at the price of item-specific detail.
            for table in (self.item_embeddings, self.output):
                table.weight.data.zero_()
                table.weight.requires_grad_(False)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json and model.safetensors in `directory` (created), the tied output table once."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().contiguous() for name, t in self.state_dict().items()
                 if not (self.config.tie_item_embeddings and name == TIED_OUTPUT)}
        (directory / CONFIG_FILE).write_text(self.config.to_json_string(), encoding="utf-8")
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FedRecModel:
        """The model `save_pretrained` (or transformers' before it) wrote to `directory`, in eval mode. A config
        or weights file that does not describe this model is a ValueError naming the file and what is wrong."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = FedRecConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")))
        except (UnicodeDecodeError, ValueError, TypeError) as err:
            raise ValueError(f"{directory / CONFIG_FILE}: not a fedrec model config ({err})") from err
        model = cls(config)
        try:
            state = load_file(str(directory / WEIGHTS_FILE))
        except SafetensorError as err:
            raise ValueError(f"{directory / WEIGHTS_FILE}: not a safetensors file ({err})") from err
        if config.tie_item_embeddings:
            state.pop(TIED_OUTPUT, None)  # the item table's own rows: it was tied when saved
        expected = {k: v for k, v in model.state_dict().items()
                    if not (config.tie_item_embeddings and k == TIED_OUTPUT)}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        other = sorted(f"{k} {tuple(state[k].shape)} {state[k].dtype} (expected {tuple(v.shape)} {v.dtype})"
                       for k, v in expected.items()
                       if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype))
        if missing or unexpected or other:
            raise ValueError(f"{directory / WEIGHTS_FILE} does not fit {directory / CONFIG_FILE}: missing {missing}, "
                             f"unexpected {unexpected}, other shapes or dtypes {other}")
        model.load_state_dict(state, strict=False)
        return model.eval()

    def set_item_features(self, features: torch.Tensor) -> None:
        """Install the frozen (num_item_rows, feature_dim) public item-feature table."""
        if not self.config.feature_dim:
            raise ValueError("this model was configured without item features (feature_dim=0)")
        self.item_features.copy_(features.to(self.item_features.dtype))

    @torch.no_grad()
    def start_item_bias(self, counts: torch.Tensor) -> None:
        """Set the item bias to log(max(count, POPULARITY_FLOOR)) from a (DP) release of item popularity, so the
        softmax ranks items by their released count; items below one user's whole weight start level."""
        if self.output.bias is None:
            raise ValueError("a popularity release starts the item bias, which this model has none of: set "
                             "model.item_bias=true")
        if counts.shape != self.output.bias.shape:
            raise ValueError(f"popularity has {counts.shape[0]} rows, the item bias {self.output.bias.shape[0]}")
        self.output.bias.copy_(counts.clamp(min=POPULARITY_FLOOR).log().to(self.output.bias))

    def item_row_parameters(self) -> list[str]:
        """Names of the trainable tensors with one row per catalog row (item table, output layer), each
        tied tensor once: what the server may aggregate row by row (`strategy.item_rows`)."""
        per_item = ("item_embeddings.weight", "output.weight", "output.bias")
        return [name for name, p in self.named_parameters() if name in per_item and p.requires_grad]

    def embed(self, item_ids: torch.Tensor, event_types: torch.Tensor,
              time_buckets: torch.Tensor) -> torch.Tensor:
        """Sum of the input embeddings for left-padded sequences.  # (B, T) -> (B, T, d)"""
        B, T = item_ids.shape
        # Positions count back from the most recent event, so padding width never shifts them; they are
        # expanded to the batch because broadcast ids break per-sample gradients.
        positions = torch.arange(T - 1, -1, -1, device=item_ids.device).clamp(max=self.config.max_len - 1)
        positions = positions.unsqueeze(0).expand(B, T).contiguous()  # (B, T)
        x = self.item_embeddings(item_ids) + self.position_embeddings(positions)  # (B, T, d)
        if self.config.use_event_types:
            x = x + self.event_type_embeddings(event_types)
        if self.config.use_time_gaps:
            x = x + self.time_embeddings(time_buckets)
        if self.config.feature_dim:
            x = x + self.feature_projection(self.item_features[item_ids])  # (B, T, F) -> (B, T, d)
        return self.dropout(self.embedding_norm(x))

    @staticmethod
    def attention_mask(item_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive causal + key-padding mask; each position may always see itself (no empty rows)."""
        B, T = item_ids.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=item_ids.device).tril()  # (T, T)
        keys = (item_ids != 0).unsqueeze(1)  # (B, 1, T)
        allowed = causal.unsqueeze(0) & keys  # (B, T, T)
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=item_ids.device)
        mask = torch.zeros(B, 1, T, T, dtype=dtype, device=item_ids.device)
        return mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)  # (B, 1, T, T)

    def forward(self, item_ids: torch.Tensor, event_types: torch.Tensor,
                time_buckets: torch.Tensor) -> torch.Tensor:
        """Hidden state after each event.  # (B, T) ids -> (B, T, d)"""
        x = self.embed(item_ids, event_types, time_buckets)
        mask = self.attention_mask(item_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog row; row 0 (padding) can never be recommended.  # (..., d) -> (..., V)"""
        scores = self.output(hidden)  # (..., d) -> (..., V)
        if self.config.feature_scoring:
            # A parameter-free product with the frozen table: Opacus only needs feature_output's gradient.
            scores = scores + self.feature_output(hidden) @ self.item_features.T  # (..., F) @ (F, V)
        return scores.index_fill(-1, torch.zeros(1, dtype=torch.long, device=scores.device), float("-inf"))

    def score_next(self, item_ids: torch.Tensor, event_types: torch.Tensor,
                   time_buckets: torch.Tensor) -> torch.Tensor:
        """Scores for the item after the last event of each sequence.  # (B, T) -> (B, V)"""
        return self.logits(self.forward(item_ids, event_types, time_buckets)[:, -1])

    def sampled_logits(self, hidden: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Sampled softmax for large catalogs: column 0 is each position's label, then the user's negatives
        (`draw_negatives`); a negative equal to the position's label scores -inf. Each negative stands for
        items / K items: its score is raised by log(items / K) (the correction for uniform sampling, Jean et al.
        2015), so that the sampled normaliser estimates the full softmax's.

        # hidden (B, T, d), labels (B, T), negatives (B, K) -> (B, T, 1 + K)"""
        logits = self.candidate_scores(hidden, labels, negatives, self.output.weight, self.output.bias)
        if self.config.feature_scoring:
            # The frozen feature table is public: only feature_output (a Linear, clipped as usual) is trained.
            features = self.feature_output(hidden)  # (B, T, F)
            logits = logits + torch.cat([(features * self.item_features[labels]).sum(-1, keepdim=True),
                                         torch.bmm(features, self.item_features[negatives].transpose(1, 2))], -1)
        count = negatives.shape[1]
        stands_for = math.log((self.config.num_item_rows - 1) / count)
        logits = logits + torch.cat([logits.new_zeros(1), logits.new_full((count,), stands_for)])
        own = torch.cat([torch.zeros_like(labels, dtype=torch.bool).unsqueeze(-1),
                         negatives.unsqueeze(1) == labels.unsqueeze(-1)], dim=-1)  # (B, T, 1 + K)
        return logits.masked_fill(own, float("-inf"))


class CandidateScores(nn.Module):
    """h · W[c] + b[c] for each position's label c and for each of the user's negatives c, with (W, b) the output
    layer's weight and bias passed in: the sampled softmax's only use of them. It is a layer of its own (without
    parameters) so that per-user clipping (fl_client.dp.bookkeeping) records which rows each user's gradient
    touches: the labels of the user's positions and the user's negatives.

    # hidden (B, T, d), labels (B, T), negatives (B, K), distinct within a row -> (B, T, 1 + K)"""

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        positive = (hidden * F.embedding(labels, weight)).sum(-1, keepdim=True)  # (B, T, 1)
        negative = torch.bmm(hidden, F.embedding(negatives, weight).transpose(1, 2))  # (B, T, d) x (B, d, K)
        if bias is not None:
            positive, negative = positive + bias[labels].unsqueeze(-1), negative + bias[negatives].unsqueeze(1)
        return torch.cat([positive, negative], dim=-1)


def draw_negatives(num_item_rows: int, count: int, users: int, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """For each of `users` users, `count` distinct catalog rows (never the padding row 0), every K-subset of the
    items equally likely, drawn from no data and independently of the other users. # -> (users, count), sorted

    Under DP a step draws them once for all its sampled users, before the micro-batches: each user's clipped
    gradient is then a function of their own events and their own data-independent draw, so adding or removing a
    user changes the step's clipped sum by at most C, as DP-SGD's accounting assumes. (Negatives shared by a
    micro-batch would not: who shares a micro-batch depends on who was sampled. Negatives shared by the whole step
    are DP-safe but cost HR@10 under DP: their sampling error is the same for every user of the step; BENCHMARKS.md,
    "Sampled softmax under DP".)"""
    items = num_item_rows - 1
    if not 0 < count <= items:
        raise ValueError(f"train.num_negatives={count}: a sampled softmax needs 1 to {items} negatives "
                         f"(the catalog's items)")
    if 2 * count > items:  # most of the catalog: a permutation per user
        keys = torch.rand(users, items, generator=generator)
        return (keys.topk(count, dim=1).indices + 1).sort(1).values.to(device)
    rows = torch.randint(1, num_item_rows, (users, count), generator=generator).sort(1).values
    while True:  # redraw repeats until each row is distinct: by symmetry every K-subset stays equally likely
        repeat = torch.zeros_like(rows, dtype=torch.bool)
        repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
        if not bool(repeat.any()):
            return rows.to(device)
        rows[repeat] = torch.randint(1, num_item_rows, (int(repeat.sum()),), generator=generator)
        rows = rows.sort(1).values


class StepNegatives:
    """One `draw_negatives` for the users of a step, handed out micro-batch by micro-batch: which micro-batch a user
    falls in changes nothing about the negatives the user gets."""

    def __init__(self, num_item_rows: int, count: int, users: Sequence[int], device: torch.device | str) -> None:
        self.negatives = draw_negatives(num_item_rows, count, len(users), device)  # (users, K)
        self.row = {int(u): i for i, u in enumerate(users)}

    def of(self, users: Sequence[int]) -> torch.Tensor:
        """(len(users), K): the negatives of these users of the step, in this order."""
        return self.negatives[[self.row[int(u)] for u in users]]


def sequence_loss(model: FedRecModel, batch: dict[str, torch.Tensor], per_user: bool = False,
                  negatives: torch.Tensor | None = None, padded: bool = False) -> torch.Tensor:
    """Next-item cross-entropy at every non-padding position.

    Returns the mean over positions, or with `per_user` the (B,) per-user mean that DP-SGD clips. Only real
    positions are scored (the (N, V) output layer dominates the cost), so the output layer's rows are the
    positions `labels != 0` of the users in order; `padded` scores every (user, position) instead, for Opacus'
    hooks, which need every layer's leading dimension to be the user's. `negatives` (`draw_negatives`, a row per
    user): a sampled softmax over each position's label and the user's negatives instead of the whole catalog
    (scored padded).
    """
    hidden = model(batch["item_ids"], batch["event_types"], batch["time_buckets"])  # (B, T, d)
    labels = batch["labels"]  # (B, T)
    if not padded and negatives is None:
        keep = labels != 0
        losses = F.cross_entropy(model.logits(hidden[keep]), labels[keep],
                                 reduction="none" if per_user else "mean")  # (N, d) -> (N, V) -> (N,)
        if not per_user:
            return losses
        users = keep.nonzero()[:, 0]  # (N,) the user of each scored position
        return losses.new_zeros(len(labels)).index_add(0, users, losses) / keep.sum(1).clamp(min=1)
    if negatives is not None:
        logits = model.sampled_logits(hidden, labels, negatives)  # (B, T, 1 + K)
        targets = torch.zeros_like(labels)
    else:
        logits, targets = model.logits(hidden), labels  # (B, T, V)
    valid = (labels != 0).to(hidden.dtype)  # (B, T)
    targets = targets.masked_fill(labels == 0, -100)  # padding positions are ignored
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(labels)
    if per_user:
        return losses.sum(1) / valid.sum(1).clamp(min=1)  # (B,)
    return losses.sum() / valid.sum().clamp(min=1)

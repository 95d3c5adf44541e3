"""Full-catalog ranking metrics (HR@K, NDCG@K, MRR), model evaluation and the popularity baseline."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from shared_model.modeling_fedrec import FedRecModel, sequence_loss
from shared_model.sequences import Split, UserSequences, make_batch

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)
SECOND_MOMENT = ":m2"  # key suffix: mean of the squared per-user metric; pools over sites like the mean does
STANDARD_ERROR = ":se"  # key suffix: standard error of the mean over users (the spread of users, not of runs)


@dataclass
class RankingMetrics:
    """Running sums of per-user ranking metrics; `result()` gives the means."""

    ks: Sequence[int] = DEFAULT_KS
    count: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def update(self, ranks: torch.Tensor) -> None:
        """Add users whose held-out item got 0-based rank `ranks` among all catalog items.  # (B,)"""
        ranks = ranks.double()
        for k in self.ks:
            hit = (ranks < k).double()
            self._add(f"hr@{k}", hit)
            self._add(f"ndcg@{k}", hit / torch.log2(ranks + 2.0))
            self._add(f"mrr@{k}", hit / (ranks + 1.0))  # reciprocal rank, 0 beyond the cut-off
        self._add("mrr", 1.0 / (ranks + 1.0))  # over the full ranking
        self.count += int(ranks.numel())

    def _add(self, name: str, per_user: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + per_user.sum().item()
        moment = name + SECOND_MOMENT
        self.sums[moment] = self.sums.get(moment, 0.0) + per_user.square().sum().item()

    def result(self) -> dict[str, float]:
        """Mean of each metric over the users seen, and of its square (`<name>:m2`, for standard errors of
        pooled results); empty dict when none."""
        if not self.count:
            return {}
        return {name: total / self.count for name, total in self.sums.items()}


def with_standard_errors(metrics: Mapping[str, float], users: float | None = None) -> dict[str, float]:
    """The means of `metrics`, each second moment (`<name>:m2`) replaced by the standard error of that mean
    over `users` users (`<name>:se`), plus `users` (default: the count `evaluate_*` put in `metrics`).

    Means and second moments pooled over sites by user-weighted averaging give the pooled users' standard
    error, so sites send both and the server calls this once on the aggregate.
    """
    users = float(metrics.get("users", 0.0)) if users is None else users
    out = {k: float(v) for k, v in metrics.items() if not k.endswith(SECOND_MOMENT)}
    for key, value in metrics.items():
        if key.endswith(SECOND_MOMENT) and users > 1:
            name = key[: -len(SECOND_MOMENT)]
            variance = max(float(value) - float(metrics[name]) ** 2, 0.0) * users / (users - 1)
            out[name + STANDARD_ERROR] = math.sqrt(variance / users)
    out["users"] = float(users)
    return out


def with_error(metrics: Mapping[str, float], key: str) -> str:
    """`0.0590 ± 0.0025` when the standard error of `key` is known, else the mean alone."""
    se = metrics.get(key + STANDARD_ERROR)
    return f"{metrics[key]:.4f}" + ("" if se is None else f" ± {se:.4f}")


def without_moments(metrics: Mapping[str, float]) -> dict[str, float]:
    """Just the means (and counts): for logs and tables."""
    return {k: v for k, v in metrics.items() if not k.endswith(SECOND_MOMENT)}


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target: items scoring strictly higher, plus half the ties (fair to constant
    scorers).  # scores (B, V), targets (B,) -> (B,)"""
    target_scores = scores.gather(1, targets.unsqueeze(1))  # (B, 1)
    if torch.isnan(scores).any():  # NaN compares false with everything: it would rank first and score HR 1
        bad = int(torch.isnan(scores).any(1).sum())
        raise ValueError(f"the scorer returned NaN scores for {bad} of {scores.shape[0]} users "
                         "(a diverged model with NaN weights?); refusing to rank them")
    higher = (scores > target_scores).sum(1)
    ties = (scores == target_scores).sum(1) - 1
    return higher + torch.div(ties, 2, rounding_mode="floor")


def mask_seen(scores: torch.Tensor, item_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Set already-seen items to -inf (except the target), for the history-masked protocol."""
    masked = scores.scatter(1, item_ids, float("-inf"))
    return masked.scatter(1, targets.unsqueeze(1), scores.gather(1, targets.unsqueeze(1)))


Scorer = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def by_length(seqs: UserSequences, users: np.ndarray) -> np.ndarray:
    """`users` fewest events first (so shortest input first, whatever the split): a batch is padded to its
    longest user, and every padded position costs a pass through the transformer (in random order most batches
    of 512 Beauty users held one of 50 events)."""
    return users[np.argsort(seqs.lengths()[users], kind="stable")]


def evaluate_scorer(scorer: Scorer, seqs: UserSequences, split: Split, max_len: int, batch_size: int = 512,
                    mask_history: bool = False, ks: Sequence[int] = DEFAULT_KS,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Rank each user's held-out item against the whole catalog with any batch -> (B, V) scorer."""
    metrics = RankingMetrics(ks=ks)
    order = by_length(seqs, np.arange(len(seqs)))
    for start in range(0, len(order), batch_size):
        users = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in make_batch(seqs, users, split, max_len).items()}
        scores = scorer(batch).float()  # (B, V)
        if mask_history:
            scores = mask_seen(scores, batch["item_ids"], batch["labels"])
        metrics.update(target_ranks(scores, batch["labels"]).cpu())
    return {**metrics.result(), "users": float(metrics.count)}


@torch.no_grad()
def evaluate_model(model: FedRecModel, seqs: UserSequences, split: Split, batch_size: int = 512,
                   mask_history: bool = False, device: torch.device | str = "cpu") -> dict[str, float]:
    """Full-ranking metrics of a model on the valid or test split."""
    was_training = model.training
    model.eval()

    def scorer(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.score_next(batch["item_ids"], batch["event_types"], batch["time_buckets"])

    try:
        return evaluate_scorer(scorer, seqs, split, model.config.max_len, batch_size, mask_history,
                               device=device)
    finally:
        model.train(was_training)


@torch.no_grad()
def training_loss(model: FedRecModel, seqs: UserSequences, batch_size: int = 256,
                  device: torch.device | str = "cpu") -> float:
    """Mean over users of each user's next-item cross-entropy on the training part, dropout off.

    How well the model fits the events it is trained on; a per-user mean, so user-weighted averaging over
    sites pools it exactly. (A site's own training loss is measured on its local model, with dropout on.)
    """
    was_training = model.training
    model.eval()
    users = by_length(seqs, seqs.trainable_users())
    total = 0.0
    try:
        for start in range(0, len(users), batch_size):
            batch = {k: v.to(device) for k, v in make_batch(seqs, users[start:start + batch_size], "train",
                                                             model.config.max_len).items()}
            total += sequence_loss(model, batch, per_user=True).sum().item()
    finally:
        model.train(was_training)
    return total / max(len(users), 1)


def evaluate_popularity(train_seqs: UserSequences, seqs: UserSequences, split: Split, num_rows: int,
                        max_len: int = 50, mask_history: bool = False) -> dict[str, float]:
    """The popularity baseline through the same ranking code: score = training-part count."""
    counts = torch.from_numpy(train_seqs.item_counts(num_rows)).double()
    counts[0] = float("-inf")

    def scorer(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return counts.unsqueeze(0).expand(batch["labels"].shape[0], -1)

    return evaluate_scorer(scorer, seqs, split, max_len, mask_history=mask_history)

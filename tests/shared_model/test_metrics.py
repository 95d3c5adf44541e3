"""Tests for full-catalog ranking metrics, history masking, and model / popularity evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared_model.configuration_fedrec import FedRecConfig
from shared_model.metrics import (
    SECOND_MOMENT,
    RankingMetrics,
    by_length,
    evaluate_model,
    evaluate_popularity,
    evaluate_scorer,
    mask_seen,
    target_ranks,
    training_loss,
    with_error,
    with_standard_errors,
    without_moments,
)
from shared_model.modeling_fedrec import FedRecModel, sequence_loss
from shared_model.sequences import UserSequences, make_batch

METRIC_KEYS = {"hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@5", "mrr@10", "mrr@20", "mrr"}
MOMENT_KEYS = {key + SECOND_MOMENT for key in METRIC_KEYS}


@pytest.fixture
def popularity_seqs() -> UserSequences:
    """Three users of four events over rows 1..5; training parts [1, 1], [1, 2], [2, 1] give counts 4, 2, 0, 0, 0.

    Test targets are 1, 2, 5; validation targets 2, 3, 4.
    """
    items = np.array([1, 1, 2, 1, 1, 2, 3, 2, 2, 1, 4, 5], dtype=np.int64)
    return UserSequences(user_ids=["u0", "u1", "u2"], offsets=np.array([0, 4, 8, 12]), items=items,
                         event_types=np.ones(12, dtype=np.int64), time_buckets=np.zeros(12, dtype=np.int64))


@pytest.fixture
def tiny_model() -> FedRecModel:
    """A seeded tiny model over the shared fixture's six items (dropout on, so train/eval mode matters)."""
    torch.manual_seed(0)
    return FedRecModel(FedRecConfig(num_items=6, hidden_size=32, num_hidden_layers=2, max_len=10))


def test_target_ranks_count_higher_scores_and_half_the_ties() -> None:
    scores = torch.tensor([
        [0.1, 0.5, 0.3, 0.5, 0.2],  # target 2: two items above
        [0.1, 0.5, 0.3, 0.5, 0.2],  # target 1: none above, one tie -> floor(1 / 2) = 0
        [0.0, 0.0, 0.0, 0.0, 0.0],  # constant scorer: four ties -> 2
        [0.9, 0.4, 0.4, 0.4, 0.1],  # target 1: one above, two ties -> 1 + 1
        [0.9, 0.8, 0.7, 0.6, 0.5],  # target 4: last of five
    ])
    targets = torch.tensor([2, 1, 3, 1, 4])
    ranks = target_ranks(scores, targets)
    assert ranks.tolist() == [2, 0, 2, 2, 4]
    assert ranks.dtype == torch.int64


def test_nan_scores_are_refused_not_ranked_first() -> None:
    # NaN compares false with everything: ranked naively it would count as a hit (HR@10 1, NDCG@10 inf).
    scores = torch.tensor([[0.1, 0.5, 0.3], [0.2, float("nan"), 0.1]])
    with pytest.raises(ValueError, match="NaN scores for 1 of 2 users"):
        target_ranks(scores, torch.tensor([1, 2]))


def test_target_ranks_below_minus_inf_padding() -> None:
    scores = torch.tensor([[float("-inf"), 1.0, 3.0, 2.0]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [2]  # the -inf padding row never outranks


def test_ranking_metrics_exact_values() -> None:
    metrics = RankingMetrics()
    metrics.update(torch.tensor([0, 1]))
    metrics.update(torch.tensor([7, 30]))
    result = metrics.result()
    assert set(result) == METRIC_KEYS | MOMENT_KEYS
    assert metrics.count == 4
    expected = {
        "hr@5": 2 / 4, "hr@10": 3 / 4, "hr@20": 3 / 4,
        "ndcg@5": (1 + 1 / math.log2(3)) / 4,
        "ndcg@10": (1 + 1 / math.log2(3) + 1 / math.log2(9)) / 4,
        "ndcg@20": (1 + 1 / math.log2(3) + 1 / math.log2(9)) / 4,
        "mrr@5": (1 + 1 / 2) / 4, "mrr@10": (1 + 1 / 2 + 1 / 8) / 4, "mrr@20": (1 + 1 / 2 + 1 / 8) / 4,
        "mrr": (1 + 1 / 2 + 1 / 8 + 1 / 31) / 4,
    }
    assert without_moments(result) == pytest.approx(expected)
    assert result["hr@10:m2"] == pytest.approx(3 / 4)  # a hit squared is a hit
    assert result["ndcg@10:m2"] == pytest.approx((1 + 1 / math.log2(3) ** 2 + 1 / math.log2(9) ** 2) / 4)


@pytest.mark.parametrize(("rank", "ndcg", "mrr"), [(0, 1.0, 1.0), (1, 1 / math.log2(3), 0.5),
                                                   (4, 1 / math.log2(6), 0.2)])
def test_single_rank_values(rank: int, ndcg: float, mrr: float) -> None:
    metrics = RankingMetrics(ks=(5,))
    metrics.update(torch.tensor([rank]))
    assert without_moments(metrics.result()) == pytest.approx({"hr@5": 1.0, "ndcg@5": ndcg, "mrr@5": mrr, "mrr": mrr})


def test_rank_at_k_is_a_miss() -> None:
    metrics = RankingMetrics(ks=(5,))
    metrics.update(torch.tensor([5]))
    assert without_moments(metrics.result()) == pytest.approx({"hr@5": 0.0, "ndcg@5": 0.0, "mrr@5": 0.0, "mrr": 1 / 6})


def test_ranking_metrics_without_users_is_empty() -> None:
    assert RankingMetrics().result() == {}


def test_standard_errors_are_those_of_the_per_user_values() -> None:
    ranks = torch.tensor([0, 3, 12, 40, 7, 1, 25])
    metrics = RankingMetrics()
    metrics.update(ranks)
    result = with_standard_errors(metrics.result(), metrics.count)
    hits = (ranks < 10).double().numpy()
    ndcg = hits / np.log2(ranks.double().numpy() + 2.0)
    assert result["hr@10:se"] == pytest.approx(hits.std(ddof=1) / math.sqrt(7))
    assert result["ndcg@10:se"] == pytest.approx(ndcg.std(ddof=1) / math.sqrt(7))
    assert result["users"] == 7.0 and not any(k.endswith(SECOND_MOMENT) for k in result)
    assert with_error(result, "hr@10") == f"{hits.mean():.4f} ± {hits.std(ddof=1) / math.sqrt(7):.4f}"
    assert with_error({"hr@10": 0.5}, "hr@10") == "0.5000"


def test_sites_pooled_by_user_weighted_means_give_the_pooled_standard_error() -> None:
    # What the server does with the sites' replies: average means and second moments by users.
    site_ranks = [torch.tensor([0, 3, 12]), torch.tensor([40, 7, 1, 25, 9])]
    everyone, sites = RankingMetrics(), []
    for ranks in site_ranks:
        site = RankingMetrics()
        site.update(ranks)
        everyone.update(ranks)
        sites.append((site.result(), site.count))
    pooled = {key: sum(r[key] * n for r, n in sites) / 8 for key in sites[0][0]}
    assert with_standard_errors(pooled, 8) == pytest.approx(with_standard_errors(everyone.result(), 8))


def test_mask_seen_hides_history_but_keeps_the_target() -> None:
    scores = torch.arange(6, dtype=torch.float32).unsqueeze(0).repeat(2, 1)  # (2, 6)
    history = torch.tensor([[0, 2, 3], [0, 0, 5]])
    masked = mask_seen(scores, history, torch.tensor([3, 1]))
    inf = float("-inf")
    assert masked.tolist() == [[inf, 1.0, inf, 3.0, 4.0, 5.0], [inf, 1.0, 2.0, 3.0, 4.0, inf]]
    assert scores.tolist()[0] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # input left untouched


def test_evaluate_scorer_with_an_oracle_and_batches(popularity_seqs: UserSequences) -> None:
    def oracle(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.one_hot(batch["labels"], 6).float()  # (B, V)

    for batch_size in (1, 2, 512):
        result = evaluate_scorer(oracle, popularity_seqs, "test", max_len=10, batch_size=batch_size)
        assert without_moments(result) == {**dict.fromkeys(METRIC_KEYS, 1.0), "users": 3.0}


def test_evaluate_popularity_toy_case(popularity_seqs: UserSequences) -> None:
    # Scores [-inf, 4, 2, 0, 0, 0]; test targets 1, 2, 5 -> ranks 0, 1 and 2 + floor(2 ties / 2) = 3.
    result = evaluate_popularity(popularity_seqs, popularity_seqs, "test", num_rows=6)
    assert without_moments(result) == pytest.approx({
        "hr@5": 1.0, "hr@10": 1.0, "hr@20": 1.0,
        "ndcg@5": (1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3,
        "ndcg@10": (1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3,
        "ndcg@20": (1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3,
        "mrr@5": (1 + 1 / 2 + 1 / 4) / 3, "mrr@10": (1 + 1 / 2 + 1 / 4) / 3, "mrr@20": (1 + 1 / 2 + 1 / 4) / 3,
        "mrr": (1 + 1 / 2 + 1 / 4) / 3, "users": 3.0})


def test_evaluate_popularity_valid_split(popularity_seqs: UserSequences) -> None:
    # Validation targets 2, 3, 4 -> ranks 1, 3, 3.
    result = evaluate_popularity(popularity_seqs, popularity_seqs, "valid", num_rows=6)
    assert result["mrr"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 4) / 3)
    assert result["hr@5"] == 1.0


def test_evaluate_popularity_with_history_masking(popularity_seqs: UserSequences) -> None:
    # Masking each user's inputs leaves every target on top (u0's target 1 is in its history yet kept).
    result = evaluate_popularity(popularity_seqs, popularity_seqs, "test", num_rows=6, mask_history=True)
    assert without_moments(result) == {**dict.fromkeys(METRIC_KEYS, 1.0), "users": 3.0}


def test_evaluate_model_keys_ranges_and_users(tiny_model: FedRecModel, tiny_sequences: UserSequences) -> None:
    for split in ("valid", "test"):
        result = evaluate_model(tiny_model, tiny_sequences, split)
        assert set(result) == METRIC_KEYS | MOMENT_KEYS | {"users"}
        assert result["users"] == 2.0
        assert all(0.0 <= result[key] <= 1.0 for key in METRIC_KEYS)
        assert result["hr@5"] <= result["hr@10"] <= result["hr@20"] == 1.0  # only 6 items: always in the top 20


@pytest.mark.parametrize("batch_size", [1, 256])
def test_training_loss_is_the_mean_over_users_of_their_own_loss_without_dropout(
        tiny_model: FedRecModel, tiny_sequences: UserSequences, batch_size: int) -> None:
    tiny_model.train()
    users = tiny_sequences.trainable_users()
    with torch.no_grad():
        tiny_model.eval()
        batch = make_batch(tiny_sequences, users, "train", tiny_model.config.max_len)
        expected = sequence_loss(tiny_model, batch, per_user=True).mean().item()
        tiny_model.train()
    assert training_loss(tiny_model, tiny_sequences, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    assert tiny_model.training  # mode restored


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_model_restores_the_mode_and_runs_in_eval_mode(tiny_model: FedRecModel,
                                                                tiny_sequences: UserSequences,
                                                                training: bool) -> None:
    tiny_model.train(training)
    first = evaluate_model(tiny_model, tiny_sequences, "test", batch_size=1)
    assert tiny_model.training is training
    assert all(module.training is training for module in tiny_model.modules())
    # Dropout is off during evaluation, so a second run (and any batch size) gives the same numbers.
    assert evaluate_model(tiny_model, tiny_sequences, "test") == pytest.approx(first)
    assert not any(p.grad is not None for p in tiny_model.parameters())


def test_evaluation_batches_users_shortest_first_and_scores_each_as_alone() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 12, size=20)
    items = rng.integers(1, 7, size=int(lengths.sum()))
    seqs = UserSequences(user_ids=[f"u{i}" for i in range(20)], offsets=np.concatenate([[0], np.cumsum(lengths)]),
                         items=items, event_types=np.ones(len(items), dtype=np.int64),
                         time_buckets=np.zeros(len(items), dtype=np.int64))
    order = by_length(seqs, np.arange(20))
    assert sorted(order.tolist()) == list(range(20))
    assert np.all(np.diff(lengths[order]) >= 0)
    torch.manual_seed(0)
    model = FedRecModel(FedRecConfig(num_items=6, hidden_size=16, max_len=10))
    one_at_a_time = evaluate_model(model, seqs, "test", batch_size=1)
    batched = evaluate_model(model, seqs, "test", batch_size=8)  # batches of users padded alike
    assert batched.keys() == one_at_a_time.keys()
    assert all(batched[k] == pytest.approx(one_at_a_time[k], abs=1e-9) for k in batched)

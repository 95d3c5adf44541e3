"""The round record: what the server writes for each completed round, one JSON object per round in the run
directory's metrics.jsonl (the report, fedrec-server's progress line and fedrec-compare read it). The strategy
fills a RoundRecord as the round goes (fl_server.strategy), the server adds what the run knows
(fl_server.server_app). Each field's comment is its meaning: docs/configuration.md prints them, and a test
checks that every field has one and that a real run's records carry no other key."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class RoundRecord:
    """One round. A field left at None does not apply to the round and is not written."""

    # the round's number, counted across resumes (0: an exported starting model, scored before training, or a
    # popularity release)
    round: int = 0
    # seconds since the ServerApp started (fedrec-server's own start-up before it submits the run not included)
    seconds: float | None = None
    starting_model: bool | None = None  # true on round 0, the exported model training started from
    lr: float | None = None  # the sites' learning rate this round (after any step decay)
    server_lr: float | None = None  # the server step this round (FedAvgM, FedAdam, FedYogi; after any step decay)
    train_replies: int | None = None  # sites that answered the train message (trained, declined or failed)
    train_failures: int | None = None  # sites that answered with an error
    train_failure_reasons: list[str] | None = None  # each failed site's error
    train_no_reply: int | None = None  # sites asked to train that sent nothing within the round timeout
    declined: int | None = None  # sites that declined (their budget would be exceeded)
    declined_reasons: list[str] | None = None  # each declining site's reason
    dropped: int | None = None  # replies dropped before aggregation by the server's checks (fl_server.reply_checks)
    dropped_reasons: list[str] | None = None  # why each was dropped
    # why the round left the global model unchanged (too few usable replies, non-finite aggregate)
    unusable: str | None = None
    # the norm bound's figures: median update norm, bound (null: unbounded), pull bound (users x norm that lets a
    # longer update in; null: none this round) and largest norm accepted (with secure aggregation every reply
    # carries the secure average: these are its norm, not any site's)
    update_norms: dict[str, float | None] | None = None
    # the largest train message sent to a site (bytes; with secure aggregation including the sealed shares)
    bytes_to_each_site: int | None = None
    # the largest train reply received (bytes; with secure aggregation the masked update as sent)
    bytes_from_each_site: int | None = None
    # sites sent the frozen public tensors this round (each until it says it keeps them)
    frozen_sent_to: int | None = None
    # the sites' privacy reports: sites, sites_with_dp, sites_without_dp, epsilon_max, epsilon_mean, delta_max
    # (ε cumulative at each site over all its rounds)
    privacy: dict[str, Any] | None = None
    # distributed DP's sample_rate q, noise_multiplier σ, max_grad_norm C and colluders t; with secure aggregation
    # also sum_noise_multiplier, the noise the round's sum carried in units of C: each of the m sites summed added
    # σ/√(n − t), n the fewest sites a secure sum can be unmasked over (secure_aggregation's fewest_summed), so
    # σ·√((m − t)/(n − t)): σ when m = n, more (a less accurate step than central DP-SGD's) when m > n
    distributed_dp: dict[str, float] | None = None
    # round 0 of a training with strategy.dp_popularity_noise: the release's noise_multiplier σ_p, the sites and
    # users it summed, and rows_above_floor (items whose released count passed one user's weight)
    popularity_release: dict[str, float] | None = None
    # the slowest and mean site training time (s) and the largest peak memory (MB)
    site_cost: dict[str, float] | None = None
    train: dict[str, float] | None = None  # the sites' training metrics, weighted by users (train-loss, ...)
    # strategy.item_rows: its mode, the sites whose rows were weighted, the sites left out and why
    item_rows: dict[str, Any] | None = None
    # share_optimizer_state: sites whose Adam moments were averaged, and their step
    shared_moments: dict[str, float] | None = None
    # the secure sum of the updates: sites summed, dropped after sharing, fewest_summed (the fewest sites a sum of
    # this round could have been unmasked over: the shares one site's masks need on the complete graph, more on a
    # SecAgg+ ring), clipped coordinates, and
    # protocol_bytes_max: the largest site's bytes in the key, share and unmask exchanges, both directions (the train
    # message and the masked reply are bytes_to_each_site and bytes_from_each_site); empty when the sum could not be
    # recovered
    secure_aggregation: dict[str, int] | None = None
    # the secure sum of the evaluation figures: sites summed and its bookkeeping
    secure_evaluation: dict[str, int] | None = None
    evaluate_failures: int | None = None  # sites whose evaluation failed
    evaluate_failure_reasons: list[str] | None = None  # each one's error
    # evaluations left out of the pooled scores (malformed, non-finite, out of range)
    evaluate_dropped: int | None = None
    evaluate_dropped_reasons: list[str] | None = None  # why each was left out
    evaluate_no_reply: int | None = None  # sites asked to evaluate that sent nothing within the round timeout
    # the global model scored by the sites on their own users: means, standard errors (:se), users, validation
    # NDCG@10 and the training cross-entropy (train-ce)
    federated_eval: dict[str, float] | None = None
    # the global model scored by the server on its own events (same keys; empty when not evaluated)
    central_eval: dict[str, float] | None = None

    def row(self) -> dict[str, Any]:
        """The JSON object of metrics.jsonl: every field that applies (not None), in the order above."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def undocumented(row: dict[str, Any]) -> list[str]:
    """The keys of a metrics.jsonl row that RoundRecord does not declare (and so does not document)."""
    return sorted(set(row) - {f.name for f in fields(RoundRecord)})

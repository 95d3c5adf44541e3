"""The round record: one JSON object per completed round in the run directory's metrics.jsonl (the report,
fedrec-server's progress line and fedrec-compare read it). Every key a round may carry is listed here with its
meaning; docs/configuration.md prints this table and a test checks a real run's records against it."""

from __future__ import annotations

from typing import Any

ROUND_RECORD: dict[str, str] = {
    "round": "the round's number, counted across resumes (0: an exported starting model, scored before training)",
    "seconds": "seconds since this server start when the round was recorded",
    "starting_model": "true on round 0, the exported model training started from",
    "lr": "the sites' learning rate this round (after any step decay)",
    "server_lr": "the server step this round (FedAvgM, FedAdam, FedYogi; after any step decay)",
    "train_replies": "sites that answered the train message (trained, declined or failed)",
    "train_failures": "sites that answered with an error",
    "train_failure_reasons": "each failed site's error",
    "train_no_reply": "sites asked to train that sent nothing within the round timeout",
    "declined": "sites that declined (their budget would be exceeded)",
    "declined_reasons": "each declining site's reason",
    "dropped": "replies dropped before aggregation by the server's checks (fl_server.reply_checks)",
    "dropped_reasons": "why each was dropped",
    "unusable": "why the round left the global model unchanged (too few usable replies, non-finite aggregate)",
    "update_norms": "the norm bound's figures: median update norm, bound and largest norm accepted",
    "bytes_to_each_site": "the largest train message sent to a site (bytes)",
    "bytes_from_each_site": "the largest train reply received (bytes)",
    "frozen_sent_to": "sites sent the frozen public tensors this round (each until it says it keeps them)",
    "privacy": "the sites' privacy reports: sites, sites_with_dp, sites_without_dp, epsilon_max, epsilon_mean, "
               "delta_max (ε cumulative at each site over all its rounds)",
    "distributed_dp": "distributed DP's sample_rate q, noise_multiplier σ, max_grad_norm C and colluders t",
    "site_cost": "the slowest and mean site training time (s) and the largest peak memory (MB)",
    "train": "the sites' training metrics, weighted by users (train-loss, ...)",
    "item_rows": "strategy.item_rows: its mode, the sites whose rows were weighted, the sites left out and why",
    "shared_moments": "share_optimizer_state: sites whose Adam moments were averaged, and their step",
    "secure_aggregation": "the secure sum of the updates: sites summed, dropped after sharing, clipped coordinates, "
                          "the largest protocol message (bytes); empty when the sum could not be recovered",
    "secure_evaluation": "the secure sum of the evaluation figures: sites summed and its bookkeeping",
    "evaluate_failures": "sites whose evaluation failed",
    "evaluate_failure_reasons": "each one's error",
    "evaluate_dropped": "evaluations left out of the pooled scores (malformed, non-finite, out of range)",
    "evaluate_dropped_reasons": "why each was left out",
    "evaluate_no_reply": "sites asked to evaluate that sent nothing within the round timeout",
    "federated_eval": "the global model scored by the sites on their own users: means, standard errors (:se), "
                      "users, validation NDCG@10 and the training cross-entropy (train-ce)",
    "central_eval": "the global model scored by the server on its own events (same keys; empty when not evaluated)",
}


def undocumented(record: dict[str, Any]) -> list[str]:
    """The keys of a round record that ROUND_RECORD does not describe."""
    return sorted(set(record) - set(ROUND_RECORD))

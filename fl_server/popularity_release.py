"""Round 0 of a distributed-DP training with `strategy.dp_popularity_noise`: the sites release item popularity
once (fl_client.dp.popularity: each user's training-part item counts at unit L2 norm, Gaussian noise σ_p on the
sum, each site adding its share under secure aggregation), and the global item bias starts at the log of the
released counts. Each site's ledger records the release as (σ_p, 1, 1) before the DP-SGD rounds.

The sites answer a train message whose config carries wire.DDP_POPULARITY, through the same grid as the rounds
(secure aggregation included); the replies pass the strategy's reply checks (not its norm bound), and the
summed counts set the bias directly (never through the server optimiser's step): under secure aggregation from
the one secure average, without it from each site's counts, clipped to what its users could add.
The release is checkpointed as round 0 (its row has `popularity_release`), so a resumed training never asks
for it again; a site asked again (the server stopped before that checkpoint) answers from its kept reply.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fl_server.config import ServerConfig
from fl_server.replies import failure, reply_metrics
from fl_server.round_record import RoundRecord
from fl_server.secure_round import SecureAggregationGrid
from fl_server.strategy import RoundsFailedError
from shared_model import wire
from shared_model.modeling_fedrec import POPULARITY_FLOOR, FedRecModel

log = logging.getLogger(__name__)
BIAS = "output.bias"
NOISE_MARGIN = 6.0  # standard deviations of a site's noise beyond its users' counts before its share is clipped
UNTOUCHED = ("accepted_norms", "declared_users", "norm_bound_factor", "max_update_norm")


def check_release(cfg: ServerConfig) -> None:
    """ValueError for a release the run cannot make: it needs distributed DP, a positive σ_p and an item bias."""
    noise = cfg.strategy.dp_popularity_noise
    if noise and not (noise > 0 and cfg.strategy.distributed_dp):
        raise ValueError(f"strategy.dp_popularity_noise={noise}: a popularity release needs strategy.distributed_dp "
                         "and a positive σ (0 = no release)")
    if noise and not cfg.model.item_bias:
        raise ValueError("strategy.dp_popularity_noise starts the item bias: set model.item_bias=true")
    if noise and cfg.initial_model:
        raise ValueError("strategy.dp_popularity_noise starts the item bias of a new model; the starting model "
                         f"{cfg.initial_model} has a trained one (drop the release, or start afresh)")


def summed_counts(grid: Any, shares: list, users: int, start: torch.Tensor, noise: float) -> torch.Tensor:
    """The released counts summed over the sites. Under secure aggregation every reply carries the one secure
    average (each site bounded by strategy.secagg_clip). Without it each site's counts, (its bias - the global
    one) × its users, are clipped to what its k users could add to an item, [0, k], widened by NOISE_MARGIN σ_p
    for its noise: a site that lies moves an item's count by no more than an honest site of its size could."""
    def bias(msg: Any) -> torch.Tensor:
        return torch.from_numpy(msg.content.array_records[wire.ARRAYS][BIAS].numpy()).double()

    if isinstance(grid, SecureAggregationGrid):
        return (bias(shares[0]) - start) * users  # the secure average over all `users`
    margin = NOISE_MARGIN * noise
    total = torch.zeros_like(start)
    for msg in shares:
        site_users = int(reply_metrics(msg)[wire.NUM_EXAMPLES])
        total += ((bias(msg) - start) * site_users).clamp(min=-margin, max=site_users + margin)
    return total


def release_popularity(grid: Any, strategy: Any, model: FedRecModel, trainable: dict[str, torch.Tensor],
                       config: ConfigRecord, cfg: ServerConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Ask every site the strategy samples for its share of the release, set the global item bias from the
    sum; the new trainable weights and the release's figures (strategy.last_round holds the round's record).
    RoundsFailedError when fewer than strategy.min_nodes sites sent a usable share (their spending is in their
    ledgers; nothing is trained)."""
    noise = cfg.strategy.dp_popularity_noise
    release = ConfigRecord({**dict(config), wire.DDP_POPULARITY: noise})
    start = ArrayRecord(trainable)
    # The norm bound judges training updates against each other: a share's norm is its noise over its users, so
    # an honest small site's share would look like an attack. Each share is bounded by what its users could
    # have contributed instead (below); the rounds' norm history and declared users are left as they were.
    kept = {name: getattr(strategy, name) for name in UNTOUCHED}
    strategy.norm_bound_factor, strategy.max_update_norm, strategy.accepted_norms = 0.0, 0.0, []
    messages = list(strategy.configure_train(0, start, release, grid))
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    failures = [reason for m in replies if (reason := failure(m))]
    strategy.last_round = RoundRecord(round=0, train_replies=len(replies), train_failures=len(failures),
                                      bytes_to_each_site=strategy.bytes_sent)
    strategy.count_silent("train", 0, len(replies))
    shares, dropped = strategy.usable_replies([m for m in replies if not failure(m)], failures)
    for name, value in kept.items():  # a release's norms and user counts are not a training round's
        setattr(strategy, name, value)
    if len(shares) < strategy.min_train_nodes:
        raise RoundsFailedError(f"the popularity release (round 0) got {len(shares)} usable shares ({len(dropped)} "
                                f"dropped, {len(failures)} failed), fewer than strategy.min_nodes="
                                f"{strategy.min_train_nodes}: {'; '.join((failures + dropped)[:3])}")
    users = sum(int(reply_metrics(m)[wire.NUM_EXAMPLES]) for m in shares)
    counts = summed_counts(grid, shares, users, trainable[BIAS].double(), noise)
    if not bool(counts.isfinite().all()):
        raise RoundsFailedError("the popularity release (round 0): the summed counts are not finite")
    model.start_item_bias(counts)
    figures = {"noise_multiplier": noise, "sites": len(shares), "users": users,
               "rows_above_floor": int((counts[1:] > POPULARITY_FLOOR).sum())}  # row 0 is padding
    log.info("popularity release: %d sites, %d users, σ_p = %g; the item bias starts at the log of the released "
             "counts (%d of %d rows above %g)", len(shares), users, noise, figures["rows_above_floor"],
             counts.numel(), POPULARITY_FLOOR)
    return {**trainable, BIAS: model.output.bias.detach().clone()}, figures

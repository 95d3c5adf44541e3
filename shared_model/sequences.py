"""One time-ordered sequence per user, the leave-one-out split, and padded batches for the model.

One row per user is what makes Opacus' per-sample guarantee a per-user guarantee: keep it that way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from shared_model.catalog import PADDING_ROW, ItemCatalog
from shared_model.event_log import EVENT_TYPE_CODES, EventLog, LoadReport

if TYPE_CHECKING:  # imported where a batch is made (make_batch): a site's protocol stages import no torch
    import torch

Split = Literal["train", "valid", "test", "next"]  # next: the whole history, for the item after it (no target)
MIN_EVENTS = 3  # leave-one-out needs one training target, one validation and one test event
FIRST_EVENT_BUCKET = 1  # time bucket of a user's first event; 0 is padding / no timestamps


@dataclass
class UserSequences:
    """Per-user event sequences stored flat (CSR): user u owns positions offsets[u]:offsets[u+1]."""

    user_ids: list[str]
    offsets: np.ndarray  # (U+1,)
    items: np.ndarray  # (E,) catalog rows
    event_types: np.ndarray  # (E,) EVENT_TYPE_CODES
    time_buckets: np.ndarray  # (E,) 0 when the log has no timestamps
    regions: list[str] = field(default_factory=list)
    merchants: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user_ids)

    def nbytes(self) -> int:
        """The bytes of its event arrays."""
        return sum(a.nbytes for a in (self.offsets, self.items, self.event_types, self.time_buckets))

    def lengths(self) -> np.ndarray:
        """Events per user."""
        return np.diff(self.offsets)

    def subset(self, users: np.ndarray | list[int]) -> UserSequences:
        """A new UserSequences with only the given user indices (e.g. one client's partition)."""
        users = np.asarray(users, dtype=np.int64)
        parts = [np.arange(self.offsets[u], self.offsets[u + 1]) for u in users]
        pos = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        lengths = self.lengths()[users]
        return UserSequences(
            user_ids=[self.user_ids[u] for u in users],
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            items=self.items[pos], event_types=self.event_types[pos], time_buckets=self.time_buckets[pos],
            regions=[self.regions[u] for u in users] if self.regions else [],
            merchants=[self.merchants[u] for u in users] if self.merchants else [])

    def window(self, user: int, split: Split) -> tuple[slice, int | None]:
        """Input slice of the flat arrays and the target row for one user and split (None for train)."""
        start, end = int(self.offsets[user]), int(self.offsets[user + 1])
        if split == "train":  # inputs e_1..e_{n-3}, targets e_2..e_{n-2}
            return slice(start, end - 3), None
        if split == "valid":
            return slice(start, end - 2), int(self.items[end - 2])
        if split == "next":
            return slice(start, end), None
        return slice(start, end - 1), int(self.items[end - 1])

    def trainable_users(self) -> np.ndarray:
        """Users with at least one training target (4+ events): the rows a training epoch samples."""
        return np.flatnonzero(self.lengths() >= MIN_EVENTS + 1)

    def item_counts(self, num_rows: int) -> np.ndarray:
        """How often each catalog row occurs in the training part of the sequences (popularity)."""
        counts = np.zeros(num_rows, dtype=np.int64)
        for u in range(len(self)):
            start, end = int(self.offsets[u]), int(self.offsets[u + 1])
            np.add.at(counts, self.items[start:end - 2], 1)
        return counts


def gap_buckets(timestamps: np.ndarray, starts: np.ndarray, num_buckets: int) -> np.ndarray:
    """Log2-minute buckets of the gap to the previous event of the same user (first event -> 1)."""
    gaps = np.diff(timestamps, prepend=timestamps[:1]).clip(min=0) / 60.0
    buckets = 2 + np.floor(np.log2(1.0 + gaps)).astype(np.int64)
    buckets = np.minimum(buckets, num_buckets - 1)
    buckets[starts] = FIRST_EVENT_BUCKET
    return buckets


def _most_common(values: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The most frequent value in each user's slice (ties: first seen), for natural partitions."""
    return [Counter(values[offsets[u]:offsets[u + 1]].tolist()).most_common(1)[0][0]
            for u in range(len(offsets) - 1)]


def to_user_sequences(log: EventLog, catalog: ItemCatalog, num_time_buckets: int = 32,
                      min_events: int = MIN_EVENTS) -> UserSequences:
    """Map events through the catalog and group them into one time-ordered sequence per user.

    Events of unknown items and of users with fewer than `min_events` events are dropped; the returned
    `dropped` dict counts them next to the load report's own drops (the log itself is not changed).
    """
    frame = log.frame
    report = LoadReport(source=log.report.source, rows_read=log.report.rows_read, dropped=dict(log.report.dropped))
    rows = catalog.rows(frame["item_id"])
    known = rows != PADDING_ROW
    report.drop("unknown item", int((~known).sum()))
    frame, rows = frame.loc[known], rows[known]
    sizes = frame.groupby("user_id", sort=False).size()
    keep_users = sizes.index[sizes >= min_events]
    short = frame["user_id"].isin(keep_users).to_numpy()
    report.drop(f"user with < {min_events} events", int((~short).sum()))
    frame, rows = frame.loc[short], rows[short]
    user_ids = frame["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]]) if len(frame) else np.zeros(0, int)
    offsets = np.r_[starts, len(frame)].astype(np.int64)
    if log.has_timestamps and len(frame):
        buckets = gap_buckets(frame["timestamp"].to_numpy(np.int64), starts, num_time_buckets)
    else:
        buckets = np.zeros(len(frame), dtype=np.int64)
    return UserSequences(
        user_ids=[str(u) for u in user_ids[starts]], offsets=offsets, items=rows.astype(np.int64),
        event_types=frame["event_type"].map(EVENT_TYPE_CODES).to_numpy(np.int64), time_buckets=buckets,
        regions=_most_common(frame["region"].to_numpy(str), offsets) if "region" in frame else [],
        merchants=_most_common(frame["merchant_id"].to_numpy(str), offsets) if "merchant_id" in frame else [],
        dropped=report.dropped)


def make_batch(seqs: UserSequences, users: np.ndarray | list[int], split: Split,
               max_len: int) -> dict[str, torch.Tensor]:
    """Left-padded tensors for a batch of users, padded to the longest input in the batch.

    Train batches carry `labels` (B, T): the next item at every position (0 = ignore).
    Eval batches carry `labels` (B,): the held-out item. "next" batches (whole histories) carry none.
    """
    windows = [seqs.window(int(u), split) for u in users]
    lengths = [min(max_len, w.stop - w.start) for w, _ in windows]
    width = max(lengths, default=1) or 1
    batch = {name: np.zeros((len(windows), width), dtype=np.int64)
             for name in ("item_ids", "event_types", "time_buckets")}
    train_labels = np.zeros((len(windows), width), dtype=np.int64)
    for b, ((window, _), length) in enumerate(zip(windows, lengths, strict=True)):
        if length == 0:
            continue
        src = slice(window.stop - length, window.stop)
        batch["item_ids"][b, -length:] = seqs.items[src]
        batch["event_types"][b, -length:] = seqs.event_types[src]
        batch["time_buckets"][b, -length:] = seqs.time_buckets[src]
        if split == "train":
            train_labels[b, -length:] = seqs.items[src.start + 1:src.stop + 1]
    import torch  # not at the top: a site's secure-aggregation messages load the sequences, not torch

    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    if split == "train":
        tensors["labels"] = torch.from_numpy(train_labels)
    elif split != "next":
        tensors["labels"] = torch.tensor([t for _, t in windows], dtype=torch.int64)
    return tensors


PADDING_SLACK = 64  # padded positions a user may add to a micro-batch (a new one costs a pass of small matmuls)
# the most scores one micro-batch may hold (positions × catalog rows): 1 GiB of float32, and as much again for
# their gradient; 256 positions at a million items, no limit below Beauty's 12,102 items at 8,192 positions
MAX_SCORES = 2**28


def micro_batch_positions(max_tokens: int, scores_per_position: int) -> int:
    """`max_tokens` (train.micro_batch_tokens), lowered where a micro-batch's scores (positions ×
    `scores_per_position`: the catalog's rows, or 1 + the sampled negatives) would exceed MAX_SCORES."""
    return max(1, min(max_tokens, MAX_SCORES // max(1, scores_per_position)))


def sampled_softmax_users(negatives: int, hidden_size: int) -> int:
    """Users a micro-batch of a sampled softmax may hold: each gathers the (negatives × hidden_size) rows of the
    item table its negatives name (and under DP their gradients), which stay within MAX_SCORES numbers."""
    return max(1, MAX_SCORES // max(1, negatives * hidden_size))


def length_chunks(seqs: UserSequences, users: list[int], max_len: int, max_tokens: int,
                  max_users: int = 1 << 30) -> list[list[int]]:
    """Split a batch into micro-batches of similar length: at most `max_tokens` padded positions and
    `max_users` users each (per-user gradients of the item table cost users x items x d memory), and a user
    joins the micro-batch before it only if that pads its users by at most PADDING_SLACK positions in all.

    Every position costs a pass through the transformer (and under DP a row of scores over the whole
    catalog), padding included: the 128 longest of 256 Beauty users padded to one micro-batch were four times
    as many positions as they hold. Under DP this changes nothing about privacy (the Poisson-sampled batch is
    the same set of users, each clipped on its own); without DP the micro-batches' gradients add up to the
    batch's.
    """
    spans = {u: seqs.window(u, "train")[0] for u in users}
    lengths = {u: min(max_len, max(1, span.stop - span.start)) for u, span in spans.items()}
    chunks: list[list[int]] = []
    width = 0  # the longest length in the last micro-batch
    for user in sorted(users, key=lambda u: lengths[u]):
        length = lengths[user]
        if (chunks and len(chunks[-1]) < max_users and (len(chunks[-1]) + 1) * length <= max_tokens
                and len(chunks[-1]) * (length - width) <= PADDING_SLACK):
            chunks[-1].append(user)
        else:
            chunks.append([user])
        width = length
    return chunks

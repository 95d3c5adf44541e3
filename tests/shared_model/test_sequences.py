"""Tests for per-user sequences, time-gap buckets, the leave-one-out split and padded batches.

The shared `tiny_sequences` fixture (tests/conftest.py) holds, in time order,
u1 -> rows [1, 2, 3, 4, 5] (a b c d e), u2 -> rows [3, 1, 2] (c a b); u3 (2 events) and item "zzz" are dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from shared_model.catalog import ItemCatalog
from shared_model.events import EVENT_TYPE_CODES, LoadReport, finish_events, load_events
from shared_model.sequences import Split, UserSequences, gap_buckets, make_batch, to_user_sequences

VIEW, FAV, CART, BUY = (EVENT_TYPE_CODES[name] for name in ("view", "favourite", "cart", "purchase"))


def _assert_batch(batch: dict[str, torch.Tensor], expected: dict[str, list]) -> None:
    """Every tensor equals its expected nested list, exactly, as int64."""
    assert set(batch) == set(expected)
    for name, values in expected.items():
        assert batch[name].dtype == torch.int64, name
        assert batch[name].tolist() == values, name


def test_one_time_ordered_row_per_user(tiny_sequences: UserSequences) -> None:
    seqs = tiny_sequences
    assert len(seqs) == 2
    assert seqs.user_ids == ["u1", "u2"]
    assert seqs.offsets.tolist() == [0, 5, 8]
    assert seqs.lengths().tolist() == [5, 3]
    assert seqs.items.tolist() == [1, 2, 3, 4, 5, 3, 1, 2]
    assert seqs.event_types.tolist() == [VIEW, CART, BUY, VIEW, FAV, VIEW, VIEW, BUY]
    # u1 gaps: first, 1 min, 3 min (the dropped "zzz" event in between is skipped), 7 min, ~1e6 min (capped)
    assert seqs.time_buckets.tolist() == [1, 3, 4, 5, 7, 1, 2, 3]
    assert seqs.regions == ["north", "east"]
    assert seqs.merchants == []


def test_unknown_items_and_short_users_are_dropped_and_counted(tiny_events_csv: Path,
                                                                tiny_catalog: ItemCatalog) -> None:
    log = load_events(tiny_events_csv)
    seqs = to_user_sequences(log, tiny_catalog)
    expected = {"unknown item": 1, "user with < 3 events": 2}  # counted in events (rows), not users
    assert seqs.dropped == expected
    assert log.report.dropped == {}  # the log is not changed, so building sequences twice counts once
    assert to_user_sequences(log, tiny_catalog).dropped == expected
    assert (log.report.rows_read, log.report.rows_kept) == (11, 11)
    assert len(seqs.items) == 11 - sum(seqs.dropped.values())  # nothing lost without a count


def test_min_events_is_configurable(tiny_events_csv: Path, tiny_catalog: ItemCatalog) -> None:
    seqs = to_user_sequences(load_events(tiny_events_csv), tiny_catalog, min_events=2)
    assert seqs.user_ids == ["u1", "u2", "u3"]
    assert seqs.items[seqs.offsets[2]:].tolist() == [6, 6]


def test_no_timestamps_means_zero_time_buckets(tiny_events_csv: Path, tiny_catalog: ItemCatalog) -> None:
    frame = load_events(tiny_events_csv).frame
    log = finish_events(frame, LoadReport(source="positions"), has_timestamps=False)
    seqs = to_user_sequences(log, tiny_catalog)
    assert seqs.items.tolist() == [1, 2, 3, 4, 5, 3, 1, 2]
    assert seqs.time_buckets.tolist() == [0] * 8


def test_empty_result_when_every_user_is_too_short(tiny_catalog: ItemCatalog) -> None:
    frame = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": [1, 2],
                          "event_type": ["view", "view"]})
    seqs = to_user_sequences(finish_events(frame, LoadReport(source="x", rows_read=2)), tiny_catalog)
    assert (len(seqs), seqs.offsets.tolist(), seqs.items.tolist()) == (0, [0], [])
    assert seqs.dropped == {"user with < 3 events": 2}


def test_gap_buckets_values() -> None:
    minute = 60
    # user A: first, +0 s, +1 min, +3 min, +7 min, +15 min, +1e9 s; user B starts at index 7 (earlier clock).
    stamps = np.cumsum([0, 0, minute, 3 * minute, 7 * minute, 15 * minute, 10**9])
    stamps = np.r_[stamps, 100, 100 + 30].astype(np.int64)
    buckets = gap_buckets(stamps, np.array([0, 7]), num_buckets=8)
    assert buckets.tolist() == [1, 2, 3, 4, 5, 6, 7, 1, 2]


def test_gap_buckets_grow_with_the_gap_and_are_capped() -> None:
    gaps = np.array([0, 30, 60, 120, 600, 3_600, 86_400, 10**7, 10**9])  # seconds
    stamps = np.r_[0, np.cumsum(gaps)].astype(np.int64)  # one user, one gap between consecutive events
    buckets = gap_buckets(stamps, np.array([0]), num_buckets=24)
    assert buckets.tolist() == [1, 2, 2, 3, 3, 5, 7, 12, 19, 23]  # 2 + floor(log2(1 + minutes)), max 23
    assert np.all(np.diff(buckets[1:]) >= 0)


def test_window_is_leave_one_out(tiny_sequences: UserSequences) -> None:
    assert tiny_sequences.window(0, "train") == (slice(0, 2), None)
    assert tiny_sequences.window(0, "valid") == (slice(0, 3), 4)
    assert tiny_sequences.window(0, "test") == (slice(0, 4), 5)
    assert tiny_sequences.window(1, "train") == (slice(5, 5), None)
    assert tiny_sequences.window(1, "valid") == (slice(5, 6), 1)
    assert tiny_sequences.window(1, "test") == (slice(5, 7), 2)


def test_make_batch_train_left_padded_with_next_item_labels(tiny_sequences: UserSequences) -> None:
    # u1: inputs e1..e3-of-5 = [1, 2], labels [2, 3]; u2 (3 events) has no training input at all.
    _assert_batch(make_batch(tiny_sequences, [0, 1], "train", max_len=10), {
        "item_ids": [[1, 2], [0, 0]], "event_types": [[VIEW, CART], [0, 0]], "time_buckets": [[1, 3], [0, 0]],
        "labels": [[2, 3], [0, 0]]})


def test_make_batch_valid_and_test_targets(tiny_sequences: UserSequences) -> None:
    _assert_batch(make_batch(tiny_sequences, np.array([0, 1]), "valid", max_len=10), {
        "item_ids": [[1, 2, 3], [0, 0, 3]], "event_types": [[VIEW, CART, BUY], [0, 0, VIEW]],
        "time_buckets": [[1, 3, 4], [0, 0, 1]], "labels": [4, 1]})
    _assert_batch(make_batch(tiny_sequences, [0, 1], "test", max_len=10), {
        "item_ids": [[1, 2, 3, 4], [0, 0, 3, 1]], "event_types": [[VIEW, CART, BUY, VIEW], [0, 0, VIEW, VIEW]],
        "time_buckets": [[1, 3, 4, 5], [0, 0, 1, 2]], "labels": [5, 2]})


def test_make_batch_truncates_to_the_last_max_len_events(tiny_sequences: UserSequences) -> None:
    _assert_batch(make_batch(tiny_sequences, [0, 1], "test", max_len=2), {
        "item_ids": [[3, 4], [3, 1]], "event_types": [[BUY, VIEW], [VIEW, VIEW]],
        "time_buckets": [[4, 5], [1, 2]], "labels": [5, 2]})
    _assert_batch(make_batch(tiny_sequences, [0, 1], "train", max_len=1), {
        "item_ids": [[2], [0]], "event_types": [[CART], [0]], "time_buckets": [[3], [0]], "labels": [[3], [0]]})


def test_make_batch_width_follows_the_batch(tiny_sequences: UserSequences) -> None:
    assert make_batch(tiny_sequences, [1], "test", max_len=10)["item_ids"].tolist() == [[3, 1]]
    assert make_batch(tiny_sequences, [1, 0], "test", max_len=10)["item_ids"].tolist() == [[0, 0, 3, 1],
                                                                                             [1, 2, 3, 4]]
    only_short = make_batch(tiny_sequences, [1], "train", max_len=10)  # no input: one all-padding column
    assert only_short["item_ids"].tolist() == [[0]] and only_short["labels"].tolist() == [[0]]


def test_subset_keeps_the_chosen_users_in_order(tiny_sequences: UserSequences) -> None:
    only_u2 = tiny_sequences.subset([1])
    assert only_u2.user_ids == ["u2"]
    assert only_u2.offsets.tolist() == [0, 3]
    assert (only_u2.items.tolist(), only_u2.event_types.tolist()) == ([3, 1, 2], [VIEW, VIEW, BUY])
    assert (only_u2.time_buckets.tolist(), only_u2.regions) == ([1, 2, 3], ["east"])
    swapped = tiny_sequences.subset(np.array([1, 0]))
    assert swapped.user_ids == ["u2", "u1"]
    assert swapped.offsets.tolist() == [0, 3, 8]
    assert swapped.items.tolist() == [3, 1, 2, 1, 2, 3, 4, 5]
    assert make_batch(swapped, [1], "test", max_len=10)["labels"].tolist() == [5]
    empty = tiny_sequences.subset([])
    assert (len(empty), empty.offsets.tolist(), empty.items.tolist()) == (0, [0], [])


def test_trainable_users_need_four_events(tiny_sequences: UserSequences) -> None:
    assert tiny_sequences.trainable_users().tolist() == [0]  # u2 has exactly 3 events


def test_item_counts_cover_only_the_training_part(tiny_sequences: UserSequences) -> None:
    # u1 contributes rows 1, 2, 3 (not 4 = validation, 5 = test); u2 contributes row 3 (not 1, 2).
    assert tiny_sequences.item_counts(num_rows=7).tolist() == [0, 1, 1, 2, 0, 0, 0]


def _one_user_with_regions(regions: list[str]) -> UserSequences:
    """One user buying item "a" once a minute, region per event as given."""
    n = len(regions)
    frame = pd.DataFrame({"user_id": ["u"] * n, "item_id": ["a"] * n, "timestamp": np.arange(n) * 60,
                          "event_type": ["purchase"] * n, "region": regions, "merchant_id": regions})
    return to_user_sequences(finish_events(frame, LoadReport(source="x", rows_read=n)),
                             ItemCatalog.from_items(["a"]))


def test_region_is_the_most_common_per_user() -> None:
    seqs = _one_user_with_regions(["west", "east", "east", "north", "east"])
    assert (seqs.regions, seqs.merchants) == (["east"], ["east"])


def test_region_tie_goes_to_the_first_seen() -> None:
    # The documented tie rule of _most_common is "first seen", not "alphabetically first".
    assert _one_user_with_regions(["south", "north", "south", "north"]).regions == ["south"]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_make_batch_of_no_users(tiny_sequences: UserSequences, split: Split) -> None:
    batch = make_batch(tiny_sequences, [], split, max_len=10)
    assert batch["item_ids"].shape == (0, 1)
    assert batch["labels"].shape[0] == 0

"""Tests for the synthetic events generator and its writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared_model.events import EVENT_TYPES, EventLog, load_events
from simulations.synthetic import generate_events, write_events


@pytest.fixture(scope="module")
def log() -> EventLog:
    """A small log: 300 users, 80 items, 4 regions, 3 merchants."""
    return generate_events(num_users=300, num_items=80, num_regions=4, num_merchants=3, seed=3)


def test_same_seed_same_log_and_other_seed_differs() -> None:
    first = generate_events(num_users=50, num_items=40, seed=7).frame
    pd.testing.assert_frame_equal(first, generate_events(num_users=50, num_items=40, seed=7).frame)
    assert not first.equals(generate_events(num_users=50, num_items=40, seed=8).frame)


def test_columns_and_sizes(log: EventLog) -> None:
    frame = log.frame
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "event_type", "region", "merchant_id",
                                   "item_title"]
    assert frame["timestamp"].dtype == np.int64
    assert (log.num_users, frame["region"].nunique(), frame["merchant_id"].nunique()) == (300, 4, 3)
    per_user = frame.groupby("user_id").size()
    assert per_user.min() >= 5 and per_user.max() <= 40
    assert frame.groupby("user_id")[["region", "merchant_id"]].nunique().max().tolist() == [1, 1]
    assert frame.groupby("item_id")["item_title"].nunique().max() == 1
    assert log.has_timestamps and log.report.dropped == {}


def test_all_event_types_with_views_most_and_purchases_least(log: EventLog) -> None:
    counts = log.frame["event_type"].value_counts()
    assert set(counts.index) == set(EVENT_TYPES)
    assert counts.idxmax() == "view" and counts.idxmin() == "purchase"


def test_every_purchase_follows_a_cart_of_the_same_item(log: EventLog) -> None:
    frame = log.frame
    previous = frame.groupby("user_id")[["item_id", "event_type"]].shift()
    purchases = frame["event_type"] == "purchase"
    assert (previous.loc[purchases, "event_type"] == "cart").all()
    assert (previous.loc[purchases, "item_id"] == frame.loc[purchases, "item_id"]).all()


def test_timestamps_strictly_increase_per_user_with_varied_gaps(log: EventLog) -> None:
    frame = log.frame
    gaps = frame.groupby("user_id")["timestamp"].diff().dropna()
    assert (gaps > 0).all()
    assert gaps.min() < 60 and gaps.max() > 86_400  # seconds inside a visit, days between sessions


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip_through_load_events(tmp_path: Path, log: EventLog, suffix: str) -> None:
    path = write_events(log, tmp_path / "run" / f"events{suffix}")
    loaded = load_events(path)
    pd.testing.assert_frame_equal(loaded.frame, log.frame)
    assert loaded.report.dropped == {}


def test_write_events_refuses_unknown_suffix(tmp_path: Path, log: EventLog) -> None:
    with pytest.raises(ValueError, match=r"unsupported events file suffix '\.json'"):
        write_events(log, tmp_path / "events.json")


def test_regions_prefer_different_topics(log: EventLog) -> None:
    frame = log.frame
    topic = frame["item_title"].str.split().str[0]  # the first title word names the topic
    shares = pd.crosstab(frame["region"], topic, normalize="index")
    assert shares.idxmax(axis=1).nunique() == 4
    for a in shares.index:
        for b in shares.index:
            if a < b:
                assert 0.5 * (shares.loc[a] - shares.loc[b]).abs().sum() > 0.5  # total variation distance


def test_next_item_is_predictable_beyond_popularity() -> None:
    views = generate_events(num_users=600, num_items=120, seed=5).frame.query("event_type == 'view'")
    pairs = pd.DataFrame({"user": views["user_id"], "prev": views.groupby("user_id")["item_id"].shift(),
                          "next": views["item_id"]}).dropna()
    train = pairs["user"] < "u300"
    successor = pairs[train].groupby("prev")["next"].agg(lambda s: s.value_counts().index[0])
    held_out = pairs[~train]
    bigram_hits = (held_out["prev"].map(successor) == held_out["next"]).mean()
    popular_hits = (held_out["next"] == pairs.loc[train, "next"].value_counts().index[0]).mean()
    assert bigram_hits > 0.3 and bigram_hits > 10 * popular_hits


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="events_per_user"):
        generate_events(num_users=10, events_per_user=(5, 4))
    with pytest.raises(ValueError, match="num_items must be at least 8"):
        generate_events(num_users=10, num_items=5)

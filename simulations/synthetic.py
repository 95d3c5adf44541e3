"""The embedded synthetic events log: regional and merchant tastes, in-topic item transitions, a funnel.

Items belong to topics. Each region (and, more weakly, each merchant) prefers its own slice of topics, so a
partition by region or merchant is non-IID. A user mostly walks from an item to one of its near successors in
the same topic (a fixed Markov chain a sequence model can learn beyond popularity) and sometimes jumps to a
popular item of a topic drawn from their tastes. Every visit is a view; some become favourite, cart, purchase.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shared_model.events import EVENT_TYPES, EventLog, LoadReport, finish_events

START_TIME = 1_704_067_200  # 2024-01-01 UTC; users start within the following 30 days
FOLLOW_PROB = 0.75  # chance the next visit follows the item chain instead of jumping
SUCCESSOR_STEPS = np.array([1, 2, 3])  # how far along the topic's item ring the chain moves
SUCCESSOR_PROBS = np.array([0.6, 0.3, 0.1])
POPULARITY_SKEW = 3.0  # jumps land on rank floor(n * u**skew): low ranks (popular items) far more often
REGION_BOOST = 8.0  # weight of a region's own topics against 1 for the others
MERCHANT_BOOST = 3.0
FAVOURITE_TOPIC_BOOST = 3.0
# Funnel stages in EVENT_TYPES order: every visit is a view; favourite and cart are independent; a purchase
# needs a cart. Views are most frequent and purchases rarest (0.25 * 0.35 < 0.12).
FAVOURITE_PROB, CART_PROB, PURCHASE_GIVEN_CART = 0.12, 0.25, 0.35
TOPIC_WORDS = ("garden", "kitchen", "audio", "outdoor", "skincare", "toys", "books", "fitness", "pets",
               "office", "tools", "games")
STYLE_WORDS = ("classic", "compact", "deluxe", "eco", "mini", "premium", "pro", "travel")


def _num_topics(num_regions: int) -> int:
    """Two preferred topics per region, and at least eight topics."""
    return max(8, 2 * num_regions)


def _item_layout(num_items: int, num_topics: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Items dealt round-robin into topics: (topic of item, rank in topic, topic start, topic size)."""
    items = np.arange(num_items)
    topic = items % num_topics
    rank = items // num_topics
    size = np.bincount(topic, minlength=num_topics)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    return topic, rank, start, size


def _topic_item(topic: np.ndarray, rank: np.ndarray, num_topics: int) -> np.ndarray:
    """Item id of (topic, rank), the inverse of the round-robin layout."""
    return rank * num_topics + topic


def _sample_rows(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One categorical draw per row of a (N, K) weight matrix, vectorised by inverse CDF."""
    cdf = np.cumsum(weights, axis=1)
    u = rng.random(len(weights))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), weights.shape[1] - 1)


def _user_profiles(rng: np.random.Generator, num_users: int, num_regions: int, num_merchants: int,
                   num_topics: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Region, merchant and topic-taste weights (U, K) per user."""
    region_share = 1.0 / np.sqrt(np.arange(1, num_regions + 1))  # unequal region sizes, like real sites
    region = _sample_rows(rng, np.broadcast_to(region_share, (num_users, num_regions)))
    # Merchant m is based in region m % R; users mostly shop at merchants of their own region.
    home = (np.arange(num_merchants)[None, :] % num_regions) == region[:, None]
    merchant = _sample_rows(rng, np.where(home, 4.0, 1.0))
    topics = np.arange(num_topics)
    region_taste = np.where(topics[None, :] % num_regions == np.arange(num_regions)[:, None], REGION_BOOST, 1.0)
    merchant_taste = np.where(topics[None, :] == np.arange(num_merchants)[:, None] % num_topics,
                              MERCHANT_BOOST, 1.0)
    taste = region_taste[region] * merchant_taste[merchant]  # (U, K)
    favourite = _sample_rows(rng, taste)
    taste[np.arange(num_users), favourite] *= FAVOURITE_TOPIC_BOOST
    return region, merchant, taste


def _walk_items(rng: np.random.Generator, taste: np.ndarray, num_items: int, steps: int) -> np.ndarray:
    """Visited items (U, steps): follow the in-topic successor chain, else jump to a popular item of a taste."""
    num_users, num_topics = taste.shape
    topic_of, rank_of, _, size = _item_layout(num_items, num_topics)
    visits = np.zeros((num_users, steps), dtype=np.int64)
    current = np.zeros(num_users, dtype=np.int64)
    for t in range(steps):
        jump_topic = _sample_rows(rng, taste)
        jump_rank = np.floor(size[jump_topic] * rng.random(num_users) ** POPULARITY_SKEW).astype(np.int64)
        jumped = _topic_item(jump_topic, jump_rank, num_topics)
        step = rng.choice(SUCCESSOR_STEPS, size=num_users, p=SUCCESSOR_PROBS)
        topic = topic_of[current]
        followed = _topic_item(topic, (rank_of[current] + step) % size[topic], num_topics)
        follow = rng.random(num_users) < FOLLOW_PROB if t else np.zeros(num_users, dtype=bool)
        current = np.where(follow, followed, jumped)
        visits[:, t] = current
    return visits


def _funnel(rng: np.random.Generator, num_visits: int) -> np.ndarray:
    """Which stages (view, favourite, cart, purchase) each visit reaches: a (V, 4) boolean mask."""
    stages = np.ones((num_visits, len(EVENT_TYPES)), dtype=bool)
    stages[:, 1] = rng.random(num_visits) < FAVOURITE_PROB
    stages[:, 2] = rng.random(num_visits) < CART_PROB
    stages[:, 3] = stages[:, 2] & (rng.random(num_visits) < PURCHASE_GIVEN_CART)
    return stages


def _gaps(rng: np.random.Generator, first_stage: np.ndarray) -> np.ndarray:
    """Seconds since the previous event: seconds-minutes inside a visit, minutes to days between visits."""
    n = len(first_stage)
    within = rng.lognormal(np.log(45.0), 0.8, n)
    same_session = rng.lognormal(np.log(240.0), 1.0, n)
    new_session = rng.lognormal(np.log(86_400.0), 1.2, n)
    between = np.where(rng.random(n) < 0.7, same_session, new_session)
    return np.maximum(1, np.where(first_stage, between, within)).astype(np.int64)  # >= 1 s: strictly increasing


def _titles(num_items: int, num_topics: int) -> np.ndarray:
    """Titles whose words name the item's topic, e.g. 'kitchen deluxe item 17' (text carries the topic)."""
    topic_word = [TOPIC_WORDS[t % len(TOPIC_WORDS)] + (str(t // len(TOPIC_WORDS)) if t >= len(TOPIC_WORDS)
                                                        else "") for t in range(num_topics)]
    return np.array([f"{topic_word[i % num_topics]} {STYLE_WORDS[(i // num_topics) % len(STYLE_WORDS)]} item {i}"
                     for i in range(num_items)])


def _expand_visits(rng: np.random.Generator, visits: np.ndarray, length: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visits (user-major, `length` per user) through the funnel, cut to `length` events: (user, item, kind)."""
    stages = _funnel(rng, len(visits))
    expand = stages.sum(axis=1)
    user = np.repeat(np.repeat(np.arange(len(length)), length), expand)
    item = np.repeat(visits, expand)
    kind = np.tile(np.arange(len(EVENT_TYPES)), len(visits))[stages.ravel()]
    offsets = np.r_[0, np.cumsum(np.bincount(user, minlength=len(length)))]
    keep = np.arange(len(user)) - offsets[user] < length[user]
    return user[keep], item[keep], kind[keep]


def _timestamps(rng: np.random.Generator, user: np.ndarray, kind: np.ndarray, num_users: int) -> np.ndarray:
    """Strictly increasing unix seconds per user, each user starting at a random time in the first 30 days."""
    gaps = _gaps(rng, kind == 0)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    gaps[starts] = 0
    elapsed = np.cumsum(gaps)
    start_time = START_TIME + rng.integers(0, 30 * 86_400, size=num_users)
    return start_time[user] + elapsed - np.repeat(elapsed[starts], np.diff(np.r_[starts, len(user)]))


def _ids(prefix: str, count: int) -> np.ndarray:
    """Zero-padded string ids ('u0007'), so lexical order (the canonical sort) equals numeric order."""
    return np.char.add(prefix, np.char.zfill(np.arange(count).astype(str), len(str(count - 1))))


def generate_events(num_users: int = 2000, num_items: int = 500, num_regions: int = 4, num_merchants: int = 8,
                    events_per_user: tuple[int, int] = (5, 40), seed: int = 0) -> EventLog:
    """A deterministic synthetic EventLog (all four event types, region, merchant_id, item_title)."""
    low, high = events_per_user
    if not 1 <= low <= high or min(num_users, num_regions, num_merchants) < 1:
        raise ValueError("need 1 <= events_per_user[0] <= events_per_user[1] and at least one user/region/merchant")
    num_topics = _num_topics(num_regions)
    if num_items < num_topics:
        raise ValueError(f"num_items must be at least {num_topics} (one per topic), got {num_items}")
    rng = np.random.default_rng(seed)
    region, merchant, taste = _user_profiles(rng, num_users, num_regions, num_merchants, num_topics)
    length = rng.integers(low, high + 1, size=num_users)  # events per user
    # Every visit yields at least one event, so `length` visits always fill `length` events.
    visits = _walk_items(rng, taste, num_items, high)[np.arange(high)[None, :] < length[:, None]]
    user, item, kind = _expand_visits(rng, visits, length)
    frame = pd.DataFrame({
        "user_id": _ids("u", num_users)[user],
        "item_id": _ids("i", num_items)[item],
        "timestamp": _timestamps(rng, user, kind, num_users),
        "event_type": np.array(EVENT_TYPES)[kind],
        "region": _ids("region-", num_regions)[region[user]],
        "merchant_id": _ids("m", num_merchants)[merchant[user]],
        "item_title": _titles(num_items, num_topics)[item],
    })
    return finish_events(frame, LoadReport(source=f"synthetic(seed={seed})", rows_read=len(frame)))


def write_events(log: EventLog, path: str | Path) -> Path:
    """Write an EventLog's frame as CSV, TSV or Parquet (by suffix) so `load_events` reads it back."""
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".parquet", ".pq"):
        log.frame.to_parquet(path, index=False)
    elif suffix in (".csv", ".tsv", ".tab"):
        log.frame.to_csv(path, sep="," if suffix == ".csv" else "\t", index=False)
    else:
        raise ValueError(f"unsupported events file suffix {path.suffix!r} (use .csv, .tsv or .parquet)")
    return path

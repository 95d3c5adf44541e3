"""Shared tiny fixtures: a hand-made three-user events log, its catalog, and the sequences built from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared_model.catalog import ItemCatalog
from shared_model.events import load_events
from shared_model.sequences import UserSequences, to_user_sequences

T0 = 1_700_000_000  # unix seconds
TINY_TIME_BUCKETS = 8  # small enough that a huge gap hits the cap (bucket 7)

# Rows out of time order on purpose. In time order:
#   u1: a(+0, view) b(+60, cart) zzz(+100, not in the catalog) c(+240, purchase) d(+660, view) e(+huge, favourite)
#   u2: c(+5, view) a(+10, pv = view) b(+130, buy = purchase)
#   u3: f, f (two events: too short)

TINY_EVENTS_CSV = f"""user_id,item_id,timestamp,event_type,region
u2,a,{T0 + 10},pv,east
u1,e,{T0 + 660 + 60_000_000},favourite,south
u3,f,{T0},view,west
u1,c,{T0 + 240},purchase,south
u2,c,{T0 + 5},view,east
u1,zzz,{T0 + 100},view,north
u1,a,{T0},view,north
u3,f,{T0 + 1},view,west
u1,d,{T0 + 660},view,north
u2,b,{T0 + 130},buy,east
u1,b,{T0 + 60},cart,north
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` start first, longest first (`slow(seconds=...)`, for the few that run minutes), each
    followed by a short test; tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device (CI).

    `make test` runs xdist with `--maxschedchunk 1`: each worker is handed the first two tests of the list, then
    one more as each finishes. So the two longest tests start at once on different workers and everything else
    fills in around them (xdist's default hands each worker a quarter of its share at once: all the slow tests
    landed on one worker, which ran them one after another while the other sat idle)."""
    def expected_seconds(item: pytest.Item) -> float:
        slow = item.get_closest_marker("slow")
        return -1.0 if slow is None or item.get_closest_marker("gpu") else float(slow.kwargs.get("seconds", 0))

    # stable, so the same order on every worker; GPU tests (skipped in CI) among the short ones
    slow = sorted((item for item in items if expected_seconds(item) >= 0), key=expected_seconds, reverse=True)
    short = [item for item in items if expected_seconds(item) < 0]
    paired = min(len(slow), len(short))
    items[:] = [item for pair in zip(slow[:paired], short[:paired], strict=True) for item in pair] + \
        slow[paired:] + short[paired:]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def tiny_events_csv(tmp_path: Path) -> Path:
    """The hand-made log above as a CSV file (11 rows: one unknown item, one two-event user)."""
    path = tmp_path / "events.csv"
    path.write_text(TINY_EVENTS_CSV)
    return path


@pytest.fixture
def tiny_catalog() -> ItemCatalog:
    """Items a..f at rows 1..6 ("zzz" is deliberately missing)."""
    return ItemCatalog.from_items(["f", "e", "d", "c", "b", "a"])


@pytest.fixture
def tiny_sequences(tiny_events_csv: Path, tiny_catalog: ItemCatalog) -> UserSequences:
    """u1 -> items [1, 2, 3, 4, 5], u2 -> items [3, 1, 2]; u3 dropped."""
    return to_user_sequences(load_events(tiny_events_csv), tiny_catalog, num_time_buckets=TINY_TIME_BUCKETS)

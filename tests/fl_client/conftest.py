"""Fixtures shared by the site-side tests."""

import numpy as np
import pandas as pd
import pytest

from fl_client.dp.settings import PrivacyConfig
from fl_client.site import SiteConfig
from shared_model.catalog import ItemCatalog
from shared_model.events import LoadReport, finish_events
from shared_model.sequences import UserSequences, to_user_sequences
from simulations.synthetic import generate_events, write_events


@pytest.fixture
def site(tmp_path):
    log = generate_events(num_users=120, num_items=40, seed=3)
    events = write_events(log, tmp_path / "events.csv")
    catalog = ItemCatalog.from_events(log.frame)
    catalog.save(tmp_path)
    return SiteConfig(data_path=str(events), catalog_path=str(tmp_path / "catalog.json"),
                      state_dir=str(tmp_path / "state"), privacy=PrivacyConfig(enabled=True, epsilon=4.0),
                      device="cpu")


@pytest.fixture
def seqs() -> UserSequences:
    """60 users of 4-11 events over 30 items, two event types: a tiny training set for DP mechanics."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        start = int(rng.integers(0, 20))
        for i in range(int(rng.integers(4, 12))):
            rows.append((f"u{u}", f"i{(start + i) % 30}", 1000 + 600 * i, "view" if i % 2 else "purchase"))
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "event_type"])
    log = finish_events(frame, LoadReport("memory", len(frame)))
    return to_user_sequences(log, ItemCatalog.from_events(log.frame))

"""Fixtures shared by the site-side tests."""

import pytest

from fl_client.site import SiteConfig
from shared_model.catalog import ItemCatalog
from simulations.synthetic import generate_events, write_events


@pytest.fixture
def site(tmp_path):
    log = generate_events(num_users=120, num_items=40, seed=3)
    events = write_events(log, tmp_path / "events.csv")
    catalog = ItemCatalog.from_events(log.frame)
    catalog.save(tmp_path)
    return SiteConfig(data_path=str(events), catalog_path=str(tmp_path / "catalog.json"),
                      state_dir=str(tmp_path / "state"), epsilon=4.0, device="cpu")

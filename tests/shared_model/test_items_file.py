"""Building the shared catalog from the consortium's items file (`fedrec-admin catalog`)."""

import pytest

from fl_server.admin import main
from shared_model.catalog import ItemCatalog
from shared_model.events import EventsError, load_events
from shared_model.items_file import catalog_from_items_file


def test_ids_are_normalised_as_the_sites_events_are_and_attributes_kept_per_column(tmp_path, capsys):
    items = tmp_path / "items.csv"
    items.write_text("item_id,title,brand,category\n1,Red lipstick,Acme,lips|makeup\n2.0, Blue shampoo ,Bee,hair\n"
                     " 3,,,\n1,Red lipstick,Acme,makeup|lips\n")
    catalog, report = catalog_from_items_file(items)
    assert catalog.item_ids == ["1", "2", "3"] and catalog.titles == {"1": "Red lipstick", "2": "Blue shampoo"}
    assert catalog.attributes == {"1": ["brand=Acme", "category=lips", "category=makeup"],
                                  "2": ["brand=Bee", "category=hair"]}
    assert (report.rows, report.items, report.repeated, report.normalised_ids) == (4, 3, 1, 2)
    # a site's events naming the items as '2.0' or ' 3' map onto the same rows
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp\nu,2.0,1700000000\nu, 3,1700000100\nu,1,1700000200\n")
    assert (catalog.rows(load_events(events).frame["item_id"]) > 0).all()
    assert main(["catalog", "--items", str(items), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert ItemCatalog.load(tmp_path / "out").fingerprint == catalog.fingerprint and catalog.fingerprint in printed


@pytest.mark.parametrize(("text", "message"), [
    ("id,title\n1,a\n", "missing required column"),
    ("item_id,title\n1,a\n1,b\n", "item '1' again, with another title"),
    ("item_id,title\nNaN,a\n", "missing-value marker"),
    ("item_id,title\n,a\n", "empty id"),
    ("item_id,title\n", "no items"),
])
def test_an_unusable_items_file_is_refused_naming_the_line(tmp_path, text, message):
    items = tmp_path / "items.csv"
    items.write_text(text)
    with pytest.raises(EventsError, match=message) as caught:
        catalog_from_items_file(items)
    assert str(items) in str(caught.value)

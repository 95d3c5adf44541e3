"""Tests for the item catalog: padding row 0, sorted rows, fingerprint, save/load and mismatch checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared_model.catalog import CATALOG_FILE, PADDING_ROW, CatalogError, CatalogMismatchError, ItemCatalog


@pytest.fixture
def catalog() -> ItemCatalog:
    """Three items given out of order, with a repeat and one non-ASCII title."""
    return ItemCatalog.from_items(["c", "a", "b", "a"], titles={"a": "Apple", "c": "Crème brûlée"})


def test_from_items_sorts_distinct_ids_after_the_padding_row(catalog: ItemCatalog) -> None:
    assert PADDING_ROW == 0
    assert catalog.item_ids == ["a", "b", "c"]
    assert catalog.num_rows == 4
    assert [catalog.item_id(row) for row in (1, 2, 3)] == ["a", "b", "c"]


def test_from_items_stringifies_ids() -> None:
    assert ItemCatalog.from_items(pd.Series([10, 2, 10])).item_ids == ["10", "2"]  # e.g. Parquet ints


def test_rows_of_known_and_unknown_ids(catalog: ItemCatalog) -> None:
    rows = catalog.rows(["b", "zzz", "a", "c", ""])
    assert rows.dtype == np.int64
    assert rows.tolist() == [2, 0, 1, 3, 0]
    assert catalog.rows(pd.Series(["c", "nope"])).tolist() == [3, 0]
    assert catalog.rows([]).tolist() == []


@pytest.mark.parametrize("row", [0, 4, -1])
def test_item_id_refuses_padding_and_out_of_range_rows(catalog: ItemCatalog, row: int) -> None:
    with pytest.raises(IndexError, match=f"row {row} is not an item row"):
        catalog.item_id(row)


def test_titles(catalog: ItemCatalog) -> None:
    assert (catalog.title(1), catalog.title(2), catalog.title(3)) == ("Apple", None, "Crème brûlée")


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate item ids"):
        ItemCatalog(["a", "b", "a"])


def test_from_events_takes_items_and_nonempty_titles() -> None:
    frame = pd.DataFrame({"item_id": ["y", "x", "y", "z"], "item_title": ["", "Ex", "Why", ""]})
    catalog = ItemCatalog.from_events(frame)
    assert catalog.item_ids == ["x", "y", "z"]
    assert catalog.titles == {"x": "Ex", "y": "Why"}


def test_fingerprint_is_stable_for_the_same_set_in_any_order() -> None:
    first = ItemCatalog.from_items(["b", "a", "c"]).fingerprint
    assert ItemCatalog.from_items(["c", "b", "a", "b"]).fingerprint == first
    assert ItemCatalog.from_items(["a", "b", "c"], titles={"a": "titles do not count"}).fingerprint == first
    assert len(first) == 64 and set(first) <= set("0123456789abcdef")  # hex SHA-256


@pytest.mark.parametrize("other", [["a", "b"], ["a", "b", "d"], ["a", "b", "c", "d"], ["ab", "c"], ["abc"]])
def test_fingerprint_differs_for_different_sets(other: list[str]) -> None:
    assert ItemCatalog.from_items(other).fingerprint != ItemCatalog.from_items(["a", "b", "c"]).fingerprint


def test_fingerprint_depends_on_row_order() -> None:
    assert ItemCatalog(["a", "b"]).fingerprint != ItemCatalog(["b", "a"]).fingerprint


def test_save_load_round_trip(catalog: ItemCatalog, tmp_path: Path) -> None:
    path = catalog.save(tmp_path / "model")
    assert path == tmp_path / "model" / CATALOG_FILE
    assert json.loads(path.read_text(encoding="utf-8"))["fingerprint"] == catalog.fingerprint
    for source in (path, tmp_path / "model"):  # the file itself, or the directory holding it
        loaded = ItemCatalog.load(source)
        assert loaded.item_ids == catalog.item_ids
        assert loaded.titles == catalog.titles
        assert loaded.fingerprint == catalog.fingerprint
        assert loaded.rows(["c", "a", "q"]).tolist() == [3, 1, 0]


def test_load_refuses_ids_changed_under_a_kept_fingerprint(catalog: ItemCatalog, tmp_path: Path) -> None:
    path = catalog.save(tmp_path)
    payload = json.loads(path.read_text(encoding="utf-8"))
    payload["item_ids"] = ["a", "c", "b"]  # rows swapped, fingerprint left as it was
    path.write_text(json.dumps(payload), encoding="utf-8")
    with pytest.raises(CatalogMismatchError, match="stored fingerprint does not match its item ids"):
        ItemCatalog.load(path)


def test_check_matches(catalog: ItemCatalog) -> None:
    catalog.check_matches(ItemCatalog.from_items(["b", "c", "a"]).fingerprint)  # same set: no error
    other = ItemCatalog.from_items(["a", "b"]).fingerprint
    with pytest.raises(CatalogMismatchError, match=f"fingerprint {other[:12]}.*ours {catalog.fingerprint[:12]}"):
        catalog.check_matches(other)
    assert issubclass(CatalogMismatchError, ValueError)


GOOD_FINGERPRINT = ItemCatalog(["a", "b"]).fingerprint


@pytest.mark.parametrize(("text", "message"), [
    ('{"item_ids": ["a", "b"', "invalid JSON at line 1, column 23"),
    ('{"item_ids": ["a",\n "b",]}', "invalid JSON at line 2, column 6"),
    ("", "invalid JSON at line 1, column 1"),
    ("null", "expected a JSON object with 'item_ids', found null"),
    ('["a", "b"]', "expected a JSON object with 'item_ids', found array"),
    ('{"titles": {}}', "missing key 'item_ids'"),
    ('{"item_ids": "ab"}', "'item_ids' must be an array of strings, found string"),
    ('{"item_ids": []}', "'item_ids' is empty"),
    ('{"item_ids": ["a", 2]}', r"item_ids\[1\] must be a string, found number 2"),
    ('{"item_ids": ["a", null]}', r"item_ids\[1\] must be a string, found null"),
    ('{"item_ids": ["a", ""]}', r"item_ids\[1\] '' is empty or has surrounding whitespace"),
    ('{"item_ids": ["a", "b", "a"]}', r"item id 'a' is listed twice \(item_ids\[0\] and item_ids\[2\]\)"),
    ('{"item_ids": ["a"], "titles": ["x"]}', r"'titles' must be an object \{item id: a string\}, found array"),
    ('{"item_ids": ["a"], "titles": {"a": 5}}', r"titles\['a'\] must be a string, found number 5"),
    ('{"item_ids": ["a"], "titles": {"z": "Zed"}}', r"titles\['z'\] names an item that is not in item_ids"),
    ('{"item_ids": ["a"], "attributes": {"a": [1]}}', r"attributes\['a'\] must be an array of strings"),
    ('{"item_ids": ["a"], "fingerprint": 7}', "'fingerprint' must be 64 lowercase hex digits, found 7"),
    ('{"item_ids": ["a"], "item_id": ["b"]}', r"unknown key\(s\) \['item_id'\]"),
])
def test_broken_catalog_files_name_the_file_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    # Before: bare JSONDecodeError / KeyError / TypeError naming no file, or a silently accepted catalog.
    path = tmp_path / CATALOG_FILE
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CatalogError, match=message) as caught:
        ItemCatalog.load(tmp_path)
    assert str(caught.value).startswith(f"{path}: ")


def test_catalog_that_is_not_utf8_or_missing_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / CATALOG_FILE
    path.write_bytes(b'{"item_ids": ["caf\xe9"]}')
    with pytest.raises(CatalogError, match=f"{re.escape(str(path))}: not valid UTF-8 at byte 18"):
        ItemCatalog.load(path)
    with pytest.raises(CatalogError, match=r"nowhere\.json: catalog file does not exist"):
        ItemCatalog.load(tmp_path / "nowhere.json")


def test_catalog_errors_are_value_errors_and_mismatch_is_a_catalog_error() -> None:
    assert issubclass(CatalogError, ValueError)
    assert issubclass(CatalogMismatchError, CatalogError)


def test_valid_catalog_with_every_key_loads(tmp_path: Path) -> None:
    path = tmp_path / CATALOG_FILE
    path.write_text(json.dumps({"fingerprint": GOOD_FINGERPRINT, "item_ids": ["a", "b"], "titles": {"a": "A"},
                                "attributes": {"b": ["brand-1"]}}), encoding="utf-8")
    loaded = ItemCatalog.load(path)
    assert (loaded.item_ids, loaded.titles, loaded.attributes) == (["a", "b"], {"a": "A"}, {"b": ["brand-1"]})

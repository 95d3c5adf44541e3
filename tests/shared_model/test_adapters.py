"""Tests for the data-set adapters: tiny files in tmp_path, plus one real-data check per format."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from shared_model.adapters import (
    DATASETS,
    load_dataset,
    load_item_attributes,
    load_movielens,
    load_s3rec,
    load_tianchi,
    zip_to_region,
)
from shared_model.events import EventsError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GENRES = "|0" * 19


def _write_movielens(directory: Path, ratings: str, users: str | None = None, items: bytes | None = None) -> Path:
    """A MovieLens-100K folder with the given u.data and small default u.user / u.item."""
    directory.mkdir(exist_ok=True)
    (directory / "u.data").write_bytes(ratings.encode())
    (directory / "u.user").write_text(users if users is not None else
                                      "1|24|M|technician|85711\n2|53|F|other|T8H1N\n3|23|M|writer|ABC\n")
    default_items = f"10|Misérables, Les (1995)|01-Jan-1995||http://x{GENRES}\n20|Heat (1995)|01-Jan-1995||u{GENRES}\n"
    (directory / "u.item").write_bytes(items if items is not None else default_items.encode("latin-1"))
    return directory


@pytest.fixture
def movielens_dir(tmp_path: Path) -> Path:
    """Five ratings, one CRLF line, one by a user absent from u.user."""
    ratings = "1\t20\t5\t900\n2\t10\t3\t800\r\n1\t10\t4\t700\n3\t20\t1\t600\n99\t10\t2\t500\n"
    return _write_movielens(tmp_path / "ml", ratings)


def test_movielens_maps_ratings_to_purchases_with_region_and_title(movielens_dir: Path) -> None:
    log = load_movielens(movielens_dir)
    frame = log.frame
    assert list(frame["user_id"]) == ["1", "1", "2", "3"]
    assert list(frame["timestamp"]) == [700, 900, 800, 600]  # sorted by user, then time
    assert set(frame["event_type"]) == {"purchase"}
    assert dict(zip(frame["user_id"], frame["region"], strict=True)) == {"1": "us-8", "2": "ca", "3": "unknown"}
    assert frame.loc[frame["item_id"] == "10", "item_title"].iloc[0] == "Misérables, Les (1995)"
    assert log.has_timestamps
    assert log.report.rows_read == 5
    assert log.report.dropped == {"user not in u.user": 1}


def test_movielens_logs_region_fallbacks(movielens_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="shared_model.adapters"):
        load_movielens(movielens_dir)
    assert "1 users with Canadian postal codes" in caplog.text
    assert "1 with malformed zip codes" in caplog.text


@pytest.mark.parametrize(("code", "region"), [
    ("85711", "us-8"), ("02215", "us-0"), ("12345-6789", "us-1"), ("T8H1N", "ca"), ("v3n4p", "ca"),
    ("ABC", "unknown"), ("", "unknown"), ("1234", "unknown"), ("W1A0A", "unknown"),
])
def test_zip_to_region(code: str, region: str) -> None:
    assert zip_to_region(code) == region


@pytest.mark.parametrize(("ratings", "row", "column"), [
    ("1\t10\t4\t700\n1\t20\t5\n", 2, None),  # three fields
    ("1\t10\t4\t700\n\n1\tx20\t5\t900\n", 3, "item"),  # the blank line still counts
    ("1\t10\t4\t7.5\n", 1, "unix_time"),
])
def test_movielens_malformed_ratings_name_file_and_line(tmp_path: Path, ratings: str, row: int,
                                                        column: str | None) -> None:
    directory = _write_movielens(tmp_path / "ml", ratings)
    with pytest.raises(EventsError) as caught:
        load_movielens(directory)
    assert caught.value.path == str(directory / "u.data")
    assert (caught.value.row, caught.value.column) == (row, column)


@pytest.mark.parametrize(("unix_time", "message"), [
    ("1234567890123456789012345", "timestamp after 2100 '1234567890123456789012345'"),  # was OverflowError
    ("5000000000", "timestamp after 2100 '5000000000' (read as seconds)"),
])
def test_movielens_unusable_times_name_file_line_and_column(tmp_path: Path, unix_time: str, message: str) -> None:
    directory = _write_movielens(tmp_path / "ml", f"1\t10\t4\t700\n2\t20\t3\t{unix_time}\n")
    with pytest.raises(EventsError, match=re.escape(message)) as caught:
        load_movielens(directory)
    assert (caught.value.path, caught.value.row, caught.value.column) == (str(directory / "u.data"), 2, "unix_time")


def test_movielens_long_integer_ids_stay_exact(tmp_path: Path) -> None:
    # Before: a 25-digit id overflowed int64 with a bare OverflowError.
    long_id = "1" * 25
    users = f"{long_id}|24|M|technician|85711\n"
    directory = _write_movielens(tmp_path / "ml", f"{long_id}\t10\t4\t700\n00{long_id}\t20\t4\t800\n", users=users)
    assert load_movielens(directory).frame["user_id"].tolist() == [long_id, long_id]


def test_tianchi_date_after_2100_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "user_behavior.csv"
    path.write_text(TIANCHI_HEADER + "7,100,1,,1,2014-12-06 02\n7,100,1,,1,2214-12-06 03\n")
    with pytest.raises(EventsError, match=r"row 3, column 'time': timestamp after 2100 '2214-12-06 03'"):
        load_tianchi(path)


def test_tianchi_report_notes_how_times_were_read(tmp_path: Path) -> None:
    path = tmp_path / "user_behavior.csv"
    path.write_text(TIANCHI_HEADER + "7,100,1,,1,2014-12-06 02\n")
    assert load_tianchi(path).report.notes == ["timestamps as dates (%Y-%m-%d %H)"]


def test_events_options_pass_the_timestamp_unit(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\na,x,1700000000000\n")
    log = load_dataset("events", tmp_path / "events.csv", timestamp_unit="ms")
    assert log.frame["timestamp"].tolist() == [1_700_000_000]


def test_movielens_malformed_registry_files(tmp_path: Path) -> None:
    bad_user = _write_movielens(tmp_path / "a", "1\t10\t4\t700\n", users="1|24|M|technician\n")
    with pytest.raises(EventsError, match=r"u\.user, row 1: expected 5 fields"):
        load_movielens(bad_user)
    twice = _write_movielens(tmp_path / "b", "1\t10\t4\t700\n", items=f"10|A|||{GENRES}\n10|B|||{GENRES}\n".encode())
    with pytest.raises(EventsError, match=r"u\.item, row 2.*item 10 listed twice"):
        load_movielens(twice)
    (missing := tmp_path / "c").mkdir()
    with pytest.raises(EventsError, match=r"u\.data: file does not exist"):
        load_movielens(missing)


def test_s3rec_orders_by_line_position_without_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "Beauty.txt"
    path.write_text("1 5 3 9\n2 3\n\n10 7 5\n")
    log = load_s3rec(path)
    assert not log.has_timestamps
    by_user = log.frame.groupby("user_id")["item_id"].apply(list).to_dict()
    assert by_user == {"1": ["5", "3", "9"], "2": ["3"], "10": ["7", "5"]}
    assert list(log.frame.loc[log.frame["user_id"] == "1", "timestamp"]) == [0, 1, 2]
    assert set(log.frame["event_type"]) == {"purchase"}
    assert log.report.rows_read == 6


@pytest.mark.parametrize(("text", "row", "message"), [
    ("1 5 3\n2\n", 2, "user 2 has no items"),
    ("1 5 3\n2 4 x7\n", 2, "not an integer id: 'x7'"),
    ("1 5 3\n2 4 ²\n", 2, "not an integer id"),
    ("1 5\n2 4\n1 6\n", 3, "user 1 already has a line"),
])
def test_s3rec_malformed_lines_name_file_and_line(tmp_path: Path, text: str, row: int, message: str) -> None:
    path = tmp_path / "Beauty.txt"
    path.write_text(text)
    with pytest.raises(EventsError, match=message) as caught:
        load_s3rec(path)
    assert (caught.value.path, caught.value.row) == (str(path), row)


def test_item_attributes_are_keyed_by_item_id(tmp_path: Path) -> None:
    path = tmp_path / "attrs.json"
    path.write_text(json.dumps({"4": [1, 2, 3], "83": []}))
    assert load_item_attributes(path) == {"4": [1, 2, 3], "83": []}


@pytest.mark.parametrize(("text", "message"), [
    ('{"4": [1, 2],\n "5": [3,]}', r"row 2: invalid JSON"),
    ('[[1, 2]]', "expected a JSON object"),
    ('{"4": [1, "brand"]}', "item 4: attributes must be a list of integers"),
    ('{"4": [true]}', "item 4: attributes must be a list of integers"),
    ('{"four": [1]}', "item key 'four' is not an integer id"),
])
def test_item_attributes_malformed(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "attrs.json"
    path.write_text(text)
    with pytest.raises(EventsError, match=message):
        load_item_attributes(path)


TIANCHI_HEADER = "user_id,item_id,behavior_type,user_geohash,item_category,time\n"


def test_tianchi_maps_behaviours_geohash_and_category(tmp_path: Path) -> None:
    path = tmp_path / "user_behavior.csv"
    path.write_text(TIANCHI_HEADER + "7,100,1,96nn52n,4245,2014-12-06 02\n7,100,3,,4245,2014-12-06 03\n"
                    "8,200,2,9q8yy,11,2014-12-07 00\n8,200,4,9q8yy,11,2014-12-07 01\n")
    frame = load_tianchi(path).frame
    assert list(frame["event_type"]) == ["view", "cart", "favourite", "purchase"]
    assert list(frame["region"]) == ["96n", "unknown", "9q8", "9q8"]
    assert list(frame["merchant_id"]) == ["4245", "4245", "11", "11"]
    assert frame["timestamp"].iloc[0] == 1_417_831_200  # 2014-12-06 02:00 UTC
    assert list(load_tianchi(path, region_precision=1).frame["region"]) == ["9", "unknown", "9", "9"]


@pytest.mark.parametrize(("rows", "message", "row", "column"), [
    ("7,100,1,,1,2014-12-06 02\n7,100,5,,1,2014-12-06 03\n", "unknown behavior_type '5'", 3, "behavior_type"),
    ("7,100,1,,1,2014-12-06\n", "unparsable timestamp", 2, "time"),
    ("7,100,1,,1\n", "unparsable timestamp ''", 2, "time"),  # a short row reads as empty trailing fields
])
def test_tianchi_malformed_rows_name_file_and_line(tmp_path: Path, rows: str, message: str, row: int,
                                                   column: str | None) -> None:
    path = tmp_path / "user_behavior.csv"
    path.write_text(TIANCHI_HEADER + rows)
    with pytest.raises(EventsError, match=message) as caught:
        load_tianchi(path)
    assert (caught.value.path, caught.value.row, caught.value.column) == (str(path), row, column)


def test_tianchi_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "user_behavior.csv"
    path.write_text("user_id,item_id,behavior_type,time\n7,100,1,2014-12-06 02\n")
    with pytest.raises(EventsError, match=r"missing Tianchi column\(s\) \['user_geohash', 'item_category'\]"):
        load_tianchi(path)


def test_load_dataset_dispatches_by_name(tmp_path: Path, movielens_dir: Path) -> None:
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\na,x,1\n")
    (tmp_path / "seq.txt").write_text("1 2 3\n")
    (tmp_path / "tianchi.csv").write_text(TIANCHI_HEADER + "7,100,1,96nn52n,4245,2014-12-06 02\n")
    assert len(load_dataset("events", tmp_path / "events.csv")) == 1
    assert len(load_dataset("movielens", movielens_dir)) == 4
    assert not load_dataset("s3rec", tmp_path / "seq.txt").has_timestamps
    assert load_dataset("tianchi", tmp_path / "tianchi.csv", region_precision=2).frame["region"].iloc[0] == "96"
    with pytest.raises(ValueError, match="valid names: " + ", ".join(DATASETS)):
        load_dataset("netflix", tmp_path)


def _real(folder: str) -> Path:
    """A folder of the shared real data, or skip when this checkout has no shared data."""
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} is absent")
    return DATA / folder


@pytest.mark.integration
def test_real_movielens_100k() -> None:
    log = load_movielens(_real("ml-100k"))
    frame = log.frame
    assert (log.num_users, frame["item_id"].nunique(), len(log)) == (943, 1682, 100_000)
    # The shared u.data carries 349 extra CRLF lines by users 995-998, who are not in u.user.
    assert log.report.rows_read == 100_349
    assert log.report.dropped == {"user not in u.user": 349}
    regions = frame.drop_duplicates("user_id")["region"].value_counts()
    assert regions["ca"] == 18 and "unknown" not in regions
    assert frame.loc[frame["item_id"] == "543", "item_title"].iloc[0] == "Misérables, Les (1995)"


@pytest.mark.integration
def test_real_amazon_beauty() -> None:
    folder = _real("amazon-beauty")
    log = load_s3rec(folder / "Beauty.txt")
    assert (log.num_users, log.frame["item_id"].nunique(), len(log)) == (22_363, 12_101, 198_502)
    assert not log.has_timestamps
    assert list(log.frame.loc[log.frame["user_id"] == "2", "item_id"]) == ["6", "7", "8", "9", "10", "4", "11"]
    attributes = load_item_attributes(folder / "Beauty_item2attributes.json")
    assert set(attributes) == set(log.frame["item_id"])
    assert attributes["4"] == [1, 2, 3]


@pytest.mark.integration
def test_real_tianchi_sample() -> None:
    log = load_tianchi(_real("tianchi-mobile-sample") / "user_behavior.csv")
    # 2,000 lines: a header and 1,999 events; 142 repeat another event in the same hour and are dropped.
    assert log.report.rows_read == 1_999
    assert log.report.dropped == {"duplicate event": 142}
    assert (log.num_users, len(log)) == (34, 1_857)
    assert log.frame["event_type"].value_counts().to_dict() == {"view": 1735, "cart": 70, "purchase": 34,
                                                                 "favourite": 18}
    assert (log.frame["region"] == "unknown").sum() == 1_311
    assert log.frame.loc[log.frame["region"] != "unknown", "region"].str.len().eq(3).all()

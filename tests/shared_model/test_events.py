"""Tests for the events schema: CSV/Parquet loading, clear errors naming file/row/column, and drop counts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from shared_model.events import EventsError, LoadReport, load_events

HEADER = "user_id,item_id,timestamp"
JAN_1_2024 = 1_704_067_200  # 2024-01-01T00:00:00Z in unix seconds
DAY = 86_400


def _write(tmp_path: Path, text: str | bytes, name: str = "events.csv") -> Path:
    """Write `text` (str as UTF-8, bytes as given) into tmp_path/name."""
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_csv_load_canonical_columns_sorted_by_user_then_time(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{HEADER},event_type,region\nb,i2,30,view,x\na,i1,20,cart,y\nb,i3,10,buy,x\n")
    log = load_events(path)
    frame = log.frame
    assert list(frame.columns) == ["user_id", "item_id", "timestamp", "event_type", "region"]
    assert list(frame["user_id"]) == ["a", "b", "b"]
    assert list(frame["item_id"]) == ["i1", "i3", "i2"]
    assert list(frame["timestamp"]) == [20, 10, 30]
    assert list(frame["event_type"]) == ["cart", "purchase", "view"]
    assert (len(log), log.num_users, log.has_timestamps) == (3, 2, True)
    assert (log.report.rows_read, log.report.rows_kept, log.report.dropped) == (3, 3, {})


def test_tsv_is_read_with_tabs(tmp_path: Path) -> None:
    log = load_events(_write(tmp_path, "user_id\titem_id\ttimestamp\nu\ti\t5\n", "events.tsv"))
    assert log.frame[["user_id", "item_id", "timestamp"]].values.tolist() == [["u", "i", 5]]


def test_parquet_load_turns_ids_into_strings(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pd.DataFrame({"user_id": [7, 7, 3], "item_id": [10, 20, 10], "timestamp": [200, 100, 50],
                  "event_type": ["view", "cart", "order"]}).to_parquet(path)
    frame = load_events(path).frame
    assert list(frame["user_id"]) == ["3", "7", "7"]
    assert list(frame["item_id"]) == ["10", "20", "10"]
    assert list(frame["timestamp"]) == [50, 100, 200]
    assert list(frame["event_type"]) == ["purchase", "cart", "view"]


def test_parquet_datetime_column_becomes_unix_seconds(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    times = pd.to_datetime(["2024-01-01 00:00:00", "2024-01-02 00:01:00"], format="%Y-%m-%d %H:%M:%S")
    pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": times}).to_parquet(path)
    assert list(load_events(path).frame["timestamp"]) == [JAN_1_2024, JAN_1_2024 + DAY + 60]


def test_column_mapping_renames_file_columns(tmp_path: Path) -> None:
    path = _write(tmp_path, "customer,sku,when,action,shop\nc1,s1,100,click,m1\n")
    mapping = {"user_id": "customer", "item_id": "sku", "timestamp": "when", "event_type": "action",
               "merchant_id": "shop"}
    frame = load_events(path, columns=mapping).frame
    assert frame.iloc[0].to_dict() == {"user_id": "c1", "item_id": "s1", "timestamp": 100, "event_type": "view",
                                       "merchant_id": "m1"}


@pytest.mark.parametrize(("stamp", "seconds"), [
    ("2024-01-01", JAN_1_2024),
    ("2024-01-01T00:00:00", JAN_1_2024),
    ("2024-01-02T00:01:40", JAN_1_2024 + DAY + 100),
])
def test_iso_date_strings_become_unix_seconds(tmp_path: Path, stamp: str, seconds: int) -> None:
    log = load_events(_write(tmp_path, f"{HEADER}\nu,a,{stamp}\n"))
    assert log.frame["timestamp"].tolist() == [seconds]


def test_integer_unix_seconds_are_kept(tmp_path: Path) -> None:
    frame = load_events(_write(tmp_path, f"{HEADER}\nu,a,1700000060\nu,b,1700000000\n")).frame
    assert frame["timestamp"].tolist() == [1_700_000_000, 1_700_000_060]
    assert frame["timestamp"].dtype == "int64"


def test_explicit_timestamp_format_is_used(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{HEADER}\nu,a,02/01/2024\n")
    assert load_events(path, timestamp_format="%d/%m/%Y").frame["timestamp"].tolist() == [JAN_1_2024 + DAY]


def test_iso_dates_of_mixed_precision_in_one_column(tmp_path: Path) -> None:
    # Both values are valid ISO 8601; a date-only first row must not make later date-times "unparsable".
    path = _write(tmp_path, f"{HEADER}\nu,a,2024-01-01\nu,b,2024-01-01 00:00:30\n")
    assert load_events(path).frame["timestamp"].tolist() == [JAN_1_2024, JAN_1_2024 + 30]


@pytest.mark.parametrize("stamp", ["2024-01-01T02:00:00+02:00", "2024-01-01T00:00:00Z"])
def test_iso_timestamps_with_utc_offset_become_utc_seconds(tmp_path: Path, stamp: str) -> None:
    assert load_events(_write(tmp_path, f"{HEADER}\nu,a,{stamp}\n")).frame["timestamp"].tolist() == [JAN_1_2024]


def test_log_without_event_type_means_purchase(tmp_path: Path) -> None:
    frame = load_events(_write(tmp_path, f"{HEADER}\nu,a,1\nu,b,2\n")).frame
    assert frame["event_type"].tolist() == ["purchase", "purchase"]


@pytest.mark.parametrize(("spelling", "canonical"), [
    ("view", "view"), ("pv", "view"), ("click", "view"), ("1", "view"), ("  PV ", "view"),
    ("favourite", "favourite"), ("favorite", "favourite"), ("fav", "favourite"), ("2", "favourite"),
    ("cart", "cart"), ("add_to_cart", "cart"), ("3", "cart"), ("Cart", "cart"),
    ("purchase", "purchase"), ("buy", "purchase"), ("order", "purchase"), ("4", "purchase"),
])
def test_event_type_aliases(tmp_path: Path, spelling: str, canonical: str) -> None:
    log = load_events(_write(tmp_path, f"{HEADER},event_type\nu,a,1,{spelling}\n"))
    assert log.frame["event_type"].tolist() == [canonical]


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.csv"
    with pytest.raises(EventsError, match="file does not exist") as caught:
        load_events(path)
    assert str(caught.value).startswith(str(path))
    assert caught.value.path == str(path)


@pytest.mark.parametrize(("text", "message"), [
    (b"", "file is empty"),
    (b"\n", "file has no header and no rows"),
    (f"{HEADER}\n".encode(), "file has a header but no rows"),
])
def test_empty_and_header_only_files(tmp_path: Path, text: bytes, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(EventsError, match=message) as caught:
        load_events(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_missing_required_column_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "user_id,item_id,time\nu,a,1\n")
    with pytest.raises(EventsError, match=r"column 'timestamp': missing required column") as caught:
        load_events(path)
    assert caught.value.column == "timestamp"


def test_missing_mapped_column_names_the_files_spelling(tmp_path: Path) -> None:
    path = _write(tmp_path, "user_id,item_id,timestamp\nu,a,1\n")
    with pytest.raises(EventsError, match="column 'customer'") as caught:
        load_events(path, columns={"user_id": "customer"})
    assert caught.value.column == "customer"


def test_duplicate_header_column_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "user_id,item_id,timestamp,item_id\nu,a,1,b\n")
    with pytest.raises(EventsError, match=r"duplicate column in header.*item_id"):
        load_events(path)


@pytest.mark.parametrize(("text", "row", "value"), [
    (f"{HEADER}\nu,a,2024-01-01\nu,b,2024-01-02\nu,c,yesterday\n", 4, "yesterday"),
    (f"{HEADER}\nu,a,1700000000\nu,b,1700000060\nu,c,yesterday\n", 4, "yesterday"),
    (f"{HEADER}\nu,a,1700000000\nu,b,\n", 3, ""),
], ids=["dates", "unix-seconds", "unix-seconds-empty"])
def test_unparsable_timestamp_names_file_line_and_column(tmp_path: Path, text: str, row: int, value: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(EventsError, match="unparsable timestamp") as caught:
        load_events(path)
    assert (caught.value.row, caught.value.column) == (row, "timestamp")
    assert str(caught.value).startswith(f"{path}, row {row}, column 'timestamp': unparsable timestamp {value!r}")


def test_unparsable_timestamp_row_counts_blank_lines(tmp_path: Path) -> None:
    # The row is the 1-based line of the file, as an editor shows it (the adapters count blank lines too).
    path = _write(tmp_path, f"{HEADER}\nu,a,2024-01-01\n\nu,b,yesterday\n")
    with pytest.raises(EventsError) as caught:
        load_events(path)
    assert caught.value.row == 4


def test_unparsable_timestamp_reports_mapped_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "user_id,item_id,when\nu,a,soon\n")
    with pytest.raises(EventsError, match=r"row 2, column 'when'"):
        load_events(path, columns={"timestamp": "when"})


def test_unknown_event_type_names_row_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{HEADER},event_type\nu,a,1,view\nu,b,2,wishlist\n")
    with pytest.raises(EventsError, match="unknown event type 'wishlist'") as caught:
        load_events(path)
    assert (caught.value.row, caught.value.column) == (3, "event_type")


@pytest.mark.parametrize(("text", "row", "column"), [
    (f"{HEADER}\nu,a,1\n,b,2\n", 3, "user_id"),
    (f"{HEADER}\nu,a,1\n   ,b,2\n", 3, "user_id"),
    (f"{HEADER}\nu,,1\n", 2, "item_id"),
])
def test_empty_id_names_row_and_column(tmp_path: Path, text: str, row: int, column: str) -> None:
    with pytest.raises(EventsError, match="empty id") as caught:
        load_events(_write(tmp_path, text))
    assert (caught.value.row, caught.value.column) == (row, column)


def test_null_user_id_in_parquet_is_an_empty_id_error(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pd.DataFrame({"user_id": ["u", None], "item_id": ["a", "b"], "timestamp": [1, 2]}).to_parquet(path)
    with pytest.raises(EventsError, match="empty id") as caught:
        load_events(path)
    assert caught.value.column == "user_id"


def test_non_utf8_file_is_an_error_asking_for_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{HEADER}\nJosé,a,1\n".encode("latin-1"))
    with pytest.raises(EventsError, match=r"not valid UTF-8 at byte \d+; re-encode the file as UTF-8") as caught:
        load_events(path)
    assert caught.value.path == str(path)


def test_non_utf8_error_gives_the_byte_offset_in_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{HEADER}\nJosé,a,1\n".encode("latin-1"))
    offset = len(f"{HEADER}\nJos".encode())  # where 0xE9 sits in the file, not inside its field
    with pytest.raises(EventsError, match=f"not valid UTF-8 at byte {offset};"):
        load_events(path)


def test_exact_duplicates_are_dropped_and_counted(tmp_path: Path) -> None:
    text = f"{HEADER},event_type\nu,a,1,view\nu,a,1,view\nu,a,1,pv\nu,a,1,cart\nu,a,2,view\n"
    log = load_events(_write(tmp_path, text))
    assert log.frame[["item_id", "timestamp", "event_type"]].values.tolist() == [
        ["a", 1, "view"], ["a", 1, "cart"], ["a", 2, "view"]]  # "pv" is a view, so it duplicates row 1 too
    assert log.report.rows_read == 5
    assert log.report.rows_kept == 3
    assert log.report.dropped == {"duplicate event": 2}


def test_summary_of_a_loaded_file(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{HEADER}\nu,a,1\nu,a,1\nu,b,2\n")
    assert load_events(path).report.summary() == f"{path}: 3 rows read, 2 kept, dropped (duplicate event: 1)"


def test_load_report_counts_and_summary() -> None:
    report = LoadReport(source="site-a", rows_read=10)
    assert report.summary() == "site-a: 10 rows read, 10 kept, dropped (none)"
    report.drop("unknown item", 2)
    report.drop("duplicate event", 1)
    report.drop("nothing", 0)
    report.drop("unknown item", 3)
    assert report.dropped == {"unknown item": 5, "duplicate event": 1}
    assert report.rows_kept == 4
    assert report.summary() == "site-a: 10 rows read, 4 kept, dropped (duplicate event: 1, unknown item: 5)"

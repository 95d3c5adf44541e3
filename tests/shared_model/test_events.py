"""Tests for the events schema: CSV/Parquet loading, clear errors naming file/row/column, and drop counts."""

from __future__ import annotations

import re
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
    assert load_events(path).report.summary() == (f"{path}: 3 rows read, 2 kept, dropped (duplicate event: 1); "
                                                   "timestamps in seconds (detected from their magnitude)")


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


# --- hole 7 of issue 25: timestamps that overflow or hide their unit, ids that are not ids ---------------------


@pytest.mark.parametrize(("stamp", "message"), [
    ("inf", "non-finite timestamp 'inf'"),
    ("-inf", "non-finite timestamp '-inf'"),
    ("1e30", "timestamp out of range '1e30'"),
    ("1234567890123456789012345", "timestamp out of range '1234567890123456789012345'"),
    ("-5", "timestamp before 1970 '-5'"),
    ("1900-01-01", "timestamp before 1970 '1900-01-01'"),
    ("2200-01-01T00:00:00", "timestamp after 2100 '2200-01-01T00:00:00'"),
])
def test_unusable_timestamps_name_file_row_and_column(tmp_path: Path, stamp: str, message: str) -> None:
    # Before: inf, 1e30 and 25 digits became INT64_MIN and moved the event to the front of the user's sequence.
    path = _write(tmp_path, f"{HEADER}\nu,a,{stamp}\n")
    with pytest.raises(EventsError, match=re.escape(message)) as caught:
        load_events(path)
    assert (caught.value.path, caught.value.row, caught.value.column) == (str(path), 2, "timestamp")


@pytest.mark.parametrize(("scale", "unit"), [(1, "seconds"), (1_000, "milliseconds"), (1_000_000, "microseconds"),
                                             (1_000_000_000, "nanoseconds")])
def test_timestamp_unit_is_detected_converted_and_reported(tmp_path: Path, scale: int, unit: str) -> None:
    path = _write(tmp_path, f"{HEADER}\nu,a,{JAN_1_2024 * scale}\nu,b,{(JAN_1_2024 + 90) * scale + scale // 2}\n")
    log = load_events(path)
    assert log.frame["timestamp"].tolist() == [JAN_1_2024, JAN_1_2024 + 90]  # floored to whole seconds
    assert f"timestamps in {unit} (detected from their magnitude)" in log.report.notes
    assert f"timestamps in {unit}" in log.report.summary()


def test_configured_timestamp_unit_is_used(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{HEADER}\nu,a,{JAN_1_2024 * 1000}\n")
    log = load_events(path, timestamp_unit="ms")
    assert log.frame["timestamp"].tolist() == [JAN_1_2024]
    assert log.report.notes[-1] == "timestamps in milliseconds (as configured)"
    with pytest.raises(EventsError, match=r"row 2, column 'timestamp': timestamp after 2100 .*read as seconds"):
        load_events(path, timestamp_unit="s")


def test_unknown_timestamp_unit_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timestamp_unit must be one of auto, s, ms, us, ns, got 'hours'"):
        load_events(_write(tmp_path, f"{HEADER}\nu,a,1\n"), timestamp_unit="hours")


def test_ambiguous_timestamp_asks_for_the_unit(tmp_path: Path) -> None:
    # 5e10 is year 3554 as seconds and 1971 as milliseconds: no guess.
    path = _write(tmp_path, f"{HEADER}\nu,a,{JAN_1_2024}\nu,b,50000000000\n")
    with pytest.raises(EventsError, match=r"row 3, column 'timestamp': ambiguous timestamp .*set timestamp_unit"):
        load_events(path)
    assert load_events(path, timestamp_unit="ms").frame["timestamp"].max() == 50_000_000


def test_mixed_timestamp_units_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, f"{HEADER}\nu,a,{JAN_1_2024 * 1000}\nu,b,{JAN_1_2024}\n")
    with pytest.raises(EventsError, match=r"row 3, .*looks like seconds while the largest.*milliseconds"):
        load_events(path)


def test_iso_dates_are_reported_as_dates(tmp_path: Path) -> None:
    assert load_events(_write(tmp_path, f"{HEADER}\nu,a,2024-01-01\n")).report.notes == [
        "timestamps as dates (ISO 8601)"]


@pytest.mark.parametrize("marker", ["NaN", "nan", "None", "null", "NULL", "NA", "N/A", "<NA>", "NaT"])
@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_missing_value_markers_are_not_ids(tmp_path: Path, marker: str, column: str) -> None:
    # Before: "NaN" became a user (every NaN row one shared user) or an item.
    row = {"user_id": "u", "item_id": "a", "timestamp": "1"} | {column: marker}
    path = _write(tmp_path, f"{HEADER}\nu,b,1\n{row['user_id']},{row['item_id']},{row['timestamp']}\n")
    with pytest.raises(EventsError, match=f"missing-value marker used as an id: {re.escape(repr(marker))}") as caught:
        load_events(path)
    assert (caught.value.row, caught.value.column) == (3, column)


def test_id_with_a_control_character_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, f'{HEADER}\nu,a,1\n"v\nw",b,2\n')
    with pytest.raises(EventsError, match=r"row 3, column 'user_id': id contains a control character: 'v\\nw'"):
        load_events(path)


def test_integer_valued_float_ids_equal_integer_ids_and_are_counted(tmp_path: Path) -> None:
    # Before: "1" and "1.0" were two users, and " 2" kept its space only in the report's eyes.
    path = _write(tmp_path, f"{HEADER}\n1,10,1\n1.0,20.00,2\n 2 ,10,3\n-3.0,1.5,4\n")
    log = load_events(path)
    assert log.frame["user_id"].tolist() == ["-3", "1", "1", "2"]
    assert log.frame["item_id"].tolist() == ["1.5", "10", "20", "10"]
    assert log.num_users == 3
    assert log.report.normalised_ids == {"user_id": 3, "item_id": 1}
    assert "3 user_id value(s) normalised" in log.report.summary()


def test_parquet_float_ids_read_as_integers(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pd.DataFrame({"user_id": [7.0, 7.0], "item_id": [1, 2], "timestamp": [1, 2]}).to_parquet(path)
    log = load_events(path)
    assert log.frame["user_id"].tolist() == ["7", "7"]
    assert log.report.normalised_ids == {"user_id": 2}


def test_rows_after_a_quoted_newline_keep_their_file_line(tmp_path: Path) -> None:
    path = _write(tmp_path, f'{HEADER},item_title\nu,a,1,"two\nlines"\nu,b,soon,x\n')
    with pytest.raises(EventsError) as caught:
        load_events(path)
    assert caught.value.row == 4  # the record starts on line 4 of the file, not on record 3


@pytest.mark.parametrize(("text", "row", "message"), [
    (f"{HEADER}\nu,a,1,extra\n", 2, "more fields than the header's 3"),
    (f"{HEADER}\nu,a,1\nu,b,2,extra\n", 3, "expected 3 fields like the header, found 4"),
])
def test_rows_with_too_many_fields_name_their_line(tmp_path: Path, text: str, row: int, message: str) -> None:
    # Before: pandas silently used the extra leading field of row 2 as an index and shifted every column.
    with pytest.raises(EventsError, match=message) as caught:
        load_events(_write(tmp_path, text))
    assert caught.value.row == row


def test_wrong_separator_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(EventsError, match="the header looks separated by ';'"):
        load_events(_write(tmp_path, "user_id;item_id;timestamp\nu;a;1\n"))


def test_header_names_are_stripped(tmp_path: Path) -> None:
    assert len(load_events(_write(tmp_path, " user_id , item_id ,timestamp\nu,a,1\n"))) == 1


def test_nested_parquet_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pd.DataFrame({"user_id": [[1, 2]], "item_id": ["a"], "timestamp": [1]}).to_parquet(path)
    with pytest.raises(EventsError, match=r"column 'user_id': nested values"):
        load_events(path)

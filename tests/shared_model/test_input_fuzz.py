"""Broken events and catalog files: each gets a clear error naming the file, or loads with every row accounted for.

No other exception type escapes and nothing hangs (each case runs under a SIGALRM guard).
"""

from __future__ import annotations

import json
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared_model.adapters import load_dataset
from shared_model.catalog import CATALOG_FILE, CatalogError, ItemCatalog
from shared_model.events import EventLog, EventsError, load_events

H = "user_id,item_id,timestamp"
T = 1_700_000_000  # 2023-11-14 in unix seconds
GOOD = f"{H},event_type\nu1,a,{T},view\nu1,b,{T + 60},cart\nu2,a,{T + 5},buy\n"
GUARD_SECONDS = 5


@contextmanager
def time_guard(seconds: int = GUARD_SECONDS) -> Iterator[None]:
    """Fail the case instead of hanging the suite (SIGALRM: main thread, POSIX)."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _parquet(frame: pd.DataFrame) -> Callable[[Path], None]:
    """A writer of `frame` as Parquet."""
    return lambda path: frame.to_parquet(path)


# (case id, file name, content: text, bytes or a writer, expected: error regex, or {"users": n} for a clean load)
EVENT_CASES: list[tuple[str, str, str | bytes | Callable[[Path], None], str | dict[str, int]]] = [
    ("empty-file", "e.csv", b"", "file is empty"),
    ("only-newline", "e.csv", b"\n", "no header and no rows"),
    ("header-only", "e.csv", f"{H}\n", "header but no rows"),
    ("header-and-blank-lines", "e.csv", f"{H}\n\n\n", "header but no rows"),
    ("missing-timestamp-column", "e.csv", "user_id,item_id\nu,a\n", "column 'timestamp': missing required column"),
    ("missing-user-column", "e.csv", "item_id,timestamp\na,1\n", "column 'user_id': missing required column"),
    ("no-columns-at-all", "e.csv", ",,,\n,,,\n", "missing required column"),
    ("semicolon-delimiter", "e.csv", "user_id;item_id;timestamp\nu;a;1\n", "separated by ';'"),
    ("tab-delimiter-in-csv", "e.csv", "user_id\titem_id\ttimestamp\nu\ta\t1\n", "separated by '\\\\t'"),
    ("comma-delimiter-in-tsv", "e.tsv", f"{H}\nu,a,1\n", "separated by ','"),
    ("duplicated-header-column", "e.csv", f"{H},item_id\nu,a,1,b\n", "duplicate column in header"),
    ("duplicated-header-row", "e.csv", f"{H}\n{H}\nu,a,1\n", "row 2, column 'timestamp': unparsable timestamp"),
    ("binary-garbage", "e.csv", random.Random(1).randbytes(300), "not valid UTF-8"),
    ("latin-1-bytes", "e.csv", f"{H}\nJosé,a,1\n".encode("latin-1"), "row 2: not valid UTF-8 at byte"),
    ("utf-16", "e.csv", f"{H}\nu,a,1\n".encode("utf-16"), "not valid UTF-8 at byte 0"),
    ("nul-in-id", "e.csv", f"{H}\nu\x00,a,1\n", "row 2, column 'user_id': id contains a control character"),
    ("ascii-control-garbage", "e.csv", bytes(range(1, 128)) * 3, "expected 1 fields like the header"),
    ("unclosed-quote", "e.csv", f'{H}\n"u,a,1\n', "EOF inside string"),
    ("too-many-fields-first-row", "e.csv", f"{H}\nu,a,1,x\n", "row 2: more fields than the header"),
    ("too-many-fields-later-row", "e.csv", f"{H}\nu,a,1\nu,b,2,x\n", "row 3: expected 3 fields"),
    ("too-few-fields", "e.csv", f"{H}\nu,a\n", "row 2, column 'timestamp': unparsable timestamp ''"),
    ("quoted-newline-in-id", "e.csv", f'{H}\n"u\nv",a,1\n', "row 2, column 'user_id': id contains a control"),
    ("quoted-newline-in-title", "e.csv", f'{H},item_title\nu,a,1,"x\ny"\nu,b,z,t\n', "row 4, column 'timestamp'"),
    ("ts-nan", "e.csv", f"{H}\nu,a,NaN\n", "row 2, column 'timestamp': unparsable timestamp 'NaN'"),
    ("ts-inf", "e.csv", f"{H}\nu,a,{T}\nu,b,inf\n", "row 3, column 'timestamp': non-finite timestamp 'inf'"),
    ("ts-minus-inf", "e.csv", f"{H}\nu,a,-inf\n", "non-finite timestamp '-inf'"),
    ("ts-1e30", "e.csv", f"{H}\nu,a,{T}\nu,b,1e30\n", "row 3, column 'timestamp': timestamp out of range '1e30'"),
    ("ts-25-digits", "e.csv", f"{H}\nu,a,{'9' * 25}\n", "timestamp out of range"),
    ("ts-uint64-max", "e.csv", f"{H}\nu,a,18446744073709551615\n", "timestamp out of range"),
    ("ts-negative", "e.csv", f"{H}\nu,a,-5\n", "row 2, column 'timestamp': timestamp before 1970 '-5'"),
    ("ts-ambiguous", "e.csv", f"{H}\nu,a,50000000000\n", "ambiguous timestamp .*set timestamp_unit"),
    ("ts-mixed-units", "e.csv", f"{H}\nu,a,{T}\nu,b,{T * 1000}\n", "row 2, .*timestamp in another unit"),
    ("ts-empty", "e.csv", f"{H}\nu,a,{T}\nu,b,\n", "row 3, column 'timestamp': unparsable timestamp ''"),
    ("ts-words", "e.csv", f"{H}\nu,a,yesterday\n", "unparsable timestamp 'yesterday'"),
    ("ts-hex", "e.csv", f"{H}\nu,a,0x10\n", "unparsable timestamp '0x10'"),
    ("ts-year-1900", "e.csv", f"{H}\nu,a,1900-01-01\n", "timestamp before 1970 '1900-01-01'"),
    ("ts-year-9999", "e.csv", f"{H}\nu,a,9999-12-31\n", "timestamp after 2100 '9999-12-31'"),
    ("ts-year-10000", "e.csv", f"{H}\nu,a,10000-01-01\n", "unparsable timestamp '10000-01-01'"),
    ("id-NaN", "e.csv", f"{H}\nNaN,a,1\n", "row 2, column 'user_id': missing-value marker used as an id: 'NaN'"),
    ("id-nan-item", "e.csv", f"{H}\nu,nan,1\n", "column 'item_id': missing-value marker"),
    ("id-None", "e.csv", f"{H}\nNone,a,1\n", "missing-value marker used as an id: 'None'"),
    ("id-null", "e.csv", f"{H}\nu,a,1\nnull,b,2\n", "row 3, column 'user_id': missing-value marker"),
    ("id-empty", "e.csv", f"{H}\nu,a,1\n,b,2\n", "row 3, column 'user_id': empty id"),
    ("id-whitespace", "e.csv", f"{H}\n   ,a,1\n", "row 2, column 'user_id': empty id"),
    ("event-type-unknown", "e.csv", f"{H},event_type\nu,a,1,wishlist\n", "unknown event type 'wishlist'"),
    ("event-type-empty", "e.csv", f"{H},event_type\nu,a,1,\n", "unknown event type ''"),
    ("huge-field", "e.csv", f"{H}\nu,{'x' * 1_000_000},{T}\n", {"users": 1}),
    ("bom", "e.csv", b"\xef\xbb\xbf" + f"{H}\nu,a,{T}\n".encode(), {"users": 1}),
    ("crlf", "e.csv", f"{H}\r\nu,a,{T}\r\n", {"users": 1}),
    ("cr-only", "e.csv", f"{H}\ru,a,{T}\r", {"users": 1}),
    ("one-user", "e.csv", f"{H}\nu,a,{T}\nu,b,{T + 1}\n", {"users": 1}),
    ("ids-1-and-1.0", "e.csv", f"{H}\n1,a,{T}\n1.0,b,{T + 1}\n 1 ,c,{T + 2}\n", {"users": 1, "normalised": 2}),
    ("exact-duplicates", "e.csv", f"{H}\nu,a,{T}\nu,a,{T}\nu,a,{T}\n", {"users": 1, "dropped": 2}),
    ("ts-milliseconds", "e.csv", f"{H}\nu,a,{T * 1000}\n", {"users": 1, "first": T}),
    ("ts-microseconds", "e.csv", f"{H}\nu,a,{T * 10**6}\n", {"users": 1, "first": T}),
    ("ts-nanoseconds", "e.csv", f"{H}\nu,a,{T * 10**9}\n", {"users": 1, "first": T}),
    ("ts-fractional-seconds", "e.csv", f"{H}\nu,a,{T}.75\n", {"users": 1, "first": T}),
    ("header-with-spaces", "e.csv", " user_id , item_id , timestamp \nu,a,1\n", {"users": 1}),
    ("parquet-garbage", "e.parquet", b"PAR1 not really parquet PAR1", "cannot parse"),
    ("parquet-empty-frame", "e.parquet", _parquet(pd.DataFrame({"user_id": pd.Series([], dtype=str),
                                                                 "item_id": pd.Series([], dtype=str),
                                                                 "timestamp": pd.Series([], dtype="int64")})),
     "header but no rows"),
    ("parquet-no-columns", "e.parquet", _parquet(pd.DataFrame(index=range(2))), "missing required column"),
    ("parquet-null-id", "e.parquet", _parquet(pd.DataFrame({"user_id": [1.0, np.nan], "item_id": ["a", "b"],
                                                            "timestamp": [T, T]})), "row 3, column 'user_id': empty"),
    ("parquet-float-ids", "e.parquet", _parquet(pd.DataFrame({"user_id": [1.0, 1.0], "item_id": [2.0, 3.0],
                                                              "timestamp": [T, T + 1]})),
     {"users": 1, "normalised": 4}),
    ("parquet-inf-time", "e.parquet", _parquet(pd.DataFrame({"user_id": ["u"], "item_id": ["a"],
                                                             "timestamp": [np.inf]})), "non-finite timestamp"),
    ("parquet-nested", "e.parquet", _parquet(pd.DataFrame({"user_id": [[1, 2]], "item_id": ["a"],
                                                           "timestamp": [T]})), "column 'user_id': nested values"),
    ("parquet-ns-ints", "e.parquet", _parquet(pd.DataFrame({"user_id": ["u"], "item_id": ["a"],
                                                            "timestamp": [T * 10**9 + 999_999_999]})),
     {"users": 1, "first": T}),
    ("parquet-datetimes", "e.parquet", _parquet(pd.DataFrame({"user_id": ["u"], "item_id": ["a"],
                                                              "timestamp": pd.to_datetime([T], unit="s")})),
     {"users": 1, "first": T}),
]


def _write(path: Path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write a case's content (text as UTF-8)."""
    if callable(content):
        content(path)
    else:
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _check_accounted(log: EventLog) -> None:
    """Every row read is kept or counted in a drop reason."""
    report = log.report
    assert report.rows_kept == len(log.frame)
    assert report.rows_read == report.rows_kept + sum(report.dropped.values())
    assert log.frame["timestamp"].between(0, 4_102_444_800).all()


def test_there_are_at_least_50_kinds_of_broken_events_file() -> None:
    assert len({case[0] for case in EVENT_CASES}) == len(EVENT_CASES) >= 50


@pytest.mark.parametrize(("name", "content", "expected"), [case[1:] for case in EVENT_CASES],
                         ids=[case[0] for case in EVENT_CASES])
def test_broken_events_file_gets_a_clear_error_or_a_counted_load(tmp_path: Path, name: str,
                                                                 content: str | bytes | Callable[[Path], None],
                                                                 expected: str | dict[str, int]) -> None:
    path = _write(tmp_path / name, content)
    with time_guard():
        if isinstance(expected, str):
            with pytest.raises(EventsError, match=expected) as caught:
                load_events(path)
            assert str(caught.value).startswith(str(path))
            return
        log = load_events(path)
    _check_accounted(log)
    assert log.num_users == expected["users"]
    assert sum(log.report.dropped.values()) == expected.get("dropped", 0)
    assert sum(log.report.normalised_ids.values()) == expected.get("normalised", 0)
    if "first" in expected:
        assert log.frame["timestamp"].iloc[0] == expected["first"]


ADAPTER_CASES: list[tuple[str, str, str, str | bytes, str]] = [
    ("s3rec-garbage", "s3rec", "seq.txt", b"\xff\xfe\x00garbage", "not valid utf-8"),
    ("s3rec-float-id", "s3rec", "seq.txt", "1 2 3.0\n", "not an integer id: '3.0'"),
    ("s3rec-user-without-items", "s3rec", "seq.txt", "1 2 3\n4\n", "row 2: user 4 has no items"),
    ("tianchi-year-2200", "tianchi", "t.csv",
     "user_id,item_id,behavior_type,user_geohash,item_category,time\n1,2,1,,3,2200-01-01 00\n",
     "row 2, column 'time': timestamp after 2100"),
    ("tianchi-nan-user", "tianchi", "t.csv",
     "user_id,item_id,behavior_type,user_geohash,item_category,time\nNaN,2,1,,3,2014-12-06 02\n",
     "column 'user_id': missing-value marker"),
]


@pytest.mark.parametrize(("fmt", "name", "content", "expected"), [case[1:] for case in ADAPTER_CASES],
                         ids=[case[0] for case in ADAPTER_CASES])
def test_broken_adapter_files_get_a_clear_error(tmp_path: Path, fmt: str, name: str, content: str | bytes,
                                                expected: str) -> None:
    path = _write(tmp_path / name, content)
    with time_guard(), pytest.raises(EventsError, match=expected) as caught:
        load_dataset(fmt, path)
    assert str(caught.value).startswith(str(path))


VALID_CATALOG = json.dumps({"fingerprint": ItemCatalog(["a", "b"]).fingerprint, "item_ids": ["a", "b"],
                            "titles": {"a": "A"}, "attributes": {"b": ["x"]}})
CATALOG_CASES: list[tuple[str, str | bytes, str]] = [
    ("empty-file", "", "invalid JSON at line 1"),
    ("truncated", VALID_CATALOG[: len(VALID_CATALOG) // 2], "invalid JSON at line 1"),
    ("not-json", "item_ids: a, b", "invalid JSON"),
    ("trailing-garbage", VALID_CATALOG + "}", "invalid JSON"),
    ("binary", bytes(range(256)), "not valid UTF-8"),
    ("null", "null", "found null"),
    ("list", '["a", "b"]', "found array"),
    ("number", "42", "found number"),
    ("string", '"a"', "found string"),
    ("empty-object", "{}", "missing key 'item_ids'"),
    ("ids-null", '{"item_ids": null}', "must be an array of strings, found null"),
    ("ids-object", '{"item_ids": {"a": 1}}', "found object"),
    ("ids-empty", '{"item_ids": []}', "'item_ids' is empty"),
    ("ids-numbers", '{"item_ids": [1, 2]}', r"item_ids\[0\] must be a string, found number"),
    ("ids-nested", '{"item_ids": [["a"]]}', r"item_ids\[0\] must be a string, found array"),
    ("ids-duplicate", '{"item_ids": ["a", "b", "a"]}', "listed twice"),
    ("ids-blank", '{"item_ids": [" a"]}', "surrounding whitespace"),
    ("titles-list", '{"item_ids": ["a"], "titles": ["A"]}', "'titles' must be an object"),
    ("titles-null", '{"item_ids": ["a"], "titles": null}', "'titles' must be an object"),
    ("title-number", '{"item_ids": ["a"], "titles": {"a": 1}}', "must be a string, found number"),
    ("title-unknown-item", '{"item_ids": ["a"], "titles": {"b": "B"}}', "not in item_ids"),
    ("attributes-string", '{"item_ids": ["a"], "attributes": {"a": "x"}}', "must be an array of strings"),
    ("fingerprint-wrong", '{"item_ids": ["a"], "fingerprint": "' + "0" * 64 + '"}', "stored fingerprint does not"),
    ("fingerprint-not-hex", '{"item_ids": ["a"], "fingerprint": "xyz"}', "64 lowercase hex digits"),
    ("unknown-key", '{"item_ids": ["a"], "items": ["b"]}', "unknown key"),
    ("deep-nesting", "[" * 100_000 + "]" * 100_000, "nested too deeply|found array"),
    ("nan-literal", '{"item_ids": [NaN]}', "must be a string, found number"),
]


def test_there_are_many_kinds_of_broken_catalog() -> None:
    assert len({case[0] for case in CATALOG_CASES}) == len(CATALOG_CASES) >= 25


@pytest.mark.parametrize(("content", "expected"), [case[1:] for case in CATALOG_CASES],
                         ids=[case[0] for case in CATALOG_CASES])
def test_broken_catalog_gets_an_error_naming_the_file(tmp_path: Path, content: str | bytes, expected: str) -> None:
    path = _write(tmp_path / CATALOG_FILE, content)
    with time_guard(), pytest.raises(CatalogError, match=expected) as caught:
        ItemCatalog.load(path)
    assert str(caught.value).startswith(f"{path}: ")


def _mutations(text: str, seed: int, count: int) -> Iterator[bytes]:
    """Seeded random damage to `text`: byte flips, deletions, insertions of delimiters and quotes, truncation."""
    rng = random.Random(seed)
    specials = [b",", b"\n", b'"', b"\t", b"\x00", b"\xff", b"e", b"-", b".", b"9" * 20, b"NaN", b"\r"]
    for _ in range(count):
        data = bytearray(text.encode("utf-8"))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) + 1)
            match rng.randrange(4):
                case 0:
                    data[at:at] = rng.choice(specials)
                case 1:
                    del data[at:at + rng.randint(1, 5)]
                case 2:
                    data[min(at, len(data) - 1)] = rng.randrange(256)
                case _:
                    del data[at:]
        yield bytes(data)


def test_randomly_damaged_events_files_never_escape_with_another_error(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    outcomes = {"error": 0, "loaded": 0}
    for data in _mutations(GOOD, seed=0, count=150):
        path.write_bytes(data)
        with time_guard():
            try:
                log = load_events(path)
            except EventsError as err:
                assert str(err).startswith(str(path))
                outcomes["error"] += 1
                continue
        _check_accounted(log)
        outcomes["loaded"] += 1
    assert outcomes["error"] > 0 and outcomes["loaded"] > 0  # the damage really spans both outcomes


def test_randomly_damaged_catalogs_never_escape_with_another_error(tmp_path: Path) -> None:
    path = tmp_path / CATALOG_FILE
    for data in _mutations(VALID_CATALOG, seed=1, count=150):
        path.write_bytes(data)
        with time_guard():
            try:
                ItemCatalog.load(path)
            except CatalogError as err:
                assert str(err).startswith(f"{path}: ")

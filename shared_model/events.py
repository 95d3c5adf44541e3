"""The canonical behaviour-event schema, and loading CSV/Parquet logs into it with clear errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from shared_model.event_log import EVENT_TYPE_CODES, EVENT_TYPES, EventLog, LoadReport
from shared_model.timestamps import TIMESTAMP_UNITS, UNIT_NAMES, TimestampError, check_range, numbers_to_seconds

EVENT_TYPE_ALIASES: dict[str, str] = {
    "1": "view", "pv": "view", "click": "view", "favorite": "favourite", "fav": "favourite",
    "2": "favourite", "3": "cart", "add_to_cart": "cart", "4": "purchase", "buy": "purchase",
    "order": "purchase",
}
REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp")
OPTIONAL_COLUMNS: tuple[str, ...] = ("event_type", "region", "merchant_id", "item_title")
ID_COLUMNS: tuple[str, ...] = ("user_id", "item_id")
# Spellings that tools write for a missing value (pandas, R, SQL exports): never a real user or item.
MISSING_MARKERS = frozenset({"nan", "none", "null", "nat", "na", "n/a", "<na>", "#n/a"})
_INTEGER_FLOAT = r"(-?\d+)\.0+"  # '1.0': an integer id that went through a float column (Parquet with a null)
_CONTROL = r"[\x00-\x1f\x7f]"
_FIELD_COUNT = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")  # pandas' C parser message


class EventsError(ValueError):
    """Bad input in an events file; the message names the file, and the row and column when known."""

    def __init__(self, path: str | Path, message: str, row: int | None = None, column: str | None = None) -> None:
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {message}")
        self.path, self.row, self.column = str(path), row, column


def _utf8_error(path: Path) -> EventsError:
    """Locate the first byte that is not UTF-8 in the whole file (pandas only knows the field offset)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return EventsError(path, f"not valid UTF-8 at byte {err.start}; re-encode the file as UTF-8", row=line)
    return EventsError(path, "not valid UTF-8; re-encode the file as UTF-8")


def _read_parquet(path: Path) -> pd.DataFrame:
    """A Parquet file as strings (nulls become ""); nested values (lists, maps) are refused, naming the column."""
    frame = pd.read_parquet(path)
    for column in frame.columns:
        first = frame[column].dropna().head(1).tolist()
        if first and isinstance(first[0], list | dict | np.ndarray):
            raise EventsError(path, f"nested values ({type(first[0]).__name__}) where plain values belong",
                              column=str(column))
    return frame.apply(lambda col: col.astype(object).where(col.notna(), "").astype(str))


def _parser_error(path: Path, err: Exception) -> EventsError:
    """An EventsError for a pandas parse failure, with the file line when pandas names one."""
    found = _FIELD_COUNT.search(str(err))
    if found:
        expected, line, saw = (int(g) for g in found.groups())
        return EventsError(path, f"expected {expected} fields like the header, found {saw}", row=line)
    return EventsError(path, f"cannot parse: {' '.join(str(err).split())}")


def _file_lines(frame: pd.DataFrame) -> np.ndarray:
    """The 1-based file line each record starts on: quoted fields may hold newlines, so a record can span lines."""
    spans = np.ones(len(frame), dtype=np.int64)
    for column in frame.columns:
        values = frame[column]
        if values.str.contains("\n", regex=False).any():
            spans += values.str.count("\n").to_numpy(dtype=np.int64)
    return 2 + np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int64)


def read_table(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read CSV/TSV/Parquet as strings, with the 1-based file line of every row (blank lines skipped).

    Header names are stripped of surrounding whitespace. For Parquet the "line" is the record number + 1, so
    messages read the same as for CSV.
    """
    path = Path(path)
    if not path.exists():
        raise EventsError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise EventsError(path, "file is empty")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = _read_parquet(path)
            frame.columns = [str(c).strip() for c in frame.columns]
            return frame, np.arange(2, len(frame) + 2)
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8",
                            skip_blank_lines=False)
    except EventsError:
        raise
    except UnicodeDecodeError as err:
        raise _utf8_error(path) from err
    except pd.errors.EmptyDataError as err:
        raise EventsError(path, "file has no header and no rows") from err
    except (pd.errors.ParserError, OSError, ValueError) as err:
        raise _parser_error(path, err) from err
    if not isinstance(frame.index, pd.RangeIndex):  # pandas turns the extra leading fields of row 2 into an index
        raise EventsError(path, f"more fields than the header's {len(frame.columns)}", row=2)
    frame.columns = [str(c).strip() for c in frame.columns]
    lines = _file_lines(frame)
    blank = (frame == "").all(axis=1).to_numpy() if len(frame.columns) else np.zeros(len(frame), bool)
    return frame.loc[~blank].reset_index(drop=True), lines[~blank]


def _check_header(path: Path, frame: pd.DataFrame, columns: Mapping[str, str]) -> None:
    """Refuse duplicate headers and missing required columns, naming them."""
    header = [str(c) for c in frame.columns]
    mangled = [c for c in header if "." in c and c.rsplit(".", 1)[0] in header and c.rsplit(".", 1)[1].isdigit()]
    if len(set(header)) != len(header) or mangled:
        raise EventsError(path, f"duplicate column in header: {sorted(set(mangled)) or header}")
    for canonical in REQUIRED_COLUMNS:
        source = columns.get(canonical, canonical)
        if source not in header:
            other = [sep for sep in (";", "|", "\t", ",") if len(header) == 1 and sep in header[0]]
            hint = f"; the header looks separated by {other[0]!r}, not by this file type's separator" if other else ""
            raise EventsError(path, f"missing required column (have {header!r:.200}){hint}", column=source)


def _first_bad(path: str | Path, bad: np.ndarray, values: pd.Series, lines: np.ndarray, column: str,
               what: str, hint: str = "") -> EventsError:
    """An EventsError for the first flagged row, quoting its value and naming its file line."""
    first = int(np.flatnonzero(bad)[0])
    return EventsError(path, f"{what} {values.iloc[first]!r}{hint}", row=int(lines[first]), column=column)


def parse_timestamps(path: str | Path, values: pd.Series, column: str, fmt: str | None, lines: np.ndarray,
                     unit: str = "auto") -> tuple[np.ndarray, str]:
    """Unix seconds and a note saying how they were read, from numbers or dates.

    Numbers are in `unit` (s, ms, us, ns; "auto" detects it from their magnitude); dates are ISO 8601 unless `fmt`
    is given (offsets become UTC). Non-finite, overflowing, pre-1970 and post-2100 times raise EventsError.
    """
    if unit not in TIMESTAMP_UNITS:
        raise ValueError(f"timestamp_unit must be one of {', '.join(TIMESTAMP_UNITS)}, got {unit!r}")
    numeric = pd.to_numeric(values, errors="coerce")
    try:
        if fmt is None and (numeric.notna().any() or unit != "auto"):  # numbers: any non-number is the error
            if numeric.isna().any():
                hint = "" if unit == "auto" else f" (timestamp_unit {unit!r} expects numbers)"
                raise _first_bad(path, numeric.isna().to_numpy(), values, lines, column, "unparsable timestamp", hint)
            seconds, found = numbers_to_seconds(numeric, unit)
            how = "detected from their magnitude" if unit == "auto" else "as configured"
            return seconds, f"timestamps in {UNIT_NAMES[found]} ({how})"
        parsed = pd.to_datetime(values, format=fmt or "ISO8601", errors="coerce", utc=True)
        if parsed.isna().any():
            raise _first_bad(path, parsed.isna().to_numpy(), values, lines, column, "unparsable timestamp")
        seconds = parsed.dt.tz_localize(None).astype("datetime64[s]").astype(np.int64).to_numpy()
        check_range(seconds, "a date")
    except TimestampError as err:
        raise _first_bad(path, np.arange(len(values)) == err.position, values, lines, column, err.what,
                         err.hint) from err
    return seconds, f"timestamps as dates ({fmt or 'ISO 8601'})"


def normalise_ids(path: str | Path, values: pd.Series, column: str, lines: np.ndarray) -> tuple[pd.Series, int]:
    """Stripped ids with integer-valued floats ('1.0') as integers ('1'), and how many were rewritten.

    Empty ids, missing-value markers ('NaN', 'None', 'null', ...) and control characters raise EventsError.
    """
    stripped = values.fillna("").astype(str).str.strip()
    for bad, what in ((stripped == "", "empty id"),
                      (stripped.str.lower().isin(MISSING_MARKERS), "missing-value marker used as an id:"),
                      (stripped.str.contains(_CONTROL, regex=True), "id contains a control character:")):
        flags = bad.to_numpy(dtype=bool)
        if flags.any():
            shown = "" if what == "empty id" else f" {stripped.iloc[int(np.flatnonzero(flags)[0])]!r}"
            raise EventsError(path, f"{what}{shown}", row=int(lines[int(np.flatnonzero(flags)[0])]), column=column)
    ids = stripped.str.replace(f"^{_INTEGER_FLOAT}$", r"\1", regex=True)
    return ids, int((ids != values.fillna("").astype(str)).sum())


def normalise_event_types(path: str | Path, values: pd.Series, column: str, lines: np.ndarray) -> pd.Series:
    """Map event-type spellings onto EVENT_TYPES; an unknown type is an error naming its row."""
    lowered = values.str.strip().str.lower()
    mapped = lowered.map(lambda v: v if v in EVENT_TYPE_CODES else EVENT_TYPE_ALIASES.get(v))
    if mapped.isna().any():
        raise _first_bad(path, mapped.isna().to_numpy(), values, lines, column, "unknown event type",
                         f" (expected one of {EVENT_TYPES})")
    return mapped.astype(str)


def canonicalise(path: str | Path, raw: pd.DataFrame, columns: Mapping[str, str],
                 timestamp_format: str | None = None, lines: np.ndarray | None = None,
                 report: LoadReport | None = None, timestamp_unit: str = "auto") -> pd.DataFrame:
    """Rename mapped columns, normalise and check ids, parse timestamps and event types.

    `lines` gives each row's file line for error messages (default: header on line 1, no blank lines);
    what was detected or rewritten (timestamp unit, ids) is noted in `report`.
    """
    lines = np.arange(2, len(raw) + 2) if lines is None else lines
    report = LoadReport(source=str(path)) if report is None else report
    out = pd.DataFrame()
    for canonical in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        source = columns.get(canonical, canonical)
        if source in raw.columns:
            out[canonical] = raw[source].fillna("").astype(str).str.strip()
    for key in ID_COLUMNS:
        out[key], changed = normalise_ids(path, raw[columns.get(key, key)], columns.get(key, key), lines)
        if changed:
            report.normalised_ids[key] = changed
            report.notes.append(f"{changed} {key} value(s) normalised (whitespace stripped, '1.0' read as '1')")
    out["timestamp"], note = parse_timestamps(path, out["timestamp"], columns.get("timestamp", "timestamp"),
                                              timestamp_format, lines, timestamp_unit)
    report.notes.append(note)
    if "event_type" in out:
        out["event_type"] = normalise_event_types(path, out["event_type"],
                                                  columns.get("event_type", "event_type"), lines)
    else:
        out["event_type"] = "purchase"  # a log without types records purchases
    return out


def load_events(path: str | Path, columns: Mapping[str, str] | None = None,
                timestamp_format: str | None = None, timestamp_unit: str = "auto") -> EventLog:
    """Load a CSV/TSV/Parquet events file into the canonical schema.

    `columns` maps canonical names to the file's names (e.g. {"user_id": "customer"}); `timestamp_unit` says
    what numeric times count (s, ms, us, ns; "auto" detects it and the report notes what it found). Exact
    duplicate events are dropped and counted in the report; everything else that is wrong raises EventsError.
    """
    path = Path(path)
    columns = dict(columns or {})
    raw, lines = read_table(path)
    _check_header(path, raw, columns)
    if raw.empty:
        raise EventsError(path, "file has a header but no rows")
    report = LoadReport(source=str(path), rows_read=len(raw))
    frame = canonicalise(path, raw, columns, timestamp_format, lines, report, timestamp_unit)
    return finish_events(frame, report)


def finish_events(frame: pd.DataFrame, report: LoadReport, has_timestamps: bool = True) -> EventLog:
    """Drop exact duplicate events (counted), sort by user then time (stable), and wrap as an EventLog."""
    duplicated = frame.duplicated(subset=["user_id", "item_id", "timestamp", "event_type"])
    report.drop("duplicate event", int(duplicated.sum()))
    frame = frame.loc[~duplicated]
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    return EventLog(frame=frame, report=report, has_timestamps=has_timestamps)

"""The canonical behaviour-event schema, and loading CSV/Parquet logs into it with clear errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

EVENT_TYPES: tuple[str, ...] = ("view", "favourite", "cart", "purchase")
# Row 0 of every event-type embedding is padding, so codes start at 1.
EVENT_TYPE_CODES: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}
EVENT_TYPE_ALIASES: dict[str, str] = {
    "1": "view", "pv": "view", "click": "view", "favorite": "favourite", "fav": "favourite",
    "2": "favourite", "3": "cart", "add_to_cart": "cart", "4": "purchase", "buy": "purchase",
    "order": "purchase",
}
REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "timestamp")
OPTIONAL_COLUMNS: tuple[str, ...] = ("event_type", "region", "merchant_id", "item_title")


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


@dataclass
class LoadReport:
    """What happened to the rows of one events file: how many were read, kept, and dropped (and why)."""

    source: str
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        """Rows that survived every filter."""
        return self.rows_read - sum(self.dropped.values())

    def drop(self, reason: str, count: int) -> None:
        """Record `count` rows dropped for `reason` (zero counts are not recorded)."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + int(count)

    def summary(self) -> str:
        """One line for logs: read, kept, and each drop reason with its count."""
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.source}: {self.rows_read} rows read, {self.rows_kept} kept, dropped ({drops})"


@dataclass
class EventLog:
    """Canonical events (one row per event) plus the load report and whether timestamps are real times."""

    frame: pd.DataFrame
    report: LoadReport
    has_timestamps: bool = True

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def num_users(self) -> int:
        """Distinct users in the log."""
        return int(self.frame["user_id"].nunique())


def _utf8_error(path: Path) -> EventsError:
    """Locate the first byte that is not UTF-8 in the whole file (pandas only knows the field offset)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return EventsError(path, f"not valid UTF-8 at byte {err.start}; re-encode the file as UTF-8", row=line)
    return EventsError(path, "not valid UTF-8; re-encode the file as UTF-8")


def read_table(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read CSV/TSV/Parquet as strings, with the 1-based file line of every row (blank lines skipped).

    For Parquet the "line" is the record number + 1, so messages read the same as for CSV.
    """
    path = Path(path)
    if not path.exists():
        raise EventsError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise EventsError(path, "file is empty")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
            frame = frame.apply(lambda col: col.astype(object).where(col.notna(), "").astype(str))
            return frame, np.arange(2, len(frame) + 2)
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8",
                            skip_blank_lines=False)
    except UnicodeDecodeError as err:
        raise _utf8_error(path) from err
    except pd.errors.EmptyDataError as err:
        raise EventsError(path, "file has no header and no rows") from err
    except (pd.errors.ParserError, OSError, ValueError) as err:
        raise EventsError(path, f"cannot parse: {err}") from err
    lines = np.arange(2, len(frame) + 2)
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
            raise EventsError(path, f"missing required column (have {header})", column=source)


def _first_bad(path: str | Path, bad: np.ndarray, values: pd.Series, lines: np.ndarray, column: str,
               what: str, hint: str = "") -> EventsError:
    """An EventsError for the first flagged row, quoting its value and naming its file line."""
    first = int(np.flatnonzero(bad)[0])
    return EventsError(path, f"{what} {values.iloc[first]!r}{hint}", row=int(lines[first]), column=column)


def parse_timestamps(path: str | Path, values: pd.Series, column: str, fmt: str | None,
                     lines: np.ndarray) -> np.ndarray:
    """Unix seconds from integer seconds or dates (ISO 8601 unless `fmt` is given; offsets become UTC)."""
    numeric = pd.to_numeric(values, errors="coerce")
    if fmt is None and numeric.notna().any():  # a column of unix seconds: any non-number is the error
        if numeric.isna().any():
            raise _first_bad(path, numeric.isna().to_numpy(), values, lines, column, "unparsable timestamp")
        return numeric.to_numpy(dtype=np.int64)
    parsed = pd.to_datetime(values, format=fmt or "ISO8601", errors="coerce", utc=True)
    if parsed.isna().any():
        raise _first_bad(path, parsed.isna().to_numpy(), values, lines, column, "unparsable timestamp")
    return (parsed.dt.tz_localize(None).astype("datetime64[s]").astype(np.int64)).to_numpy()


def normalise_event_types(path: str | Path, values: pd.Series, column: str, lines: np.ndarray) -> pd.Series:
    """Map event-type spellings onto EVENT_TYPES; an unknown type is an error naming its row."""
    lowered = values.str.strip().str.lower()
    mapped = lowered.map(lambda v: v if v in EVENT_TYPE_CODES else EVENT_TYPE_ALIASES.get(v))
    if mapped.isna().any():
        raise _first_bad(path, mapped.isna().to_numpy(), values, lines, column, "unknown event type",
                         f" (expected one of {EVENT_TYPES})")
    return mapped.astype(str)


def canonicalise(path: str | Path, raw: pd.DataFrame, columns: Mapping[str, str],
                 timestamp_format: str | None = None, lines: np.ndarray | None = None) -> pd.DataFrame:
    """Rename mapped columns, check ids are non-empty, parse timestamps and event types.

    `lines` gives each row's file line for error messages (default: header on line 1, no blank lines).
    """
    lines = np.arange(2, len(raw) + 2) if lines is None else lines
    out = pd.DataFrame()
    for canonical in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        source = columns.get(canonical, canonical)
        if source in raw.columns:
            out[canonical] = raw[source].fillna("").astype(str).str.strip()
    for key in ("user_id", "item_id"):
        empty = (out[key] == "").to_numpy()
        if empty.any():
            raise EventsError(path, "empty id", row=int(lines[int(np.flatnonzero(empty)[0])]),
                              column=columns.get(key, key))
    out["timestamp"] = parse_timestamps(path, out["timestamp"], columns.get("timestamp", "timestamp"),
                                        timestamp_format, lines)
    if "event_type" in out:
        out["event_type"] = normalise_event_types(path, out["event_type"],
                                                  columns.get("event_type", "event_type"), lines)
    else:
        out["event_type"] = "purchase"  # a log without types records purchases
    return out


def load_events(path: str | Path, columns: Mapping[str, str] | None = None,
                timestamp_format: str | None = None) -> EventLog:
    """Load a CSV/TSV/Parquet events file into the canonical schema.

    `columns` maps canonical names to the file's names (e.g. {"user_id": "customer"}). Exact duplicate
    events are dropped and counted in the report; everything else that is wrong raises EventsError.
    """
    path = Path(path)
    columns = dict(columns or {})
    raw, lines = read_table(path)
    _check_header(path, raw, columns)
    if raw.empty:
        raise EventsError(path, "file has a header but no rows")
    frame = canonicalise(path, raw, columns, timestamp_format, lines)
    report = LoadReport(source=str(path), rows_read=len(frame))
    return finish_events(frame, report)


def finish_events(frame: pd.DataFrame, report: LoadReport, has_timestamps: bool = True) -> EventLog:
    """Drop exact duplicate events (counted), sort by user then time (stable), and wrap as an EventLog."""
    duplicated = frame.duplicated(subset=["user_id", "item_id", "timestamp", "event_type"])
    report.drop("duplicate event", int(duplicated.sum()))
    frame = frame.loc[~duplicated]
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    return EventLog(frame=frame, report=report, has_timestamps=has_timestamps)

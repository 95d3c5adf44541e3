"""Adapters from public data-set formats (MovieLens-100K, S3-Rec sequences, Tianchi) to the canonical EventLog.

Every path is an argument. Malformed input raises EventsError naming the file and the 1-based line number of
the bad line (its `row`); well-formed rows that cannot be used are dropped and counted in the report.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shared_model.events import (
    EventLog,
    EventsError,
    LoadReport,
    canonicalise,
    finish_events,
    load_events,
    parse_timestamps,
    read_table,
)

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("events", "movielens", "s3rec", "tianchi")
UNKNOWN_REGION = "unknown"
CANADA_REGION = "ca"
_US_ZIP = re.compile(r"\d{5}(-\d{4})?")
# A Canadian postal code opens with letter-digit-letter, and only these letters start one; ML-100K keeps 5 chars.
_CA_POSTAL = re.compile(r"[ABCEGHJKLMNPRSTVXY]\d[A-Z]", re.IGNORECASE)
TIANCHI_BEHAVIOURS: dict[str, str] = {"1": "view", "2": "favourite", "3": "cart", "4": "purchase"}
TIANCHI_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "behavior_type", "user_geohash", "item_category", "time")
TIANCHI_MAPPING: dict[str, str] = {"event_type": "behavior_type", "region": "user_geohash",
                                   "merchant_id": "item_category", "timestamp": "time"}
TIANCHI_TIME_FORMAT = "%Y-%m-%d %H"


def _is_id(token: str) -> bool:
    """An ASCII non-negative integer (str.isdigit alone also accepts digits like '²' that int() rejects)."""
    return token.isascii() and token.isdigit()


def _read_lines(path: Path, encoding: str = "utf-8") -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers, CRLF endings tolerated; EventsError if unreadable."""
    if not path.is_file():
        raise EventsError(path, "file does not exist")
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as err:
        raise EventsError(path, f"not valid {encoding} at byte {err.start}") from err
    # Split on "\n" only: str.splitlines would also break latin-1 titles at bytes such as 0x85.
    lines = (line.rstrip("\r") for line in text.split("\n"))
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def _read_fields(path: Path, sep: str, names: tuple[str, ...],
                 encoding: str = "utf-8") -> tuple[pd.DataFrame, np.ndarray]:
    """Split every non-blank line into exactly len(names) fields: (string frame, 1-based line numbers)."""
    numbered = _read_lines(path, encoding)
    if not numbered:
        raise EventsError(path, "file has no rows")
    rows = []
    for number, line in numbered:
        fields = line.split(sep)
        if len(fields) != len(names):
            raise EventsError(path, f"expected {len(names)} fields separated by {sep!r}, found {len(fields)}",
                              row=number)
        rows.append(fields)
    frame = pd.DataFrame(rows, columns=list(names), dtype=str)
    return frame, np.fromiter((number for number, _ in numbered), dtype=np.int64, count=len(numbered))


def _integer_strings(path: Path, frame: pd.DataFrame, column: str, lines: np.ndarray) -> pd.Series:
    """A column of integers as canonical strings ('007' -> '7'); EventsError names the first bad line.

    Done on the digits, not through int64, so a 25-digit value stays itself instead of overflowing.
    """
    values = frame[column].str.strip()
    good = values.map(_is_id).to_numpy(dtype=bool)
    if not good.all():
        first = int(np.flatnonzero(~good)[0])
        raise EventsError(path, f"not an integer: {frame[column].iloc[first]!r}", row=int(lines[first]),
                          column=column)
    stripped = values.str.lstrip("0")
    return stripped.where(stripped != "", "0").astype(str)


def _unique_ids(path: Path, frame: pd.DataFrame, column: str, lines: np.ndarray) -> pd.Series:
    """Integer ids of a registry file (u.user, u.item) that must not repeat."""
    ids = _integer_strings(path, frame, column, lines)
    repeated = ids.duplicated().to_numpy()
    if repeated.any():
        first = int(np.flatnonzero(repeated)[0])
        raise EventsError(path, f"{column} {ids.iloc[first]} listed twice", row=int(lines[first]), column=column)
    return ids


def zip_to_region(zip_code: str) -> str:
    """Region of a MovieLens zip code: US ZIP -> 'us-<national area digit>', Canadian -> 'ca', else 'unknown'."""
    code = zip_code.strip()
    if _US_ZIP.fullmatch(code):
        return f"us-{code[0]}"
    if _CA_POSTAL.match(code):
        return CANADA_REGION
    return UNKNOWN_REGION


def _movielens_regions(path: Path) -> dict[str, str]:
    """User id -> region from u.user, logging how many users fell back to the coarse regions."""
    users, lines = _read_fields(path, "|", ("user", "age", "gender", "occupation", "zip_code"))
    ids = _unique_ids(path, users, "user", lines)
    regions = users["zip_code"].map(zip_to_region)
    malformed = users.loc[regions == UNKNOWN_REGION, "zip_code"]
    logger.info("%s: %d users with Canadian postal codes -> region '%s'; %d with malformed zip codes -> '%s' %s",
                path, int((regions == CANADA_REGION).sum()), CANADA_REGION, len(malformed), UNKNOWN_REGION,
                malformed.head(5).tolist())
    return dict(zip(ids, regions, strict=True))


def _movielens_titles(path: Path) -> dict[str, str]:
    """Item id -> title from u.item (latin-1, pipe-separated: id|title|dates|url|19 genre flags)."""
    names = ("item", "title", "release_date", "video_date", "url", *(f"genre_{g}" for g in range(19)))
    items, lines = _read_fields(path, "|", names, encoding="latin-1")
    ids = _unique_ids(path, items, "item", lines)
    return dict(zip(ids, items["title"].str.strip(), strict=True))


def load_movielens(directory: str | Path) -> EventLog:
    """MovieLens-100K (u.data, u.user, u.item in `directory`) as events with region and title.

    Ratings are treated as implicit interactions: the score is discarded and every rating becomes one
    "purchase" event. Ratings by users missing from u.user, or of items missing from u.item, are dropped
    and counted in the report: those files are the release's user and item registries.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EventsError(directory, "MovieLens directory does not exist")
    path = directory / "u.data"
    ratings, lines = _read_fields(path, "\t", ("user", "item", "rating", "unix_time"))
    seconds, _ = parse_timestamps(path, _integer_strings(path, ratings, "unix_time", lines), "unix_time", None,
                                  lines, unit="s")  # u.data's times are unix seconds by its README
    frame = pd.DataFrame({
        "user_id": _integer_strings(path, ratings, "user", lines),
        "item_id": _integer_strings(path, ratings, "item", lines),
        "timestamp": seconds,
        "event_type": "purchase",
    })
    report = LoadReport(source=str(path), rows_read=len(frame))
    regions = _movielens_regions(directory / "u.user")
    titles = _movielens_titles(directory / "u.item")
    known_user = frame["user_id"].isin(regions.keys())
    report.drop("user not in u.user", int((~known_user).sum()))
    known_item = frame["item_id"].isin(titles.keys())
    report.drop("item not in u.item", int((known_user & ~known_item).sum()))
    frame = frame.loc[known_user & known_item].copy()
    frame["region"] = frame["user_id"].map(regions)
    frame["item_title"] = frame["item_id"].map(titles)
    return finish_events(frame, report)


def load_s3rec(sequences_path: str | Path) -> EventLog:
    """S3-Rec sequences (one `user item1 item2 ...` line per user, in time order) as purchase events.

    The files carry no times: each event's timestamp is its position in the user's line (0, 1, 2, ...) and
    `has_timestamps` is False, so the order is kept but no time features are built. Item attributes come
    separately from `load_item_attributes`.
    """
    path = Path(sequences_path)
    users: list[str] = []
    items: list[str] = []
    positions: list[int] = []
    first_line: dict[str, int] = {}
    for number, line in _read_lines(path):
        tokens = line.split()
        bad = next((token for token in tokens if not _is_id(token)), None)
        if bad is not None:
            raise EventsError(path, f"not an integer id: {bad!r}", row=number)
        user = str(int(tokens[0]))
        if len(tokens) < 2:
            raise EventsError(path, f"user {user} has no items", row=number)
        if user in first_line:
            raise EventsError(path, f"user {user} already has a line ({first_line[user]})", row=number)
        first_line[user] = number
        users.extend([user] * (len(tokens) - 1))
        items.extend(str(int(token)) for token in tokens[1:])
        positions.extend(range(len(tokens) - 1))
    if not users:
        raise EventsError(path, "file has no users")
    frame = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": np.asarray(positions, dtype=np.int64),
                          "event_type": "purchase"})
    return finish_events(frame, LoadReport(source=str(path), rows_read=len(frame)), has_timestamps=False)


def load_item_attributes(path: str | Path) -> dict[str, list[int]]:
    """S3-Rec item attributes (`{item: [attribute ids]}` JSON, e.g. brand and categories) by item id."""
    path = Path(path)
    if not path.is_file():
        raise EventsError(path, "file does not exist")
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise EventsError(path, f"not valid utf-8 at byte {err.start}") from err
    except json.JSONDecodeError as err:
        raise EventsError(path, f"invalid JSON: {err.msg} at column {err.colno}", row=err.lineno) from err
    if not isinstance(payload, dict):
        raise EventsError(path, f"expected a JSON object {{item: [attribute ids]}}, found {type(payload).__name__}")
    attributes: dict[str, list[int]] = {}
    for item, values in payload.items():
        if not _is_id(item.strip()):
            raise EventsError(path, f"item key {item!r} is not an integer id")
        if not isinstance(values, list) or not all(type(v) is int for v in values):  # bool is an int subclass
            raise EventsError(path, f"item {item}: attributes must be a list of integers, found {values!r:.80}")
        attributes[str(int(item))] = values
    return attributes


def _read_tianchi_csv(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The raw Tianchi CSV as strings with file lines, with every expected column present."""
    raw, lines = read_table(path)
    missing = [column for column in TIANCHI_COLUMNS if column not in raw.columns]
    if missing:
        raise EventsError(path, f"missing Tianchi column(s) {missing} (have {list(raw.columns)})", column=missing[0])
    if raw.empty:
        raise EventsError(path, "file has a header but no rows")
    return raw, lines


def load_tianchi(path: str | Path, region_precision: int = 3) -> EventLog:
    """Tianchi mobile `user_behavior.csv` as events: behaviour 1-4 -> view/favourite/cart/purchase.

    Region is the first `region_precision` characters of user_geohash ("unknown" when it is empty).
    merchant_id is item_category, a stand-in: the log names no shops, and a category is the nearest thing to
    a site that holds one slice of the items.
    """
    if region_precision < 1:
        raise ValueError(f"region_precision must be at least 1, got {region_precision}")
    path = Path(path)
    raw, lines = _read_tianchi_csv(path)
    behaviour = raw["behavior_type"].str.strip()
    bad = (~behaviour.isin(list(TIANCHI_BEHAVIOURS))).to_numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise EventsError(path, f"unknown behavior_type {behaviour.iloc[first]!r} (expected 1, 2, 3 or 4)",
                          row=int(lines[first]), column="behavior_type")
    raw = raw.assign(behavior_type=behaviour.map(TIANCHI_BEHAVIOURS))
    report = LoadReport(source=str(path), rows_read=len(raw))
    frame = canonicalise(path, raw, TIANCHI_MAPPING, TIANCHI_TIME_FORMAT, lines, report)
    prefix = frame["region"].str[:region_precision]
    frame["region"] = prefix.where(prefix != "", UNKNOWN_REGION)
    return finish_events(frame, report)


def load_dataset(name: str, path: str | Path, **options: Any) -> EventLog:
    """Load a data set by format name (see DATASETS); options go to that format's loader."""
    match name:
        case "events":
            return load_events(path, **options)
        case "movielens":
            return load_movielens(path, **options)
        case "s3rec":
            return load_s3rec(path, **options)
        case "tianchi":
            return load_tianchi(path, **options)
        case _:
            raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")

"""The public item catalog: item id -> embedding row, shared by every party and fingerprinted."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared_model.atomic import write_text_atomically

if TYPE_CHECKING:
    import pandas as pd

CATALOG_FILE = "catalog.json"
PADDING_ROW = 0  # row 0 of the item table is padding; real items start at row 1
CATALOG_KEYS: tuple[str, ...] = ("fingerprint", "item_ids", "titles", "attributes")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


class CatalogError(ValueError):
    """A catalog that cannot be used; the message names the file (when there is one) and the problem."""


class CatalogMismatchError(CatalogError):
    """Two parties' catalogs differ, so their item rows (and weights) are not comparable."""


def _kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_json(path: Path) -> Any:
    """The parsed JSON of a catalog file; CatalogError names the file and what is wrong with it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as err:
        raise CatalogError(f"{path}: catalog file does not exist") from err
    except OSError as err:
        raise CatalogError(f"{path}: cannot read the catalog: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise CatalogError(f"{path}: not valid UTF-8 at byte {err.start}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CatalogError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except RecursionError as err:
        raise CatalogError(f"{path}: invalid catalog: JSON nested too deeply") from err


def _item_ids(path: Path, payload: dict[str, Any]) -> list[str]:
    """The ordered item ids of a parsed catalog: a non-empty array of distinct, non-empty, stripped strings."""
    if "item_ids" not in payload:
        raise CatalogError(f"{path}: missing key 'item_ids' (have {sorted(payload)})")
    ids = payload["item_ids"]
    if not isinstance(ids, list):
        raise CatalogError(f"{path}: 'item_ids' must be an array of strings, found {_kind(ids)}")
    if not ids:
        raise CatalogError(f"{path}: 'item_ids' is empty; a catalog needs at least one item")
    seen: dict[str, int] = {}
    for position, item in enumerate(ids):
        if not isinstance(item, str):
            raise CatalogError(f"{path}: item_ids[{position}] must be a string, found {_kind(item)} {item!r:.40}")
        if not item or item != item.strip():
            raise CatalogError(f"{path}: item_ids[{position}] {item!r:.40} is empty or has surrounding whitespace")
        if item in seen:
            raise CatalogError(f"{path}: item id {item!r:.40} is listed twice (item_ids[{seen[item]}] and "
                               f"item_ids[{position}])")
        seen[item] = position
    return ids


def _mapping(path: Path, payload: dict[str, Any], key: str, known: set[str], value_ok: Callable[[Any], bool],
             expected: str) -> dict[str, Any]:
    """An optional {item id: value} object of a parsed catalog, every key a catalog item, every value checked."""
    mapping = payload.get(key, {})
    if not isinstance(mapping, dict):
        raise CatalogError(f"{path}: '{key}' must be an object {{item id: {expected}}}, found {_kind(mapping)}")
    for item, value in mapping.items():
        if item not in known:
            raise CatalogError(f"{path}: {key}[{item!r:.40}] names an item that is not in item_ids")
        if not value_ok(value):
            raise CatalogError(f"{path}: {key}[{item!r:.40}] must be {expected}, found {_kind(value)} {value!r:.40}")
    return dict(mapping)


def parse_catalog(path: Path, payload: Any) -> ItemCatalog:
    """An ItemCatalog from a parsed catalog.json, each problem raised as CatalogError naming `path`."""
    if not isinstance(payload, dict):
        raise CatalogError(f"{path}: expected a JSON object with 'item_ids', found {_kind(payload)}")
    unknown = sorted(set(payload) - set(CATALOG_KEYS))
    if unknown:
        raise CatalogError(f"{path}: unknown key(s) {unknown}; a catalog holds {', '.join(CATALOG_KEYS)}")
    ids = _item_ids(path, payload)
    titles = _mapping(path, payload, "titles", set(ids), lambda v: isinstance(v, str), "a string")
    attributes = _mapping(path, payload, "attributes", set(ids),
                          lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), "an array of strings")
    catalog = ItemCatalog(list(ids), titles, attributes)
    stored = payload.get("fingerprint")
    if stored is not None and not (isinstance(stored, str) and _HEX_SHA256.fullmatch(stored)):
        raise CatalogError(f"{path}: 'fingerprint' must be 64 lowercase hex digits, found {stored!r:.80}")
    if stored not in (None, catalog.fingerprint):
        raise CatalogMismatchError(f"{path}: stored fingerprint does not match its item ids (file altered?)")
    return catalog


@dataclass
class ItemCatalog:
    """Ordered item ids (row i+1 = item_ids[i]) with optional titles; the order defines the model's rows."""

    item_ids: list[str]
    titles: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, list[str]] = field(default_factory=dict)  # public metadata: brand, categories, ...

    def __post_init__(self) -> None:
        self._rows = {item: i + 1 for i, item in enumerate(self.item_ids)}
        if len(self._rows) != len(self.item_ids):
            raise CatalogError("item catalog has duplicate item ids")

    @classmethod
    def from_items(cls, item_ids: Iterable[str], titles: dict[str, str] | None = None,
                   attributes: dict[str, list[str]] | None = None) -> ItemCatalog:
        """A catalog of the distinct ids, sorted so every party building it from the same set agrees."""
        return cls(sorted({str(i) for i in item_ids}), dict(titles or {}), dict(attributes or {}))

    @classmethod
    def from_events(cls, frame: pd.DataFrame) -> ItemCatalog:
        """A catalog of every item in an events frame, with titles where the frame has them."""
        titles: dict[str, str] = {}
        if "item_title" in frame:
            named = frame.loc[frame["item_title"] != "", ["item_id", "item_title"]].drop_duplicates("item_id")
            titles = dict(zip(named["item_id"], named["item_title"], strict=True))
        return cls.from_items(frame["item_id"], titles)

    @property
    def num_rows(self) -> int:
        """Rows in the item table, padding included."""
        return len(self.item_ids) + 1

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 over the ordered ids: equal fingerprints mean equal row assignments. Kept once computed (a
        site's message asks three times: 1.9 ms each for Beauty's 12,101 items, 0.16 s for a million); a
        catalog's items never change."""
        digest = hashlib.sha256()
        for item in self.item_ids:
            digest.update(item.encode("utf-8"))
            digest.update(b"\x00")
        return digest.hexdigest()

    def rows(self, item_ids: Sequence[str] | pd.Series) -> np.ndarray:
        """Row of each id; unknown ids get PADDING_ROW (callers count and drop them)."""
        return np.fromiter((self._rows.get(str(i), PADDING_ROW) for i in item_ids), dtype=np.int64,
                           count=len(item_ids))

    def item_id(self, row: int) -> str:
        """The item id stored at a row (row >= 1)."""
        if not 1 <= row <= len(self.item_ids):
            raise IndexError(f"row {row} is not an item row (1..{len(self.item_ids)})")
        return self.item_ids[row - 1]

    def title(self, row: int) -> str | None:
        """The title of the item at a row, when known."""
        return self.titles.get(self.item_id(row))

    def check_matches(self, fingerprint: str) -> None:
        """Raise CatalogMismatchError unless the other party's fingerprint equals ours."""
        if fingerprint != self.fingerprint:
            raise CatalogMismatchError(
                f"item catalog fingerprint {fingerprint[:12]}... does not match ours {self.fingerprint[:12]}...; "
                "both parties must use the same catalog file")

    def save(self, directory: str | Path) -> Path:
        """Write catalog.json (ids, titles, fingerprint) into a directory."""
        path = Path(directory) / CATALOG_FILE
        payload = {"fingerprint": self.fingerprint, "item_ids": self.item_ids, "titles": self.titles,
                   "attributes": self.attributes}
        write_text_atomically(path, json.dumps(payload, ensure_ascii=False))  # a crash never leaves half a catalog
        return path

    @classmethod
    def load(cls, path: str | Path) -> ItemCatalog:
        """Read a catalog.json (or the one inside a directory) and verify it; CatalogError names file and problem."""
        path = Path(path)
        if path.is_dir():
            path = path / CATALOG_FILE
        return parse_catalog(path, _read_json(path))

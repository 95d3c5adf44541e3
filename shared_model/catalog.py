"""The public item catalog: item id -> embedding row, shared by every party and fingerprinted."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

CATALOG_FILE = "catalog.json"
PADDING_ROW = 0  # row 0 of the item table is padding; real items start at row 1


class CatalogMismatchError(ValueError):
    """Two parties' catalogs differ, so their item rows (and weights) are not comparable."""


@dataclass
class ItemCatalog:
    """Ordered item ids (row i+1 = item_ids[i]) with optional titles; the order defines the model's rows."""

    item_ids: list[str]
    titles: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, list[str]] = field(default_factory=dict)  # public metadata: brand, categories, ...

    def __post_init__(self) -> None:
        self._rows = {item: i + 1 for i, item in enumerate(self.item_ids)}
        if len(self._rows) != len(self.item_ids):
            raise ValueError("item catalog has duplicate item ids")

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

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the ordered ids: equal fingerprints mean equal row assignments."""
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
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"fingerprint": self.fingerprint, "item_ids": self.item_ids, "titles": self.titles,
                   "attributes": self.attributes}
        path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ItemCatalog:
        """Read a catalog.json (or the one inside a directory) and verify its stored fingerprint."""
        path = Path(path)
        if path.is_dir():
            path = path / CATALOG_FILE
        payload = json.loads(path.read_text(encoding="utf-8"))
        catalog = cls(list(payload["item_ids"]), dict(payload.get("titles", {})), dict(payload.get("attributes", {})))
        if payload.get("fingerprint") not in (None, catalog.fingerprint):
            raise CatalogMismatchError(f"{path}: stored fingerprint does not match its item ids (file altered?)")
        return catalog

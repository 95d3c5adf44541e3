"""The consortium's shared catalog built from an items file (`fedrec-admin catalog`): one row per item, its id
normalised as the sites' events files normalise theirs, an optional `title`, and any other columns as public
attributes (several values in one cell separated by `|`), each kept as `column=value`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared_model.catalog import ItemCatalog
from shared_model.events import EventsError, normalise_ids, read_table

ID_COLUMN = "item_id"
TITLE_COLUMN = "title"
VALUE_SEPARATOR = "|"


@dataclass
class ItemsReport:
    """What was read: rows, distinct items, rows that repeated an item identically (merged), rewritten ids."""

    rows: int
    items: int
    repeated: int
    normalised_ids: int
    titled: int
    with_attributes: int

    def summary(self) -> str:
        return (f"{self.rows:,} rows read, {self.items:,} items ({self.titled:,} with a title, "
                f"{self.with_attributes:,} with attributes); {self.repeated:,} rows repeated an item identically "
                f"(merged); {self.normalised_ids:,} ids normalised (whitespace, '1.0' read as '1')")


def catalog_from_items_file(path: str | Path) -> tuple[ItemCatalog, ItemsReport]:
    """The catalog of an items file (CSV, TSV or Parquet); an EventsError naming the file, line and column of
    what cannot be used (no id column, a bad id, one id with two different rows)."""
    path = Path(path)
    frame, lines = read_table(path)
    if ID_COLUMN not in frame.columns:
        raise EventsError(path, f"missing required column (have {list(frame.columns)!r:.200})", column=ID_COLUMN)
    ids, normalised = normalise_ids(path, frame[ID_COLUMN], ID_COLUMN, lines)
    titles = frame[TITLE_COLUMN].str.strip().tolist() if TITLE_COLUMN in frame.columns else [""] * len(frame)
    extra = [c for c in frame.columns if c not in (ID_COLUMN, TITLE_COLUMN)]
    cells = frame[extra].to_numpy(dtype=str).tolist() if extra else [[]] * len(frame)
    seen: dict[str, tuple[int, tuple[str, tuple[str, ...]]]] = {}  # id -> (line, its content)
    item_titles: dict[str, str] = {}
    attributes: dict[str, list[str]] = {}
    for i, (item, title, row) in enumerate(zip(ids.tolist(), titles, cells, strict=True)):
        values = tuple(f"{column}={value.strip()}" for column, cell in zip(extra, row, strict=True)
                       for value in cell.split(VALUE_SEPARATOR) if value.strip())
        content = (title, tuple(sorted(set(values))))
        if item in seen:
            if seen[item][1] != content:
                raise EventsError(path, f"item {item!r} again, with another title or attributes than on line "
                                        f"{seen[item][0]}", row=int(lines[i]), column=ID_COLUMN)
            continue
        seen[item] = (int(lines[i]), content)
        if title:
            item_titles[item] = title
        if content[1]:
            attributes[item] = list(content[1])
    if not seen:
        raise EventsError(path, "no items: the file has a header and no rows")
    catalog = ItemCatalog.from_items(seen, item_titles, attributes)
    report = ItemsReport(rows=len(frame), items=len(seen), repeated=len(frame) - len(seen), normalised_ids=normalised,
                         titled=len(item_titles), with_attributes=len(attributes))
    return catalog, report

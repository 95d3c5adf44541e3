"""The canonical event types and what loading an events file gives (`shared_model.events` does the loading).

Without pandas at import: a site's message process (fresh in deployment, one per message) reads its cached
sequences and never parses events, so it need not pay pandas' import (about 0.35 s of CPU; BENCHMARKS.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

EVENT_TYPES: tuple[str, ...] = ("view", "favourite", "cart", "purchase")
# Row 0 of every event-type embedding is padding, so codes start at 1.
EVENT_TYPE_CODES: dict[str, int] = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}


@dataclass
class LoadReport:
    """What happened to the rows of one events file: how many were read, kept, and dropped (and why)."""

    source: str
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was detected or rewritten (timestamp unit, ids)
    normalised_ids: dict[str, int] = field(default_factory=dict)  # column -> ids rewritten ('1.0' -> '1', ' a')

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
        notes = "".join(f"; {note}" for note in self.notes)
        return f"{self.source}: {self.rows_read} rows read, {self.rows_kept} kept, dropped ({drops}){notes}"


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

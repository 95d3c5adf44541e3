"""The site's privacy ledger: every DP-SGD step this site ever took, on disk, so ε is cumulative.

The ledger survives client restarts (deployment starts a fresh process per message), refuses to record the
same (run, round) twice, and answers "would this round exceed the site's budget?" before any training.
It belongs to one site identity (site.json, fl_client.dp.enrolment), which also keeps the ledger's head (its
entry count and the SHA-256 of its entries), rewritten after every record: a ledger that was emptied,
shortened or edited no longer matches its head and is an error naming the file, never ε = 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fl_client.dp.settings import AccountantHistory
from shared_model.atomic import write_text_atomically

log = logging.getLogger(__name__)
# 2: the ledger names the site it belongs to (site_id), and the site's head in site.json pins its entries.
LEDGER_VERSION = 2
START_OVER = ("A site that really wants to start over (a new data set, a new budget) does so deliberately: "
              "give it a new --state-dir (state-dir in its node config), which enrols a new site identity")


class LedgerError(RuntimeError):
    """The ledger or the site's identity is missing, damaged or inconsistent: the site refuses to train rather
    than count its spent ε from 0."""


class BudgetExceededError(RuntimeError):
    """Training would spend more than the site's (ε, δ) budget."""


@dataclass
class LedgerEntry:
    """One training round's DP-SGD steps at this site."""

    run_id: str
    round: int
    history: AccountantHistory  # (noise multiplier, sample rate, steps) triples of this round
    epsilon_after: float  # cumulative ε of the site once this round was recorded
    recorded_at: str


FAR_PAST_BUDGET = 10.0  # PrivacyLedger.check declines, without PRV, steps whose RDP ε alone is this x the budget


def epsilon_of(history: AccountantHistory, delta: float, accountant: str = "prv") -> float:
    """ε of a composition of DP-SGD steps (0 for no steps)."""
    if not history:
        return 0.0
    # Opacus is imported only to compute ε: a site's start check and its evaluate messages open no accountant.
    from fl_client.dp.engine import composed_epsilon

    return composed_epsilon(history, delta, accountant)


def entries_digest(entries: Sequence[LedgerEntry]) -> str:
    """SHA-256 of the entries' canonical JSON: what the site's head pins."""
    text = json.dumps([asdict(e) for e in entries], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; anything else is a LedgerError naming the file."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LedgerError(f"{path}: the site's {what} cannot be read ({err}); restore it from a backup. "
                          f"{START_OVER}.") from err
    if not isinstance(payload, dict):
        raise LedgerError(f"{path}: the site's {what} is not a JSON object; restore it from a backup. {START_OVER}.")
    return payload


@dataclass
class SiteIdentity:
    """Who this site is (an id set once, at enrolment) and the head of its ledger: site.json in its state dir."""

    path: Path
    site_id: str
    enrolled_at: str
    entries: int = 0  # entries the ledger held after its last record
    sha256: str = entries_digest([])  # entries_digest of those entries

    @classmethod
    def new(cls, path: Path, site_id: str = "") -> SiteIdentity:
        """A fresh identity (not yet written): a random id unless `site_id` (a ledger's) is given."""
        return cls(path, site_id or uuid.uuid4().hex, datetime.now(UTC).isoformat())

    @classmethod
    def load(cls, path: Path) -> SiteIdentity:
        """site.json, checked field by field."""
        payload = read_json(path, "identity file")
        head = payload.get("head")
        try:
            if not isinstance(head, dict):
                raise TypeError("no head")
            identity = cls(path, str(payload["site_id"]), str(payload["enrolled_at"]), int(head["entries"]),
                           str(head["sha256"]))
        except (KeyError, TypeError, ValueError) as err:
            raise LedgerError(f"{path}: the site's identity file lacks site_id, enrolled_at or head "
                              f"{{entries, sha256}} ({err}); restore it from a backup. {START_OVER}.") from err
        if not identity.site_id or identity.entries < 0:
            raise LedgerError(f"{path}: the site's identity file names no site id or a negative entry count")
        return identity

    def advance(self, entries: Sequence[LedgerEntry]) -> None:
        """Pin the ledger's new head and write site.json atomically."""
        self.entries, self.sha256 = len(entries), entries_digest(entries)
        payload = {"site_id": self.site_id, "enrolled_at": self.enrolled_at,
                   "head": {"entries": self.entries, "sha256": self.sha256},
                   "note": "written by fedrec after every ledger record; do not edit or copy to another site"}
        write_text_atomically(self.path, json.dumps(payload, indent=1))


class PrivacyLedger:
    """Cumulative accounting for one site and one δ, stored as JSON in the site's state dir.

    `delta`: the site's δ; None adopts the δ the ledger was started with (a ledger keeps one δ for life).
    `identity`: the site it belongs to; its site id must match the file's and its head the file's entries.
    """

    def __init__(self, path: str | Path, delta: float | None, accountant: str = "prv",
                 identity: SiteIdentity | None = None) -> None:
        self.path, self.accountant, self.identity = Path(path), accountant, identity
        self.site_id = identity.site_id if identity else ""
        self.entries: list[LedgerEntry] = []
        if self.path.exists():
            self._load(delta)
        elif delta is None:
            raise LedgerError(f"{self.path}: no ledger to take δ from")
        else:
            self.delta = delta
        if identity is not None:
            self._check_head(identity)

    def _load(self, delta: float | None) -> None:
        payload = read_json(self.path, "privacy ledger")
        if self.identity is not None and payload.get("site_id") != self.identity.site_id:
            raise LedgerError(f"{self.path}: this ledger belongs to site {payload.get('site_id')!r}, but the state "
                              f"dir's {self.identity.path.name} names site {self.identity.site_id!r}: a ledger "
                              f"copied from another site is never used. {START_OVER}.")
        stored = payload.get("delta")
        if (delta is not None and stored != delta) or payload.get("accountant") != self.accountant:
            raise LedgerError(f"{self.path}: ledger was kept for δ={stored} with accountant "
                              f"{payload.get('accountant')!r}; this site now asks for δ={delta} with "
                              f"{self.accountant!r}. Keep the site's δ and accountant fixed for its lifetime.")
        try:
            self.delta = float(stored)  # type: ignore[arg-type]
            self.entries = [LedgerEntry(run_id=str(e["run_id"]), round=int(e["round"]),
                                        history=[(float(s), float(q), int(n)) for s, q, n in e["history"]],
                                        epsilon_after=float(e["epsilon_after"]), recorded_at=str(e["recorded_at"]))
                            for e in payload["entries"]]
        except (KeyError, TypeError, ValueError) as err:
            raise LedgerError(f"{self.path}: the privacy ledger is damaged ({err!r}); restore it from a backup. "
                              f"{START_OVER}.") from err
        self.site_id = str(payload.get("site_id", ""))

    def _check_head(self, identity: SiteIdentity) -> None:
        """The file must hold at least the entries the head pins, unchanged; more means a crash came between
        writing the ledger and its head (the later spending is kept, and the head catches up)."""
        pinned = self.entries[:identity.entries]
        if len(pinned) < identity.entries or entries_digest(pinned) != identity.sha256:
            problem = (f"holds {len(self.entries)} entries where {identity.path} records {identity.entries}"
                       if len(pinned) < identity.entries else
                       f"its first {identity.entries} entries differ from those {identity.path} pins (SHA-256)")
            raise LedgerError(f"{self.path}: the privacy ledger was emptied, shortened or edited: it {problem}. "
                              f"Restore the ledger from a backup; this site never counts its spent ε from a "
                              f"partial ledger. {START_OVER}.")
        if len(self.entries) > identity.entries:
            log.warning("%s: %d ledger entries were recorded after the last head in %s; keeping them", self.path,
                        len(self.entries) - identity.entries, identity.path)
            identity.advance(self.entries)

    @property
    def history(self) -> AccountantHistory:
        """Every step this site has taken, in order."""
        return [step for entry in self.entries for step in entry.history]

    def spent(self) -> float:
        """Cumulative ε of the site so far."""
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_with(self, planned: AccountantHistory) -> float:
        """Cumulative ε if the planned steps were taken too."""
        return epsilon_of(self.history + list(planned), self.delta, self.accountant)

    def rounds_within(self, round_steps: AccountantHistory, budget_epsilon: float, most: int) -> int:
        """How many more rounds of `round_steps` each (at most `most`) keep this site's ε within the budget."""
        low, high = 0, most  # ε grows with every round: the largest count that fits, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            if self.epsilon_with([(s, q, n * middle) for s, q, n in round_steps]) <= budget_epsilon:
                low = middle
            else:
                high = middle - 1
        return low

    def has(self, run_id: str, server_round: int) -> bool:
        """Whether this (run, round) was already trained and recorded here."""
        return any(e.run_id == run_id and e.round == server_round for e in self.entries)

    def check(self, planned: AccountantHistory, budget_epsilon: float) -> float:
        """Raise BudgetExceededError unless the planned steps fit the budget; returns the ε they would reach.

        Steps whose ε alone is far past the budget by RDP's bound (closed form, cheap at any σ) are declined
        before the PRV accountant sees them: its domain grows with the ε it must cover, and a distributed-DP
        step at the server's σ = 10^-3 (q = 0.1) needed over 4 GB. Composition only adds ε, and PRV's ε is
        nowhere near 1/FAR_PAST_BUDGET of RDP's for such steps, so this declines nothing that would fit."""
        if self.accountant == "prv":
            alone = epsilon_of(list(planned), self.delta, "rdp")
            if alone > FAR_PAST_BUDGET * budget_epsilon:
                raise BudgetExceededError(
                    f"the planned steps {list(planned)} alone spend ε = {alone:.3g} (RDP's bound), over "
                    f"{FAR_PAST_BUDGET:g}x this site's budget ε = {budget_epsilon}; declining to train")
        after = self.epsilon_with(planned)
        if after > budget_epsilon:
            raise BudgetExceededError(
                f"training would bring this site's ε from {self.spent():.3f} to {after:.3f}, over its budget "
                f"ε = {budget_epsilon} (δ = {self.delta:.3g}); declining to train")
        return after

    def record(self, run_id: str, server_round: int, history: AccountantHistory) -> LedgerEntry:
        """Append one round's steps, write the ledger atomically, then its head; a repeated (run, round) is
        refused."""
        if self.has(run_id, server_round):
            raise ValueError(f"{self.path}: round {server_round} of run {run_id} is already recorded")
        steps = [(float(s), float(q), int(n)) for s, q, n in history]  # as they read back: the digest must match
        entry = LedgerEntry(run_id=run_id, round=server_round, history=steps,
                            epsilon_after=self.epsilon_with(steps), recorded_at=datetime.now(UTC).isoformat())
        self.entries.append(entry)
        self.write()
        return entry

    def write(self) -> None:
        """The ledger, then the head that pins it (a crash between leaves a ledger ahead of its head: kept)."""
        payload = {"version": LEDGER_VERSION, "unit": "one user", "site_id": self.site_id, "delta": self.delta,
                   "accountant": self.accountant, "entries": [asdict(e) for e in self.entries]}
        write_text_atomically(self.path, json.dumps(payload, indent=1))  # a crash leaves the old or the new ledger
        if self.identity is not None:
            self.identity.advance(self.entries)

"""The site's privacy ledger: every DP-SGD step this site ever took, on disk, so ε is cumulative.

The ledger survives client restarts (deployment starts a fresh process per message), refuses to record the
same (run, round) twice, and answers "would this round exceed the site's budget?" before any training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from fl_client.privacy import AccountantHistory, composed_epsilon
from shared_model.atomic import write_text_atomically

LEDGER_VERSION = 1


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


def epsilon_of(history: AccountantHistory, delta: float, accountant: str = "prv") -> float:
    """ε of a composition of DP-SGD steps (0 for no steps)."""
    return composed_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), delta, accountant)


class PrivacyLedger:
    """Cumulative accounting for one site and one δ, stored as JSON next to the site's data."""

    def __init__(self, path: str | Path, delta: float, accountant: str = "prv") -> None:
        self.path, self.delta, self.accountant = Path(path), delta, accountant
        self.entries: list[LedgerEntry] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        payload = json.loads(self.path.read_text(encoding="utf-8"))
        if payload.get("delta") != self.delta or payload.get("accountant") != self.accountant:
            raise ValueError(f"{self.path}: ledger was kept for δ={payload.get('delta')} with accountant "
                             f"{payload.get('accountant')!r}; this site now asks for δ={self.delta} with "
                             f"{self.accountant!r}. Keep the site's δ fixed for its lifetime.")
        self.entries = [LedgerEntry(run_id=e["run_id"], round=int(e["round"]),
                                    history=[(float(s), float(q), int(n)) for s, q, n in e["history"]],
                                    epsilon_after=float(e["epsilon_after"]), recorded_at=e["recorded_at"])
                        for e in payload["entries"]]

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

    def has(self, run_id: str, server_round: int) -> bool:
        """Whether this (run, round) was already trained and recorded here."""
        return any(e.run_id == run_id and e.round == server_round for e in self.entries)

    def check(self, planned: AccountantHistory, budget_epsilon: float) -> float:
        """Raise BudgetExceededError unless the planned steps fit the budget; returns the ε they would reach."""
        after = self.epsilon_with(planned)
        if after > budget_epsilon:
            raise BudgetExceededError(
                f"training would bring this site's ε from {self.spent():.3f} to {after:.3f}, over its budget "
                f"ε = {budget_epsilon} (δ = {self.delta:.3g}); declining to train")
        return after

    def record(self, run_id: str, server_round: int, history: AccountantHistory) -> LedgerEntry:
        """Append one round's steps and write the ledger atomically; a repeated (run, round) is refused."""
        if self.has(run_id, server_round):
            raise ValueError(f"{self.path}: round {server_round} of run {run_id} is already recorded")
        entry = LedgerEntry(run_id=run_id, round=server_round, history=list(history),
                            epsilon_after=self.epsilon_with(history), recorded_at=datetime.now(UTC).isoformat())
        self.entries.append(entry)
        self._write()
        return entry

    def _write(self) -> None:
        payload = {"version": LEDGER_VERSION, "unit": "one user", "delta": self.delta,
                   "accountant": self.accountant, "entries": [asdict(e) for e in self.entries]}
        write_text_atomically(self.path, json.dumps(payload, indent=1))  # a crash leaves the old or the new ledger

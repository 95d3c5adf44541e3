"""A site's enrolment and its lock: the identity its ledger belongs to, and one process at a time on its ledger.

A site is enrolled once, at its first start: a random site id in site.json and an empty ledger naming that id,
both in the site's state dir. From then on a missing, emptied, shortened or edited ledger, a ledger without
its site.json, or a state dir that shows earlier rounds but no ledger is an error naming what was found;
starting over is deliberate (a new state dir is a new site). Everything that reads the ledger to spend ε
holds the site's exclusive lock (fcntl.flock) from the budget check through training to the record, so two
processes never both spend from the same balance.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fl_client.dp.ledger import START_OVER, LedgerError, PrivacyLedger, SiteIdentity, read_json
from fl_client.dp.settings import default_delta

log = logging.getLogger(__name__)
IDENTITY_FILE = "site.json"
LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = "site.lock"
PID_WIDTH = 20  # the holder's pid, padded: a shorter one overwrites a longer one whole
LOCK_TIMEOUT_S = 3600.0  # longer than any round a site trains: a second process waits for the first to finish


class SiteBusyError(LedgerError):
    """Another process held the site's lock for longer than the wait allows."""


@contextmanager
def site_lock(state_dir: str | Path, timeout_s: float = LOCK_TIMEOUT_S, poll_s: float = 0.05) -> Iterator[None]:
    """Hold the site's exclusive lock (state_dir/site.lock) for the block; wait up to `timeout_s` for it.

    flock locks an open file description, so separate processes and separate opens in one process exclude
    each other, and the kernel releases the lock when its holder dies (a killed round never blocks the site).
    """
    path = Path(state_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8") as handle:
        deadline = time.monotonic() + timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise SiteBusyError(f"{path}: another process (pid {holder}) has held this site's ledger lock for "
                                        f"over {timeout_s:.0f} s; not training beside it. Is a second fedrec-client "
                                        "running on this state dir?") from None
                if not waiting:
                    log.info("%s: waiting for process %s to finish with this site's ledger", path, holder)
                    waiting = True
                time.sleep(poll_s)
        try:
            # Who holds it, for the message of a process that waits: written over the start, never truncated.
            # Truncating and rewriting the file made a lock 0.22 ms on ext4, in place 0.03 ms (BENCHMARKS.md).
            os.pwrite(handle.fileno(), f"{os.getpid():<{PID_WIDTH}}".encode(), 0)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def earlier_rounds(state_dir: Path) -> list[str]:
    """What in the state dir shows that this site took part in DP rounds before (empty for a fresh one).

    Kept replies and σ plans are written by DP rounds only (a σ plan before every DP round's training, so it
    is there even when the round was killed); optimiser states are not evidence: a site without DP keeps them
    too, and turning DP on later must not look like a lost ledger."""
    found = []
    replies = state_dir / "replies"
    files = [p for p in replies.glob("*") if p.is_file()] if replies.is_dir() else []
    if files:
        found.append(f"{len(files)} kept round replies in {replies}")
    if (state_dir / "sigma_plans.json").exists():
        found.append(f"σ plans in {state_dir / 'sigma_plans.json'}")
    return found


def load_identity(state_dir: Path) -> SiteIdentity | None:
    """The enrolled site's identity (None when the state dir was never enrolled), checked against what the state
    dir holds. Call holding site_lock."""
    identity_path, ledger_path = state_dir / IDENTITY_FILE, state_dir / LEDGER_FILE
    if identity_path.exists():
        identity = SiteIdentity.load(identity_path)
        if not ledger_path.exists():
            shown = [f"{identity_path} records {identity.entries} ledger entries", *earlier_rounds(state_dir)]
            raise LedgerError(f"{ledger_path}: the site's privacy ledger is missing, but this state dir shows the "
                              f"site enrolled and active: {'; '.join(shown)}. Restore the ledger from a backup; "
                              f"the site never counts its spent ε from 0. {START_OVER}.")
        return identity
    if ledger_path.exists():
        return adopt_ledger(state_dir)
    if shown := earlier_rounds(state_dir):
        raise LedgerError(f"{ledger_path}: the site's privacy ledger and its {identity_path.name} are missing, but "
                          f"this state dir shows earlier rounds: {'; '.join(shown)}. Restore both from a backup; "
                          f"the site never counts its spent ε from 0. {START_OVER}.")
    return None


def adopt_ledger(state_dir: Path) -> SiteIdentity:
    """A ledger without site.json: a ledger of the version before site identities (enrolled now, its entries
    kept), or an enrolment cut short before site.json was written (an empty ledger, no earlier rounds).
    Anything else is an error: site.json pins the ledger, and a ledger without it could have been shortened."""
    identity_path, ledger_path = state_dir / IDENTITY_FILE, state_dir / LEDGER_FILE
    payload = read_json(ledger_path, "privacy ledger")
    entries = payload.get("entries")
    shown = earlier_rounds(state_dir)
    legacy = payload.get("version") == 1 and bool(entries)
    if not (legacy or (entries == [] and not shown)):
        count = len(entries) if isinstance(entries, list) else "unreadable"
        raise LedgerError(f"{identity_path}: the site's identity file is missing beside its ledger {ledger_path} "
                          f"({count} entries{'; ' if shown else ''}{'; '.join(shown)}); without it a shortened "
                          f"ledger cannot be told from a whole one. Restore it from a backup. {START_OVER}.")
    identity = SiteIdentity.new(identity_path, str(payload.get("site_id", "")))
    ledger = PrivacyLedger(ledger_path, None, str(payload.get("accountant")))
    ledger.site_id, ledger.identity = identity.site_id, identity
    ledger.write()  # the ledger first (now naming the site), then the head that pins it
    log.warning("%s: enrolled this site (id %s) around its existing ledger of %d entries", identity_path,
                identity.site_id, len(ledger.entries))
    return identity


def enrol(state_dir: Path, delta: float, accountant: str) -> SiteIdentity:
    """A new site: a random id, an empty ledger naming it (δ fixed from now on), then site.json. Call holding
    site_lock, after load_identity found the state dir fresh."""
    identity = SiteIdentity.new(state_dir / IDENTITY_FILE)
    ledger = PrivacyLedger(state_dir / LEDGER_FILE, delta, accountant)
    ledger.site_id, ledger.identity = identity.site_id, identity
    ledger.write()
    log.info("%s: enrolled a new site, id %s, δ = %.3g", identity.path, identity.site_id, delta)
    return identity


def open_site_ledger(state_dir: str | Path, accountant: str, delta: float | None, num_users: int,
                     dp: bool = True) -> PrivacyLedger:
    """The site's ledger, checked against its identity; a fresh state dir is enrolled first. Call holding
    site_lock.

    `delta`: the site's configured δ (None: the ledger's, or default_delta(num_users) for a new site). Under DP
    the ledger's δ must stay below 1/num_users, or the site refuses (its user count grew past 1/δ since)."""
    folder = Path(state_dir)
    identity = load_identity(folder)
    if identity is None:
        fresh = delta if delta is not None else default_delta(num_users)
        if dp:
            check_delta(folder / LEDGER_FILE, fresh, num_users)  # before δ is fixed for good
        identity = enrol(folder, fresh, accountant)
    ledger = PrivacyLedger(folder / LEDGER_FILE, delta, accountant, identity)
    if dp:
        check_delta(ledger.path, ledger.delta, num_users)
    return ledger


def check_delta(ledger_path: Path, delta: float, num_users: int) -> None:
    """Refuse DP with δ not below 1/#users: (ε, δ)-DP then allows revealing a user outright."""
    if not delta * max(num_users, 1) < 1:
        raise LedgerError(f"{ledger_path}: this site's δ = {delta:.3g} (kept in its ledger from the site's first "
                          f"start) is not below 1/#users = 1/{num_users} = {1 / max(num_users, 1):.3g}, so its "
                          "(ε, δ) guarantee would be void: the data set grew since, or --delta is too large. The "
                          f"ledger keeps its δ and the ε already spent; refusing DP training. {START_OVER}.")

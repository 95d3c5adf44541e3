"""A site's ledger cannot be lost or forged by accident: it belongs to the site identity enrolled in its state
dir, its head pins its entries, one process at a time spends from it, and its δ stays below 1/#users.

Before site identities, each case here read as ε = 0 (or lost a round) without a word."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fl_client.dp.enrolment import SiteBusyError, open_site_ledger, site_lock
from fl_client.dp.ledger import BudgetExceededError, LedgerError, epsilon_of
from fl_client.dp.settings import default_delta

ROUND = [(1.0, 0.05, 40)]  # σ, sample rate, steps of one local training round
USERS = 500


def spend(state_dir: Path, rounds: int) -> float:
    """Enrol (on first use) and record `rounds` rounds the way a site does: under its lock."""
    with site_lock(state_dir):
        ledger = open_site_ledger(state_dir, "prv", None, USERS)
        for r in range(len(ledger.entries) + 1, len(ledger.entries) + rounds + 1):
            ledger.record("run-a", r, ROUND)
        return ledger.spent()


def reopen(state_dir: Path, users: int = USERS) -> float:
    with site_lock(state_dir):
        return open_site_ledger(state_dir, "prv", None, users).spent()


def ledger_file(state_dir: Path) -> Path:
    return state_dir / "privacy_ledger.json"


def edit_ledger(state_dir: Path, change) -> None:
    payload = json.loads(ledger_file(state_dir).read_text())
    change(payload)
    ledger_file(state_dir).write_text(json.dumps(payload))


def test_a_fresh_state_dir_is_enrolled_once_with_an_id_and_an_empty_ledger(tmp_path):
    assert reopen(tmp_path) == 0.0
    identity = json.loads((tmp_path / "site.json").read_text())
    ledger = json.loads(ledger_file(tmp_path).read_text())
    assert len(identity["site_id"]) == 32 and ledger["site_id"] == identity["site_id"]
    assert identity["head"]["entries"] == 0 and ledger["entries"] == [] and ledger["delta"] == default_delta(USERS)
    spent = spend(tmp_path, 2)
    assert reopen(tmp_path) == pytest.approx(spent) == pytest.approx(epsilon_of(ROUND * 2, default_delta(USERS)))
    again = json.loads((tmp_path / "site.json").read_text())
    assert again["site_id"] == identity["site_id"] and again["head"]["entries"] == 2  # the id never changes


@pytest.mark.parametrize(("damage", "says"), [
    (lambda state: ledger_file(state).unlink(), "privacy ledger is missing"),
    (lambda state: edit_ledger(state, lambda p: p.update(entries=[])), "emptied, shortened or edited: it holds 0"),
    (lambda state: edit_ledger(state, lambda p: p["entries"].pop()), "emptied, shortened or edited: it holds 1"),
    (lambda state: edit_ledger(state, lambda p: p["entries"][0]["history"][0].__setitem__(0, 50.0)), "differ"),
    (lambda state: edit_ledger(state, lambda p: p.update(site_id="0" * 32)), "belongs to site '000"),
    (lambda state: (state / "site.json").unlink(), "identity file is missing beside its ledger"),
    (lambda state: ((state / "site.json").unlink(), ledger_file(state).unlink()), "shows earlier rounds"),
])
def test_a_lost_or_forged_ledger_is_refused_naming_the_file_never_read_as_zero(tmp_path, damage, says):
    spend(tmp_path, 2)
    (tmp_path / "sigma_plans.json").write_text("{}")  # what every DP round leaves behind
    damage(tmp_path)
    with pytest.raises(LedgerError, match=says) as refused:
        reopen(tmp_path)
    assert str(tmp_path) in str(refused.value) and "new --state-dir" in str(refused.value)


def test_a_state_dir_with_kept_replies_but_no_identity_or_ledger_is_refused(tmp_path):
    (tmp_path / "replies").mkdir()
    (tmp_path / "replies" / "train-7_round3.pt").write_bytes(b"x")
    with pytest.raises(LedgerError, match=r"1 kept round replies in .*replies"):
        reopen(tmp_path)
    assert not (tmp_path / "site.json").exists()  # nothing enrolled over the evidence


def test_a_ledger_written_just_before_a_crash_keeps_its_new_entry(tmp_path):
    spend(tmp_path, 1)
    head = (tmp_path / "site.json").read_text()
    spent = spend(tmp_path, 1)
    (tmp_path / "site.json").write_text(head)  # the crash came between the ledger and its head
    assert reopen(tmp_path) == pytest.approx(spent)  # more spending than the head knows is kept, not refused
    assert json.loads((tmp_path / "site.json").read_text())["head"]["entries"] == 2


def test_a_ledger_from_before_site_identities_is_adopted_with_its_entries(tmp_path):
    entry = {"run_id": "r", "round": 1, "history": [list(ROUND[0])], "epsilon_after": 1.0, "recorded_at": "then"}
    ledger_file(tmp_path).write_text(json.dumps({"version": 1, "unit": "one user", "delta": 1e-4,
                                                 "accountant": "prv", "entries": [entry]}))
    assert reopen(tmp_path) == pytest.approx(epsilon_of(ROUND, 1e-4))
    assert json.loads(ledger_file(tmp_path).read_text())["site_id"] == json.loads(
        (tmp_path / "site.json").read_text())["site_id"]


def test_default_delta_is_strictly_below_one_over_the_users():
    for users in (1, 2, 10, 1000, 10**5, 10**7):
        assert default_delta(users) < 1 / users
        assert default_delta(users) * users <= 0.1  # at most 0.1 users exposed in expectation
    assert default_delta(2) == 1e-5 and default_delta(10**6) == pytest.approx(1e-7)


def test_a_changed_user_count_keeps_the_first_delta_and_the_spent_epsilon(tmp_path):
    spent = spend(tmp_path, 1)
    with site_lock(tmp_path):
        grown = open_site_ledger(tmp_path, "prv", None, 60_000)  # today's rule would give 1/(10 · 60,000)
    assert grown.delta == default_delta(USERS) == 1e-5 and grown.spent() == pytest.approx(spent)
    grown.record("run-a", 2, [(1.0, 0.01, 40)])  # a new sample rate: each entry keeps its own
    assert grown.history == [*ROUND, (1.0, 0.01, 40)]
    with pytest.raises(LedgerError, match=r"privacy_ledger.json: this site's δ = 1e-05 .* 1/100000 = 1e-05"):
        reopen(tmp_path, users=100_000)  # δ is no longer below 1/#users: DP refused, ledger untouched
    assert len(json.loads(ledger_file(tmp_path).read_text())["entries"]) == 2


def test_a_configured_delta_not_below_one_over_the_users_is_refused_before_it_is_fixed(tmp_path):
    with pytest.raises(LedgerError, match="1/#users = 1/10"), site_lock(tmp_path):
        open_site_ledger(tmp_path, "prv", 0.5, 10)
    assert not ledger_file(tmp_path).exists()  # the site may retry with a smaller δ
    with site_lock(tmp_path):
        assert open_site_ledger(tmp_path, "prv", 0.01, 10).delta == 0.01


def test_two_writers_with_budget_for_one_round_spend_it_once(tmp_path):
    """Each writer checks the budget, trains (sleeps) and records, as a round does. Without the lock both
    pass the check on the same balance and both record: the site overspends (or one round is lost)."""
    one_round = epsilon_of(ROUND, default_delta(USERS))
    spend(tmp_path, 0)
    outcomes: list[str] = []

    def writer(run: str) -> None:
        with site_lock(tmp_path):
            ledger = open_site_ledger(tmp_path, "prv", None, USERS)
            try:
                ledger.check(ROUND, one_round * 1.01)
            except BudgetExceededError:
                outcomes.append("declined")
                return
            time.sleep(0.3)  # training
            ledger.record(run, 1, ROUND)
            outcomes.append("trained")

    threads = [threading.Thread(target=writer, args=(run,)) for run in ("run-a", "run-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["declined", "trained"]
    assert reopen(tmp_path) == pytest.approx(one_round)


@pytest.mark.slow
def test_two_processes_both_recording_lose_no_round(tmp_path):
    spend(tmp_path, 0)
    script = f"""
import sys, time
from pathlib import Path
import fl_client.dp.engine  # Opacus imported before the race, so both processes reach the lock together
from fl_client.dp.enrolment import open_site_ledger, site_lock
with site_lock(Path({str(tmp_path)!r})):
    ledger = open_site_ledger(Path({str(tmp_path)!r}), "prv", None, {USERS})
    time.sleep(1.0)  # training, between reading the ledger and recording
    ledger.record(sys.argv[1], 1, [(1.0, 0.05, 40)])
"""
    root = Path(__file__).resolve().parents[2]
    workers = [subprocess.Popen([sys.executable, "-c", script, run], cwd=root, stderr=subprocess.PIPE, text=True)
               for run in ("run-a", "run-b")]
    for worker in workers:
        assert worker.wait(timeout=120) == 0, worker.stderr.read() if worker.stderr else ""
    entries = json.loads(ledger_file(tmp_path).read_text())["entries"]
    assert sorted(e["run_id"] for e in entries) == ["run-a", "run-b"]
    assert reopen(tmp_path) == pytest.approx(epsilon_of(ROUND * 2, default_delta(USERS)))


def test_a_second_process_waits_for_the_lock_then_gives_up_with_a_clear_error(tmp_path):
    busy = r"site.lock: another process \(pid \d+\) has held"
    with site_lock(tmp_path), pytest.raises(SiteBusyError, match=busy), site_lock(tmp_path, timeout_s=0.2):
        pass
    with site_lock(tmp_path, timeout_s=0.2):  # released: the next one gets it at once
        pass


def test_the_lock_names_its_holder_over_whatever_an_earlier_holder_wrote(tmp_path):
    """The holder's pid is written in place (padded), not by truncating the file: a longer pid left by an earlier
    holder must not show through."""
    (tmp_path / "site.lock").write_text("98765432109876")
    with site_lock(tmp_path):
        assert (tmp_path / "site.lock").read_text().strip() == str(os.getpid())

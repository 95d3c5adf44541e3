"""The site's privacy ledger: ε only grows, survives restarts, refuses over-budget rounds and double records."""

import json

import pytest

from fl_client.dp.ledger import BudgetExceededError, LedgerError, PrivacyLedger, epsilon_of

ROUND = [(1.0, 0.05, 40)]  # σ, sample rate, steps of one local training round
DELTA = 1e-4


def test_epsilon_never_decreases_as_rounds_are_recorded(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", DELTA)
    assert ledger.spent() == 0.0
    previous = 0.0
    for r in range(1, 5):
        entry = ledger.record("run-a", r, ROUND)
        assert entry.epsilon_after > previous
        assert ledger.spent() == pytest.approx(entry.epsilon_after)
        previous = entry.epsilon_after
    assert ledger.spent() == pytest.approx(epsilon_of(ROUND * 4, DELTA))


def test_ledger_survives_a_restart_and_keeps_counting(tmp_path):
    path = tmp_path / "site" / "ledger.json"
    first = PrivacyLedger(path, DELTA)
    first.record("run-a", 1, ROUND)
    spent = first.spent()
    restarted = PrivacyLedger(path, DELTA)
    assert restarted.spent() == pytest.approx(spent)
    assert restarted.has("run-a", 1) and not restarted.has("run-a", 2)
    restarted.record("run-a", 2, ROUND)
    assert PrivacyLedger(path, DELTA).spent() > spent
    assert json.loads(path.read_text())["unit"] == "one user"


def test_budget_check_declines_a_round_that_would_overspend(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", DELTA)
    one_round = epsilon_of(ROUND, DELTA)
    assert ledger.check(ROUND, budget_epsilon=one_round * 1.01) == pytest.approx(one_round)
    ledger.record("run-a", 1, ROUND)
    with pytest.raises(BudgetExceededError, match="over its budget"):
        ledger.check(ROUND, budget_epsilon=one_round * 1.01)
    assert ledger.spent() == pytest.approx(one_round)  # a refused check spends nothing


def test_a_step_far_past_the_budget_is_declined_before_the_prv_accountant_sees_it(tmp_path, monkeypatch):
    """A server chooses a distributed-DP round's σ: at σ = 10^-3 (q = 0.1) PRV's domain needed over 4 GB. RDP's
    bound declines such a step first; a step that fits still goes to PRV."""
    import fl_client.dp.engine as engine

    asked: list[str] = []
    real = engine._epsilon
    monkeypatch.setattr(engine, "_epsilon", lambda history, delta, acc: asked.append(acc) or real(history, delta, acc))
    ledger = PrivacyLedger(tmp_path / "ledger.json", DELTA, accountant="prv")
    with pytest.raises(BudgetExceededError, match=r"alone spend ε = .* \(RDP's bound\), over 10x this site's budget"):
        ledger.check([(0.05, 0.1, 1)], budget_epsilon=8.0)  # PRV: ε = 271, computed in 20-45 s
    assert asked == ["rdp"] and ledger.spent() == 0.0
    assert 0 < ledger.check([(1.0, 0.1, 1)], budget_epsilon=8.0) < 8.0 and asked[-1] == "prv"


def test_the_same_round_cannot_be_recorded_twice(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", DELTA)
    ledger.record("run-a", 1, ROUND)
    with pytest.raises(ValueError, match="already recorded"):
        ledger.record("run-a", 1, ROUND)
    ledger.record("run-b", 1, ROUND)  # another run's round 1 is new spending


def test_changing_delta_for_an_existing_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, DELTA).record("run-a", 1, ROUND)
    with pytest.raises(LedgerError, match=f"{path}: ledger was kept for δ=0.0001"):
        PrivacyLedger(path, DELTA * 10)
    assert PrivacyLedger(path, None).delta == DELTA  # None: the δ the ledger was started with


def test_a_long_ledger_composes_each_distinct_step_once(tmp_path, monkeypatch):
    """A distributed-DP site records one (σ, q, 1) entry per round; composing 120 of them entry by entry took
    25 s per check (the PRV accountant costs about 0.2 s per entry), so rounds slowed as the run went on.
    Identical (σ, q) steps count as one entry, wherever they sit in the history: composition is commutative."""
    import fl_client.dp.engine as engine

    composed: list[list] = []
    real = engine.create_accountant

    def counting(mechanism):
        accountant = real(mechanism=mechanism)
        original = accountant.get_epsilon

        def get_epsilon(delta, **kwargs):
            composed.append(list(accountant.history))
            return original(delta=delta, **kwargs)

        accountant.get_epsilon = get_epsilon
        return accountant

    monkeypatch.setattr(engine, "create_accountant", counting)
    ledger = PrivacyLedger(tmp_path / "ledger.json", DELTA)
    one_step = [(1.1, 0.25, 1)]
    for r in range(1, 7):
        ledger.record("run-a", r, one_step if r != 3 else [(2.0, 0.25, 1)])
    spent = ledger.spent()
    assert max(len(history) for history in composed) == 2
    assert composed[-1] == [(1.1, 0.25, 5), (2.0, 0.25, 1)]
    unmerged = real(mechanism="prv")  # Opacus, composing the history as recorded
    unmerged.history = [(1.1, 0.25, 1)] * 2 + [(2.0, 0.25, 1)] + [(1.1, 0.25, 1)] * 3
    assert spent == pytest.approx(unmerged.get_epsilon(delta=DELTA), rel=1e-9)

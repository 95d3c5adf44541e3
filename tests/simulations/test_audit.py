"""The one-run privacy audit: the bound's statistics, and small audits on the synthetic data (CI's audit)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from scipy import special

import simulations.audit
from fl_client.dp.engine import PrivacySpent
from simulations.audit import AuditRunConfig, ClaimRefutedError, make_canaries, run_audit
from simulations.audit_bound import audit_scores, epsilon_lower_bound, p_value

SMALL = ["data.synthetic.num_users=600", "data.synthetic.num_items=100", "model.hidden_size=32", "model.max_len=20",
         "train.batch_size=64", "train.lr=0.003", "train.patience=0", "audit.canaries=400"]


def audit_config(tmp_path: Path, overrides: list[str]) -> AuditRunConfig:
    with initialize_config_module(config_module="simulations.conf", version_base="1.3"):
        cfg = compose(config_name="audit", overrides=[*SMALL, *overrides, f"output_dir={tmp_path}"])
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def test_perfect_guesses_without_delta_give_the_closed_form_bound():
    # r right guesses of r: the largest ε with expit(ε)^r <= α is logit(α^(1/r))
    for guesses in (10, 100, 1000):
        expected = special.logit(0.05 ** (1 / guesses))
        assert epsilon_lower_bound(1000, guesses, guesses, 0.0, 0.05) == pytest.approx(expected, abs=1e-5)


# (m canaries, guesses, right guesses, δ) -> the bound at significance 0.05 of the reference implementation,
# jax-privacy's auditing._epsilon_one_run (google-deepmind/jax_privacy commit 8967688), computed 2026-12-05.
JAX_PRIVACY = [((1000, 100, 91, 1e-5), 1.715576), ((1000, 200, 150, 1e-5), 0.819973),
               ((1000, 1000, 1000, 0.0), 5.809068), ((1000, 20, 20, 1e-5), 1.791284),
               ((10000, 1000, 700, 1e-5), 0.729253), ((1000, 400, 246, 1e-5), 0.294277),
               ((100, 100, 90, 1e-3), 1.58056), ((1000, 2000, 1200, 1e-6), 0.329462)]


@pytest.mark.parametrize(("case", "reference"), JAX_PRIVACY)
def test_the_bound_agrees_with_the_reference_implementation(case, reference):
    m, guesses, correct, delta = case
    assert epsilon_lower_bound(m, guesses, correct, delta, 0.05) == pytest.approx(reference, abs=2e-6)


def test_delta_only_loosens_the_bound_and_half_right_is_no_evidence():
    assert p_value(1000, 200, 150, 1.0, 1e-5) >= p_value(1000, 200, 150, 1.0, 0.0)
    assert epsilon_lower_bound(1000, 200, 150, 1e-3, 0.05) < epsilon_lower_bound(1000, 200, 150, 0.0, 0.05)
    assert epsilon_lower_bound(1000, 200, 100, 1e-5, 0.05) == 0.0


def test_the_bound_exceeds_the_true_epsilon_at_most_at_the_significance_level():
    """Guesses from a mechanism that is exactly ε-DP (randomized response: each guess right with probability
    e^ε / (1 + e^ε)) refute ε in at most about 5% of trials."""
    rng = np.random.default_rng(0)
    epsilon, guesses, trials = 1.0, 200, 2000
    correct = rng.binomial(guesses, special.expit(epsilon), size=trials)
    refuted = np.mean([epsilon_lower_bound(1000, guesses, int(c), 0.0, 0.05) > epsilon for c in correct])
    assert refuted <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / trials)


def test_scores_that_separate_give_a_bound_and_random_scores_none():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    separated = audit_scores(included + rng.normal(0, 0.1, 1000), included, 1e-5, 0.05)
    assert separated.epsilon_lower_bound > 3 and separated.auc == 1.0 and separated.correct == separated.guesses
    noise = audit_scores(rng.normal(size=1000), included, 1e-5, 0.05)
    assert noise.epsilon_lower_bound < 0.5 and 0.4 < noise.auc < 0.6


def test_canaries_are_random_sequences_of_real_catalog_rows():
    canaries = make_canaries(50, 12, 100, True, np.random.default_rng(2))
    assert len(canaries) == 50 and canaries.items.min() >= 1 and canaries.items.max() < 100
    assert (canaries.lengths() == 12).all() and len(canaries.trainable_users()) == 50
    with pytest.raises(ValueError, match=r"audit\.length=3"):
        make_canaries(5, 3, 100, False, np.random.default_rng(2))


@pytest.mark.slow
def test_the_control_without_dp_is_caught_memorising_and_a_dp_run_stays_below_its_claim(tmp_path):
    control = run_audit(audit_config(tmp_path / "control", ["privacy=disabled", "train.epochs=20"]))
    assert control["claimed_epsilon"] is None and control["epsilon_lower_bound"] > 0.5
    white = run_audit(audit_config(tmp_path / "white", ["privacy=disabled", "train.epochs=20", "audit.score=gradient"]))
    assert white["score"] == "gradient" and white["epsilon_lower_bound"] > 0.2 and white["auc"] > 0.55
    private = run_audit(audit_config(tmp_path / "dp", ["privacy.epsilon=2.0", "train.epochs=10"]))
    assert 0 <= private["epsilon_lower_bound"] <= private["claimed_epsilon"] == pytest.approx(2.0, rel=0.01)
    assert json.loads((tmp_path / "dp" / "audit.json").read_text()) == private


def test_a_claim_below_the_bound_fails_the_audit(tmp_path, monkeypatch):
    """An accountant that under-reports ε (here: a non-DP training that claims ε = 0.01) is caught."""
    real_train = simulations.audit.train

    def under_reporting(*args, **kwargs):
        result = real_train(*args, **kwargs)
        claimed = PrivacySpent(epsilon=0.01, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0,
                               history=((1.0, 0.1, 1),))
        return replace(result, privacy=claimed)

    monkeypatch.setattr(simulations.audit, "train", under_reporting)
    with pytest.raises(ClaimRefutedError, match=r"exceeds the claimed ε = 0\.010"):
        run_audit(audit_config(tmp_path, ["privacy=disabled", "train.epochs=4"]))  # bound about 0.2 already


@pytest.mark.slow
def test_a_federated_audit_puts_the_canaries_at_site_0_and_checks_that_sites_ledger(tmp_path):
    report = run_audit(audit_config(tmp_path, ["audit.mode=federated", "federation.num_rounds=2",
                                               "federation.local_epochs=1", "privacy.epsilon=3.0",
                                               "federation.num_cpus=1"]))  # one worker: see test_federation
    assert report["mode"] == "federated" and "per user of site 0, over its 2 ledger entries" in report["claim"]
    assert 0 <= report["epsilon_lower_bound"] <= report["claimed_epsilon"] <= 3.0 * 1.01
    site0 = pd.read_parquet(tmp_path / "sites" / "site-0" / "events.parquet")
    canaries = site0.loc[site0["user_id"].str.startswith("canary-"), "user_id"].nunique()
    assert canaries == report["canaries_included"] > 0
    others = pd.concat(pd.read_parquet(p) for p in (tmp_path / "sites").glob("site-[1-9]*/events.parquet"))
    assert not others["user_id"].str.startswith("canary-").any()

"""`fedrec-client --check`: a site checks its data against the catalog before joining, without connecting,
enrolling or spending anything."""

import re

import pytest

from fl_client.site import SiteStartError
from fl_client.supernode import main
from shared_model.catalog import ItemCatalog
from simulations.synthetic import generate_events, write_events


@pytest.fixture
def site(tmp_path):
    log = generate_events(num_users=120, num_items=40, seed=4)
    write_events(log, tmp_path / "events.csv")
    ItemCatalog.from_events(log.frame[log.frame["item_id"] != log.frame["item_id"].iloc[0]]).save(tmp_path)
    return ["--data", str(tmp_path / "events.csv"), "--catalog", str(tmp_path / "catalog.json"),
            "--state-dir", str(tmp_path / "state")]


def test_the_check_prints_counts_delta_and_sigma_and_writes_nothing(site, tmp_path, capsys):
    assert main([*site, "--check", "10x1x32"]) == 0
    out = capsys.readouterr().out
    assert "catalog: " in out and "fingerprint" in out
    assert "'unknown item': " in out  # the catalog lacks one item: its events are counted as dropped
    assert "120 users" in out and "δ = 1e-05" in out and "a new site (not enrolled yet)" in out
    assert "σ = " in out and "10 rounds x 1 local epochs at batch 32 (4 steps a round" in out
    assert "ready: this site can join" in out
    assert not (tmp_path / "state").exists()  # no enrolment, no cache, no ledger


def test_the_check_refuses_what_the_start_would_refuse(site, tmp_path):
    with pytest.raises(ValueError, match="ROUNDSxEPOCHSxBATCH"):
        main([*site, "--check", "5x2"])  # not a plan
    with pytest.raises(SiteStartError, match="below this site's min_users=500"):
        main([*site, "--min-users", "500", "--check"])
    assert not (tmp_path / "state").exists()


def test_an_enrolled_site_is_told_how_many_rounds_its_remaining_budget_trains(site, tmp_path, capsys):
    """σ is calibrated to the whole budget: a site that already spent half of it trains half the plan's rounds
    and declines the rest, and the check says so instead of a plain "ready" (before: "ready" whatever was left)."""
    from fl_client.dp.enrolment import site_lock
    from fl_client.site import SiteConfig, SiteData
    from fl_client.training_round import planned_sigma
    from shared_model.adapters import load_dataset
    from shared_model.sequences import to_user_sequences

    config = SiteConfig(data_path=site[1], catalog_path=site[3], state_dir=site[5])
    catalog = ItemCatalog.load(config.catalog_path)
    data = SiteData(catalog, to_user_sequences(load_dataset(config.data_format, config.data_path), catalog,
                                               min_events=config.min_events))
    with site_lock(config.state_dir):
        ledger = config.open_ledger(len(data.sequences))  # enrols the site
        _, [(sigma, rate, steps)] = planned_sigma(config, data, 10, 1, 32, ledger.delta, cache=False)
        ledger.record("earlier-run", 1, [(sigma, rate, steps * 5)])  # half the plan already spent
    assert main([*site, "--check", "10x1x32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"spent in 1 round\b", out) and "will train 5 of the plan's 10 rounds" in out
    with site_lock(config.state_dir):
        config.open_ledger(len(data.sequences)).record("earlier-run", 2, [(sigma, rate, steps * 5)])
    assert main([*site, "--check", "10x1x32"]) == 0
    out = capsys.readouterr().out
    assert "would decline every round" in out and "ready: this site can join" not in out

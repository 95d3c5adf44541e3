"""`fedrec-client --check`: a site checks its data against the catalog before joining, without connecting,
enrolling or spending anything."""

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

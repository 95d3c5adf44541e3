"""A site's item count for a model that trains only some item rows: noised under DP, paid once from the site's
own budget (ledger round 0), resent unchanged, declined when unaffordable, and planned into the round σ."""

import json
from dataclasses import replace

import pytest
import torch

from fl_client.count_round import count_round
from fl_client.federated import COUNT_ROUND, plan_round, train_round
from fl_client.item_selection import user_item_histogram
from fl_client.ledger import PrivacyLedger
from fl_client.rounds import RoundConfig, build_global_model
from fl_client.site import load_site_data
from tests.fl_client.server_round import round_record

K = 12


def query(catalog, server_round=0, num_rounds=2):
    record, state = round_record(catalog, server_round, num_rounds, trained_item_rows=K)
    return RoundConfig.from_record(record), state


def ledger_rounds(site):
    return [e["round"] for e in json.loads(site.ledger_path.read_text())["entries"]]


def test_a_dp_site_pays_for_its_item_count_once_and_resends_the_same_answer(site):
    data = load_site_data(site)
    cfg = query(data.catalog)[0]
    first = count_round(site, data, cfg)
    assert first.dp and not first.declined and first.counts.shape == (data.catalog.num_rows,)
    assert 0 < first.epsilon < site.epsilon
    entries = json.loads(site.ledger_path.read_text())["entries"]
    assert [(e["round"], e["history"]) for e in entries] == [(COUNT_ROUND, [[site.selection_noise, 1.0, 1]])]
    exact = torch.from_numpy(user_item_histogram(data.sequences, data.catalog.num_rows))
    noise = first.counts - exact
    assert 0.5 * site.selection_noise < float(noise.std()) < 2 * site.selection_noise
    again = count_round(site, data, cfg)  # a restarted server asks again: same release, nothing spent
    assert torch.equal(again.counts, first.counts) and again.epsilon == first.epsilon
    assert ledger_rounds(site) == [COUNT_ROUND]


def test_without_dp_the_counts_are_exact_and_nothing_is_claimed(site):
    site = replace(site, dp=False)
    data = load_site_data(site)
    reply = count_round(site, data, query(data.catalog)[0])
    assert not reply.dp and reply.epsilon == 0.0 and not site.ledger_path.exists()
    assert torch.equal(reply.counts, torch.from_numpy(user_item_histogram(data.sequences, data.catalog.num_rows)))


def test_a_site_declines_a_count_its_budget_cannot_pay_for(site):
    site = replace(site, epsilon=0.05, selection_noise=1.0)
    data = load_site_data(site)
    reply = count_round(site, data, query(data.catalog)[0])
    assert reply.counts is None and "budget" in reply.declined and ledger_rounds(site) == []  # enrolled, nothing spent


def test_the_count_and_every_planned_round_together_spend_the_budget(site):
    data = load_site_data(site)
    cfg, state = query(data.catalog)
    counts = count_round(site, data, cfg).counts
    model = build_global_model(cfg, state)
    model.select_most_counted_rows(counts)
    state = model.state_dict()
    delta = PrivacyLedger(site.ledger_path, None).delta  # fixed at the site's enrolment
    assert plan_round(site, data, cfg, delta, counted=True)[0] > plan_round(site, data, cfg, delta)[0]
    for server_round in (1, 2):
        cfg, _ = query(data.catalog, server_round)
        reply = train_round(site, data, cfg, state)
        assert not reply.declined
        state = {**state, **reply.state}
    assert site.epsilon * 0.97 < reply.epsilon <= site.epsilon * 1.01
    assert PrivacyLedger(site.ledger_path, delta).spent() == pytest.approx(reply.epsilon)
    assert ledger_rounds(site) == [COUNT_ROUND, 1, 2]
    mask = state["item_row_mask"]
    assert int(mask.sum()) == K and torch.equal(mask, model.item_row_mask)  # the server's choice, never redone


def test_a_site_refuses_to_train_rows_the_server_never_chose(site):
    data = load_site_data(site)
    cfg, state = query(data.catalog, server_round=1)
    with pytest.raises(ValueError, match="ask the sites for item counts first"):
        train_round(site, data, cfg, state)
    assert not site.ledger_path.exists()

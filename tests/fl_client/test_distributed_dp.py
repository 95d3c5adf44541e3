"""A distributed-DP round at a site: one DP-SGD step over a Poisson sample, with this site's share of the noise,
charged to the site's ledger as (σ of the sum, q, 1 step)."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fl_client.distributed_dp import dp_step_round, gradient_step, noise_share
from fl_client.round_config import RoundConfig, build_global_model
from fl_client.site import SiteStartError, load_site_data
from shared_model import modeling_fedrec, secure_sum, wire
from shared_model.catalog import ItemCatalog
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel, draw_negatives, sequence_loss
from shared_model.sequences import make_batch
from tests.fl_client.server_round import round_record


def ddp_round(catalog: ItemCatalog, server_round: int = 1, q: float = 0.2, sigma: float = 1.0,
              colluders: int = 0, dropout: float = 0.0) -> tuple[RoundConfig, dict]:
    record, _ = round_record(catalog, server_round)
    config = FedRecConfig(num_items=len(catalog.item_ids), hidden_size=16, max_len=10,
                          catalog_fingerprint=catalog.fingerprint, hidden_dropout_prob=dropout,
                          attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    state = FedRecModel(config).state_dict()
    record.update({wire.MODEL_CONFIG: config.to_json_string(), wire.DDP_SAMPLE_RATE: q, wire.DDP_NOISE: sigma,
                   wire.DDP_CLIP: 1.0, wire.DDP_COLLUDERS: colluders})
    return RoundConfig.from_record(record), state


def test_each_site_adds_sigma_over_root_of_the_honest_sites_it_is_summed_with():
    catalog = ItemCatalog.from_items(["a", "b", "c"])
    cfg, _ = ddp_round(catalog, sigma=2.0, colluders=1)
    assert noise_share(cfg, None) == 2.0  # no secure sum: the server sees this update, so all the noise
    assert noise_share(cfg, 5) == pytest.approx(2.0 / math.sqrt(4))
    with pytest.raises(SiteStartError, match="no site's noise would be left"):
        noise_share(cfg, 1)


def test_a_sum_over_more_sites_than_the_shares_cover_carries_more_noise_than_sigma():
    """Each site's share covers a sum over the fewest sites that unmask it (n), so m > n honest sites add
    σ·√((m − t)/(n − t)): the dropout margin costs accuracy, never privacy."""
    catalog = ItemCatalog.from_items(["a", "b", "c"])
    cfg, _ = ddp_round(catalog, sigma=2.0, colluders=1)
    share = noise_share(cfg, 7)
    for summed in (7, 8, 10):  # the colluder's share is known to the server: the others' shares add up to
        honest = math.sqrt((summed - 1) * share ** 2)
        assert secure_sum.sum_noise_multiplier(2.0, summed, 7, 1) == pytest.approx(honest)
    assert secure_sum.sum_noise_multiplier(2.0, 7, 7, 1) == pytest.approx(2.0)  # the fewest: exactly σ
    assert secure_sum.sum_noise_multiplier(2.0, 10, 7, 1) == pytest.approx(2.0 * math.sqrt(9 / 6))


@pytest.mark.parametrize("num_negatives", [0, 8], ids=["full softmax", "sampled softmax"])
def test_without_noise_the_update_is_minus_the_clipped_gradient_sum_over_the_expected_batch(site, num_negatives,
                                                                                            monkeypatch):
    data = load_site_data(site)
    catalog = data.catalog
    cfg, state = ddp_round(catalog, q=1.0)  # every user sampled
    negatives, draws = None, []
    if num_negatives:  # the round's recipe asks for a sampled softmax: one draw for the step
        cfg = replace(cfg, num_negatives=num_negatives)
        negatives = draw_negatives(len(catalog.item_ids) + 1, num_negatives, len(data.sequences.trainable_users()))
        monkeypatch.setattr(modeling_fedrec, "draw_negatives", lambda *args: draws.append(args[:3]) or negatives)
    model = build_global_model(cfg, state)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reply = gradient_step(site, data, cfg, model, share=0.0)
    users = data.sequences.trainable_users()
    assert reply.num_examples == len(users)
    expected = {k: torch.zeros_like(v) for k, v in reply.state.items()}
    reference = build_global_model(cfg, state)
    for index, user in enumerate(users):  # each user's own gradient, clipped to C = 1, summed
        reference.zero_grad()
        batch = make_batch(data.sequences, [int(user)], "train", reference.config.max_len)
        sequence_loss(reference, batch, per_user=True,
                      negatives=None if negatives is None else negatives[index:index + 1]).sum().backward()
        grads = {n: p.grad.clone() for n, p in reference.named_parameters() if n in expected}
        norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
        for n, g in grads.items():
            expected[n] += g * min(1.0, 1.0 / float(norm))
    for name, trained in reply.state.items():
        assert torch.allclose((start[name] - trained) * len(users), expected[name], atol=1e-4), name
    assert draws == ([(len(catalog.item_ids) + 1, num_negatives, len(users))] if num_negatives else [])  # one draw


def test_an_empty_sample_is_a_step_of_noise_alone_with_this_sites_share(site):
    data = load_site_data(site)
    cfg, state = ddp_round(data.catalog, q=1e-9)  # no user sampled; expected batch 1
    model = build_global_model(cfg, state)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reply = gradient_step(site, data, cfg, model, share=0.5)
    steps = torch.cat([(start[k] - v).reshape(-1) for k, v in reply.state.items()])
    assert reply.num_examples == 1 and float(steps.std()) == pytest.approx(0.5, rel=0.05)


def test_each_round_is_charged_as_one_step_of_the_sum_and_a_resend_is_not_charged_again(site):
    data = load_site_data(site)
    cfg, state = ddp_round(data.catalog, q=0.2, sigma=1.0)
    first = dp_step_round(site, data, cfg, state, share=0.5)
    again = dp_step_round(site, data, cfg, state, share=0.5)
    ledger = json.loads(site.ledger_path.read_text())
    assert [e["history"] for e in ledger["entries"]] == [[[1.0, 0.2, 1]]]  # σ of the sum, not the share
    assert first.epsilon == again.epsilon > 0 and not first.declined
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)


def test_a_round_over_the_budget_is_declined_before_any_step(site):
    data = load_site_data(site)
    cfg, state = ddp_round(data.catalog, q=1.0, sigma=0.3)  # far over ε = 4 in one step
    reply = dp_step_round(site, data, cfg, state, share=0.3)
    assert reply.declined and "over its budget" in reply.declined and reply.num_examples == 0
    assert json.loads(site.ledger_path.read_text())["entries"] == []


def test_a_site_without_dp_refuses_distributed_dp(site):
    from dataclasses import replace

    data = load_site_data(site)
    cfg, state = ddp_round(data.catalog)
    with pytest.raises(SiteStartError, match="without DP"):
        dp_step_round(replace(site, privacy=replace(site.privacy, enabled=False)), data, cfg, state, share=1.0)


def test_a_malformed_distributed_dp_round_is_refused():
    from fl_client.round_config import RoundConfigError

    catalog = ItemCatalog.from_items(["a", "b"])
    record, _ = round_record(catalog)
    record.update({wire.DDP_SAMPLE_RATE: 2.0, wire.DDP_NOISE: 1.0, wire.DDP_CLIP: 1.0, wire.DDP_COLLUDERS: 0})
    with pytest.raises(RoundConfigError, match="distributed DP"):
        RoundConfig.from_record(record)
    np.testing.assert_equal(RoundConfig.from_record(round_record(catalog)[0]).ddp_sample_rate, 0.0)


def test_in_secure_mode_the_sample_comes_from_the_os_csprng(site, monkeypatch):
    import dataclasses

    import fl_client.distributed_dp

    drawn = []

    def from_the_csprng(count):  # stands in for fl_client.dp.secure_rng.secure_uniform: nobody sampled
        drawn.append(count)
        return np.ones(count)

    monkeypatch.setattr(fl_client.distributed_dp, "secure_uniform", from_the_csprng)
    monkeypatch.setattr(np.random, "default_rng", lambda *_: pytest.fail("numpy's generator drew the sample"))
    data = load_site_data(site)
    cfg, state = ddp_round(data.catalog, q=0.5)
    secure = dataclasses.replace(site, privacy=dataclasses.replace(site.privacy, secure_mode=True))
    reply = gradient_step(secure, data, cfg, build_global_model(cfg, state), share=0.5)
    assert drawn == [len(data.sequences.trainable_users())] and reply.train_loss == 0.0 and reply.train_seconds > 0


def test_on_a_secagg_ring_a_sites_share_covers_the_fewest_sites_a_sum_can_be_unmasked_over():
    """Before: the share covered one neighbourhood's threshold (100 sites on a ring of 4 neighbours: σ/√4, so a
    round of all 100 carried 5σ); a ring's sum cannot be unmasked over fewer than 80 of them."""
    from fl_client.secagg import SecAggState

    nodes = list(range(100))
    state = SecAggState(node=7, roster={n: (b"e", b"m") for n in nodes}, neighbours=[5, 6, 8, 9], needed=4)
    assert state.fewest_summed() == 80
    catalog = ItemCatalog.from_items(["a", "b", "c"])
    cfg, _ = ddp_round(catalog, sigma=2.0)
    assert noise_share(cfg, state.fewest_summed()) == pytest.approx(2.0 / math.sqrt(80))
    complete = SecAggState(node=7, roster={n: (b"e", b"m") for n in range(10)}, neighbours=[n for n in range(10)
                                                                                              if n != 7], needed=7)
    assert complete.fewest_summed() == 7


def release_round(catalog: ItemCatalog, sigma_p: float = 2.0, server_round: int = 0,
                  item_bias: bool = True) -> tuple[RoundConfig, dict]:
    record, _ = round_record(catalog, server_round)
    config = FedRecConfig(num_items=len(catalog.item_ids), hidden_size=16, max_len=10, item_bias=item_bias,
                          catalog_fingerprint=catalog.fingerprint)
    torch.manual_seed(0)
    state = FedRecModel(config).state_dict()
    record.update({wire.MODEL_CONFIG: config.to_json_string(), wire.DDP_SAMPLE_RATE: 0.2, wire.DDP_NOISE: 1.0,
                   wire.DDP_CLIP: 1.0, wire.DDP_COLLUDERS: 0, wire.DDP_POPULARITY: sigma_p})
    return RoundConfig.from_record(record), state


def test_a_release_round_sends_the_bias_plus_its_users_counts_and_is_charged_once_as_sigma_p_at_rate_1(site):
    from fl_client.dp.popularity import user_normalised_counts

    data = load_site_data(site)
    cfg, state = release_round(data.catalog, sigma_p=2.0)
    assert noise_share(cfg, 4) == pytest.approx(2.0 / 2)  # the release's σ_p is what the shares add up to
    reply = dp_step_round(site, data, cfg, state, share=1e-9)  # a negligible share: the counts themselves
    users = data.sequences.trainable_users()
    assert reply.num_examples == len(users) and not reply.declined
    changed = [k for k in reply.state if not torch.equal(reply.state[k], state[k])]
    assert changed == ["output.bias"]  # nothing is trained
    exact = user_normalised_counts(data.sequences, len(state["output.bias"]), users)
    np.testing.assert_allclose((reply.state["output.bias"] - state["output.bias"]).double().numpy() * len(users),
                               exact, atol=1e-4)
    again = dp_step_round(site, data, cfg, state, share=1e-9)
    assert torch.equal(again.state["output.bias"], reply.state["output.bias"])  # a resend spends nothing more
    entries = json.loads(site.ledger_path.read_text())["entries"]
    assert [e["history"] for e in entries] == [[[2.0, 1.0, 1]]] and reply.epsilon > 0


def test_a_release_is_refused_after_round_0_and_without_an_item_bias(site):
    from fl_client.round_config import RoundConfigError

    data = load_site_data(site)
    for sigma_p, server_round in ((2.0, 3), (float("inf"), 0), (float("nan"), 0), (-1.0, 0)):
        with pytest.raises(RoundConfigError, match="round 0"):
            release_round(data.catalog, sigma_p=sigma_p, server_round=server_round)
    cfg, state = release_round(data.catalog, item_bias=False)
    with pytest.raises(SiteStartError, match="item_bias"):
        dp_step_round(site, data, cfg, state, share=1.0)
    assert not site.ledger_path.exists() or json.loads(site.ledger_path.read_text())["entries"] == []

"""DP-SGD mechanics: per-user gradients are exact, clipped to C, and ε is what was asked for."""

import json

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant

from fl_client.dp import engine as privacy
from fl_client.dp.engine import PrivacyConfig, calibrate_noise, make_private
from fl_client.dp.settings import default_delta
from fl_client.dp.step import private_step
from fl_client.train import TrainConfig, TrainingDivergedError, plain_step, train, user_loader
from shared_model import sequences, wire
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel, sequence_loss
from shared_model.sequences import length_chunks, make_batch


def tiny_model(tie: bool) -> FedRecModel:
    torch.manual_seed(0)
    return FedRecModel(FedRecConfig(num_items=30, hidden_size=16, max_len=8, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, tie_item_embeddings=tie))


@pytest.mark.parametrize("tie", [True, False])
def test_per_user_gradients_equal_each_users_own_gradient(seqs, tie):
    model = tiny_model(tie)
    reference = tiny_model(tie)
    reference.load_state_dict(model.state_dict())
    users = seqs.trainable_users()[:4]
    batch = make_batch(seqs, users, "train", 8)
    engine = PrivacyEngine()
    loader = user_loader(users, 4, torch.Generator().manual_seed(0))
    private, _optimizer, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e6)
    sequence_loss(model, batch, per_user=True, padded=True).mean().backward()
    for i in range(len(users)):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        reference.zero_grad()
        sequence_loss(reference, one, per_user=True).sum().backward()
        for (name, p), q in zip(private._module.named_parameters(), reference.parameters(), strict=True):
            assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5), name


def test_each_users_gradient_is_clipped_to_max_grad_norm(seqs):
    model = tiny_model(True)
    config = PrivacyConfig(enabled=True, max_grad_norm=0.01, grad_sample_mode="hooks")
    loader = user_loader(seqs.trainable_users(), 16, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _engine, private, optimizer, _loader = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                                         loader, config, noise_multiplier=0.0)
    batch = make_batch(seqs, seqs.trainable_users()[:16], "train", 8)
    per_user = sequence_loss(model, batch, per_user=True, padded=True)
    per_user.mean().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)  # (B,)
    assert (norms > config.max_grad_norm).all()  # the bound binds, so the test means something
    scale = config.max_grad_norm / norms  # every user's gradient is rescaled to norm exactly C
    expected = torch.cat([(p.grad_sample * scale.view(-1, *[1] * (p.dim()))).sum(0).flatten()
                          for p in params]) / optimizer.expected_batch_size
    optimizer.step()
    # σ = 0 and lr = 1: the update is the sum of clipped per-user gradients over the expected batch size.
    after = dict(private._module.named_parameters())
    step = torch.cat([(before[k] - after[k].detach()).flatten() for k in after])
    assert 0 < step.norm() <= config.max_grad_norm * 16 / optimizer.expected_batch_size + 1e-6
    assert torch.allclose(step, expected, atol=1e-7)


def test_noise_is_calibrated_to_the_requested_epsilon(seqs):
    for epsilon in (1.0, 8.0):
        model = tiny_model(True)
        result = train(model, seqs, TrainConfig(epochs=2, batch_size=16, lr=1e-3),
                       PrivacyConfig(enabled=True, epsilon=epsilon))
        assert result.privacy is not None
        assert result.privacy.epsilon == pytest.approx(epsilon, rel=0.02)
        assert result.privacy.delta == pytest.approx(default_delta(len(seqs)))
        assert result.privacy.delta < 1 / len(seqs)
        assert sum(steps for _, _, steps in result.privacy.history) == 2 * 4  # ceil(52 users / 16) steps
        assert "per user" in result.privacy.claim()
        fresh = create_accountant(mechanism="prv")  # the claim is Opacus' own answer for the steps taken
        fresh.history = list(result.privacy.history)
        assert fresh.get_epsilon(delta=result.privacy.delta) == pytest.approx(result.privacy.epsilon)
    assert calibrate_noise(PrivacyConfig(epsilon=1.0), 0.1, 100, 1e-5) > calibrate_noise(
        PrivacyConfig(epsilon=8.0), 0.1, 100, 1e-5)


@pytest.mark.parametrize(("accountant", "epsilon", "sample_rate", "steps"), [
    ("prv", 1.0, 0.01, 1000), ("rdp", 8.0, 1 / 6, 60), ("rdp", 0.5, 0.001, 100), ("gdp", 2.0, 0.1, 50)])
def test_the_sigma_search_spends_the_budget_to_opacus_tolerance_in_few_accountant_calls(
        accountant, epsilon, sample_rate, steps):
    """σ spends at most ε and within 0.01 of it (Opacus' get_noise_multiplier's tolerance), in at most 7 calls of
    the accountant, each of which takes 0.1-1 s: Opacus' bisection makes 10-16 (benchmarks/sigma_search.py)."""
    calls: list[float] = []

    def spends(sigma: float) -> float:
        calls.append(sigma)
        return privacy.composed_epsilon([(sigma, sample_rate, steps)], 1e-5, accountant)

    sigma = privacy.smallest_sigma(spends, epsilon)
    assert epsilon - 0.01 <= spends(sigma) <= epsilon
    assert len(calls) - 1 <= 7


def test_the_prv_accountant_is_never_asked_about_a_sigma_far_below_the_answer(monkeypatch):
    """PRV's domain grows with the ε it is asked about: from σ = 1 a plan of 10^5 steps at q = 0.1 grew past 23 GB
    and was killed. The search starts from RDP's σ (closed form at any σ); here, from σ = 1, PRV was asked about
    ε = 75.6 first, now never above 1.2x the budget."""
    asked: list[tuple[str, float]] = []
    epsilon_of = privacy._epsilon

    def spy(history, delta, accountant):
        spent = epsilon_of(history, delta, accountant)
        asked.append((accountant, spent))
        return spent

    monkeypatch.setattr(privacy, "_epsilon", spy)
    privacy._calibrated_sigma.cache_clear()
    sigma = privacy.calibrate_noise(PrivacyConfig(epsilon=8.0, accountant="prv"), 0.1, 5000, 1e-5)
    assert 7.99 <= privacy.composed_epsilon([(sigma, 0.1, 5000)], 1e-5, "prv") <= 8.0
    prv = [spent for accountant, spent in asked if accountant == "prv"]
    assert prv and max(prv) <= 1.2 * 8.0, asked


def test_a_budget_no_noise_can_keep_is_refused_and_any_budget_is_never_overspent():
    with pytest.raises(ValueError, match="the budget is too low"):
        privacy.smallest_sigma(lambda sigma: 1.0, 0.5)  # ε that no σ lowers
    # an ε that jumps over the budget's last 0.01: still answered, with a σ that keeps it
    assert privacy.smallest_sigma(lambda sigma: 10.0 if sigma < 3.3 else 7.0, 8.0) >= 3.3
    def too_wide_below_3(sigma: float) -> float:  # as PRV's domain for many steps at a small σ
        if sigma < 3.0:
            raise MemoryError("Unable to allocate 84.1 GiB")
        return 30.0 / sigma

    assert privacy.smallest_sigma(too_wide_below_3, 8.0) == pytest.approx(3.75, abs=0.01)  # searched from above
    with pytest.raises(RuntimeError, match="did not settle within 100 accountant calls"):
        privacy.smallest_sigma(lambda sigma: 0.0, 1.0)  # no σ ever spends near the budget: bounded, not endless


@pytest.fixture
def sigma_searches(monkeypatch):
    """The σ searches from here on (the per-process cache starts empty)."""
    calls: list[float] = []
    search = privacy.sigma_search
    monkeypatch.setattr(privacy, "sigma_search",
                        lambda spends, eps, accountant: calls.append(eps) or search(spends, eps, accountant))
    privacy._calibrated_sigma.cache_clear()
    return calls


def test_the_sigma_search_runs_once_per_plan_in_a_process(sigma_searches):
    calls = sigma_searches
    config = PrivacyConfig(epsilon=3.0, accountant="rdp")
    sigma = calibrate_noise(config, 0.25, 40, 1e-3)
    assert calibrate_noise(config, 0.25, 40, 1e-3) == sigma and len(calls) == 1  # a site's next round
    assert calibrate_noise(PrivacyConfig(epsilon=6.0, accountant="rdp"), 0.25, 40, 1e-3) < sigma
    assert len(calls) == 2


def test_a_sites_sigma_plans_outlive_its_process_and_a_broken_cache_is_searched_again(sigma_searches, tmp_path):
    calls = sigma_searches
    config, cache = PrivacyConfig(epsilon=3.0, accountant="rdp"), tmp_path / "state" / "sigma_plans.json"
    sigma = calibrate_noise(config, 0.25, 40, 1e-3, cache_path=cache)
    privacy._calibrated_sigma.cache_clear()  # the next round's fresh process
    assert calibrate_noise(config, 0.25, 40, 1e-3, cache_path=cache) == sigma and len(calls) == 1
    assert calibrate_noise(config, 0.25, 80, 1e-3, cache_path=cache) > sigma and len(calls) == 2  # another plan
    cache.write_text('{"x": -1.0}')
    privacy._calibrated_sigma.cache_clear()
    with pytest.warns(UserWarning, match=r"sigma_plans.json: ignoring the σ plan cache"):
        assert calibrate_noise(config, 0.25, 40, 1e-3, cache_path=cache) == sigma
    assert len(calls) == 3 and list(json.loads(cache.read_text()).values()) == [sigma]  # rewritten


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
def test_clip_stats_record_each_sampled_users_own_gradient_norm_before_clipping(seqs, mode):
    reference = tiny_model(True)
    truth = []
    for user in seqs.trainable_users():  # every user's own gradient norm at the starting weights
        reference.zero_grad()
        sequence_loss(reference, make_batch(seqs, [int(user)], "train", 8), per_user=True).sum().backward()
        truth.append(torch.sqrt(sum((p.grad ** 2).sum() for p in reference.parameters())).item())
    config = TrainConfig(epochs=2, batch_size=16, lr=0.0, clip_stats=True, micro_batch_users=4)  # lr 0: fixed
    result = train(tiny_model(True), seqs, config, PrivacyConfig(enabled=True, noise_multiplier=1.0,
                                                                  max_grad_norm=np.median(truth),
                                                                  grad_sample_mode=mode))
    stats = result.clipping
    assert stats is not None and len(stats.norms) > 16  # several steps, several micro-batches each
    assert all(np.isclose(truth, n, rtol=1e-4).any() for n in stats.norms)
    summary = stats.summary()
    assert summary["user_steps"] == len(stats.norms) and 0 < summary["clipped_fraction"] < 1
    assert summary["norm_p10"] <= summary["norm_median"] <= summary["norm_p90"]
    assert sum(summary["squared_norm_share"].values()) == pytest.approx(1, abs=1e-3)
    assert "item_embeddings.weight" in summary["squared_norm_share"]
    assert train(tiny_model(True), seqs, config, PrivacyConfig(enabled=True, max_grad_norm=1e6)
                 ).clipping.summary()["clipped_fraction"] == 0
    assert train(tiny_model(True), seqs, TrainConfig(epochs=1, batch_size=16), PrivacyConfig(enabled=True)
                 ).clipping is None  # off unless asked


def test_training_without_dp_makes_no_privacy_claim(seqs):
    result = train(tiny_model(True), seqs, TrainConfig(epochs=1, batch_size=16), PrivacyConfig(enabled=False))
    assert result.privacy is None


@pytest.mark.parametrize("dp", [False, True])
def test_training_that_diverges_raises_instead_of_returning_nan_weights(seqs, dp):
    config = TrainConfig(epochs=2, batch_size=16, optimizer="sgd", lr=1e12)
    with pytest.raises(TrainingDivergedError, match=r"diverged in epoch 1: non-finite weights.*train.lr=1000000000000"):
        train(tiny_model(True), seqs, config, PrivacyConfig(enabled=dp))


def test_weights_sent_after_opacus_wrapping_have_no_opacus_prefix(seqs):
    model = tiny_model(True)
    loader = user_loader(seqs.trainable_users(), 16, torch.Generator())
    _, private, _, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                    PrivacyConfig(enabled=True, grad_sample_mode="hooks"), noise_multiplier=1.0)
    assert any(k.startswith("_module.") for k in private.state_dict())
    state = wire.trainable_state(model)
    assert set(state) == {name for name, _ in tiny_model(True).named_parameters()}


def test_length_chunks_cover_every_user_once_within_the_token_bound(seqs):
    users = seqs.trainable_users().tolist()
    chunks = length_chunks(seqs, users, max_len=8, max_tokens=20, max_users=2)
    assert sorted(u for chunk in chunks for u in chunk) == sorted(users)
    for chunk in chunks:
        assert len(chunk) <= 2
        longest = max(min(8, seqs.window(u, "train")[0].stop - seqs.window(u, "train")[0].start) for u in chunk)
        assert len(chunk) == 1 or len(chunk) * longest <= 20


@pytest.mark.parametrize("mode,tie", [("bookkeeping", True), ("bookkeeping", False), ("hooks", True)])
def test_micro_batching_gives_the_same_dp_update_as_one_batch(seqs, mode, tie):
    users = seqs.trainable_users()[:12].tolist()
    updates = []
    for tokens in (10_000, 16):
        model = tiny_model(tie)
        before = {k: v.clone() for k, v in model.named_parameters()}
        config = PrivacyConfig(enabled=True, max_grad_norm=0.05, grad_sample_mode=mode)
        loader = user_loader(seqs.trainable_users(), 12, torch.Generator())
        _, private, optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                                                config, noise_multiplier=0.0)
        private_step(private, model, seqs, users, optimizer, config,
                     TrainConfig(micro_batch_tokens=tokens), torch.device("cpu"))
        updates.append(torch.cat([(before[k] - p.detach()).flatten() for k, p in model.named_parameters()]))
    assert updates[0].norm() > 0
    assert torch.allclose(updates[0], updates[1], atol=1e-6)


def test_micro_batches_pad_few_positions(seqs, monkeypatch):
    monkeypatch.setattr(sequences, "PADDING_SLACK", 8)  # 60 users: the default slack would take them all
    users = seqs.trainable_users().tolist()
    lengths = {u: min(8, seqs.window(u, "train")[0].stop - seqs.window(u, "train")[0].start) for u in users}
    chunks = length_chunks(seqs, users, max_len=8, max_tokens=10_000)
    assert 1 < len(chunks) < len(set(lengths.values()))  # split, but lengths close together share one
    for chunk in chunks:  # a user joins only if it pads the users before it by at most PADDING_SLACK
        widths = [lengths[u] for u in chunk]
        assert widths == sorted(widths)
        assert all(k * (widths[k] - widths[k - 1]) <= 8 for k in range(1, len(widths)))
    padded = sum(len(chunk) * max(lengths[u] for u in chunk) for chunk in chunks)
    assert padded < 0.8 * len(users) * max(lengths.values())  # against one padded batch


def test_micro_batching_gives_the_same_update_as_one_batch_without_dp(seqs):
    users = seqs.trainable_users()[:12].tolist()
    updates = []
    for tokens in (10_000, 16):
        model = tiny_model(True)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        config = TrainConfig(micro_batch_tokens=tokens)
        assert len(length_chunks(seqs, users, 8, tokens)) == (1 if tokens > 1000 else 5)
        loss = plain_step(model, seqs, users, optimizer, config, torch.device("cpu"))
        with torch.no_grad():
            whole = float(sequence_loss(tiny_model(True), make_batch(seqs, users, "train", 8)))
        assert loss == pytest.approx(whole, rel=1e-5)
        updates.append(torch.cat([(before[k] - p.detach()).flatten() for k, p in model.named_parameters()]))
    assert updates[0].norm() > 0
    assert torch.allclose(updates[0], updates[1], atol=1e-6)


def test_dp_training_works_without_timestamps(seqs):
    model = FedRecModel(FedRecConfig(num_items=30, hidden_size=16, max_len=8, use_time_gaps=False))
    assert not hasattr(model, "time_embeddings")  # no parameter without a per-user gradient
    result = train(model, seqs, TrainConfig(epochs=1, batch_size=16), PrivacyConfig(enabled=True))
    assert result.privacy is not None and result.privacy.epsilon > 0


@pytest.mark.parametrize("train_items", [True, False])
def test_per_user_gradients_are_exact_with_public_features_and_item_bias(seqs, train_items):
    config = FedRecConfig(num_items=30, hidden_size=16, max_len=8, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, feature_dim=4, feature_scoring=True, item_bias=True,
                          train_item_embeddings=train_items)
    torch.manual_seed(0)
    model, reference = FedRecModel(config), FedRecModel(config)
    features = torch.randn(31, 4)
    model.set_item_features(features)
    reference.load_state_dict(model.state_dict())
    users = seqs.trainable_users()[:3]
    batch = make_batch(seqs, users, "train", 8)
    loader = user_loader(users, 3, torch.Generator())
    PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e6)
    sequence_loss(model, batch, per_user=True, padded=True).mean().backward()
    for i in range(len(users)):
        reference.zero_grad()
        sequence_loss(reference, {k: v[i:i + 1] for k, v in batch.items()}, per_user=True).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            if p.requires_grad:
                assert torch.allclose(p.grad_sample[i], q.grad, atol=1e-5), name
            else:
                assert q.grad is None and getattr(p, "grad_sample", None) is None, name


def test_a_frozen_item_table_stays_zero_under_dp_training(seqs):
    model = FedRecModel(FedRecConfig(num_items=30, hidden_size=16, max_len=8, item_bias=True,
                                     train_item_embeddings=False))
    bias_before = model.output.bias.detach().clone()
    train(model, seqs, TrainConfig(epochs=1, batch_size=16), PrivacyConfig(enabled=True, epsilon=8.0))
    assert model.item_embeddings.weight.abs().sum() == 0  # no noise was added to it
    assert not torch.equal(model.output.bias.detach(), bias_before)


@pytest.mark.parametrize("dp", [False, True])
def test_fedprox_proximal_step_keeps_local_weights_near_the_global_ones(seqs, dp):
    distances = []
    for mu in (0.0, 200.0):
        model = tiny_model(True)
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        train(model, seqs, TrainConfig(epochs=2, batch_size=16, lr=3e-3, proximal_mu=mu),
              PrivacyConfig(enabled=dp, epsilon=8.0))
        distances.append(torch.cat([(p.detach() - start[k]).flatten() for k, p in model.named_parameters()]).norm())
    assert distances[1] < 0.7 * distances[0]


def test_micro_batches_shrink_where_their_catalog_scores_would_pass_the_bound(seqs, monkeypatch):
    """A large catalog: train.micro_batch_tokens positions would each hold a score per item (8,192 × 1M floats:
    32 GiB), so both steps cap a micro-batch's positions at MAX_SCORES / item rows."""
    from fl_client.dp import step as step_module  # both steps cut their micro-batches there

    assert sequences.micro_batch_positions(8192, 12_102) == 8192  # Beauty: no change
    assert sequences.micro_batch_positions(8192, 1_000_001) == 268
    assert sequences.micro_batch_positions(8192, 10**10) == 1  # one user a micro-batch, whatever it holds
    assert sequences.micro_batch_positions(8192, 1 + 100) == 8192  # sampled softmax: 1 + K scores a position
    monkeypatch.setattr(sequences, "MAX_SCORES", 31 * 16)  # the tiny model's 31 rows: 16 positions
    asked = []

    def spy(seqs_, users_, max_len, max_tokens, *rest):
        asked.append(max_tokens)
        return length_chunks(seqs_, users_, max_len, max_tokens, *rest)

    monkeypatch.setattr(step_module, "length_chunks", spy)
    users = seqs.trainable_users()[:12].tolist()
    model = tiny_model(True)
    plain_step(model, seqs, users, torch.optim.SGD(model.parameters(), lr=1.0), TrainConfig(), torch.device("cpu"))
    config = PrivacyConfig(enabled=True, max_grad_norm=0.05)
    _, private, optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                            user_loader(seqs.trainable_users(), 12, torch.Generator()), config,
                                            noise_multiplier=0.0)
    private_step(private, model, seqs, users, optimizer, config, TrainConfig(), torch.device("cpu"))
    assert asked == [16, 16]


def test_a_sampled_softmax_bounds_the_users_of_a_micro_batch_by_the_rows_they_gather(seqs, monkeypatch):
    """Each user of a sampled softmax gathers K × d rows of the item table: short histories would otherwise put
    thousands of users (K × d numbers each) in one micro-batch of train.micro_batch_tokens positions."""
    from fl_client.dp import step as step_module  # both steps cut their micro-batches there

    assert sequences.sampled_softmax_users(1000, 64) == 4194  # 1 GiB of float32 rows
    monkeypatch.setattr(sequences, "MAX_SCORES", 3 * 8 * 16)  # 8 negatives of width 16: 3 users
    sizes = []

    def spy(*args):
        chunks = length_chunks(*args)
        sizes.append(max(len(c) for c in chunks))
        return chunks

    monkeypatch.setattr(step_module, "length_chunks", spy)
    users = seqs.trainable_users()[:12].tolist()
    model = tiny_model(True)
    config = TrainConfig(num_negatives=8)
    plain_step(model, seqs, users, torch.optim.SGD(model.parameters(), lr=1.0), config, torch.device("cpu"))
    privacy = PrivacyConfig(enabled=True, max_grad_norm=0.05)
    _, private, optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                            user_loader(seqs.trainable_users(), 12, torch.Generator()), privacy,
                                            noise_multiplier=0.0)
    private_step(private, model, seqs, users, optimizer, privacy, config, torch.device("cpu"))
    assert sizes == [3, 3]


def test_dp_training_with_a_sampled_softmax_spends_the_budget_and_learns(seqs):
    """Sampled softmax under DP (book-keeping): trained, accounted as every DP run, and the loss goes down; with
    Opacus' hooks, which cannot see the gathered output rows, it is refused before any step."""
    model = tiny_model(True)
    config = TrainConfig(epochs=6, batch_size=26, lr=3e-3, num_negatives=8)
    result = train(model, seqs, config, PrivacyConfig(enabled=True, epsilon=8.0, max_grad_norm=1.0))
    assert result.privacy is not None and result.privacy.epsilon == pytest.approx(8.0, rel=0.02)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    with pytest.raises(ValueError, match=r"needs privacy\.grad_sample_mode=bookkeeping"):
        train(tiny_model(True), seqs, config, PrivacyConfig(enabled=True, grad_sample_mode="hooks"))

"""model.trained_item_rows: only K item rows train, picked by a user-level (noisy under DP) count that is
accounted beside the DP-SGD steps; the other rows get no gradient, no weight and score by features alone."""

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine

from fl_client.item_selection import noisy_item_histogram, select_trained_rows, user_item_histogram
from fl_client.privacy import PrivacyConfig, calibrate_noise, composed_epsilon
from fl_client.train import TrainConfig, train, user_loader
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel, sequence_loss
from shared_model.sequences import make_batch
from shared_model.serialization import save_model_dir


def masked_model(k: int = 10, tie: bool = True, bias: bool = True) -> FedRecModel:
    torch.manual_seed(0)
    return FedRecModel(FedRecConfig(num_items=30, hidden_size=16, max_len=8, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, tie_item_embeddings=tie, item_bias=bias,
                                    trained_item_rows=k))


def test_one_user_moves_the_histogram_by_exactly_one_in_l2(seqs):
    full = user_item_histogram(seqs, 31)
    for user in range(len(seqs)):
        without = user_item_histogram(seqs.subset([u for u in range(len(seqs)) if u != user]), 31)
        assert np.linalg.norm(full - without) == pytest.approx(1.0)


def test_without_noise_the_rows_with_the_largest_histogram_are_chosen(seqs):
    histogram = user_item_histogram(seqs, 31)
    model = masked_model(k=8)
    rows = model.select_most_counted_rows(noisy_item_histogram(seqs, 31)).numpy()
    assert len(rows) == 8 and list(rows) == sorted(rows) and 0 not in rows
    assert torch.equal(model.item_row_mask.nonzero().flatten(), torch.from_numpy(rows))
    assert histogram[rows].min() >= np.delete(histogram, np.r_[0, rows]).max()
    with pytest.raises(ValueError, match=r"shape \(31,\)"):
        model.select_most_counted_rows(torch.zeros(30))


def test_the_noise_has_the_asked_scale_and_comes_from_the_given_generator(seqs):
    exact = torch.from_numpy(user_item_histogram(seqs, 31))
    first = noisy_item_histogram(seqs, 31, 4.0, generator=torch.Generator().manual_seed(1))
    again = noisy_item_histogram(seqs, 31, 4.0, generator=torch.Generator().manual_seed(1))
    other = noisy_item_histogram(seqs, 31, 4.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 2.0 < float((first - exact).std()) < 8.0
    secure = noisy_item_histogram(seqs, 31, 4.0, secure=True)
    assert 2.0 < float((secure - exact).std()) < 8.0


def test_rows_outside_the_mask_get_no_gradient_and_do_not_change_any_score(seqs):
    model = masked_model(tie=False)
    model.select_item_rows(torch.arange(1, 11))
    batch = make_batch(seqs, seqs.trainable_users()[:8], "train", 8)
    sequence_loss(model, batch).backward()
    off = model.item_row_mask == 0
    for tensor in (model.item_embeddings.weight, model.output.weight, model.output.bias):
        assert tensor.grad[off].abs().max() == 0 and tensor.grad[~off].abs().max() > 0
    before = model.score_next(batch["item_ids"], batch["event_types"], batch["time_buckets"])
    with torch.no_grad():
        for tensor in (model.item_embeddings.weight, model.output.weight, model.output.bias):
            tensor[off] = torch.randn_like(tensor[off])
    after = model.score_next(batch["item_ids"], batch["event_types"], batch["time_buckets"])
    assert torch.allclose(before, after)


def test_per_user_gradients_of_masked_rows_are_zero_under_opacus(seqs):
    model = masked_model()
    model.select_item_rows(torch.arange(5, 15))
    users = seqs.trainable_users()[:4]
    loader = user_loader(users, 4, torch.Generator().manual_seed(0))
    private, _opt, _ = PrivacyEngine().make_private(module=model, data_loader=loader, noise_multiplier=0.0,
                                                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                   max_grad_norm=1e6)
    sequence_loss(model, make_batch(seqs, users, "train", 8), per_user=True).mean().backward()
    off = model.item_row_mask == 0
    grad_sample = private._module.item_embeddings.weight.grad_sample  # (B, V, d)
    assert grad_sample[:, off].abs().max() == 0 and grad_sample[:, ~off].abs().max() > 0


def test_the_model_checks_the_rows_it_is_given():
    with pytest.raises(ValueError, match="trained_item_rows=31"):
        FedRecConfig(num_items=30, trained_item_rows=31)
    model = masked_model(k=3)
    assert not model.item_rows_selected
    for bad in ([1, 2], [0, 1, 2], [1, 2, 31]):
        with pytest.raises(ValueError, match="expected 3 distinct catalog rows"):
            model.select_item_rows(torch.tensor(bad))


def test_dp_training_pays_for_the_count_within_its_epsilon(seqs):
    model = masked_model()
    privacy = PrivacyConfig(enabled=True, epsilon=4.0, selection_noise=3.0)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.01)
    result = train(model, seqs, config, privacy)
    spent = result.privacy
    assert spent is not None and spent.selection_noise == 3.0 and (3.0, 1.0, 1) in spent.history
    assert 4.0 - 0.02 <= spent.epsilon <= 4.0  # every step and the count, together
    steps = sum(n for s, q, n in spent.history if q < 1.0)
    rate = 1.0 / len(user_loader(seqs.trainable_users(), 16, torch.Generator()))
    assert composed_epsilon(((spent.noise_multiplier, rate, steps),), spent.delta, "prv") < spent.epsilon - 0.01
    alone = calibrate_noise(privacy, rate, steps, spent.delta)
    assert spent.noise_multiplier > alone  # the count's share of ε raises σ
    assert f"over {steps} DP-SGD steps" in spent.claim() and "item count" in spent.claim()
    assert int(model.item_row_mask.sum()) == 10
    off = model.item_row_mask == 0
    assert model.item_embeddings.weight[off].abs().max() == 0 and model.output.bias[off].abs().max() == 0
    assert model.item_embeddings.weight[~off].abs().min() > 0  # noised and trained


def test_rows_are_chosen_once_and_only_without_dp_for_free(seqs):
    model = masked_model()
    assert select_trained_rows(model, seqs, PrivacyConfig()) == []  # exact counts, no DP claim
    chosen = model.item_row_mask.clone()
    exact = masked_model()
    exact.select_most_counted_rows(torch.from_numpy(user_item_histogram(seqs, 31)))
    assert torch.equal(chosen, exact.item_row_mask)
    assert select_trained_rows(model, seqs, PrivacyConfig(enabled=True)) == []  # already chosen: no new release
    assert torch.equal(model.item_row_mask, chosen)
    assert select_trained_rows(masked_model(k=0), seqs, PrivacyConfig(enabled=True)) == []


@pytest.mark.parametrize("privacy,match", [(PrivacyConfig(enabled=True, selection_noise=0.0), "selection_noise"),
                                           (PrivacyConfig(enabled=True, accountant="gdp"), "accountant=prv"),
                                           (PrivacyConfig(enabled=True, epsilon=0.05, selection_noise=0.5),
                                            "raise privacy.selection_noise")])
def test_dp_settings_that_cannot_pay_for_the_count_are_refused(seqs, privacy, match):
    with pytest.raises(ValueError, match=match):
        train(masked_model(), seqs, TrainConfig(epochs=1, batch_size=16), privacy)


def test_the_exported_model_keeps_its_rows(seqs, tmp_path):
    from shared_model.catalog import ItemCatalog
    from shared_model.serialization import load_model_dir

    model = masked_model()
    train(model, seqs, TrainConfig(epochs=1, batch_size=16), PrivacyConfig())
    catalog = ItemCatalog(item_ids=[f"i{i}" for i in range(30)])
    loaded, _ = load_model_dir(save_model_dir(model, catalog, tmp_path / "model"))
    assert torch.equal(loaded.item_row_mask, model.item_row_mask) and loaded.item_rows_selected

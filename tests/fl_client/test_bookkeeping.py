"""Per-user clipping by book-keeping: every user's gradient norm and the clipped sum are exactly those of the
users' own gradients (computed one user at a time here), the tied item table included."""

import pytest
import torch
from torch import nn

from fl_client.dp.bookkeeping import PerUserClipping
from fl_client.dp.engine import PrivacyConfig, make_private
from fl_client.dp.step import private_step
from fl_client.train import TrainConfig, user_loader
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel, draw_negatives, sequence_loss
from shared_model.sequences import make_batch

MODELS = {
    "tied": {"tie_item_embeddings": True},
    "untied": {"tie_item_embeddings": False},
    "tied, features, bias": {"tie_item_embeddings": True, "feature_dim": 4, "feature_scoring": True,
                             "item_bias": True},
    "frozen items": {"feature_dim": 4, "feature_scoring": True, "item_bias": True, "train_item_embeddings": False},
}


def model_pair(**kwargs) -> tuple[FedRecModel, FedRecModel]:
    config = FedRecConfig(num_items=30, hidden_size=16, max_len=8, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, **kwargs)
    torch.manual_seed(0)
    model, reference = FedRecModel(config), FedRecModel(config)
    if config.feature_dim:
        model.set_item_features(torch.randn(config.num_item_rows, config.feature_dim))
    reference.load_state_dict(model.state_dict())
    return model, reference


def own_gradients(reference: FedRecModel, batch: dict[str, torch.Tensor],
                  negatives: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """Each user's gradient of their own loss, one backward pass per user."""
    grads = []
    for i in range(len(batch["item_ids"])):
        reference.zero_grad()
        sequence_loss(reference, {k: v[i:i + 1] for k, v in batch.items()}, per_user=True,
                      negatives=None if negatives is None else negatives[i:i + 1]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad})
    return grads


@pytest.mark.parametrize("loss", ["real positions", "padded", "sampled softmax"])
@pytest.mark.parametrize("kind", MODELS)
def test_norms_and_clipped_sum_are_those_of_each_users_own_gradient(seqs, kind, loss):
    model, reference = model_pair(**MODELS[kind])
    batch = make_batch(seqs, seqs.trainable_users()[:8], "train", 8)
    negatives = None
    if loss == "sampled softmax":
        # 12 of the 30 items a user: negatives that are also the user's labels and inputs (the cross terms)
        negatives = draw_negatives(model.config.num_item_rows, 12, 8, generator=torch.Generator().manual_seed(0))
        for ids in (batch["labels"], batch["item_ids"]):
            assert int((ids.unsqueeze(2) == negatives.unsqueeze(1)).any(2).any(1).sum()) >= 4  # of the 8 users
    grads = own_gradients(reference, batch, negatives)
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in user.values())) for user in grads])
    bound = float(norms.median())  # half the users are clipped, half are not
    clipping = PerUserClipping(model, bound)
    with clipping.recording():
        per_user = sequence_loss(model, batch, per_user=True, padded=loss == "padded", negatives=negatives)
    squared = clipping.clip(per_user, rows=(batch["labels"] != 0).nonzero()[:, 0] if loss == "real positions"
                            else None)
    assert set(squared) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in squared:  # each parameter's share, the tied table's two uses and their cross term included
        assert torch.allclose(squared[name], torch.stack([user[name].square().sum() for user in grads]),
                              rtol=1e-4, atol=1e-9), name
    assert torch.allclose(torch.stack(list(squared.values())).sum(0).sqrt(), norms, rtol=1e-5)
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected = sum(f * user[name] for f, user in zip(factors, grads, strict=True))
            assert torch.allclose(p.grad, expected, rtol=1e-4, atol=1e-6), name
        else:
            assert p.grad is None, name


def test_a_dp_step_by_bookkeeping_equals_one_by_opacus_hooks(seqs):
    """The same users, σ = 0: the update is the same clipped sum over the expected batch, micro-batches and all."""
    users = seqs.trainable_users()[:12].tolist()
    updates = []
    for mode in ("bookkeeping", "hooks"):
        model, _ = model_pair(tie_item_embeddings=True)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        privacy = PrivacyConfig(enabled=True, max_grad_norm=0.05, grad_sample_mode=mode)
        loader = user_loader(seqs.trainable_users(), 12, torch.Generator())
        _, step_model, optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                                                   privacy, noise_multiplier=0.0)
        private_step(step_model, model, seqs, users, optimizer, privacy, TrainConfig(micro_batch_tokens=16),
                     torch.device("cpu"))
        updates.append(torch.cat([(before[k] - p.detach()).flatten() for k, p in model.named_parameters()]))
    assert updates[0].norm() > 0
    assert torch.allclose(updates[0], updates[1], atol=1e-7)


def sampled_step_update(seqs, users: list[int], micro_batch_tokens: int, seed: int = 0) -> torch.Tensor:
    """The weights' change after one DP step (σ = 0, half the users clipped) with a sampled softmax."""
    model, _ = model_pair(tie_item_embeddings=True, feature_dim=4, feature_scoring=True, item_bias=True)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    privacy = PrivacyConfig(enabled=True, max_grad_norm=0.05)
    loader = user_loader(seqs.trainable_users(), len(users), torch.Generator())
    _, step_model, optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                                               privacy, noise_multiplier=0.0)
    torch.manual_seed(seed)
    private_step(step_model, model, seqs, users, optimizer, privacy,
                 TrainConfig(micro_batch_tokens=micro_batch_tokens, num_negatives=10), torch.device("cpu"))
    return torch.cat([(before[k] - p.detach()).flatten() for k, p in model.named_parameters()])


def test_a_sampled_dp_step_draws_each_users_negatives_before_its_micro_batches(seqs):
    """Each user's clipped gradient depends on their own events and their own draw only: split into many
    micro-batches or one, the step is the same sum. (Negatives drawn per micro-batch would make a user's
    gradient depend on which other users share the micro-batch, beyond the bound C the accounting assumes.)"""
    users = seqs.trainable_users()[:12].tolist()
    one = sampled_step_update(seqs, users, micro_batch_tokens=1 << 20)
    many = sampled_step_update(seqs, users, micro_batch_tokens=16)  # one or two users a micro-batch
    assert one.norm() > 0
    assert torch.allclose(one, many, atol=1e-7)
    assert not torch.allclose(one, sampled_step_update(seqs, users, 1 << 20, seed=1), atol=1e-7)  # a new draw


def test_opacus_hooks_refuse_a_sampled_softmax_they_cannot_clip(seqs):
    model, _ = model_pair(tie_item_embeddings=True)
    privacy = PrivacyConfig(enabled=True, grad_sample_mode="hooks")
    loader = user_loader(seqs.trainable_users(), 12, torch.Generator())
    _, step_model, optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                                               privacy, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"sampled softmax under DP needs privacy\.grad_sample_mode=bookkeeping"):
        private_step(step_model, model, seqs, [0, 1], optimizer, privacy, TrainConfig(num_negatives=5),
                     torch.device("cpu"))


def test_a_sampled_softmax_must_read_the_table_through_its_layer():
    """A functional use of the output layer's weight is invisible to the hooks: refused, not clipped wrong."""
    model, _ = model_pair(tie_item_embeddings=False, item_bias=True)
    clipping = PerUserClipping(model, 1.0)
    ids = torch.randint(1, 30, (3, 5))
    with clipping.recording():
        hidden = model(ids, torch.ones_like(ids), torch.ones_like(ids))
        loss = (hidden @ model.output.weight[:4].T).sum((1, 2))  # the output layer never ran
    with pytest.raises(ValueError, match=r"\['output'\] did not run"):
        clipping.clip(loss)
    with clipping.recording():
        hidden = model(ids, torch.ones_like(ids), torch.ones_like(ids))
        scores = model.candidate_scores(hidden, ids, torch.tensor([[3, 4], [5, 6], [3, 3]]), model.output.weight,
                                        model.output.bias)
    with pytest.raises(ValueError, match="negatives must be distinct rows for each user"):
        clipping.clip(scores.sum((1, 2)))


def test_layers_it_cannot_clip_exactly_are_refused_by_name():
    class Convolved(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3)

    with pytest.raises(ValueError, match=r"layer 'conv' \(Conv1d\).*only Linear, Embedding, LayerNorm"):
        PerUserClipping(Convolved(), 1.0)

    class SharedTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight

    with pytest.raises(ValueError, match=r"'a\.weight' is shared by"):
        PerUserClipping(SharedTwice(), 1.0)

    layer = nn.Linear(3, 3)
    clipping = PerUserClipping(layer, 1.0)
    with pytest.raises(ValueError, match="ran twice in one forward pass"), clipping.recording():
        layer(layer(torch.ones(2, 3)))
    with clipping.recording():
        pass
    with pytest.raises(ValueError, match="did not run in the forward pass"):
        clipping.clip(torch.ones(2, requires_grad=True))
    for rows, problem in ((torch.tensor([1, 0]), "users in order"), (torch.tensor([0, 0]), "whose rows")):
        with clipping.recording():
            loss = layer(torch.ones(2, 3)).sum(1)
        with pytest.raises(ValueError, match=problem):
            clipping.clip(loss, rows=rows)

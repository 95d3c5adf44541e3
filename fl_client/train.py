"""Training the behaviour model on one party's user sequences, with or without DP, as plain functions."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fl_client.dp.popularity import private_popularity
from fl_client.dp.settings import AccountantHistory, PrivacyConfig, resolve_delta
from fl_client.dp.step import ClippingStats, micro_batches, private_step
from fl_client.round_config import TrainingDivergedError
from shared_model import wire
from shared_model.device import resolve_device
from shared_model.metrics import evaluate_model, without_moments
from shared_model.modeling_fedrec import FedRecModel, sequence_loss
from shared_model.sequences import UserSequences, make_batch

if TYPE_CHECKING:  # the DP engine (Opacus) is imported by a private training only: see train()
    from fl_client.dp.engine import PrivacySpent, StepModel


@dataclass
class TrainConfig:
    """Optimisation settings for local (or centralized) training."""

    epochs: int = 30  # (int) passes over the users (DP: expected passes under Poisson sampling)
    batch_size: int = 256  # (int) users per step (DP: expected users per step)
    lr: float = 1e-3  # (float) learning rate
    weight_decay: float = 0.0  # (float) decoupled weight decay (AdamW)
    optimizer: str = "adam"  # (str) adam or sgd
    num_negatives: int = 0  # (int) sampled-softmax negatives a user, drawn each step; 0 = full-catalog cross-entropy
    patience: int = 5  # (int) stop after this many epochs without a better valid NDCG@10; 0 = never
    eval_every: int = 1  # (int) validate every N epochs (0 = only at the end)
    device: str = "auto"  # (str) auto, cpu or cuda
    seed: int = 0  # (int) seed for sampling and dropout
    num_threads: int = 0  # (int) torch CPU threads; 0 = torch default
    micro_batch_tokens: int = 8192  # (int) padded positions per length-sorted micro-batch (memory bound; fewer
    # where their scores over the catalog would pass 2^28 floats: 268 positions at a million items)
    micro_batch_users: int = 128  # (int) DP in hooks mode: users per micro-batch (Opacus' per-user gradients)
    proximal_mu: float = 0.0  # (float) FedProx: pull towards the weights training started from; 0 = off
    clip_stats: bool = False  # (bool) DP: record per-user gradient norms before clipping (local diagnostic)


@dataclass
class TrainResult:
    """What a training run did: losses, validation history, speed, memory and privacy spent."""

    epoch_losses: list[float] = field(default_factory=list)
    valid_history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    samples_per_second: float = 0.0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    privacy: PrivacySpent | None = None
    optimizer_state: dict[str, Any] | None = None  # the optimiser's state_dict at the end (Adam moments)
    clipping: ClippingStats | None = None  # DP with clip_stats (hooks mode): per-user norms before clipping


Progress = Callable[[int, float, dict[str, float] | None], None]


def check_finite(model: torch.nn.Module, epoch: int, config: TrainConfig) -> None:
    """Raise TrainingDivergedError when any trainable weight is NaN or inf.

    It looks at the weights only, never at a loss on the data, so under DP it is post-processing of the
    noised iterates and costs no privacy.
    """
    if bad := wire.non_finite({name: p for name, p in model.named_parameters() if p.requires_grad}):
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingDivergedError(
            f"training diverged in epoch {epoch}: non-finite weights in {shown} "
            f"(train.optimizer={config.optimizer}, train.lr={config.lr}); lower train.lr")


def build_optimizer(model: torch.nn.Module, config: TrainConfig,
                    state: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """Adam(W) or SGD over the trainable parameters, optionally continuing from a saved state (its moments;
    learning rate and weight decay always come from `config`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adam":
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")
    if state is not None:
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError) as err:
            raise ValueError(f"the saved optimiser state does not fit this model and optimizer "
                             f"({config.optimizer}): {err}") from err
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = config.lr, config.weight_decay
    return optimizer


def user_loader(users: np.ndarray, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Shuffled batches of user indices; the padded model inputs are built per (micro-)batch later.

    Items are 1-tuples because Opacus' Poisson loader inspects `dataset[0]` as a tuple.
    """
    rows = [(int(u),) for u in users]
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=generator,  # type: ignore[arg-type]
                      collate_fn=lambda items: {"users": torch.tensor([u for (u,) in items], dtype=torch.long)})


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory since `train` began, or this process' peak resident set so far on CPU (the OS
    keeps no resettable peak: in a long-lived process, such as a simulated site, it covers earlier work too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # stdlib, Unix only; imported here so the module still imports elsewhere

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(model: FedRecModel, seqs: UserSequences, config: TrainConfig, privacy: PrivacyConfig,
          valid: UserSequences | None = None, progress: Progress | None = None,
          progress_bar: bool = False, optimizer_state: dict[str, Any] | None = None) -> TrainResult:
    """Train in place; with `privacy.enabled`, DP-SGD per user whose ε covers every step taken here.

    With `valid` and `patience`, the best-validating weights are restored at the end.
    `optimizer_state` continues an earlier training's optimiser (a federated site's Adam moments); the final
    one is returned.
    """
    torch.manual_seed(config.seed)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this training's peak, not the process' (sites live long)
    torch.nn.Module.to(model, device).train()
    users = seqs.trainable_users()
    if len(users) == 0:
        raise ValueError("no user has enough events to train on (need 4+ per user for leave-one-out)")
    generator = torch.Generator().manual_seed(config.seed)
    loader = user_loader(users, config.batch_size, generator)
    optimizer = build_optimizer(model, config, optimizer_state)
    step_model: StepModel | None = None
    result = TrainResult()
    engine = None
    if privacy.enabled:
        from fl_client.dp.engine import calibrate_noise, make_private, spent  # Opacus: about 3 s of CPU to import

        if config.num_negatives and privacy.grad_sample_mode != "bookkeeping":
            raise ValueError("a sampled softmax under DP needs privacy.grad_sample_mode=bookkeeping: Opacus' hooks "
                             "do not see the output rows it gathers")
        delta = resolve_delta(privacy, len(seqs))
        before = release_popularity(model, seqs, privacy, generator)
        # Opacus' Poisson loader samples each user with rate 1/len(loader), len(loader) steps per epoch.
        steps_per_epoch = len(loader)
        sigma = calibrate_noise(privacy, 1.0 / steps_per_epoch, config.epochs * steps_per_epoch, delta,
                                before=before)
        engine, step_model, optimizer, loader = make_private(model, optimizer, loader, privacy, sigma)
        if config.clip_stats:
            result.clipping = ClippingStats(privacy.max_grad_norm)
    anchor = wire.trainable_state(model) if config.proximal_mu else None  # FedProx' global model
    best_score, best_state, stale = -1.0, None, 0
    started, samples = time.perf_counter(), 0
    for epoch in range(1, config.epochs + 1):
        batches = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress_bar, unit="batch")
        loss, seen = run_epoch(step_model, model, seqs, batches, optimizer, privacy, config, device, anchor,
                               result.clipping)
        check_finite(model, epoch, config)
        result.epoch_losses.append(loss)
        samples += seen
        metrics = None
        if valid is not None and config.eval_every and epoch % config.eval_every == 0:
            metrics = evaluate_model(model, valid, "valid", device=device)
            result.valid_history.append({"epoch": float(epoch), **without_moments(metrics)})
            if metrics["ndcg@10"] > best_score:
                best_score, best_state, stale, result.best_epoch = metrics["ndcg@10"], copy.deepcopy(
                    model.state_dict()), 0, epoch
            else:
                stale += 1
        if progress is not None:
            progress(epoch, loss, metrics)
        if config.patience and stale >= config.patience:
            break
    result.seconds = time.perf_counter() - started
    result.samples_per_second = samples / max(result.seconds, 1e-9)
    result.peak_memory_mb = peak_memory_mb(device)
    if best_state is not None and config.patience:
        model.load_state_dict(best_state)
    if engine is not None:
        result.privacy = spent(engine, privacy, delta, sigma, before)
    result.optimizer_state = optimizer.state_dict()  # Opacus' DPOptimizer hands over the wrapped one's
    return result


def release_popularity(model: FedRecModel, seqs: UserSequences, privacy: PrivacyConfig,
                       generator: torch.Generator) -> AccountantHistory:
    """With `privacy.popularity_noise`, start the item bias from a DP release of item popularity
    (fl_client.dp.popularity); returns what the release spent, for the accountant (nothing without it)."""
    if not privacy.popularity_noise:
        return []
    popularity = private_popularity(seqs, model.config.num_item_rows, privacy.popularity_noise,
                                    privacy.secure_mode, generator)
    model.start_item_bias(popularity.to(model.output.weight.device))
    return [(float(privacy.popularity_noise), 1.0, 1)]


@torch.no_grad()
def proximal_step(model: torch.nn.Module, anchor: dict[str, torch.Tensor], rate: float) -> None:
    """FedProx' term as a decoupled step w <- w - rate * (w - w0) after each optimiser step.

    It depends only on the weights, not on any user's data, so under DP it is post-processing: Opacus'
    per-user clipping and noise stay exactly as accounted.
    """
    for name, p in model.named_parameters():
        if name in anchor:
            p.sub_(rate * (p - anchor[name]))


def plain_step(model: FedRecModel, seqs: UserSequences, users: list[int], optimizer: torch.optim.Optimizer,
               config: TrainConfig, device: torch.device) -> float:
    """One non-private step on the mean loss over the batch's positions, in length-sorted micro-batches (each
    weighted by its share of the positions, so the gradient is the whole batch's); returns that mean loss. A sampled
    softmax draws the users' negatives for the step, as the DP step does."""
    chunks, negatives = micro_batches(model, seqs, users, config, device)
    batches = [make_batch(seqs, chunk, "train", model.config.max_len) for chunk in chunks]
    positions = [int((batch["labels"] != 0).sum()) for batch in batches]
    all_positions = max(sum(positions), 1)
    total = 0.0
    for chunk, batch, count in zip(chunks, batches, positions, strict=True):
        if not count:
            continue
        inputs = {k: v.to(device) for k, v in batch.items()}
        loss = sequence_loss(model, inputs, negatives=None if negatives is None else negatives.of(chunk)) * (
            count / all_positions)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def run_epoch(step_model: StepModel | None, model: FedRecModel, seqs: UserSequences,
              loader: Iterable[dict[str, torch.Tensor]],
              optimizer: torch.optim.Optimizer, privacy: PrivacyConfig, config: TrainConfig,
              device: torch.device, anchor: dict[str, torch.Tensor] | None = None,
              clipping: ClippingStats | None = None) -> tuple[float, int]:
    """One pass over the loader; returns the mean training loss and the number of user rows seen."""
    total, steps, seen = 0.0, 0, 0
    for batch in loader:
        users = batch["users"].tolist()
        optimizer.zero_grad(set_to_none=True)
        if step_model is not None:
            value = private_step(step_model, model, seqs, users, optimizer, privacy, config, device, clipping)
        else:
            value = plain_step(model, seqs, users, optimizer, config, device)
        if anchor is not None:
            proximal_step(model, anchor, config.lr * config.proximal_mu)
        total, steps, seen = total + value, steps + 1, seen + len(users)
    return total / max(steps, 1), seen

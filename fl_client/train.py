"""Training the behaviour model on one party's user sequences, with or without DP, as plain functions."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch.utils.data import DataLoader

from fl_client.privacy import PrivacyConfig, PrivacySpent, calibrate_noise, make_private, resolve_delta, spent
from shared_model.metrics import evaluate_model
from shared_model.modeling_fedrec import FedRecModel, sequence_loss
from shared_model.sequences import UserSequences, make_batch


@dataclass
class TrainConfig:
    """Optimisation settings for local (or centralized) training."""

    epochs: int = 30  # (int) passes over the users (DP: expected passes under Poisson sampling)
    batch_size: int = 256  # (int) users per step (DP: expected users per step)
    lr: float = 1e-3  # (float) learning rate
    weight_decay: float = 0.0  # (float) decoupled weight decay (AdamW)
    optimizer: str = "adam"  # (str) adam or sgd
    num_negatives: int = 0  # (int) sampled-softmax negatives; 0 = full-catalog cross-entropy
    patience: int = 0  # (int) stop after this many epochs without a better valid NDCG@10; 0 = never
    eval_every: int = 1  # (int) validate every N epochs (0 = only at the end)
    device: str = "auto"  # (str) auto, cpu or cuda
    seed: int = 0  # (int) seed for sampling and dropout
    num_threads: int = 0  # (int) torch CPU threads; 0 = torch default


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


Progress = Callable[[int, float, dict[str, float] | None], None]


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam(W) or SGD over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")


def user_loader(seqs: UserSequences, users: np.ndarray, batch_size: int, max_len: int,
                generator: torch.Generator) -> DataLoader:
    """Shuffled batches of user rows, collated into padded model inputs.

    Items are 1-tuples of user indices because Opacus' Poisson loader inspects `dataset[0]` as a tuple.
    """
    rows = [(int(u),) for u in users]
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=generator,  # type: ignore[arg-type]
                      collate_fn=lambda items: make_batch(seqs, [u for (u,) in items], "train", max_len))


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or this process' peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # stdlib, Unix only; imported here so the module still imports elsewhere

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(model: FedRecModel, seqs: UserSequences, config: TrainConfig, privacy: PrivacyConfig,
          valid: UserSequences | None = None, progress: Progress | None = None) -> TrainResult:
    """Train in place; with `privacy.enabled`, DP-SGD per user whose ε covers every step taken here.

    With `valid` and `patience`, the best-validating weights are restored at the end.
    """
    torch.manual_seed(config.seed)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    torch.nn.Module.to(model, device).train()
    users = seqs.trainable_users()
    if len(users) == 0:
        raise ValueError("no user has enough events to train on (need 4+ per user for leave-one-out)")
    generator = torch.Generator().manual_seed(config.seed)
    loader = user_loader(seqs, users, config.batch_size, model.config.max_len, generator)
    optimizer = build_optimizer(model, config)
    step_model: torch.nn.Module = model
    engine = None
    if privacy.enabled:
        if config.num_negatives:
            raise ValueError("sampled softmax is not supported under DP yet; set train.num_negatives=0")
        delta = resolve_delta(privacy, len(seqs))
        # Opacus' Poisson loader samples each user with rate 1/len(loader), len(loader) steps per epoch.
        steps_per_epoch = len(loader)
        sigma = calibrate_noise(privacy, 1.0 / steps_per_epoch, config.epochs * steps_per_epoch, delta)
        engine, step_model, optimizer, loader = make_private(model, optimizer, loader, privacy, sigma)
    result = TrainResult()
    best_score, best_state, stale = -1.0, None, 0
    started, samples = time.perf_counter(), 0
    for epoch in range(1, config.epochs + 1):
        loss, seen = run_epoch(step_model, model, loader, optimizer, privacy, config.num_negatives, device)
        result.epoch_losses.append(loss)
        samples += seen
        metrics = None
        if valid is not None and config.eval_every and epoch % config.eval_every == 0:
            metrics = evaluate_model(model, valid, "valid", device=device)
            result.valid_history.append({"epoch": float(epoch), **metrics})
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
        result.privacy = spent(engine, privacy, delta, sigma)
    return result


def run_epoch(step_model: torch.nn.Module, model: FedRecModel, loader: DataLoader,
              optimizer: torch.optim.Optimizer, privacy: PrivacyConfig, num_negatives: int,
              device: torch.device) -> tuple[float, int]:
    """One pass over the loader; returns the mean training loss and the number of user rows seen."""
    total, steps, seen = 0.0, 0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        optimizer.zero_grad(set_to_none=True)
        if privacy.enabled:
            # Per-user mean loss: the gradient Opacus clips is exactly one user's.
            per_user = sequence_loss(model, batch, per_user=True)  # (B,)
            if privacy.grad_sample_mode == "ghost":
                loss = DPTensorFastGradientClipping(step_model, optimizer, per_user, "mean")
                loss.backward()
                value = float(loss.item())
            else:
                mean_loss = per_user.mean() if per_user.numel() else per_user.sum()
                mean_loss.backward()
                value = float(mean_loss.item())
        else:
            loss_t = sequence_loss(model, batch, num_negatives=num_negatives)
            loss_t.backward()
            value = float(loss_t.item())
        optimizer.step()
        total, steps, seen = total + value, steps + 1, seen + int(batch["labels"].shape[0])
    return total / max(steps, 1), seen

"""An exponential moving average of the trainable weights over optimiser steps (iterate averaging).

Under DP it is post-processing: it reads only the noised iterates, never a user's data, so the average costs
no privacy and the accountant's ε covers it unchanged. It damps the noise each DP step leaves in the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from shared_model import wire


class WeightAverage:
    """Debiased EMA of the trainable parameters: after steps w_1..w_t with decay β,
    average = Σ_i β^(t-i) (1-β) w_i / (1 - β^t), i.e. Adam-style bias correction instead of a start
    value, so the weights training began from carry no weight."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) to average (0 = off), got {decay}")
        self.decay, self.updates = decay, 0
        self.sums = {n: torch.zeros_like(p, dtype=torch.float32)
                     for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the current weights in (call after every optimiser step)."""
        self.updates += 1
        for name, p in model.named_parameters():
            if name in self.sums:
                self.sums[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The debiased average of every trainable parameter (empty before the first update)."""
        if self.updates == 0:
            return {}
        scale = 1.0 / (1.0 - self.decay ** self.updates)
        return {name: total * scale for name, total in self.sums.items()}

    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite the model's trainable weights with the average (before any step: leave them)."""
        if self.updates:
            wire.load_state(model, self.averaged(), trainable_only=True)

    def applied(self, model: torch.nn.Module) -> AbstractContextManager[None]:
        """Inside the block the model holds the average; the trained weights come back afterwards."""
        return weights_swapped_in(model, self.averaged()) if self.updates else nullcontext()


@contextmanager
def weights_swapped_in(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block the model's trainable weights are `weights`; its own come back afterwards."""
    saved = wire.trainable_state(model)
    wire.load_state(model, weights, trainable_only=True)
    try:
        yield
    finally:
        wire.load_state(model, saved, trainable_only=True)

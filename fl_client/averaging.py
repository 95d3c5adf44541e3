"""An exponential moving average of the trainable weights over optimiser steps (iterate averaging).

Under DP it is post-processing: it reads only the noised iterates, never a user's data, so the average costs
no privacy and the accountant's ε covers it unchanged. It damps the noise each DP step leaves in the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite the model's trainable weights with the average."""
        average = self.averaged()
        for name, p in model.named_parameters():
            if name in average:
                p.copy_(average[name].to(p.dtype))

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside the block the model holds the average; the trained weights come back afterwards."""
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.sums}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])

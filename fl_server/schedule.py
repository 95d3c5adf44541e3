"""The federation's learning-rate schedule: a step decay from one round on (the sites' lr and the server's
step size), as one would lower a centralized model's lr once validation flattens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

from shared_model import wire

SERVER_LR_ATTRIBUTES = ("server_learning_rate", "eta")  # FedAvgM's, FedAdam/FedYogi's server step size


@dataclass(frozen=True)
class Decay:
    """From round `from_round` on (0: never), the sites train with `lr` and the server steps with `server_lr`
    (either 0: unchanged). Rounds are numbered globally, so a resumed run switches at the same round."""

    from_round: int = 0
    lr: float = 0.0
    server_lr: float = 0.0

    def check(self, strategy: Any) -> None:
        """ValueError for negative settings, or a server lr the strategy does not have."""
        if min(self.from_round, self.lr, self.server_lr) < 0:
            raise ValueError(f"decay_from_round, decay_lr and decay_server_lr must be >= 0, got "
                             f"{self.from_round}, {self.lr}, {self.server_lr}")
        if self.server_lr and not any(hasattr(strategy, name) for name in SERVER_LR_ATTRIBUTES):
            raise ValueError(f"decay_server_lr={self.server_lr}, but {type(strategy).__name__} takes no server "
                             "step (use strategy.name=fedavgm, fedadam or fedyogi, or decay_server_lr=0)")

    def apply(self, strategy: Any, server_round: int, config: ConfigRecord) -> None:
        """Switch the round's config and the strategy's step size once `server_round` reaches `from_round`."""
        if not self.from_round or server_round < self.from_round:
            return
        if self.lr:
            config[wire.LEARNING_RATE] = self.lr
        for name in SERVER_LR_ATTRIBUTES:
            if self.server_lr and hasattr(strategy, name):
                setattr(strategy, name, self.server_lr)


def learning_rates(strategy: Any, config: ConfigRecord) -> tuple[float, float | None]:
    """The round's site lr and, for strategies that take a server step, the server's (else None): for the
    round's record."""
    server_lr = next((float(getattr(strategy, name)) for name in SERVER_LR_ATTRIBUTES if hasattr(strategy, name)),
                     None)
    return float(config.get(wire.LEARNING_RATE, 0.0)), server_lr  # type: ignore[arg-type]

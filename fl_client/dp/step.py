"""One DP-SGD step of the behaviour model: Poisson-sampled users in length-sorted micro-batches, Opacus'
per-user clipping and noise, and an optional record of the per-user gradient norms before clipping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from fl_client.dp.bookkeeping import PerUserClipping
from fl_client.dp.settings import PrivacyConfig
from shared_model.modeling_fedrec import FedRecModel, StepNegatives, sequence_loss
from shared_model.sequences import (
    UserSequences,
    length_chunks,
    make_batch,
    micro_batch_positions,
    sampled_softmax_users,
)

if TYPE_CHECKING:  # Opacus: imported by DP training only (fl_client.dp.engine), not by the non-private step
    from opacus.optimizers import DPOptimizer

    from fl_client.dp.engine import StepModel


class MicroBatchLimits(Protocol):
    """How large a micro-batch may be (fl_client.train.TrainConfig has both)."""

    micro_batch_tokens: int  # padded positions per micro-batch
    micro_batch_users: int  # users per micro-batch
    num_negatives: int  # sampled-softmax negatives (0: the full catalog)


@dataclass
class ClippingStats:
    """Per-user gradient norms before clipping, over every DP step of a training: how much of the bound C
    each user's gradient needs, and which parameters take the clipped budget.

    A diagnostic for choosing C and the model under DP. It is computed from the raw per-user gradients, so
    the DP guarantee does not cover it: it stays with whoever trained (a site never sends it)."""

    max_grad_norm: float
    norms: list[float] = field(default_factory=list)  # one per user and step
    squared_by_parameter: dict[str, float] = field(default_factory=dict)  # summed squared per-user norms

    def add(self, squared: dict[str, torch.Tensor]) -> None:
        """Record one micro-batch: parameter name -> its (b,) squared per-user gradient norms."""
        for name, values in squared.items():
            self.squared_by_parameter[name] = self.squared_by_parameter.get(name, 0.0) + float(values.sum())
        if squared:
            self.norms.extend(torch.stack(list(squared.values())).sum(0).sqrt().tolist())

    def summary(self) -> dict[str, Any]:
        """Quantiles of the norms, the share of users clipped, and each parameter's share of the squared
        norm (largest first)."""
        norms = np.asarray(self.norms)
        if norms.size == 0:
            return {"max_grad_norm": self.max_grad_norm, "user_steps": 0}
        total = sum(self.squared_by_parameter.values()) or 1.0
        p10, median, p90 = np.percentile(norms, [10, 50, 90])
        shares = sorted(self.squared_by_parameter.items(), key=lambda kv: -kv[1])
        return {"max_grad_norm": self.max_grad_norm, "user_steps": int(norms.size),
                "clipped_fraction": float((norms > self.max_grad_norm).mean()), "norm_p10": float(p10),
                "norm_median": float(median), "norm_p90": float(p90),
                "squared_norm_share": {name: round(v / total, 4) for name, v in shares}}


def micro_batches(model: FedRecModel, seqs: UserSequences, users: list[int], config: MicroBatchLimits,
                  device: torch.device, max_users: int = 1 << 30) -> tuple[list[list[int]], StepNegatives | None]:
    """A step's length-sorted micro-batches (at most `max_users` users each), and with `config.num_negatives` the
    users' negatives, drawn for the whole step. A micro-batch's scores (a position's catalog, or its 1 + K
    candidates) and a sampled softmax's gathered rows (K × d a user) stay within shared_model.sequences.MAX_SCORES."""
    if not config.num_negatives:
        positions = micro_batch_positions(config.micro_batch_tokens, model.config.num_item_rows)
        return length_chunks(seqs, users, model.config.max_len, positions, max_users), None
    negatives = StepNegatives(model.config.num_item_rows, config.num_negatives, users, device)
    positions = micro_batch_positions(config.micro_batch_tokens, 1 + config.num_negatives)
    max_users = min(max_users, sampled_softmax_users(config.num_negatives, model.config.hidden_size))
    return length_chunks(seqs, users, model.config.max_len, positions, max_users), negatives


def private_step(step_model: StepModel, model: FedRecModel, seqs: UserSequences, users: list[int],
                 optimizer: torch.optim.Optimizer, privacy: PrivacyConfig, config: MicroBatchLimits,
                 device: torch.device, clipping: ClippingStats | None = None) -> float:
    """One DP-SGD step over a Poisson-sampled batch, in length-sorted micro-batches.

    Each micro-batch's clipped per-user gradients are summed by Opacus (skipped steps); noise is added
    and the accountant records the step once, at the last micro-batch. `clipping` records the per-user
    norms before clipping (hooks mode). With `config.num_negatives` the loss is a sampled softmax over each user's
    negatives, drawn for the whole step before its micro-batches (shared_model.modeling_fedrec.draw_negatives says
    why), book-keeping only.
    """
    names = {id(p): n for n, p in model.named_parameters()} if clipping is not None else {}
    dp_optimizer: DPOptimizer = optimizer
    # book-keeping holds no per-user gradient, so only Opacus' modes need the bound on users
    max_users = (1 << 30) if isinstance(step_model, PerUserClipping) else config.micro_batch_users
    if config.num_negatives and not isinstance(step_model, PerUserClipping):
        raise ValueError("a sampled softmax under DP needs privacy.grad_sample_mode=bookkeeping: Opacus' hooks "
                         "do not see the output rows it gathers")
    chunks, negatives = micro_batches(model, seqs, users, config, device, max_users)
    if not chunks:  # an empty Poisson batch: still a step the accountant must count
        if dp_optimizer.step_hook is not None:
            dp_optimizer.step_hook(dp_optimizer)
        return 0.0
    total = 0.0
    for i, chunk in enumerate(chunks):
        inputs = {k: v.to(device) for k, v in make_batch(seqs, chunk, "train", model.config.max_len).items()}
        if isinstance(step_model, PerUserClipping):  # book-keeping: sets the clipped sums as .grad
            with step_model.recording():
                per_user = sequence_loss(model, inputs, per_user=True,
                                         negatives=None if negatives is None else negatives.of(chunk))  # (b,)
            squared = step_model.clip(per_user, rows=(inputs["labels"] != 0).nonzero()[:, 0])
            if clipping is not None:
                clipping.add(squared)
        else:
            per_user = sequence_loss(model, inputs, per_user=True, padded=True)
            per_user.mean().backward()  # Opacus rescales to per-user gradients of this micro-batch
            if clipping is not None:
                clipping.add({names[id(p)]: g.reshape(len(g), -1).square().sum(1)
                              for p, g in zip(dp_optimizer.params, dp_optimizer.grad_samples, strict=True)})
        dp_optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)
        total += float(per_user.detach().sum())
    return total / len(users)

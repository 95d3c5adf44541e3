"""One DP-SGD step of the behaviour model: Poisson-sampled users in length-sorted micro-batches, Opacus'
per-user clipping and noise, and an optional record of the per-user gradient norms before clipping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from fl_client.dp.settings import PrivacyConfig
from shared_model.modeling_fedrec import FedRecModel, sequence_loss
from shared_model.sequences import UserSequences, make_batch


class MicroBatchLimits(Protocol):
    """How large a micro-batch may be (fl_client.train.TrainConfig has both)."""

    micro_batch_tokens: int  # padded positions per micro-batch
    micro_batch_users: int  # users per micro-batch


@dataclass
class ClippingStats:
    """Per-user gradient norms before clipping, over every DP step of a training: how much of the bound C
    each user's gradient needs, and which parameters take the clipped budget.

    A diagnostic for choosing C and the model under DP. It is computed from the raw per-user gradients, so
    the DP guarantee does not cover it: it stays with whoever trained (a site never sends it)."""

    max_grad_norm: float
    norms: list[float] = field(default_factory=list)  # one per user and step
    squared_by_parameter: dict[str, float] = field(default_factory=dict)  # summed squared per-user norms

    def add(self, per_user: dict[str, torch.Tensor]) -> None:
        """Record one micro-batch: parameter name -> its (b, ...) per-user gradients."""
        squared = {name: g.reshape(len(g), -1).norm(2, dim=-1).square() for name, g in per_user.items()}
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


def length_chunks(seqs: UserSequences, users: list[int], max_len: int, max_tokens: int,
                  max_users: int = 1 << 30) -> list[list[int]]:
    """Split a batch into micro-batches of similar length: at most `max_tokens` padded positions and
    `max_users` users each (per-user gradients of the item table cost users x items x d memory).

    Under DP this changes nothing about privacy (the Poisson-sampled batch is the same set of users, each
    clipped on its own) but stops short histories from paying for the longest one in the batch.
    """
    spans = {u: seqs.window(u, "train")[0] for u in users}
    lengths = {u: min(max_len, max(1, span.stop - span.start)) for u, span in spans.items()}
    chunks: list[list[int]] = []
    for user in sorted(users, key=lambda u: lengths[u]):
        if chunks and len(chunks[-1]) < max_users and (len(chunks[-1]) + 1) * lengths[user] <= max_tokens:
            chunks[-1].append(user)
        else:
            chunks.append([user])
    return chunks


def private_step(step_model: torch.nn.Module, model: FedRecModel, seqs: UserSequences, users: list[int],
                 optimizer: torch.optim.Optimizer, privacy: PrivacyConfig, config: MicroBatchLimits,
                 device: torch.device, clipping: ClippingStats | None = None) -> float:
    """One DP-SGD step over a Poisson-sampled batch, in length-sorted micro-batches.

    Each micro-batch's clipped per-user gradients are summed by Opacus (skipped steps); noise is added
    and the accountant records the step once, at the last micro-batch. `clipping` records the per-user
    norms before clipping (hooks mode).
    """
    names = {id(p): n for n, p in model.named_parameters()} if clipping is not None else {}
    dp_optimizer: DPOptimizer = optimizer
    chunks = length_chunks(seqs, users, model.config.max_len, config.micro_batch_tokens, config.micro_batch_users)
    if not chunks:  # an empty Poisson batch: still a step the accountant must count
        if dp_optimizer.step_hook is not None:
            dp_optimizer.step_hook(dp_optimizer)
        return 0.0
    total = 0.0
    for i, chunk in enumerate(chunks):
        inputs = {k: v.to(device) for k, v in make_batch(seqs, chunk, "train", model.config.max_len).items()}
        per_user = sequence_loss(model, inputs, per_user=True)  # (b,) one loss per user
        if privacy.grad_sample_mode == "ghost":
            DPTensorFastGradientClipping(step_model, dp_optimizer, per_user, "mean").backward()
        else:
            per_user.mean().backward()  # Opacus rescales to per-user gradients of this micro-batch
            if clipping is not None:
                clipping.add({names[id(p)]: g for p, g in zip(dp_optimizer.params, dp_optimizer.grad_samples,
                                                              strict=True)})
        dp_optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)
        total += float(per_user.detach().sum())
    return total / len(users)

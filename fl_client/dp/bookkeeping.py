"""Per-user clipping without per-user gradients ("book-keeping", Bu, Wang, Zha & Karypis, ICML 2023) for the
behaviour model's layers: Linear, Embedding and LayerNorm, the tied item table included.

One forward pass records each layer's input and output; one backward pass computes the gradient of the summed
per-user losses with respect to each layer's *output* (autograd skips the weight gradients). Every weight
gradient of user i is a sum over i's positions of (output gradient ⊗ input), so from those two records

- each user's gradient norm comes out exactly, without forming the gradient: ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)
  (g_t·g_s), per user (the "ghost norm" of Li et al. 2022 that Opacus' ghost clipping uses) where that is
  cheaper than forming the user's (out × in) gradient; an embedding row gets Σ over the positions holding it;
  a table used twice (the tied item table: input embedding and output layer) adds the cross term of its two
  uses, which Opacus' ghost clipping cannot do;
- the clipped sum Σ_i c_i ∇L_i with c_i = min(1, C / (‖∇L_i‖ + 1e-6)) (Opacus' factor) is one matmul (or one
  row scatter) of the records per layer, the cost of an ordinary weight gradient.

So a DP step costs one forward, one backward and the per-user norms, with no second backward pass (ghost
clipping) and no (users × parameters) tensor (Opacus' hooks: 400 MB a micro-batch on Beauty). Noise,
scaling and accounting stay Opacus' (DPOptimizerFastGradientClipping adds σ·C noise to the clipped sum).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

LAYERS = (nn.Linear, nn.Embedding, nn.LayerNorm)


@dataclass
class _Record:
    """One layer call: its input (ids for an embedding) and its output, both (b, T, ...)."""

    inputs: torch.Tensor
    output: torch.Tensor
    grad: torch.Tensor | None = None  # d(Σ_i L_i) / d output, filled after the backward pass


def _per_user(x: torch.Tensor) -> torch.Tensor:
    """(b, ..., k) -> (b, T, k): every leading dimension after the user's is a position."""
    return x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() != 2 else x.unsqueeze(1)


class PerUserClipping:
    """Records a model's trainable Linear, Embedding and LayerNorm layers during a forward pass and turns the
    per-user losses into clipped gradient sums (set as `.grad`) and per-user norms.

    Every trainable parameter must belong to one of those layers (else ValueError names it); a parameter shared by
    two layers must be an Embedding's weight reused as a Linear's weight (the tied item table)."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self.layers: dict[str, nn.Module] = {}
        owners: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(module, LAYERS):
                raise ValueError(f"per-user clipping: layer {name!r} ({type(module).__name__}) has trainable "
                                 f"parameters, but only {', '.join(t.__name__ for t in LAYERS)} are supported")
            if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq
                                                     or module.sparse):
                raise ValueError(f"per-user clipping: embedding {name!r} uses max_norm, scale_grad_by_freq "
                                 f"or sparse gradients, which are not supported")
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                raise ValueError(f"per-user clipping: layer norm {name!r} must normalise the last dimension only")
            self.layers[name] = module
            for p in own:
                owners.setdefault(id(p), []).append(name)
        self.names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.ties: list[tuple[str, str]] = []  # (embedding, linear) sharing one weight
        for pid, users in owners.items():
            if len(users) == 1:
                continue
            kinds = {type(self.layers[u]) for u in users}
            if len(users) != 2 or kinds != {nn.Embedding, nn.Linear}:
                raise ValueError(f"per-user clipping: parameter {self.names[pid]!r} is shared by {users}; only "
                                 f"an embedding table reused as a linear layer's weight is supported")
            embedding = next(u for u in users if isinstance(self.layers[u], nn.Embedding))
            linear = next(u for u in users if isinstance(self.layers[u], nn.Linear))
            self.ties.append((embedding, linear))
        self.records: dict[str, _Record] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record every supported layer's call during the forward pass inside."""
        self.records = {}
        handles: list[RemovableHandle] = []

        def hook_for(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
            def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                if name in self.records:
                    raise ValueError(f"per-user clipping: layer {name!r} ran twice in one forward pass")
                self.records[name] = _Record(args[0].detach(), output)
            return hook

        for name, module in self.layers.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def clip(self, per_user_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Set each trainable parameter's `.grad` to Σ_i c_i ∇L_i for the (b,) losses of the recorded forward
        pass; returns each parameter's (b,) squared per-user norms before clipping."""
        missing = [name for name in self.layers if name not in self.records]
        if missing:
            raise ValueError(f"per-user clipping: trainable layers {missing} did not run in the forward pass")
        recorded = list(self.records.values())
        grads = torch.autograd.grad(per_user_loss.sum(), [r.output for r in recorded], allow_unused=True)
        for record, grad in zip(recorded, grads, strict=True):
            record.grad = torch.zeros_like(record.output) if grad is None else grad
        squared: dict[str, torch.Tensor] = {}
        for name, module in self.layers.items():
            squared.update(self._squared_norms(name, module, self.records[name]))
        for embedding, linear in self.ties:
            weight = self.names[id(self.layers[linear].weight)]
            cross = self._tied_cross_term(self.layers[embedding], self.records[embedding], self.records[linear])
            squared[weight] = squared.pop(f"{embedding}.weight") + squared.pop(f"{linear}.weight") + 2 * cross
        norms = torch.stack(list(squared.values())).sum(0).clamp(min=0).sqrt()  # (b,)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clipping factor
        sums: dict[int, torch.Tensor] = {}
        for name, module in self.layers.items():
            for p, total in self._clipped_sums(module, self.records[name], factors):
                sums[id(p)] = sums[id(p)] + total if id(p) in sums else total
        for module in self.layers.values():
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p.grad = sums[id(p)]
        self.records = {}
        return squared

    @staticmethod
    def _squared_norms(name: str, module: nn.Module, record: _Record) -> dict[str, torch.Tensor]:
        """The (b,) squared per-user norm of each parameter of one layer (a tied weight: this use's part)."""
        assert record.grad is not None
        out: dict[str, torch.Tensor] = {}
        if isinstance(module, nn.Embedding):
            ids, g = _embedding_grads(module, record)
            same = ids.unsqueeze(2) == ids.unsqueeze(1)  # (b, T, T): positions holding the same row
            if module.weight.requires_grad:
                out[f"{name}.weight"] = (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))
            return out
        g = _per_user(record.grad)
        if isinstance(module, nn.LayerNorm):
            x = F.layer_norm(_per_user(record.inputs), module.normalized_shape, None, None, module.eps)
            if module.weight is not None and module.weight.requires_grad:
                out[f"{name}.weight"] = (g * x).sum(1).square().sum(1)
            if module.bias is not None and module.bias.requires_grad:
                out[f"{name}.bias"] = g.sum(1).square().sum(1)
            return out
        a = _per_user(record.inputs)
        if module.weight.requires_grad:
            steps, inputs, outputs = a.shape[1], a.shape[2], g.shape[2]
            if steps * (inputs + outputs) <= inputs * outputs:  # Gram matrices are cheaper than the gradient
                out[f"{name}.weight"] = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
            else:
                out[f"{name}.weight"] = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
        if module.bias is not None and module.bias.requires_grad:
            out[f"{name}.bias"] = g.sum(1).square().sum(1)
        return out

    @staticmethod
    def _tied_cross_term(module: nn.Module, embedding: _Record, linear: _Record) -> torch.Tensor:
        """(b,) ⟨the linear use's per-user gradient, the embedding use's⟩ of one shared (rows × d) table:
        Σ_{s,t} g_s[id_t] (a_s · e_t), with g the output gradient and a the input of the linear layer at s and
        e the output gradient of the embedding at t."""
        assert isinstance(module, nn.Embedding) and linear.grad is not None
        ids, e = _embedding_grads(module, embedding)  # (b, T), (b, T, d)
        a, g = _per_user(linear.inputs), _per_user(linear.grad)  # (b, S, d), (b, S, rows)
        at_ids = g.gather(2, ids.unsqueeze(1).expand(-1, g.shape[1], -1))  # (b, S, T): g_s[id_t]
        return (at_ids * torch.bmm(a, e.transpose(1, 2))).sum((1, 2))

    @staticmethod
    def _clipped_sums(module: nn.Module, record: _Record,
                      factors: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, Σ_i c_i × user i's gradient of it) for one layer's trainable parameters."""
        assert record.grad is not None
        scale = factors.view(-1, 1, 1)
        if isinstance(module, nn.Embedding):
            ids, g = _embedding_grads(module, record)
            if module.weight.requires_grad:
                total = torch.zeros_like(module.weight)
                yield module.weight, total.index_add_(0, ids.flatten(), (g * scale).flatten(0, 1))
            return
        g = _per_user(record.grad)  # scaled through the smaller factor: a Linear's output can be catalog-wide
        if isinstance(module, nn.LayerNorm):
            x = F.layer_norm(_per_user(record.inputs), module.normalized_shape, None, None, module.eps)
            if module.weight is not None and module.weight.requires_grad:
                yield module.weight, (g * x * scale).sum((0, 1))
        elif isinstance(module, nn.Linear) and module.weight.requires_grad:
            yield module.weight, g.flatten(0, 1).T @ (_per_user(record.inputs) * scale).flatten(0, 1)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.requires_grad:
            yield bias, factors @ g.sum(1)


def _embedding_grads(module: nn.Embedding, record: _Record) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding call's (b, T) ids and (b, T, d) output gradient, zero where the id is the padding row
    (which nn.Embedding never updates)."""
    assert record.grad is not None
    ids = record.inputs.reshape(record.inputs.shape[0], -1)
    g = _per_user(record.grad)
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
    return ids, g

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

    def clip(self, per_user_loss: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Set each trainable parameter's `.grad` to Σ_i c_i ∇L_i for the (b,) losses of the recorded forward
        pass; returns each parameter's (b,) squared per-user norms before clipping.

        `rows`: the user of each row of a layer that ran on the batch's positions flattened to (rows, features),
        users in order and each user's rows together (`hidden[labels != 0]`: the output layer scores only real
        positions). Every other layer's leading dimension is the user's."""
        missing = [name for name in self.layers if name not in self.records]
        if missing:
            raise ValueError(f"per-user clipping: trainable layers {missing} did not run in the forward pass")
        if rows is not None and bool((rows[1:] < rows[:-1]).any()):
            raise ValueError("per-user clipping: `rows` must list each user's rows together, users in order")
        recorded = list(self.records.values())
        grads = torch.autograd.grad(per_user_loss.sum(), [r.output for r in recorded], allow_unused=True)
        users = len(per_user_loss)
        views = {}
        for name, record, grad in zip(self.records, recorded, grads, strict=True):
            views[name] = _Rows.of(record, torch.zeros_like(record.output) if grad is None else grad, users, rows)
        self.records = {}
        squared: dict[str, torch.Tensor] = {}
        for name, module in self.layers.items():
            squared.update(_squared_norms(name, module, views[name], users))
        for embedding, linear in self.ties:
            weight = self.names[id(self.layers[linear].weight)]
            module = self.layers[embedding]
            assert isinstance(module, nn.Embedding)
            cross = _tied_cross_term(module, views[embedding], views[linear], users)
            squared[weight] = squared.pop(f"{embedding}.weight") + squared.pop(f"{linear}.weight") + 2 * cross
        norms = torch.stack(list(squared.values())).sum(0).clamp(min=0).sqrt()  # (b,)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clipping factor
        sums: dict[int, torch.Tensor] = {}
        for name, module in self.layers.items():
            for p, total in _clipped_sums(module, views[name], factors):
                sums[id(p)] = sums[id(p)] + total if id(p) in sums else total
        for module in self.layers.values():
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p.grad = sums[id(p)]
        return squared


@dataclass
class _Rows:
    """One layer call as rows: inputs (R, in) (ids (R,) for an embedding), output gradients (R, out), the user of
    each row (R,), and runs of users with the same number of rows: (first user, end user, rows each, first row),
    so that each run's rows are a (users, rows each, ...) view with no padding and no copy."""

    inputs: torch.Tensor
    grad: torch.Tensor
    user: torch.Tensor
    runs: list[tuple[int, int, int, int]]

    @staticmethod
    def of(record: _Record, grad: torch.Tensor, users: int, rows: torch.Tensor | None) -> _Rows:
        x, g = record.inputs, grad
        embedding = not x.is_floating_point()
        flat = rows is not None and x.shape[0] == len(rows) and x.dim() == (1 if embedding else 2)
        if (flat and rows is not None and x.shape[0] == users
                and not torch.equal(rows, torch.arange(users, device=rows.device))):
            raise ValueError("per-user clipping: a layer has one row per user and as many rows as the batch's "
                             "positions, which are not one per user: cannot tell whose rows they are")
        if flat and rows is not None:
            counts = torch.bincount(rows, minlength=users)
            runs, first_user, first_row = [], 0, 0
            values, lengths = torch.unique_consecutive(counts, return_counts=True)
            for each, n in zip(values.tolist(), lengths.tolist(), strict=True):
                runs.append((first_user, first_user + n, each, first_row))
                first_user, first_row = first_user + n, first_row + n * each
            user = rows
        else:
            if x.shape[0] != users:
                raise ValueError(f"per-user clipping: a layer's input has {x.shape[0]} rows for {users} users")
            per = x[0].numel() if embedding else x[0].numel() // x.shape[-1]
            runs = [(0, users, per, 0)]
            user = torch.arange(users, device=x.device).repeat_interleave(per)
        if embedding:
            return _Rows(x.reshape(-1), g.reshape(-1, g.shape[-1]), user, runs)
        return _Rows(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), user, runs)

    def views(self, *xs: torch.Tensor) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """(first user, end user, each x's (users, rows each, ...) view) for each run of users with rows."""
        for u0, u1, each, r0 in self.runs:
            if each:
                yield u0, u1, [x[r0:r0 + (u1 - u0) * each].view(u1 - u0, each, *x.shape[1:]) for x in xs]

    def per_user_sum(self, x: torch.Tensor, users: int) -> torch.Tensor:
        """(users, ...) sums of the rows of each user."""
        return x.new_zeros(users, *x.shape[1:]).index_add_(0, self.user, x)


def _embedding_grad(module: nn.Embedding, rows: _Rows) -> torch.Tensor:
    """The output gradient, zero where the id is the padding row (which nn.Embedding never updates)."""
    if module.padding_idx is None:
        return rows.grad
    return rows.grad * (rows.inputs != module.padding_idx).unsqueeze(-1).to(rows.grad.dtype)


def _normalized(module: nn.LayerNorm, rows: _Rows) -> torch.Tensor:
    return F.layer_norm(rows.inputs, module.normalized_shape, None, None, module.eps)


def _squared_norms(name: str, module: nn.Module, rows: _Rows, users: int) -> dict[str, torch.Tensor]:
    """The (b,) squared per-user norm of each trainable parameter of one layer (a tied weight: this use's part)."""
    out: dict[str, torch.Tensor] = {}
    g = _embedding_grad(module, rows) if isinstance(module, nn.Embedding) else rows.grad
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        total = g.new_zeros(users)
        if isinstance(module, nn.Embedding):  # Σ over pairs of the user's positions holding the same row
            for u0, u1, (ids, e) in rows.views(rows.inputs, g):
                same = ids.unsqueeze(2) == ids.unsqueeze(1)
                total[u0:u1] = (torch.bmm(e, e.transpose(1, 2)) * same).sum((1, 2))
        elif isinstance(module, nn.LayerNorm):
            total = rows.per_user_sum(g * _normalized(module, rows), users).square().sum(1)
        else:
            for u0, u1, (a, gv) in rows.views(rows.inputs, g):
                each, inputs, outputs = a.shape[1], a.shape[2], gv.shape[2]
                if each * (inputs + outputs) <= inputs * outputs:  # Gram matrices cost less than the gradient
                    grams = torch.bmm(a, a.transpose(1, 2)) * torch.bmm(gv, gv.transpose(1, 2))
                    total[u0:u1] = grams.sum((1, 2))
                else:
                    total[u0:u1] = torch.bmm(gv.transpose(1, 2), a).square().sum((1, 2))
        out[f"{name}.weight"] = total
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.requires_grad:
        out[f"{name}.bias"] = rows.per_user_sum(g, users).square().sum(1)
    return out


def _tied_cross_term(module: nn.Embedding, embedding: _Rows, linear: _Rows, users: int) -> torch.Tensor:
    """(b,) ⟨the linear use's per-user gradient, the embedding use's⟩ of one shared (rows × d) table:
    Σ_{s,t} g_s[id_t] (a_s · e_t), with g the output gradient and a the input of the linear layer at its row s and
    e the output gradient of the embedding at position t."""
    if len(embedding.runs) != 1:
        raise ValueError("per-user clipping: a tied embedding must run on the batch's (users, positions) ids")
    per = embedding.runs[0][2]
    ids = embedding.inputs.view(users, per)
    e = _embedding_grad(module, embedding).view(users, per, -1)
    total = linear.grad.new_zeros(users)
    for u0, u1, (a, g) in linear.views(linear.inputs, linear.grad):
        at_ids = g.gather(2, ids[u0:u1].unsqueeze(1).expand(-1, g.shape[1], -1))  # (n, S, T): g_s[id_t]
        total[u0:u1] = (at_ids * torch.bmm(a, e[u0:u1].transpose(1, 2))).sum((1, 2))
    return total


def _clipped_sums(module: nn.Module, rows: _Rows,
                  factors: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, Σ_i c_i × user i's gradient of it) for one layer's trainable parameters; the factors scale the
    inputs, not the output gradients, which for the output layer are catalog-wide."""
    per_row = factors[rows.user]  # (R,)
    scale = per_row.unsqueeze(-1)
    if isinstance(module, nn.Embedding):
        if module.weight.requires_grad:
            total = torch.zeros_like(module.weight)
            yield module.weight, total.index_add_(0, rows.inputs, _embedding_grad(module, rows) * scale)
        return
    g = rows.grad
    if isinstance(module, nn.LayerNorm):
        if module.weight is not None and module.weight.requires_grad:
            yield module.weight, (g * _normalized(module, rows) * scale).sum(0)
    elif isinstance(module, nn.Linear) and module.weight.requires_grad:
        yield module.weight, g.T @ (rows.inputs * scale)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.requires_grad:
        yield bias, per_row @ g

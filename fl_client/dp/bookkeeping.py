"""Per-user clipping without per-user gradients ("book-keeping", Bu, Wang, Zha & Karypis, ICML 2023) for the
behaviour model's layers: Linear, Embedding and LayerNorm, the tied item table included, and the sampled
softmax's gathered output rows (shared_model.modeling_fedrec.CandidateScores).

One forward pass records each layer's input and output; one backward pass computes the gradient of the summed
per-user losses with respect to each layer's *output* (autograd skips the weight gradients). Every weight
gradient of user i is a sum over i's positions of (output gradient ⊗ input), so from those two records

- each user's gradient norm comes out exactly, without forming the gradient: ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)
  (g_t·g_s), per user (the "ghost norm" of Li et al. 2022 that Opacus' ghost clipping uses) where that is
  cheaper than forming the user's (out × in) gradient; an embedding row gets Σ over the positions holding it;
  a table used twice (the tied item table: input embedding and output layer) adds the cross term of its two
  uses, which Opacus' ghost clipping cannot do; a sampled softmax's use of the table is row-sparse (the rows of
  the user's labels and of the user's negatives), and its norm and cross terms sum over the pairs of equal rows;
- the clipped sum Σ_i c_i ∇L_i with c_i = min(1, C / (‖∇L_i‖ + 1e-6)) (Opacus' factor) is one matmul (or one
  row scatter) of the records per layer, the cost of an ordinary weight gradient.

So a DP step costs one forward, one backward and the per-user norms, with no second backward pass (ghost
clipping) and no (users × parameters) tensor (Opacus' hooks: 400 MB a micro-batch on Beauty). Noise,
scaling and accounting stay Opacus' (DPOptimizerFastGradientClipping adds σ·C noise to the clipped sum).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from shared_model.modeling_fedrec import CandidateScores

LAYERS = (nn.Linear, nn.Embedding, nn.LayerNorm)


@dataclass
class _Record:
    """One layer call: its input (ids for an embedding) and its output, both (b, T, ...)."""

    inputs: torch.Tensor
    output: torch.Tensor


@dataclass
class _Candidates:
    """One CandidateScores call: hidden (b, T, d), labels (b, T), each user's distinct negatives (b, K), the table
    and bias it read, and its (b, T, 1 + K) scores."""

    hidden: torch.Tensor
    labels: torch.Tensor
    negatives: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    output: torch.Tensor

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]


class PerUserClipping:
    """Records a model's trainable Linear, Embedding and LayerNorm layers (and its CandidateScores layers, which read
    the output layer's parameters) during a forward pass and turns the per-user losses into clipped gradient sums
    (set as `.grad`) and per-user norms.

    Every trainable parameter must belong to one of those layers (else ValueError names it); a parameter shared by
    two layers must be an Embedding's weight reused as a Linear's weight (the tied item table). In one forward
    pass a table may be used by its embedding and by its linear layer or by a CandidateScores layer; a layer may
    skip a forward pass only if a CandidateScores layer read all its trainable parameters in it."""

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self.layers: dict[str, nn.Module] = {}
        self.candidates = {name: module for name, module in model.named_modules()
                           if isinstance(module, CandidateScores)}
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
        for pid, users in owners.items():
            kinds = {type(self.layers[u]) for u in users}
            if len(users) > 1 and (len(users) != 2 or kinds != {nn.Embedding, nn.Linear}):
                raise ValueError(f"per-user clipping: parameter {self.names[pid]!r} is shared by {users}; only "
                                 f"an embedding table reused as a linear layer's weight is supported")
        self.records: dict[str, _Record | _Candidates] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record every supported layer's call during the forward pass inside."""
        self.records = {}
        handles: list[RemovableHandle] = []

        def hook_for(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
            def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                if name in self.records:
                    raise ValueError(f"per-user clipping: layer {name!r} ran twice in one forward pass")
                if name in self.layers:
                    self.records[name] = _Record(args[0].detach(), output)
                    return
                if len(args) != 5:
                    raise ValueError(f"per-user clipping: {name!r} must be called with its five arguments "
                                     f"positionally (hidden, labels, negatives, weight, bias)")
                hidden, labels, negatives, weight, bias = args
                self.records[name] = _Candidates(hidden.detach(), labels, negatives, weight, bias, output)
            return hook

        for name, module in {**self.layers, **self.candidates}.items():
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
        records, self.records = self.records, {}
        read = {id(p) for r in records.values() if isinstance(r, _Candidates) for p in r.parameters()}
        unknown = [name for name, r in records.items() if isinstance(r, _Candidates)
                   and any(id(p) not in self.names for p in r.parameters())]
        if unknown:
            raise ValueError(f"per-user clipping: {unknown} read a tensor that is not a trainable parameter of the "
                             f"model")
        missing = [name for name, module in self.layers.items() if name not in records
                   and not all(id(p) in read for p in module.parameters(recurse=False) if p.requires_grad)]
        if missing:
            raise ValueError(f"per-user clipping: trainable layers {missing} did not run in the forward pass")
        if rows is not None and bool((rows[1:] < rows[:-1]).any()):
            raise ValueError("per-user clipping: `rows` must list each user's rows together, users in order")
        grads = torch.autograd.grad(per_user_loss.sum(), [r.output for r in records.values()], allow_unused=True)
        users = len(per_user_loss)
        views: dict[str, _Rows | _Sampled] = {}
        for (name, record), grad in zip(records.items(), grads, strict=True):
            grad = torch.zeros_like(record.output) if grad is None else grad
            views[name] = _Sampled.of(record, grad, users) if isinstance(record, _Candidates) \
                else _Rows.of(record, grad, users, rows)
        parts: dict[int, list[torch.Tensor]] = {}
        used_by: dict[int, list[str]] = {}
        params: dict[int, torch.Tensor] = {}
        for name, view in views.items():
            own = _sampled_norms(view) if isinstance(view, _Sampled) else \
                _squared_norms(self.layers[name], view, users)
            for p, part in own:
                parts.setdefault(id(p), []).append(part)
                used_by.setdefault(id(p), []).append(name)
                params[id(p)] = p
        for pid, names in used_by.items():
            for first, second in combinations(names, 2):
                parts[pid].append(2 * self._cross_term(pid, first, second, views, users))
        squared = {self.names[pid]: torch.stack(each).sum(0) for pid, each in parts.items()}
        norms = torch.stack(list(squared.values())).sum(0).clamp(min=0).sqrt()  # (b,)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clipping factor
        sums = _Sums()
        for name, view in views.items():
            if isinstance(view, _Sampled):
                _sampled_sums(view, factors, sums)
            else:
                _clipped_sums(self.layers[name], view, factors, sums)
        for pid, p in params.items():
            p.grad = sums.totals[pid]
        return squared

    def _cross_term(self, pid: int, first: str, second: str, views: dict[str, _Rows | _Sampled],
                    users: int) -> torch.Tensor:
        """(b,) ⟨one use's per-user gradient of a shared table, the other's⟩: an embedding with its tied linear
        layer, or with a sampled softmax's rows."""
        embedding, other = (first, second) if isinstance(self.layers.get(first), nn.Embedding) else (second, first)
        module, rows, view = self.layers.get(embedding), views[embedding], views[other]
        if isinstance(module, nn.Embedding) and isinstance(rows, _Rows):
            if isinstance(self.layers.get(other), nn.Linear) and isinstance(view, _Rows):
                return _tied_cross_term(module, rows, view, users)
            if isinstance(view, _Sampled):
                return _sampled_cross_term(module, rows, view, users)
        raise ValueError(f"per-user clipping: parameter {self.names[pid]!r} is used by {first!r} and {second!r} in "
                         f"one forward pass; only an embedding table also used by its linear layer or by a sampled "
                         f"softmax is supported")


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


def _squared_norms(module: nn.Module, rows: _Rows, users: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, its (b,) squared per-user norms) for each trainable parameter of one layer (a tied weight: this
    use's part)."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
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
        out.append((weight, total))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.requires_grad:
        out.append((bias, rows.per_user_sum(g, users).square().sum(1)))
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


@dataclass
class _Sampled:
    """One CandidateScores call per user: hidden (b, T, d), labels (b, T), each user's distinct negatives (b, K),
    and the output gradients of the label's score (b, T) and of the negatives' (b, T, K). User i's gradient of the
    table has rows labels[i, t] += label_grad[i, t] h[i, t] and negatives[i, k] += rows[i, k] (`rows`: Σ_t the
    negative's output gradient × h, (b, K, d)); of the bias, the same without h."""

    record: _Candidates
    hidden: torch.Tensor
    labels: torch.Tensor
    negatives: torch.Tensor
    label_grad: torch.Tensor
    negative_grad: torch.Tensor
    rows: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.rows = torch.bmm(self.negative_grad.transpose(1, 2), self.hidden)  # (b, K, d)

    @staticmethod
    def of(record: _Candidates, grad: torch.Tensor, users: int) -> _Sampled:
        hidden, negatives = record.hidden, record.negatives
        if hidden.dim() != 3 or hidden.shape[0] != users or negatives.dim() != 2 or negatives.shape[0] != users:
            raise ValueError(f"per-user clipping: a sampled softmax needs hidden states (users, positions, d) and "
                             f"negatives (users, K), got {tuple(hidden.shape)} and {tuple(negatives.shape)} for "
                             f"{users} users")
        ordered = negatives.sort(1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("per-user clipping: a sampled softmax's negatives must be distinct rows for each user")
        return _Sampled(record, hidden, record.labels, negatives, grad[..., 0], grad[..., 1:])

    def matches(self, ids: torch.Tensor) -> torch.Tensor:
        """(b, S, K): whether row ids[i, s] is user i's negative k."""
        return ids.unsqueeze(2) == self.negatives.unsqueeze(1)


def _sampled_norms(view: _Sampled) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, (b,) squared per-user norm) of the table and bias a sampled softmax read: Σ over pairs of equal
    rows among the user's label rows and negatives (distinct, so they pair only with label rows)."""
    record, h, g = view.record, view.hidden, view.label_grad
    same = view.labels.unsqueeze(2) == view.labels.unsqueeze(1)  # (b, T, T)
    pairs = g.unsqueeze(2) * g.unsqueeze(1) * same
    coincide = view.matches(view.labels) * g.unsqueeze(2)  # (b, T, K): label t's row is negative k, × its grad
    out = []
    if record.weight.requires_grad:
        total = (torch.bmm(h, h.transpose(1, 2)) * pairs).sum((1, 2)) + view.rows.square().sum((1, 2)) \
            + 2 * (coincide * torch.bmm(h, view.rows.transpose(1, 2))).sum((1, 2))
        out.append((record.weight, total))
    if record.bias is not None and record.bias.requires_grad:
        per_negative = view.negative_grad.sum(1)  # (b, K)
        out.append((record.bias, pairs.sum((1, 2)) + per_negative.square().sum(1)
                    + 2 * (coincide * per_negative.unsqueeze(1)).sum((1, 2))))
    return out


def _sampled_cross_term(module: nn.Embedding, embedding: _Rows, view: _Sampled, users: int) -> torch.Tensor:
    """(b,) ⟨the embedding use's per-user gradient, the sampled softmax's⟩ of one shared table: input position t
    and label position s pair where id_t = label_s (e_t · g_s h_s), and t and negative k where id_t is its row."""
    if len(embedding.runs) != 1:
        raise ValueError("per-user clipping: a tied embedding must run on the batch's (users, positions) ids")
    ids = embedding.inputs.view(users, -1)
    e = _embedding_grad(module, embedding).view(users, ids.shape[1], -1)  # (b, T', d)
    same = ids.unsqueeze(2) == view.labels.unsqueeze(1)  # (b, T', T)
    labelled = (torch.bmm(e, view.hidden.transpose(1, 2)) * view.label_grad.unsqueeze(1) * same).sum((1, 2))
    return labelled + (view.matches(ids) * torch.bmm(e, view.rows.transpose(1, 2))).sum((1, 2))


def _sampled_sums(view: _Sampled, factors: torch.Tensor, sums: _Sums) -> None:
    """Add Σ_i c_i × user i's gradient of the table and bias a sampled softmax read to `sums`."""
    record = view.record
    label_grad = view.label_grad * factors.unsqueeze(1)  # (b, T)
    labels, negatives = view.labels.reshape(-1), view.negatives.reshape(-1)
    if record.weight.requires_grad:
        total = sums.dense(record.weight)
        total.index_add_(0, labels, (label_grad.unsqueeze(-1) * view.hidden).reshape(labels.numel(), -1))
        total.index_add_(0, negatives, (view.rows * factors.view(-1, 1, 1)).reshape(negatives.numel(), -1))
    if record.bias is not None and record.bias.requires_grad:
        total = sums.dense(record.bias).index_add_(0, labels, label_grad.reshape(-1))
        total.index_add_(0, negatives, (view.negative_grad.sum(1) * factors.unsqueeze(1)).reshape(-1))


class _Sums:
    """Σ_i c_i ∇L_i per parameter, each use of a parameter added in place: one dense tensor per parameter however
    many layers use it (a million-item table is 256 MB)."""

    def __init__(self) -> None:
        self.totals: dict[int, torch.Tensor] = {}

    def dense(self, p: torch.Tensor) -> torch.Tensor:
        """The parameter's running sum, to add rows into (zeros at first)."""
        if id(p) not in self.totals:
            self.totals[id(p)] = torch.zeros_like(p)
        return self.totals[id(p)]

    def add(self, p: torch.Tensor, total: torch.Tensor) -> None:
        """Add one use's sum (a fresh tensor: kept, and added to in place later)."""
        if id(p) in self.totals:
            self.totals[id(p)].add_(total)
        else:
            self.totals[id(p)] = total


def _clipped_sums(module: nn.Module, rows: _Rows, factors: torch.Tensor, sums: _Sums) -> None:
    """Add Σ_i c_i × user i's gradient of each of one layer's trainable parameters to `sums`; the factors scale the
    inputs, not the output gradients, which for the output layer are catalog-wide."""
    per_row = factors[rows.user]  # (R,)
    scale = per_row.unsqueeze(-1)
    if isinstance(module, nn.Embedding):
        if module.weight.requires_grad:
            sums.dense(module.weight).index_add_(0, rows.inputs, _embedding_grad(module, rows) * scale)
        return
    g = rows.grad
    if isinstance(module, nn.LayerNorm):
        if module.weight is not None and module.weight.requires_grad:
            sums.add(module.weight, (g * _normalized(module, rows) * scale).sum(0))
    elif isinstance(module, nn.Linear) and module.weight.requires_grad:
        sums.add(module.weight, g.T @ (rows.inputs * scale))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.requires_grad:
        sums.add(bias, per_row @ g)

"""Row-wise aggregation for tensors with one row per catalog item (item table, output layer): the sites'
rows weighted by their per-item weights (`strategy.item_rows`), and the sites' optimiser moments averaged
the same way (`federation.share_optimizer_state`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Message

from shared_model import wire


def reweight_item_rows(global_arrays: Mapping[str, np.ndarray],
                       replies: Sequence[tuple[Mapping[str, np.ndarray], float, np.ndarray]],
                       names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """The sites' per-item tensors `names`, their rows rescaled so that Flower's user-weighted average of
    them is the row-weighted one (any other tensor in a site's mapping is passed through unchanged).

    `replies` holds (weights, users n_i, per-row weights a_i) of each site that trained. Flower computes
    sum_i (n_i / N) X_i. Replacing row r of a site's tensor L_ir by
        X_ir = G_r + (N a_ir / (n_i A_r)) (L_ir - G_r),   A_r = sum_j a_jr,
    makes that sum G_r + sum_i (a_ir / A_r) (L_ir - G_r): each site moves row r in proportion to its weight
    for item r (G: the global weights the round started from). A row no site weighs (A_r = 0) keeps the
    plain average. Every FedAvg-family strategy (FedProx, FedAvgM, FedAdam, FedYogi) averages first and then
    takes its server step, so the step is taken from the row-weighted average.
    """
    total = sum(n for _, n, _ in replies)
    mass = np.sum([a for _, _, a in replies], axis=0)
    held = mass > 0
    rescaled = []
    for arrays, n, a in replies:
        factor = np.where(held, total * a / (n * np.where(held, mass, 1.0)), 1.0)
        out = dict(arrays)
        for name in names:
            start, local = global_arrays[name].astype(np.float64), arrays[name].astype(np.float64)
            rows = factor.reshape(-1, *([1] * (local.ndim - 1)))
            out[name] = (start + rows * (local - start)).astype(arrays[name].dtype)
        rescaled.append(out)
    return rescaled


def item_weights(msg: Message, rows: int) -> np.ndarray:
    """A site's per-row weights of the item table; ValueError when absent or unusable."""
    record = msg.content.array_records.get(wire.ITEM_WEIGHTS)
    if record is None or wire.ITEM_WEIGHTS not in record:
        raise ValueError("it sent no item weights")
    weights = record[wire.ITEM_WEIGHTS].numpy().astype(np.float64)
    if weights.shape != (rows,):
        raise ValueError(f"its item weights have shape {weights.shape}, the item table has {rows} rows")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("its item weights are negative or not finite")
    return weights


def average_moments(replies: Sequence[tuple[Mapping[str, np.ndarray], float, np.ndarray | None]],
                    item_row_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The sites' optimiser moments ("<param>:<moment>", and "step") averaged, weighted by their users.

    `replies` holds (moments, users n_i, per-row weights a_i or None) of each site that trained. When every
    site sent per-row weights, the rows of per-item tensors are weighted by them instead (as the weights'
    rows are, see reweight_item_rows); a row no site weighs keeps the user-weighted mean. ValueError when the
    sites' moments disagree in names or shapes, or one is not finite.
    """
    keys = set(replies[0][0])
    for moments, _, _ in replies[1:]:
        if set(moments) != keys:
            raise ValueError(f"sites sent different optimiser moments: {sorted(keys ^ set(moments))[:3]}")
    users = np.array([n for _, n, _ in replies], dtype=np.float64)
    row_weights = [a for _, _, a in replies if a is not None]
    a = np.stack(row_weights).astype(np.float64) if len(row_weights) == len(replies) else None  # (sites, rows)
    averaged = {}
    for key in sorted(keys):
        stack = np.stack([np.asarray(moments[key], dtype=np.float64) for moments, _, _ in replies])
        if not np.isfinite(stack).all():
            raise ValueError(f"a site's optimiser moment {key} is not finite")
        mean = np.tensordot(users / users.sum(), stack, axes=1)  # (sites,) x (sites, ...) -> (...)
        if a is not None and key.split(":", 1)[0] in item_row_names:
            mass = a.sum(axis=0)
            held = (mass > 0).reshape(-1, *([1] * (mean.ndim - 1)))
            weighted = np.einsum("sr,sr...->r...", a, stack)  # (rows, ...): sum over sites of a_ir X_ir
            mean = np.where(held, weighted / np.where(held, mass.reshape(held.shape), 1.0), mean)
        averaged[key] = mean.astype(np.asarray(replies[0][0][key]).dtype)
    return averaged

"""The direction check: an update pointing away from the round's coordinate-wise median update is dropped.

A sign-flipped (or otherwise reversed) update has the same length as an honest one, so the norm bound cannot
see it; its cosine with the median of the round's updates is negative, while honest sites, however
non-IID, all descend the same global model and point the same way (measured: BENCHMARKS.md, "Robust
aggregation under attack"). The median is coordinate-wise, so a minority of attackers cannot move it far.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord

MIN_SITES = 3  # with fewer updates there is no majority to take a median of: nothing is checked


def flat_update(sent: ArrayRecord, start: Mapping[str, np.ndarray]) -> np.ndarray:
    """Sent weights (checked) minus the round's start, every tensor in name order, as one float32 vector."""
    return np.concatenate([(sent[k].numpy().astype(np.float32) - start[k]).reshape(-1) for k in sorted(sent)])


def median_cosines(updates: list[np.ndarray]) -> list[float]:
    """Each update's cosine with the coordinate-wise median of all of them (1.0 each when too few to judge)."""
    if len(updates) < MIN_SITES:
        return [1.0] * len(updates)
    reference = np.median(np.stack(updates), axis=0)  # (D,)
    norm = float(np.linalg.norm(reference))
    if norm == 0.0:
        return [1.0] * len(updates)
    return [float(u @ reference) / (max(float(np.linalg.norm(u)), 1e-30) * norm) for u in updates]

"""A user-level DP release of item popularity that starts the output layer's item bias.

Under DP-SGD a small data set can pay most of its budget learning which items are popular: the bias is one of
many weights sharing each user's clipped gradient, and its noise reshuffles the top of the ranking. Released on
its own, popularity is cheap: each user adds their training-part item counts scaled to unit L2 norm (so adding or
removing one user moves the sum by at most 1), and Gaussian noise of standard deviation σ_p is added once. That
is one Gaussian mechanism, one (σ_p, sample rate 1, 1 step) entry in the accountant's history, composed with the
DP-SGD steps that follow; DP-SGD's σ is calibrated to what is left of ε.

The bias starts at log(max(count, 1)) (FedRecModel.start_item_bias): the softmax then ranks items by their noisy
user-normalised count, and an item below one user's whole weight is not told apart from the others. A federation
makes the same release in its round 0 (fl_server.popularity_release), each site adding its share of the noise.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from fl_client.dp.secure_rng import secure_gaussian
from shared_model.sequences import UserSequences


def user_normalised_counts(seqs: UserSequences, num_rows: int, users: Iterable[int] | None = None) -> np.ndarray:
    """Σ over `users` (all by default) of their training-part item counts divided by the counts' L2 norm (each
    user's vector has norm 1, or 0 without training events): the release's sensitivity to one user is 1."""
    total = np.zeros(num_rows, dtype=np.float64)
    for u in range(len(seqs)) if users is None else users:
        items = seqs.items[int(seqs.offsets[u]):int(seqs.offsets[u + 1]) - 2]  # the training part (as item_counts)
        if len(items) == 0:
            continue
        rows, counts = np.unique(items, return_counts=True)
        total[rows] += counts / np.sqrt(np.square(counts, dtype=np.float64).sum())
    return total


def private_popularity(seqs: UserSequences, num_rows: int, noise_multiplier: float, secure_mode: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The user-normalised counts of the users DP-SGD trains on (`trainable_users`) plus N(0, σ_p²) on every
    row: (σ_p, 1, 1) in the accountant's terms."""
    if noise_multiplier <= 0:
        raise ValueError(f"privacy.popularity_noise must be positive for a release, got {noise_multiplier}")
    counts = torch.from_numpy(user_normalised_counts(seqs, num_rows, seqs.trainable_users())).to(torch.float32)
    if secure_mode:
        return counts + secure_gaussian(counts, noise_multiplier)
    return counts + torch.normal(0.0, noise_multiplier, counts.shape, generator=generator)

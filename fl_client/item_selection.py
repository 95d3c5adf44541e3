"""Which item rows a `trained_item_rows` model trains: the K rows most frequent in the training events.

Under DP they are picked from a user-level Gaussian histogram (as DP-FEST picks the embedding rows worth
training): each user adds 1/sqrt(k) to each of the k distinct items of their training events, so one user
moves the histogram by at most 1 in L2 norm, and N(0, σ²) noise on every row makes the release one Gaussian
mechanism with noise multiplier σ, accounted as one (σ, sample rate 1, 1 step) entry beside the DP-SGD steps.
Choosing the top K of the noisy histogram is post-processing.
"""

from __future__ import annotations

import numpy as np
import torch

from fl_client.privacy import AccountantHistory, PrivacyConfig
from fl_client.secure_rng import secure_standard_normal
from shared_model.modeling_fedrec import FedRecModel
from shared_model.sequences import UserSequences


def user_item_histogram(seqs: UserSequences, num_rows: int) -> np.ndarray:
    """Σ over users of 1/sqrt(k_u) at each of the k_u distinct items of a user's training events (the events
    `UserSequences.item_counts` counts): a (num_rows,) float64 vector of sensitivity 1 per user."""
    histogram = np.zeros(num_rows, dtype=np.float64)
    for user in range(len(seqs)):
        start, end = int(seqs.offsets[user]), int(seqs.offsets[user + 1])
        items = np.unique(seqs.items[start:end - 2])
        if len(items):
            histogram[items] += 1.0 / np.sqrt(len(items))
    return histogram


def choose_item_rows(seqs: UserSequences, k: int, num_rows: int, noise_multiplier: float = 0.0,
                     secure: bool = False) -> np.ndarray:
    """The k catalog rows (never padding row 0) with the largest histogram value, plus N(0, σ²) noise on every
    row when `noise_multiplier` σ > 0: from torch's seeded generator, or the OS CSPRNG with `secure`.
    Sorted row ids."""
    if not 0 < k < num_rows:
        raise ValueError(f"model.trained_item_rows={k}: expected 1..{num_rows - 1} (the catalog's items)")
    histogram = user_item_histogram(seqs, num_rows)
    if noise_multiplier:
        noise = (secure_standard_normal(num_rows) if secure
                 else torch.randn(num_rows, dtype=torch.float64).numpy())
        histogram = histogram + noise_multiplier * noise
    histogram[0] = -np.inf
    return np.sort(np.argpartition(-histogram, k - 1)[:k])


def select_trained_rows(model: FedRecModel, seqs: UserSequences, privacy: PrivacyConfig) -> AccountantHistory:
    """Choose a `trained_item_rows` model's rows from `seqs` unless they are chosen already; return the release
    to account beside the DP-SGD steps ([(σ, 1.0, 1)] under DP, else nothing)."""
    k = model.config.trained_item_rows
    if not k or model.item_rows_selected:
        return []
    if privacy.enabled and privacy.accountant == "gdp":
        raise ValueError("model.trained_item_rows under DP composes two different releases, which Opacus' gdp "
                         "accountant cannot: set privacy.accountant=prv or rdp")
    if privacy.enabled and not privacy.selection_noise > 0:
        raise ValueError(f"privacy.selection_noise={privacy.selection_noise}: the item count that picks "
                         f"model.trained_item_rows needs noise > 0 under DP")
    sigma = privacy.selection_noise if privacy.enabled else 0.0
    rows = choose_item_rows(seqs, k, model.config.num_item_rows, sigma, secure=privacy.secure_mode)
    model.select_item_rows(torch.from_numpy(rows))
    return [(sigma, 1.0, 1)] if privacy.enabled else []

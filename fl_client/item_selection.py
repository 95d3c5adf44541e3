"""The item counts that pick a `trained_item_rows` model's rows (the K rows most frequent in the training events).

Under DP they are a user-level Gaussian histogram (as DP-FEST picks the embedding rows worth training): each
user adds 1/sqrt(k) to each of the k distinct items of their training events, so one user moves the histogram
by at most 1 in L2 norm, and N(0, σ²) noise on every row makes the release one Gaussian mechanism with noise
multiplier σ, accounted as one (σ, sample rate 1, 1 step) entry beside the DP-SGD steps. Taking the top K of
the noisy histogram (the model's `select_most_counted_rows`; in federated training, of the sum of the sites'
noisy histograms, at the server) is post-processing.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fl_client.privacy import AccountantHistory, PrivacyConfig
from fl_client.secure_rng import secure_standard_normal
from shared_model.modeling_fedrec import FedRecModel
from shared_model.sequences import UserSequences

log = logging.getLogger(__name__)


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


def noisy_item_histogram(seqs: UserSequences, num_rows: int, noise_multiplier: float = 0.0,
                         secure: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """The user-level histogram plus N(0, σ²) on every row when σ = `noise_multiplier` > 0: noise from the OS
    CSPRNG with `secure`, else from `generator` (torch's global one by default). (num_rows,) float64."""
    histogram = torch.from_numpy(user_item_histogram(seqs, num_rows))
    if noise_multiplier:
        noise = (torch.from_numpy(secure_standard_normal(num_rows)) if secure
                 else torch.randn(num_rows, dtype=torch.float64, generator=generator))
        histogram = histogram + noise_multiplier * noise
    return histogram


def selection_release(privacy: PrivacyConfig) -> AccountantHistory:
    """The accountant entry of one DP item count under `privacy` ([] without DP), after checking it can be paid."""
    if not privacy.enabled:
        return []
    if privacy.accountant == "gdp":
        raise ValueError("model.trained_item_rows under DP composes two different releases, which Opacus' gdp "
                         "accountant cannot: set privacy.accountant=prv or rdp")
    if not privacy.selection_noise > 0:
        raise ValueError(f"privacy.selection_noise={privacy.selection_noise}: the item count that picks "
                         f"model.trained_item_rows needs noise > 0 under DP")
    return [(float(privacy.selection_noise), 1.0, 1)]


def select_trained_rows(model: FedRecModel, seqs: UserSequences, privacy: PrivacyConfig) -> AccountantHistory:
    """Choose a `trained_item_rows` model's rows from `seqs` unless they are chosen already; return the release
    to account beside the DP-SGD steps ([(σ, 1.0, 1)] under DP, else nothing)."""
    if not model.config.trained_item_rows or model.item_rows_selected:
        return []
    release = selection_release(privacy)
    sigma = release[0][0] if release else 0.0
    rows = model.select_most_counted_rows(noisy_item_histogram(seqs, model.config.num_item_rows, sigma,
                                                               secure=privacy.secure_mode))
    events = seqs.item_counts(model.config.num_item_rows)  # local, never released: how much the rows cover
    log.info("training item vectors for %d of %d items, chosen by a %s; they hold %.1f%% of the training events",
             len(rows), model.config.num_items, f"noisy item count (σ = {sigma:g})" if sigma else "exact item count",
             100.0 * events[rows.numpy()].sum() / max(events.sum(), 1))
    return release

"""A site's answer to the server's item-count query (`model.trained_item_rows`): its user-level histogram of
training events, noised under DP and charged to its ledger once per training (as round COUNT_ROUND).

The noise multiplier is the site's own (`selection_noise`), like every other privacy setting. A resent query
(after a server restart) gets the same noisy histogram back, so nothing is spent twice.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_client.federated import COUNT_ROUND, RoundConfig, safe_name, save_atomically, site_delta
from fl_client.item_selection import noisy_item_histogram, selection_release
from fl_client.ledger import BudgetExceededError, PrivacyLedger
from fl_client.site import SiteConfig, SiteData
from shared_model import wire


@dataclass
class CountReply:
    """The site's item counts (None when it declined), and its cumulative ε after paying for them."""

    counts: torch.Tensor | None  # (num_item_rows,) float64
    dp: bool
    epsilon: float
    delta: float
    declined: str = ""

    def metrics(self) -> dict[str, float]:
        """The MetricRecord content."""
        return {wire.DP_ENABLED: float(self.dp), wire.EPSILON: self.epsilon, wire.DELTA: self.delta,
                wire.DECLINED: float(bool(self.declined))}


def count_reply_path(site: SiteConfig, training_id: str) -> Path:
    """Where a paid-for count is kept, so a resent query gets the same answer."""
    return Path(site.state_dir) / "replies" / f"{safe_name(training_id)}_item_counts.pt"


def count_round(site: SiteConfig, data: SiteData, round_cfg: RoundConfig) -> CountReply:
    """The site's (noisy under DP) item histogram for the server's choice of trained item rows, within budget.

    The query carries settings only (no weights): a histogram needs the catalog, which the fingerprint pins.
    """
    data.catalog.check_matches(round_cfg.catalog_fingerprint)
    delta = site_delta(site, data)
    ledger = PrivacyLedger(site.ledger_path, delta, site.accountant) if site.dp else None
    cached = count_reply_path(site, round_cfg.training_id)
    if ledger is not None and ledger.has(round_cfg.training_id, COUNT_ROUND):
        if cached.exists():
            return CountReply(**torch.load(cached, weights_only=False))
        return CountReply(None, True, ledger.spent(), delta, "this training's item count was already released "
                                                            "here and its reply is lost")
    release = selection_release(site.privacy(delta))
    if ledger is not None:
        try:
            ledger.check(release, site.epsilon)
        except BudgetExceededError as err:
            return CountReply(None, True, ledger.spent(), delta, str(err))
    sigma = release[0][0] if release else 0.0
    # Fresh entropy under DP (a seed the server could guess would let it subtract the noise).
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    counts = noisy_item_histogram(data.sequences, data.catalog.num_rows, sigma, secure=site.secure_mode,
                                  generator=generator)
    if ledger is None:
        return CountReply(counts, False, 0.0, delta)
    epsilon = ledger.record(round_cfg.training_id, COUNT_ROUND, release).epsilon_after
    reply = CountReply(counts, True, epsilon, delta)
    save_atomically(reply.__dict__, cached)
    return reply

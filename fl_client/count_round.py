"""A site's answer to the server's item-count query (`model.trained_item_rows`): its user-level histogram of
training events, noised under DP and charged to its ledger once per training (as round COUNT_ROUND).

The noise multiplier is the site's own (`selection_noise`), like every other privacy setting. A resent query
(after a server restart) gets the same noisy histogram back, so nothing is spent twice.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_client.enrolment import open_site_ledger, site_lock
from fl_client.federated import COUNT_ROUND, UNREADABLE, RoundConfig, safe_name, save_atomically, site_delta
from fl_client.item_selection import noisy_item_histogram, selection_release
from fl_client.ledger import BudgetExceededError, PrivacyLedger
from fl_client.site import SiteConfig, SiteData, check_users
from shared_model import wire

log = logging.getLogger(__name__)


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
    Under DP the site's lock is held from the budget check to the ledger record.
    """
    data.catalog.check_matches(round_cfg.catalog_fingerprint)
    check_users(site, data)
    if not site.dp:
        return CountReply(histogram(site, data, 0.0), False, 0.0, site_delta(site, data))
    with site_lock(site.state_dir):
        ledger = open_site_ledger(site.state_dir, site.accountant, site.delta, len(data.sequences))
        return count_private(site, data, round_cfg, ledger)


def count_private(site: SiteConfig, data: SiteData, round_cfg: RoundConfig, ledger: PrivacyLedger) -> CountReply:
    """A DP count against the site's ledger (held under its lock): paid once per training, resent unchanged."""
    cached = count_reply_path(site, round_cfg.training_id)
    if ledger.has(round_cfg.training_id, COUNT_ROUND):
        kept = load_count(cached)
        return kept or CountReply(None, True, ledger.spent(), ledger.delta, "this training's item count was already "
                                                                            "released here and its reply is lost")
    release = selection_release(site.privacy(ledger.delta))
    try:
        ledger.check(release, site.epsilon)
    except BudgetExceededError as err:
        return CountReply(None, True, ledger.spent(), ledger.delta, str(err))
    counts = histogram(site, data, release[0][0])
    epsilon = ledger.record(round_cfg.training_id, COUNT_ROUND, release).epsilon_after
    reply = CountReply(counts, True, float(epsilon), float(ledger.delta))
    save_atomically(reply.__dict__, cached)
    return reply


def histogram(site: SiteConfig, data: SiteData, sigma: float) -> torch.Tensor:
    """The site's user-level item histogram with N(0, σ²) noise on every row (exact for σ = 0)."""
    # Fresh entropy under DP (a seed the server could guess would let it subtract the noise).
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    return noisy_item_histogram(data.sequences, data.catalog.num_rows, sigma, secure=site.secure_mode,
                                generator=generator)


def load_count(path: Path) -> CountReply | None:
    """A kept count (None when gone or unreadable: the query is then declined, never paid for again), read with
    weights_only=True."""
    if not path.exists():
        return None
    try:
        return CountReply(**torch.load(path, weights_only=True))
    except UNREADABLE as err:
        log.warning("%s: kept item count is unreadable (%s); the query is declined, not paid for again", path, err)
        return None

"""`fedrec-client --check`: a site checks its events against the consortium's catalog before it joins, without
connecting, enrolling or spending anything: what was read and dropped, its users, and the δ and σ it would use."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fl_client.dp.enrolment import LEDGER_FILE, check_delta, load_identity, site_lock
from fl_client.dp.settings import resolve_delta
from fl_client.site import SiteConfig, SiteData, check_users
from shared_model.adapters import load_dataset
from shared_model.catalog import ItemCatalog
from shared_model.sequences import to_user_sequences

DEFAULT_PLAN = "5x2x128"  # the server's defaults: num-rounds x local-epochs x batch-size (pyproject run config)


@dataclass(frozen=True)
class Plan:
    """The server's plan a site's σ depends on."""

    num_rounds: int
    local_epochs: int
    batch_size: int

    @classmethod
    def parse(cls, text: str) -> Plan:
        """`ROUNDSxEPOCHSxBATCH`, e.g. 5x2x128; a ValueError naming the expected form."""
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", text)
        if match is None or min(int(g) for g in match.groups()) < 1:
            raise ValueError(f"--check {text!r}: expected the server's plan as ROUNDSxEPOCHSxBATCH with positive "
                             f"whole numbers, e.g. {DEFAULT_PLAN} (num-rounds x local-epochs x batch-size)")
        rounds, epochs, batch = (int(g) for g in match.groups())
        return cls(rounds, epochs, batch)


def check_site(site: SiteConfig, plan: Plan) -> list[str]:
    """The site's check, one line per topic (a SiteStartError, LedgerError, EventsError or CatalogError for what
    would refuse it at start)."""
    catalog = ItemCatalog.load(site.catalog_path)
    events = load_dataset(site.data_format, site.data_path)
    sequences = to_user_sequences(events, catalog, min_events=site.min_events)
    data = SiteData(catalog, sequences)
    trainable = len(sequences.trainable_users())
    lines = [f"catalog: {site.catalog_path}: {len(catalog.item_ids):,} items, fingerprint {catalog.fingerprint}",
             f"events: {events.report.summary()}",
             f"kept: {len(sequences):,} users ({trainable:,} trainable: 4+ events), "
             f"{int(sequences.lengths().sum()):,} events; dropped while building sequences: "
             f"{sequences.dropped or 'nothing'}"]
    check_users(site, data)
    if not site.privacy.enabled:
        return [*lines, "privacy: DP is OFF: this site's updates would carry no privacy guarantee"]
    state = Path(site.state_dir)
    enrolled = state.is_dir() and load_identity(state) is not None
    ledger = None
    if enrolled:  # an enrolled site keeps its ledger's δ; nothing is written here
        with site_lock(site.state_dir):
            ledger = site.open_ledger(len(sequences))
        delta = ledger.delta
        rounds = f"{len(ledger.entries)} round{'' if len(ledger.entries) == 1 else 's'}"
        spent = f"{ledger.spent():.3f} of ε = {site.privacy.epsilon} spent in {rounds}"
    else:
        delta = resolve_delta(site.privacy, len(sequences))
        check_delta(state / LEDGER_FILE, delta, len(sequences))
        spent = f"a new site (not enrolled yet), budget ε = {site.privacy.epsilon}"
    from fl_client.training_round import planned_sigma  # Opacus: only once the data has passed its checks

    sigma, per_round = planned_sigma(site, data, plan.num_rounds, plan.local_epochs, plan.batch_size, delta,
                                     cache=False)
    [(_, sample_rate, round_steps)] = per_round
    lines += [f"privacy: DP-SGD per user, {spent}; δ = {delta:.3g} (below 1/{len(sequences):,} users)",
              f"noise: σ = {sigma:.3f} for the plan {plan.num_rounds} rounds x {plan.local_epochs} local epochs at "
              f"batch {plan.batch_size} ({round_steps} steps a round, sampling rate {sample_rate:.4g}; C = "
              f"{site.privacy.max_grad_norm})"]
    # σ is calibrated to the whole budget; a site that has already spent some of it declines the rounds it
    # cannot afford, so say how many of the plan's rounds it will train.
    affordable = plan.num_rounds if ledger is None else \
        ledger.rounds_within(per_round, site.privacy.epsilon, plan.num_rounds)
    if affordable == plan.num_rounds:
        return [*lines, "ready: this site can join"]
    if affordable == 0:
        return [*lines, f"budget: the ε already spent leaves no round of this plan within ε = "
                        f"{site.privacy.epsilon}: this site would decline every round"]
    return [*lines, f"ready: this site can join, and will train {affordable} of the plan's {plan.num_rounds} "
                    f"rounds: the ε already spent leaves no more within ε = {site.privacy.epsilon} (it declines "
                    "the rest)"]

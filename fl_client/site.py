"""A data site: its settings (from the SuperNode's node config), and its preprocessed data, cached on disk.

Deployment starts a fresh client process for every message, so parsing and mapping the site's events is done
once and cached next to the site's state; a changed events file or catalog invalidates the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_client.dp_settings import ACCOUNTANTS, GRAD_SAMPLE_MODES, PrivacyConfig
from shared_model.adapters import load_dataset
from shared_model.atomic import write_atomically
from shared_model.catalog import ItemCatalog
from shared_model.sequences import UserSequences, to_user_sequences

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class SiteConfig:
    """Everything a site decides for itself; the server never dictates noise, clipping or budget."""

    data_path: str  # (str) the site's events file (or folder, for folder-based formats)
    catalog_path: str  # (str) the public catalog.json shared by every party
    state_dir: str  # (str) where the ledger, the preprocessing cache and round replies live
    data_format: str = "events"  # (str) adapter: events, movielens, s3rec or tianchi
    dp: bool = True  # (bool) train with DP-SGD (one row per user)
    epsilon: float = 8.0  # (float) the site's total ε budget over all rounds, per user
    delta: float | None = None  # (float) the site's δ; None = 1 / the site's number of users
    max_grad_norm: float = 1.0  # (float) per-user clipping bound C
    noise_multiplier: float | None = None  # (float) fixed σ; None = calibrated so ε lasts all planned rounds
    accountant: str = "prv"  # (str) Opacus accountant for σ and the ledger: prv, rdp or gdp (fixed for life)
    selection_noise: float = 5.0  # (float) σ of the site's item count when the model trains only some item rows
    grad_sample_mode: str = "hooks"  # (str) Opacus per-user gradients: hooks (tied item table ok) or ghost
    secure_mode: bool = False  # (bool) sampling and noise from the OS CSPRNG (production; slower)
    device: str = "auto"  # (str) auto (CUDA when present), cpu or cuda
    min_events: int = 3  # (int) users with fewer events are dropped (counted)
    micro_batch_tokens: int = 8192  # (int) DP: padded positions per micro-batch (bounds this site's memory)
    micro_batch_users: int = 128  # (int) DP: users per micro-batch (per-user item-table gradients cost memory)
    cache_keep: int = 3  # (int) preprocessing caches and frozen-tensor copies kept, each kind: the latest used

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"site accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"site grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got "
                             f"{self.grad_sample_mode!r}")
        if self.cache_keep < 1:
            raise ValueError(f"site cache_keep must be at least 1 (the copy in use), got {self.cache_keep}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SiteConfig:
        """Parse a SuperNode's `--node-config` (kebab-case keys) once, with a clear error for missing keys."""
        missing = [k for k in ("data-path", "catalog-path", "state-dir") if k not in node_config]
        if missing:
            raise ValueError(f"node config is missing {missing}; start the SuperNode with --node-config "
                             "\"data-path='...' catalog-path='...' state-dir='...'\"")
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        unknown = sorted(set(node_config) - set(known) - {"partition-id", "num-partitions"})
        if unknown:
            raise ValueError(f"unknown node config keys {unknown}; known: {sorted(known)}")
        values = {known[k]: v for k, v in node_config.items() if k in known}
        for optional in ("delta", "noise_multiplier"):  # TOML has no null: "" or 0 means "not set"
            if values.get(optional) in ("", 0, 0.0):
                values[optional] = None
        return cls(**values)  # type: ignore[arg-type]

    def privacy(self, delta: float, noise_multiplier: float | None = None) -> PrivacyConfig:
        """The site's DP-SGD settings for one round (σ: the planned one, else the site's fixed one)."""
        sigma = noise_multiplier if noise_multiplier is not None else self.noise_multiplier
        return PrivacyConfig(enabled=self.dp, epsilon=self.epsilon, delta=delta, noise_multiplier=sigma,
                             max_grad_norm=self.max_grad_norm, accountant=self.accountant,
                             secure_mode=self.secure_mode, grad_sample_mode=self.grad_sample_mode,
                             selection_noise=self.selection_noise)

    @property
    def ledger_path(self) -> Path:
        """The site's privacy ledger."""
        return Path(self.state_dir) / "privacy_ledger.json"


@dataclass
class SiteData:
    """The site's public catalog and its users' sequences."""

    catalog: ItemCatalog
    sequences: UserSequences  # its `dropped` counts what preprocessing filtered


def _cache_key(site: SiteConfig, catalog: ItemCatalog, num_time_buckets: int) -> str:
    """Changes whenever the events file, the catalog or the preprocessing settings change."""
    data = Path(site.data_path)
    stat = data.stat()
    parts = [str(CACHE_VERSION), str(data.resolve()), str(stat.st_size), str(stat.st_mtime_ns), site.data_format,
             catalog.fingerprint, str(site.min_events), str(num_time_buckets)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_site_data(site: SiteConfig, num_time_buckets: int = 32) -> SiteData:
    """The site's sequences, from the cache when it is current, else parsed and cached."""
    catalog = ItemCatalog.load(site.catalog_path)
    cache = Path(site.state_dir) / f"sequences_{_cache_key(site, catalog, num_time_buckets)}.npz"
    if cache.exists():
        cache.touch()  # in use: the last to be removed by keep_latest
        return SiteData(catalog, _read_cache(cache))
    events = load_dataset(site.data_format, site.data_path)
    seqs = to_user_sequences(events, catalog, num_time_buckets=num_time_buckets, min_events=site.min_events)
    log.info("site %s; filtered while building sequences: %s", events.report.summary(), seqs.dropped or "nothing")
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_cache(cache, seqs)
    keep_latest(cache, "sequences_*.npz", site.cache_keep)
    return SiteData(catalog, seqs)


def keep_latest(current: Path, pattern: str, keep: int) -> list[Path]:
    """Remove all but `current` and the `keep` - 1 most recently used other files matching `pattern` in its
    folder (use: modification time; a reader touches what it reads). Returns what was removed (logged)."""
    folder = current.parent
    others = sorted((path for path in folder.glob(pattern) if path != current),
                    key=lambda path: path.stat().st_mtime_ns, reverse=True)
    removed = others[keep - 1:]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.info("removed %d file(s) no longer in use from %s (the site keeps %d): %s", len(removed), folder, keep,
                 ", ".join(path.name for path in removed))
    return removed


def _write_cache(path: Path, seqs: UserSequences) -> None:
    meta = json.dumps({"user_ids": seqs.user_ids, "regions": seqs.regions, "merchants": seqs.merchants,
                       "dropped": seqs.dropped})
    write_atomically(path, lambda out: np.savez(out, offsets=seqs.offsets, items=seqs.items,
                                                event_types=seqs.event_types, time_buckets=seqs.time_buckets,
                                                meta=np.array(meta)))


def _read_cache(path: Path) -> UserSequences:
    with np.load(path) as arrays:
        meta = json.loads(str(arrays["meta"]))
        seqs = UserSequences(user_ids=meta["user_ids"], offsets=arrays["offsets"], items=arrays["items"],
                             event_types=arrays["event_types"], time_buckets=arrays["time_buckets"],
                             regions=meta["regions"], merchants=meta["merchants"], dropped=meta["dropped"])
    return seqs


"""A data site: its settings (from the SuperNode's node config), and its preprocessed data, cached on disk.

Deployment starts a fresh client process for every message, so parsing and mapping the site's events is done
once and cached next to the site's state, keyed by the SHA-256 of the data's content (never its name, size or
time): a changed events file or catalog invalidates the cache, and a damaged cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from fl_client.dp.enrolment import open_site_ledger, site_lock
from fl_client.dp.ledger import PrivacyLedger
from fl_client.dp.settings import PrivacyConfig, resolve_delta
from shared_model.atomic import write_atomically, write_text_atomically
from shared_model.catalog import CATALOG_FILE, ItemCatalog
from shared_model.launch import TomlValue
from shared_model.sequences import UserSequences, to_user_sequences

log = logging.getLogger(__name__)
T = TypeVar("T")
CACHE_VERSION = 2  # 2: keyed by the data's content hash
MIN_USERS = 50  # fewer trainable users than this and a site refuses DP training (SiteConfig.min_users)
MAX_MODEL_PARAMETERS = 50_000_000  # the largest global model a site builds by default (200 MB of float32)
# The most steps a site plans for by default (SiteConfig.max_plan_steps): its σ search over 10^5 steps takes
# 2-28 s and up to 1.7 GB with the PRV accountant, over 10^6 steps 39 s and 3.9 GB (BENCHMARKS.md, "A site's σ
# search"), and a ledger composes them again at every check.
MAX_PLAN_STEPS = 100_000
START_LOCK_TIMEOUT_S = 60.0  # fedrec-client's start waits this long for a round in progress on the same state dir
# A SuperNode's --node-config names the site's privacy settings flat: PrivacyConfig's fields in kebab case, with
# `dp` for `enabled`; not popularity_noise, a release of centralized training only.
NODE_PRIVACY_KEYS = {("dp" if f.name == "enabled" else f.name.replace("_", "-")): f.name for f in fields(PrivacyConfig)
                     if f.name != "popularity_noise"}


class SiteStartError(ValueError):
    """The site cannot take part as configured (no trainable users, too few for DP); it says what to change."""


@dataclass
class SiteConfig:
    """Everything a site decides for itself; the server never dictates noise, clipping or budget."""

    data_path: str  # (str) the site's events file (or folder, for folder-based formats)
    catalog_path: str  # (str) the public catalog.json shared by every party
    state_dir: str  # (str) where the ledger, the preprocessing cache and round replies live
    data_format: str = "events"  # (str) adapter: events, movielens, s3rec or tianchi
    # (PrivacyConfig) the site's own DP settings: DP on, ε its total budget over all rounds per user, δ None =
    # default_delta(its users), σ None = calibrated so ε lasts all planned rounds, the accountant fixed for life
    privacy: PrivacyConfig = field(default_factory=lambda: PrivacyConfig(enabled=True))
    device: str = "auto"  # (str) auto (CUDA when present), cpu or cuda
    min_events: int = 3  # (int) users with fewer events are dropped (counted)
    micro_batch_tokens: int = 8192  # (int) padded positions per micro-batch (bounds this site's memory; fewer where
    # their scores over the catalog would pass 2^28 floats)
    micro_batch_users: int = 128  # (int) DP in hooks mode: users per micro-batch (Opacus' per-user gradients)
    cache_keep: int = 3  # (int) preprocessing caches and frozen-tensor copies kept, each kind: the latest used
    min_users: int = MIN_USERS  # (int) fewer trainable users and the site refuses DP training (δ, noise vs signal)
    max_model_parameters: int = MAX_MODEL_PARAMETERS  # (int) largest global model (weights + buffers) it builds
    max_plan_steps: int = MAX_PLAN_STEPS  # (int) most steps it plans: all rounds' under DP, one round's without

    def __post_init__(self) -> None:
        if self.cache_keep < 1:
            raise ValueError(f"site cache_keep must be at least 1 (the copy in use), got {self.cache_keep}")
        if min(self.min_users, self.max_model_parameters, self.max_plan_steps) < 1:
            raise ValueError(f"site min_users={self.min_users}, max_model_parameters={self.max_model_parameters} "
                             f"and max_plan_steps={self.max_plan_steps} must be at least 1")
        if self.privacy.popularity_noise:  # its ledger records the rounds' steps only, never such a release
            raise ValueError("privacy.popularity_noise is a release for centralized training (fedrec-centralized, "
                             "or fedrec-simulate federation.mode=local); a federation's sites do not make it")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SiteConfig:
        """Parse a SuperNode's `--node-config` (kebab-case keys) once, with a clear error for missing keys."""
        missing = [k for k in ("data-path", "catalog-path", "state-dir") if k not in node_config]
        if missing:
            raise ValueError(f"node config is missing {missing}; start the SuperNode with --node-config "
                             "\"data-path='...' catalog-path='...' state-dir='...'\"")
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__ if f != "privacy"}
        unknown = sorted(set(node_config) - set(known) - set(NODE_PRIVACY_KEYS) - {"partition-id", "num-partitions"})
        if unknown:
            raise ValueError(f"unknown node config keys {unknown}; known: {sorted({*known, *NODE_PRIVACY_KEYS})}")
        values = {known[k]: v for k, v in node_config.items() if k in known}
        privacy: dict[str, object] = {"enabled": True}
        privacy.update({NODE_PRIVACY_KEYS[k]: v for k, v in node_config.items() if k in NODE_PRIVACY_KEYS})
        for optional in ("delta", "noise_multiplier"):  # TOML has no null: "" or 0 means "not set"
            if privacy.get(optional) in ("", 0, 0.0):
                privacy[optional] = None
        return cls(**values, privacy=PrivacyConfig(**privacy))  # type: ignore[arg-type]

    def node_config(self) -> dict[str, TomlValue]:
        """The settings as a SuperNode's --node-config (kebab case, privacy flat; unset values left out)."""
        values = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if f.name != "privacy"}
        values.update({key: getattr(self.privacy, name) for key, name in NODE_PRIVACY_KEYS.items()})
        return {key: value for key, value in values.items() if value is not None}

    def open_ledger(self, num_users: int) -> PrivacyLedger:
        """The site's ledger at its accountant and δ, checked against its identity (enrolled on first use); call
        holding site_lock."""
        return open_site_ledger(self.state_dir, self.privacy.accountant, self.privacy.delta, num_users,
                                dp=self.privacy.enabled)

    def round_privacy(self, delta: float, noise_multiplier: float | None = None) -> PrivacyConfig:
        """The site's DP-SGD settings for one round at its δ (σ: the planned one, else the site's fixed one)."""
        sigma = noise_multiplier if noise_multiplier is not None else self.privacy.noise_multiplier
        return replace(self.privacy, delta=delta, noise_multiplier=sigma)

    @property
    def ledger_path(self) -> Path:
        """The site's privacy ledger."""
        return Path(self.state_dir) / "privacy_ledger.json"


@dataclass
class SiteData:
    """The site's public catalog and its users' sequences."""

    catalog: ItemCatalog
    sequences: UserSequences  # its `dropped` counts what preprocessing filtered


def check_site_start(site: SiteConfig, data: SiteData, lock_timeout_s: float = START_LOCK_TIMEOUT_S) -> str:
    """Refuse at start what would fail or be unsafe at round 1: no trainable users, fewer than `min_users` under
    DP, a ledger that does not fit its state dir, a δ not below 1/#users. Enrols a new site. Returns a summary."""
    check_users(site, data)
    with site_lock(site.state_dir, lock_timeout_s):
        ledger = site.open_ledger(len(data.sequences))
    return (f"site {ledger.site_id} (ledger {ledger.path}: {len(ledger.entries)} rounds recorded, δ = "
            f"{ledger.delta:.3g})")


def check_users(site: SiteConfig, data: SiteData) -> None:
    """SiteStartError for a site with no trainable users, or under DP fewer than `min_users`."""
    trainable = len(data.sequences.trainable_users())
    if trainable == 0:
        raise SiteStartError(f"{site.data_path}: no trainable users: {len(data.sequences)} users after filtering "
                             f"(dropped: {data.sequences.dropped or 'nothing'}), none with the 4+ events a training "
                             "row needs; this site cannot take part")
    if site.privacy.enabled and trainable < site.min_users:
        raise SiteStartError(f"{site.data_path}: {trainable} trainable users, below this site's min_users="
                             f"{site.min_users} (--min-users) for DP training: with so few users the noise that "
                             "protects each one drowns what they could teach the model, and δ must stay below "
                             "1/#users. Pool data with another site, or run without DP only if no privacy claim "
                             "is needed")


DIGEST_MEMO = "data_digest.json"  # in the state dir: the events' SHA-256 and the file facts it was taken at


def data_digest(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """SHA-256 of the data's content, streamed: a file's bytes, or a folder's files (relative names and bytes).

    With `memo_dir` (the site's state dir), the digest is kept there with each file's device, inode, size,
    modification and change times, and read back while they all match: hashing takes seconds a gigabyte, and in
    deployment every message is a new process that needs the digest (it keys the cached sequences). Any write to
    a file moves its change time, which a user cannot set back (short of the system clock), so a file that
    changed is hashed again. No memo is kept while a file changed less than RACY_NS before it was hashed: a
    second write within the same timestamp tick (Linux advances file times in ticks of a few ms) and of the same
    size would keep every fact."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    names = [str(file.relative_to(root)) if root.is_dir() else "" for file in files]
    facts = _file_facts(root, files, names)
    memo = Path(memo_dir) / DIGEST_MEMO if memo_dir is not None else None
    if memo is not None:
        try:
            kept = json.loads(memo.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            kept = None  # none yet, or damaged: hashed again and rewritten
        if isinstance(kept, dict) and kept.get("facts") == facts and isinstance(kept.get("digest"), str):
            return kept["digest"]
    started, digest = time.time_ns(), hashlib.sha256()
    for file, name in zip(files, names, strict=True):
        digest.update(f"{name}|{file.stat().st_size}|".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    settled = all(changed_ns < started - RACY_NS for *_, changed_ns in facts[1:])  # as FileMemo keeps values
    if memo is not None and settled and _file_facts(root, files, names) == facts:  # nor written to while read
        memo.parent.mkdir(parents=True, exist_ok=True)
        # A cache: a damaged memo is hashed again, so it is not synced to disk (shared_model.atomic)
        write_text_atomically(memo, json.dumps({"facts": facts, "digest": digest.hexdigest()}), durable=False)
    return digest.hexdigest()


def _file_facts(root: Path, files: list[Path], names: list[str]) -> list:
    """What a digest memo is valid for: the data's path, and each file's name, device, inode, size, modification
    and change times (ns)."""
    return [str(root.resolve())] + [[name, *file_identity(file)] for file, name in zip(files, names, strict=True)]


def file_identity(path: Path) -> tuple[int, int, int, int, int]:
    """A file's device, inode, size, modification and change times (ns): any write changes the change time,
    which nobody can set back short of the system clock."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _cache_key(site: SiteConfig, catalog: ItemCatalog, num_time_buckets: int) -> str:
    """Changes whenever the data's content, the catalog or the preprocessing settings change."""
    parts = [str(CACHE_VERSION), data_digest(site.data_path, site.state_dir), site.data_format, catalog.fingerprint,
             str(site.min_events), str(num_time_buckets)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


# A file changed less than this before it was read could change again within the same timestamp tick (a second
# or two on some file systems) and keep its identity: FileMemo does not keep what it read from it.
RACY_NS = 3 * 10**9
IN_USE_TOUCH_S = 60  # mark_in_use touches a file at most this often


class FileMemo:
    """What a long-lived process read from files, kept in memory while each file is unchanged.

    A simulated sites' worker answers many messages of many sites, and every message needs the catalog, the
    site's cached sequences and its frozen tensors (a deployed site's process answers one message and reads each
    once). A value is kept with its file's identity (file_identity) and served while a stat of the file finds the
    same, so an edited, replaced or damaged file is read (and checked) again; a file
    changed within RACY_NS before it was read is not kept, since a second change within the same timestamp tick
    would not show. At most `max_bytes` of values and `max_entries` files are kept, the least recently used
    dropped first."""

    def __init__(self, max_bytes: int, max_entries: int = 1024) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.bytes = 0  # of the values kept
        self.entries: OrderedDict[str, tuple[tuple[int, int, int, int, int], Any, int]] = OrderedDict()

    def read(self, path: Path, reader: Callable[[Path], T], nbytes: Callable[[T], int]) -> T:
        """`reader(path)`, or what it returned before while the file is unchanged. Whatever `reader` raises
        (a missing or damaged file) is raised and nothing is kept."""
        key = str(path)
        try:
            identity = file_identity(path)
        except OSError:
            return reader(path)  # which names the file and what is wrong with it
        if (entry := self.entries.get(key)) is not None and entry[0] == identity:
            self.entries.move_to_end(key)
            return cast(T, entry[1])
        started = time.time_ns()
        value = reader(path)
        if (old := self.entries.pop(key, None)) is not None:
            self.bytes -= old[2]
        size = nbytes(value)
        changed_ns = identity[4]
        if changed_ns < started - RACY_NS and size <= self.max_bytes:
            self.entries[key] = (identity, value, size)
            self.bytes += size
            while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
                self.bytes -= self.entries.popitem(last=False)[1][2]
        return value


def mark_in_use(path: Path) -> None:
    """Touch a file a site uses (keep_latest removes the least recently used), at most once every
    IN_USE_TOUCH_S: a touch moves the change time, so a FileMemo reads the file again after it."""
    if time.time() - path.stat().st_mtime > IN_USE_TOUCH_S:
        path.touch()


# The catalog (simulated sites share one file; Beauty's 12,101 items take 7.6 ms to read and check) and the
# sites' cached sequences (about 1 ms each for the demo's sites) a process keeps; BENCHMARKS.md, "Many simulated
# sites". The bounds count the arrays' bytes (the catalog at 100 bytes an item).
CATALOGS = FileMemo(max_bytes=256 * 2**20)
SEQUENCES = FileMemo(max_bytes=256 * 2**20)


def load_catalog(path: str | Path) -> ItemCatalog:
    """ItemCatalog.load, kept in memory while the file is unchanged (CATALOGS)."""
    path = Path(path)
    return CATALOGS.read(path / CATALOG_FILE if path.is_dir() else path, ItemCatalog.load,
                         lambda catalog: 100 * len(catalog.item_ids))


def load_site_data(site: SiteConfig, num_time_buckets: int = 32) -> SiteData:
    """The site's sequences, from the cache when it is current and intact, else parsed and cached."""
    catalog = load_catalog(site.catalog_path)
    cache = Path(site.state_dir) / f"sequences_{_cache_key(site, catalog, num_time_buckets)}.npz"
    if cache.exists():
        try:
            seqs = SEQUENCES.read(cache, _read_cache, UserSequences.nbytes)
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
            log.warning("%s: preprocessing cache is damaged (%s: %s); removed it, rebuilding from %s", cache,
                        type(err).__name__, err, site.data_path)
            cache.unlink(missing_ok=True)
        else:
            mark_in_use(cache)
            return SiteData(catalog, seqs)
    from shared_model.adapters import load_dataset  # pandas: only to parse events, never for a cached site

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
    """The sequences cache; not synced to disk (shared_model.atomic): a damaged one is rebuilt (load_site_data)."""
    meta = json.dumps({"user_ids": seqs.user_ids, "regions": seqs.regions, "merchants": seqs.merchants,
                       "dropped": seqs.dropped})
    write_atomically(path, lambda out: np.savez(out, offsets=seqs.offsets, items=seqs.items,
                                                event_types=seqs.event_types, time_buckets=seqs.time_buckets,
                                                meta=np.array(meta)), durable=False)


def _read_cache(path: Path) -> UserSequences:
    with np.load(path) as arrays:
        meta = json.loads(str(arrays["meta"]))
        seqs = UserSequences(user_ids=meta["user_ids"], offsets=arrays["offsets"], items=arrays["items"],
                             event_types=arrays["event_types"], time_buckets=arrays["time_buckets"],
                             regions=meta["regions"], merchants=meta["merchants"], dropped=meta["dropped"])
    for values in (seqs.offsets, seqs.items, seqs.event_types, seqs.time_buckets):
        values.flags.writeable = False  # kept in memory and shared by the messages a process answers (SEQUENCES)
    return seqs


def site_delta(site: SiteConfig, data: SiteData) -> float:
    """The site's δ: configured, or default_delta of its number of users (a DP site's ledger keeps the δ it
    started with: fl_client.dp.enrolment)."""
    return resolve_delta(site.privacy, len(data.sequences))

"""Splitting users into simulated data sites: natural (region / merchant), Dirichlet, or iid.

Partitions are over users, never over events, so each site holds whole user histories and the per-user DP
unit is preserved. flwr-datasets' partitioners do the assignment on a small table of users.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

from shared_model.catalog import ItemCatalog
from shared_model.sequences import UserSequences


@dataclass
class PartitionConfig:
    """How users are spread over sites."""

    kind: str = "natural"  # (str) natural, dirichlet or iid
    by: str = "region"  # (str) natural: region or merchant; dirichlet: region, merchant or attribute
    num_partitions: int = 3  # (int) sites for dirichlet and iid (natural: one site per distinct value)
    alpha: float = 0.5  # (float) Dirichlet concentration: smaller is more skewed
    min_partition_size: int = 10  # (int) Dirichlet: resample until every site has this many users
    seed: int = 0  # (int) seed of the assignment


def user_keys(seqs: UserSequences, by: str, catalog: ItemCatalog | None = None) -> list[str]:
    """Per-user value of the partition key: region, merchant, or most frequent catalog attribute."""
    if by == "region" and seqs.regions:
        return list(seqs.regions)
    if by == "merchant" and seqs.merchants:
        return list(seqs.merchants)
    if by == "attribute" and catalog is not None and catalog.attributes:
        return [top_attribute(seqs, u, catalog) for u in range(len(seqs))]
    raise ValueError(f"cannot partition by {by!r}: the data has no such per-user key "
                     "(region and merchant need those columns; attribute needs catalog attributes)")


def top_attribute(seqs: UserSequences, user: int, catalog: ItemCatalog) -> str:
    """The catalog attribute most frequent in a user's training history ("none" when items have none)."""
    start, end = int(seqs.offsets[user]), int(seqs.offsets[user + 1])
    counts: Counter[str] = Counter()
    for row in seqs.items[start:end - 2]:
        counts.update(catalog.attributes.get(catalog.item_id(int(row)), []))
    return counts.most_common(1)[0][0] if counts else "none"


def build_partitioner(config: PartitionConfig) -> Partitioner:
    """The flwr-datasets partitioner for a config."""
    match config.kind:
        case "natural":
            return NaturalIdPartitioner(partition_by="key")
        case "dirichlet":
            return DirichletPartitioner(num_partitions=config.num_partitions, partition_by="key", alpha=config.alpha,
                                        min_partition_size=config.min_partition_size, seed=config.seed)
        case "iid":
            return IidPartitioner(num_partitions=config.num_partitions)
        case _:
            raise ValueError(f"partition.kind must be natural, dirichlet or iid, got {config.kind!r}")


def partition_users(seqs: UserSequences, config: PartitionConfig,
                    catalog: ItemCatalog | None = None) -> list[np.ndarray]:
    """User indices of each site; every user lands in exactly one site."""
    keys = user_keys(seqs, config.by, catalog) if config.kind != "iid" else ["all"] * len(seqs)
    table = Dataset.from_dict({"user": np.arange(len(seqs)), "key": keys})
    if config.kind == "dirichlet":
        table = table.class_encode_column("key")
    if config.kind == "iid":
        table = table.shuffle(seed=config.seed)
    partitioner = build_partitioner(config)
    partitioner.dataset = table
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the natural partitioner's progress bar (tqdm, not optional)
            parts = [np.sort(np.asarray(partitioner.load_partition(i)["user"], dtype=np.int64))
                     for i in range(partitioner.num_partitions)]
    except ValueError as err:
        # flwr-datasets draws a Dirichlet split again until every site has min_partition_size users, then gives up
        # naming only alpha; any other error stands as raised
        if config.kind != "dirichlet" or "attempts" not in str(err):
            raise
        raise ValueError(f"partition: no Dirichlet split (alpha {config.alpha}) of {len(seqs):,} users gave each "
                         f"of {config.num_partitions:,} sites partition.min_partition_size={config.min_partition_size}"
                         f" users ({len(seqs) / config.num_partitions:,.1f} users a site on average); "
                         f"lower partition.min_partition_size, raise partition.alpha or use fewer sites "
                         f"(flwr-datasets: {err})") from err
    assigned = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(assigned) != len(seqs) or len(np.unique(assigned)) != len(seqs):
        raise RuntimeError(f"partitioning assigned {len(assigned)} rows for {len(seqs)} users")
    return parts

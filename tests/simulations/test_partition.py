"""Users (never events) are split over sites: natural by region/merchant, Dirichlet-skewed, or iid."""

import numpy as np
import pytest

from shared_model.catalog import ItemCatalog
from shared_model.sequences import to_user_sequences
from simulations.partition import PartitionConfig, partition_users
from simulations.synthetic import generate_events


@pytest.fixture(scope="module")
def data():
    log = generate_events(num_users=400, num_items=80, num_regions=4, num_merchants=6, seed=1)
    catalog = ItemCatalog.from_events(log.frame)
    return to_user_sequences(log, catalog), catalog


def assert_exact_cover(parts, num_users):
    users = np.concatenate(parts)
    assert len(users) == num_users and len(np.unique(users)) == num_users


def test_natural_partition_gives_one_site_per_region(data):
    seqs, _ = data
    parts = partition_users(seqs, PartitionConfig(kind="natural", by="region"))
    assert len(parts) == len(set(seqs.regions)) == 4
    assert_exact_cover(parts, len(seqs))
    for part in parts:
        assert len({seqs.regions[u] for u in part}) == 1


def test_dirichlet_partition_is_skewed_and_seeded(data):
    seqs, _ = data
    config = PartitionConfig(kind="dirichlet", by="merchant", num_partitions=5, alpha=0.1, min_partition_size=5)
    parts = partition_users(seqs, config)
    assert len(parts) == 5
    assert_exact_cover(parts, len(seqs))
    shares = [max(np.unique([seqs.merchants[u] for u in p], return_counts=True)[1]) / len(p) for p in parts]
    assert np.mean(shares) > 0.4  # with alpha 0.1 most sites are dominated by one merchant (6 in all)
    again = partition_users(seqs, config)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_a_dirichlet_split_no_draw_can_give_names_the_sizes_and_the_settings(data):
    seqs, _ = data  # 400 users over 50 sites is 8 a site: 20 each is impossible, whatever is drawn
    config = PartitionConfig(kind="dirichlet", by="merchant", num_partitions=50, alpha=0.5, min_partition_size=20)
    expected = (r"400 users .* 50 sites partition.min_partition_size=20 users .*\(8.0 users a site"
                r".*lower partition.min_partition_size, raise partition.alpha")
    with pytest.raises(ValueError, match=expected):
        partition_users(seqs, config)


def test_iid_partition_has_equal_sizes(data):
    seqs, _ = data
    parts = partition_users(seqs, PartitionConfig(kind="iid", num_partitions=3))
    assert_exact_cover(parts, len(seqs))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_attribute_key_and_missing_keys(data):
    seqs, catalog = data
    with pytest.raises(ValueError, match="attribute"):
        partition_users(seqs, PartitionConfig(kind="natural", by="attribute"), catalog)
    catalog.attributes = {item: [item[:2]] for item in catalog.item_ids}
    parts = partition_users(seqs, PartitionConfig(kind="dirichlet", by="attribute", num_partitions=2,
                                                  min_partition_size=5), catalog)
    assert_exact_cover(parts, len(seqs))
    with pytest.raises(ValueError, match="kind"):
        partition_users(seqs, PartitionConfig(kind="round-robin"))

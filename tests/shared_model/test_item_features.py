"""Public item features: attribute multi-hot and PCA reduction are deterministic and keep structure."""

import pytest
import torch

from shared_model.catalog import ItemCatalog
from shared_model.item_features import attribute_matrix, item_feature_table, reduce_dim


@pytest.fixture
def catalog() -> ItemCatalog:
    attributes = {"a": ["brand1", "lips"], "b": ["brand1", "lips"], "c": ["brand2", "hair"], "d": ["brand2"]}
    return ItemCatalog.from_items(["a", "b", "c", "d", "e"], attributes=attributes)


def test_attribute_matrix_rows_follow_the_catalog(catalog):
    matrix = attribute_matrix(catalog)
    assert matrix.shape == (6, 4)  # padding + 5 items, 4 distinct attributes
    assert matrix[0].abs().sum() == 0 and matrix[5].abs().sum() == 0  # padding and item "e" (no attributes)
    assert torch.allclose(matrix[1], matrix[2]) and torch.allclose(matrix[1].norm(), torch.tensor(1.0))


def test_reduced_features_keep_equal_items_equal_and_are_deterministic(catalog):
    table = item_feature_table(catalog, ["attributes"], dim=3)
    assert table.shape == (6, 3)
    assert torch.allclose(table[1], table[2])
    assert not torch.allclose(table[1], table[3])
    assert table[5].abs().sum() == 0
    assert torch.equal(table, item_feature_table(catalog, ["attributes"], dim=3))


def test_reduce_dim_pads_when_asking_for_more_components_than_exist():
    assert reduce_dim(torch.eye(3), 8).shape == (3, 8)


def test_unknown_or_missing_sources_are_refused(catalog):
    with pytest.raises(ValueError, match="subset"):
        item_feature_table(catalog, ["pictures"], dim=2)
    with pytest.raises(ValueError, match="titles"):
        item_feature_table(catalog, ["text"], dim=2)

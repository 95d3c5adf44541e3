"""Public item features for the model: title embeddings and catalog attributes, reduced to a few dimensions.

Everything here is computed from the public catalog alone, so every party derives the same table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from shared_model.catalog import ItemCatalog

FEATURE_SOURCES: tuple[str, ...] = ("text", "attributes")


def attribute_matrix(catalog: ItemCatalog) -> torch.Tensor:
    """Multi-hot (num_rows, #attributes) matrix, each item row L2-normalised; padding row 0 is zero."""
    vocabulary = sorted({a for attrs in catalog.attributes.values() for a in attrs})
    column = {a: j for j, a in enumerate(vocabulary)}
    matrix = torch.zeros(catalog.num_rows, len(vocabulary))
    for row, item in enumerate(catalog.item_ids, start=1):
        for attribute in catalog.attributes.get(item, []):
            matrix[row, column[attribute]] = 1.0
    return F.normalize(matrix, dim=1)


def reduce_dim(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """Top-`dim` principal components of the item rows (exact SVD, deterministic), rows L2-normalised."""
    items = matrix[1:].double()
    centred = items - items.mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    reduced = (u[:, :dim] * s[:dim]).float()  # (V-1, dim)
    if reduced.shape[1] < dim:
        reduced = F.pad(reduced, (0, dim - reduced.shape[1]))
    reduced = F.normalize(reduced, dim=1) * (items.abs().sum(1, keepdim=True) > 0)  # featureless items stay 0
    return torch.cat([torch.zeros(1, dim), reduced.float()])


def item_feature_table(catalog: ItemCatalog, sources: Sequence[str], dim: int,
                       cache_dir: str | Path | None = None) -> torch.Tensor:
    """(num_rows, dim) features from the chosen public sources ('text' titles, catalog 'attributes')."""
    unknown = set(sources) - set(FEATURE_SOURCES)
    if unknown or not sources:
        raise ValueError(f"item feature sources must be a non-empty subset of {FEATURE_SOURCES}, got {list(sources)}")
    parts = []
    if "text" in sources:
        if not catalog.titles:
            raise ValueError("item features 'text' need item titles, and this catalog has none")
        from shared_model.text import item_text_table  # loads the MiniLM encoder only when used

        parts.append(item_text_table(catalog, cache_dir=cache_dir))
    if "attributes" in sources:
        if not catalog.attributes:
            raise ValueError("item features 'attributes' need catalog attributes, and this catalog has none")
        parts.append(attribute_matrix(catalog))
    return reduce_dim(torch.cat(parts, dim=1), dim)

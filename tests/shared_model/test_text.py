"""Item-text features from the packaged all-MiniLM-L6-v2: offline, normalised, semantically ordered, cached."""

import torch

from shared_model.catalog import ItemCatalog
from shared_model.text import TEXT_DIM, encode_texts, item_text_table


def test_similar_titles_embed_closer_than_unrelated_ones():
    vectors = encode_texts(["red lipstick matte", "matte lipstick in red", "stainless steel frying pan"])
    assert vectors.shape == (3, TEXT_DIM)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_item_text_table_follows_catalog_rows_and_is_cached(tmp_path):
    catalog = ItemCatalog.from_items(["b", "a", "c"], titles={"a": "toy robot", "c": "garden hose"})
    table = item_text_table(catalog, cache_dir=tmp_path)
    assert table.shape == (4, TEXT_DIM)
    assert table[0].abs().sum() == 0 and table[2].abs().sum() == 0  # padding and the untitled item "b"
    assert torch.allclose(table[1], encode_texts(["toy robot"])[0], atol=1e-5)
    cached = list(tmp_path.glob("item_text_*.pt"))
    assert len(cached) == 1
    torch.save(torch.full((4, TEXT_DIM), 7.0), cached[0])
    assert item_text_table(catalog, cache_dir=tmp_path)[1, 0] == 7.0  # read back, not recomputed

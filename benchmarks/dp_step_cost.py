"""The cost of a DP-SGD step against the non-private step, on the same batches of users (issue: scale and speed).

python benchmarks/dp_step_cost.py [--steps K] [--repeats R] [--modes M,...] [HYDRA OVERRIDES of fedrec-centralized]
e.g.   python benchmarks/dp_step_cost.py +experiment=beauty train.batch_size=256
       python benchmarks/dp_step_cost.py data.synthetic.num_items=100000 train.device=cuda

Builds fedrec-centralized's data and model from the overrides, draws K fixed batches of train.batch_size users,
and times one optimiser step per batch for each way of training: non-private as fedrec trains (length-sorted
micro-batches, fl_client.train.plain_step), non-private on the whole batch padded to its longest user (how it
trained before 2026-12-06), DP with book-keeping (fl_client.dp.bookkeeping, the default) and DP with Opacus'
hooks (every user's gradient formed). Every variant starts from the same weights and sees the same users; DP
steps clip and noise as a site does (fl_client.dp.step.private_step, micro-batches included) but skip Poisson
sampling, so the batches match. The order of the variants rotates over R repeats and the median per step is
reported, with the ratio to the non-private step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fl_client.dp.engine import PrivacyConfig, make_private
from fl_client.dp.step import private_step
from fl_client.train import TrainConfig, build_optimizer, plain_step, user_loader
from shared_model.device import describe_device, resolve_device
from shared_model.factory import ModelConfig
from shared_model.modeling_fedrec import sequence_loss
from shared_model.sequences import make_batch
from simulations.config import register_schemas
from simulations.prepare import PreparedData, build_model, prepare_data

NON_PRIVATE, ONE_BATCH = "non-private", "non-private, one padded batch"
VARIANTS = [NON_PRIVATE, ONE_BATCH, "bookkeeping", "hooks"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(mode: str, model_cfg: ModelConfig, data: PreparedData, batches: list[list[int]],
                train_cfg: TrainConfig, device: torch.device) -> tuple[list[float], float]:
    """Seconds of each step (after one warm-up step) and the peak accelerator memory in MiB (0 on CPU)."""
    torch.manual_seed(0)
    model = build_model(model_cfg, data).to(device).train()
    optimizer = build_optimizer(model, train_cfg)
    private = mode not in (NON_PRIVATE, ONE_BATCH)
    privacy = PrivacyConfig(enabled=private, grad_sample_mode=mode if private else "bookkeeping")
    if private:
        loader = user_loader(np.arange(len(data.sequences)), train_cfg.batch_size, torch.Generator().manual_seed(0))
        _engine, step_model, optimizer, _loader = make_private(model, optimizer, loader, privacy, 1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for i, users in enumerate(batches):
        synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if private:
            private_step(step_model, model, data.sequences, users, optimizer, privacy, train_cfg, device)
        elif mode == NON_PRIVATE:
            plain_step(model, data.sequences, users, optimizer, train_cfg, device)
        else:
            inputs = {k: v.to(device) for k, v in make_batch(data.sequences, users, "train",
                                                             model.config.max_len).items()}
            sequence_loss(model, inputs).backward()
            optimizer.step()
        synchronize(device)
        if i:  # the first step warms up (allocations, Opacus' hooks)
            seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and repeat (plus a warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the variants, in rotating order")
    parser.add_argument("--modes", default="bookkeeping,hooks",
                        help="DP modes to time against the non-private steps, comma-separated")
    args, overrides = parser.parse_known_args()
    variants = [v for v in VARIANTS if v in (NON_PRIVATE, ONE_BATCH) or v in args.modes.split(",")]
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")  # hook and RNG notices, per variant
    register_schemas()
    with initialize_config_module(config_module="simulations.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="centralized", overrides=[*overrides, "output_dir=."]))
    train_cfg = TrainConfig(**asdict(cfg.train))
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    device = resolve_device(train_cfg.device)
    data = prepare_data(cfg.data)
    users = data.sequences.trainable_users()
    rng = np.random.default_rng(0)
    batches = [rng.choice(users, size=min(train_cfg.batch_size, len(users)), replace=False).tolist()
               for _ in range(args.steps + 1)]
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, float] = {}
    for repeat in range(args.repeats):
        for mode in variants[repeat % len(variants):] + variants[:repeat % len(variants)]:
            seconds, peak = run_variant(mode, cfg.model, data, batches, train_cfg, device)
            times[mode] += seconds
            peaks[mode] = max(peaks.get(mode, 0.0), peak)
    median = {v: statistics.median(s) for v, s in times.items()}
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{describe_device(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"data: {cfg.data.name}, {len(data.sequences)} users, {data.catalog.num_rows} item rows; batch "
          f"{train_cfg.batch_size} users, max_len {cfg.model.max_len}, hidden {cfg.model.hidden_size}, item table "
          f"{'tied' if cfg.model.tie_item_embeddings else 'untied'}; {args.steps} steps x {args.repeats} repeats; "
          f"overrides: {' '.join(overrides) or '(none)'}\n")
    print("| step | s/step (median) | × non-private | peak MiB |")
    print("|---|---|---|---|")
    for mode in variants:
        peak = f"{peaks[mode]:.0f}" if device.type == "cuda" else "-"
        print(f"| {mode} | {median[mode]:.3f} | {median[mode] / median[NON_PRIVATE]:.2f} | {peak} |")


if __name__ == "__main__":
    main()

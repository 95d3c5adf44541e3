"""The cost of a DP-SGD step against the non-private step, on the same batches of users (issue: scale and speed).

python benchmarks/dp_step_cost.py [--steps K] [--repeats R] [HYDRA OVERRIDES of fedrec-centralized ...]
e.g.   python benchmarks/dp_step_cost.py +experiment=beauty train.batch_size=256
       python benchmarks/dp_step_cost.py data.synthetic.num_items=100000 train.device=cuda

Builds fedrec-centralized's data and model from the overrides, draws K fixed batches of train.batch_size users,
and times one optimiser step per batch for each way of training: non-private, Opacus hooks (per-user gradients
materialised; tied or untied item table) and Opacus ghost clipping (per-user norms only; untied table). Every
variant starts from the same weights and sees the same users; DP steps clip and noise as a site does
(fl_client.dp.step.private_step, micro-batches included) but skip Poisson sampling, so the batches match. The
order of the variants rotates over R repeats and the median per step is reported, with the ratio to the
non-private step of the same model (tied or untied) and to the tied non-private step (what fedrec trains
without DP today).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, replace

import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from fl_client.dp.engine import PrivacyConfig, make_private
from fl_client.dp.step import private_step
from fl_client.train import TrainConfig, build_optimizer, user_loader
from shared_model.device import describe_device, resolve_device
from shared_model.factory import ModelConfig
from shared_model.modeling_fedrec import sequence_loss
from shared_model.sequences import make_batch
from simulations.config import register_schemas
from simulations.prepare import PreparedData, build_model, prepare_data

VARIANTS = [("non-private", True), ("non-private", False), ("hooks", True), ("hooks", False), ("ghost", False)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(mode: str, tie: bool, model_cfg: ModelConfig, data: PreparedData, batches: list[list[int]],
                train_cfg: TrainConfig, device: torch.device) -> tuple[list[float], float]:
    """Seconds of each step (after one warm-up step) and the peak accelerator memory in MiB (0 on CPU)."""
    torch.manual_seed(0)
    model = build_model(replace(model_cfg, tie_item_embeddings=tie), data).to(device).train()
    optimizer = build_optimizer(model, train_cfg)
    step_model: torch.nn.Module = model
    privacy = PrivacyConfig(enabled=mode != "non-private", grad_sample_mode=mode if mode != "non-private" else "hooks")
    if privacy.enabled:
        loader = user_loader(np.arange(len(data.sequences)), train_cfg.batch_size, torch.Generator().manual_seed(0))
        _engine, step_model, optimizer, _loader = make_private(model, optimizer, loader, privacy, 1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for i, users in enumerate(batches):
        synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if privacy.enabled:
            private_step(step_model, model, data.sequences, users, optimizer, privacy, train_cfg, device)
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
    args, overrides = parser.parse_known_args()
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
    times: dict[tuple[str, bool], list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[tuple[str, bool], float] = {}
    for repeat in range(args.repeats):
        for mode, tie in VARIANTS[repeat % len(VARIANTS):] + VARIANTS[:repeat % len(VARIANTS)]:
            seconds, peak = run_variant(mode, tie, cfg.model, data, batches, train_cfg, device)
            times[(mode, tie)] += seconds
            peaks[(mode, tie)] = max(peaks.get((mode, tie), 0.0), peak)
    median = {v: statistics.median(s) for v, s in times.items()}
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{describe_device(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"data: {cfg.data.name}, {len(data.sequences)} users, {data.catalog.num_rows} item rows; batch "
          f"{train_cfg.batch_size} users, max_len {cfg.model.max_len}, hidden {cfg.model.hidden_size}; "
          f"{args.steps} steps x {args.repeats} repeats; overrides: {' '.join(overrides) or '(none)'}\n")
    print("| step | item table | s/step (median) | × non-private, same table | × non-private, tied | peak MiB |")
    print("|---|---|---|---|---|---|")
    for mode, tie in VARIANTS:
        same = median[(mode, tie)] / median[("non-private", tie)]
        tied = median[(mode, tie)] / median[("non-private", True)]
        peak = f"{peaks[(mode, tie)]:.0f}" if device.type == "cuda" else "-"
        print(f"| {mode} | {'tied' if tie else 'untied'} | {median[(mode, tie)]:.3f} | {same:.2f} | {tied:.2f} "
              f"| {peak} |")


if __name__ == "__main__":
    main()

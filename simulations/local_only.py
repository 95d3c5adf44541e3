"""The local-only baseline: every site trains its own model on its own users, alone, and is scored on its own
held-out events; the user-weighted average over sites is what federating has to beat.

Same partition, model, optimiser and privacy as the federated run: a site trains for num_rounds × local_epochs
epochs (the epochs it would train in the federation) under its own (ε, δ = 1/#site users by default) budget.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_client.dp.settings import PrivacyConfig
from fl_client.train import TrainConfig, train
from fl_server.initial_model import load_initial_model
from shared_model.device import resolve_device
from shared_model.factory import ModelConfig
from shared_model.metrics import (
    SECOND_MOMENT,
    evaluate_model,
    evaluate_popularity,
    with_error,
    with_standard_errors,
)
from shared_model.privacy_claim import privacy_claim
from simulations.prepare import PreparedData, build_model

log = logging.getLogger(__name__)
METRIC_KEYS = ("hr@5", "ndcg@5", "mrr@5", "hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20", "mrr")


@dataclass
class SiteResult:
    """One site trained alone: its size, its own test metrics, what it spent and what it cost."""

    site: int
    users: int
    test: dict[str, float]
    popularity_test: dict[str, float]  # the site's own popularity (its training-part counts)
    epsilon: float | None  # None when DP was off
    delta: float | None
    seconds: float
    peak_memory_mb: float  # the process' peak so far (CPU: resident set), not this site's alone
    kept_start: bool = False  # the initial model scored higher on the site's validation events than its training


def train_site(index: int, data: PreparedData, users: np.ndarray, model_cfg: ModelConfig, train_cfg: TrainConfig,
               privacy: PrivacyConfig, cache_dir: str, initial_model: str = "") -> SiteResult:
    """Train a model on one site's users only (fresh, or from `initial_model`, an exported model directory, as
    the federation would start) and score it on their test events. From an initial model the site keeps that
    model when its training scores lower on the site's validation events, as the federation keeps its
    starting model as the best round (the ε of the training is spent either way)."""
    seqs = data.sequences.subset(users)
    device = resolve_device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)  # every site starts from the same initial weights, as in the federation
    model = build_model(model_cfg, data, cache_dir=cache_dir)
    start: tuple[float, dict[str, torch.Tensor]] | None = None
    if initial_model:
        load_initial_model(model, data.catalog, initial_model)
        start = (evaluate_model(model, seqs, "valid", device=device)["ndcg@10"],
                 {k: v.detach().clone() for k, v in model.state_dict().items()})
    result = train(model, seqs, replace(train_cfg, seed=site_seed(train_cfg.seed, index)), privacy)
    kept_start = False
    # `not >=`: a training that diverged (NaN scores) counts as scoring below the start.
    if start is not None and not evaluate_model(model, seqs, "valid", device=device)["ndcg@10"] >= start[0]:
        model.load_state_dict(start[1])
        kept_start = True
        log.info("site %d: training scored below the initial model on validation; the site keeps that model", index)
    test = evaluate_model(model, seqs, "test", device=device)
    popularity = evaluate_popularity(seqs, seqs, "test", data.catalog.num_rows, model_cfg.max_len)
    spent = result.privacy
    log.info("site %d (%d users) alone: test HR@10 %.4f NDCG@10 %.4f%s (%.0fs)", index, len(seqs), test["hr@10"],
             test["ndcg@10"], f", ε {spent.epsilon:.3f}" if spent else "", result.seconds)
    return SiteResult(site=index, users=len(seqs), test=test, popularity_test=popularity,
                      epsilon=spent.epsilon if spent else None, delta=spent.delta if spent else None,
                      seconds=round(result.seconds, 1), peak_memory_mb=round(result.peak_memory_mb, 1),
                      kept_start=kept_start)


def site_seed(seed: int, index: int) -> int:
    """The training seed of site `index` (sampling, dropout, DP noise): reproducible, and different per site.

    With one seed for all, every DP site would draw the same noise vectors: models released together
    would carry correlated noise, which the per-site guarantee assumes they do not.
    """
    return zlib.crc32(f"{seed}|local-site|{index}".encode())


def weighted_mean(rows: Sequence[dict[str, float]], weights: Sequence[int]) -> dict[str, float]:
    """User-weighted mean of each ranking metric over sites (a user counts once, wherever it lives), with the
    standard error over all their users when the rows carry second moments (`<metric>:m2`)."""
    total = float(sum(weights))
    keys = [k for key in METRIC_KEYS for k in (key, key + SECOND_MOMENT) if all(k in row for row in rows)]
    pooled = {key: sum(row[key] * w for row, w in zip(rows, weights, strict=True)) / total for key in keys}
    return with_standard_errors(pooled, total) if any(k.endswith(SECOND_MOMENT) for k in keys) else pooled


def run_local_only(data: PreparedData, parts: Sequence[np.ndarray], model_cfg: ModelConfig, train_cfg: TrainConfig,
                   privacy: PrivacyConfig, epochs: int, out_dir: Path, initial_model: str = "") -> dict[str, Any]:
    """Train every site alone for `epochs` (the last epoch's model; from `initial_model` when given, which a site
    keeps when its training scores lower on validation), write summary.json and report.md under out_dir, and
    return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    site_cfg = replace(train_cfg, epochs=epochs, patience=0, eval_every=0)
    started = time.perf_counter()
    sites = [train_site(i, data, users, model_cfg, site_cfg, privacy, str(out_dir / "cache"), initial_model)
             for i, users in enumerate(parts)]
    weights = [s.users for s in sites]
    summary: dict[str, Any] = {
        "mode": "local", "sites": len(sites), "users": sum(weights), "epochs_per_site": epochs,
        **({"initial_model": initial_model, "sites_kept_initial_model": sum(s.kept_start for s in sites)}
           if initial_model else {}),
        "seconds": round(time.perf_counter() - started, 1),
        "test": weighted_mean([s.test for s in sites], weights),
        "popularity_test": weighted_mean([s.popularity_test for s in sites], weights),
        "privacy": sites_privacy(sites, privacy),
        "per_site": [{**asdict(s), "test": with_standard_errors(s.test),
                      "popularity_test": with_standard_errors(s.popularity_test)} for s in sites]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    write_local_report(out_dir, summary)
    return summary


def sites_privacy(sites: Sequence[SiteResult], privacy: PrivacyConfig) -> dict[str, Any]:
    """Per-site (ε, δ) spent, or an explicit statement that there was no DP."""
    if not privacy.enabled:
        return {"dp": False, "claim": privacy_claim(None)}
    eps = [s.epsilon or 0.0 for s in sites]
    deltas = [s.delta or 0.0 for s in sites]
    return {"dp": True, "unit": "one user of a site", "epsilon_max": max(eps), "epsilon_mean": sum(eps) / len(eps),
            "delta_max": max(deltas),
            "claim": privacy_claim(max(eps), max(deltas), unit="user of a site", upper_bound=True,
                                   mechanism="at every site, over its own training (each site's δ is "
                                             "min(1e-5, 1/(10 · its users)) unless set)")}


def write_local_report(out_dir: Path, summary: dict[str, Any]) -> Path:
    """report.md: the user-weighted averages, then one row per site."""
    avg, pop = summary["test"], summary["popularity_test"]
    lines = ["# Local-only baseline (each site trains alone on its own users)", "",
             f"{summary['sites']} sites, {summary['users']} users, {summary['epochs_per_site']} epochs per site. "
             f"Privacy: {summary['privacy']['claim']}.", *start_note(summary), "",
             "User-weighted averages over sites (each site's own test events):", "",
             "| | HR@5 | HR@10 | NDCG@10 | HR@20 | NDCG@20 | MRR |", "|---|---|---|---|---|---|---|",
             row("local-only model", avg), row("each site's own popularity", pop), "",
             "± is one standard error over all sites' users (not over runs).", "",
             "| site | users | HR@10 | NDCG@10 | ε | seconds | process peak RSS so far, MB |",
             "|---|---|---|---|---|---|---|"]
    for s in summary["per_site"]:
        eps = "" if s["epsilon"] is None else f"{s['epsilon']:.3f}"
        lines.append(f"| {s['site']} | {s['users']} | {s['test']['hr@10']:.4f} | {s['test']['ndcg@10']:.4f} | "
                     f"{eps} | {s['seconds']} | {s['peak_memory_mb']} |")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_note(summary: dict[str, Any]) -> list[str]:
    """Where the sites started, and how many kept that model because their training scored lower."""
    if "initial_model" not in summary:
        return []
    return ["", f"Every site started from the exported model `{summary['initial_model']}`; "
                f"{summary['sites_kept_initial_model']} of {summary['sites']} kept it because their training scored "
                "lower on their validation events (their ε above was spent all the same)."]


def row(name: str, metrics: dict[str, float]) -> str:
    """One markdown table row of the headline metrics."""
    keys = ("hr@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr")
    return f"| {name} | " + " | ".join(with_error(metrics, k) for k in keys) + " |"

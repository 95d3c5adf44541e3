"""`fedrec-centralized`: train the behaviour model on pooled data, optionally with user-level DP.

Writes metrics.json (valid/test metrics, popularity baseline, speed, privacy) and model/ to the run dir.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fl_client.dp.settings import PrivacyConfig
from fl_client.train import TrainConfig, TrainResult, train
from shared_model.console import console_command, exit_on_error, rng_note
from shared_model.device import resolve_device
from shared_model.metrics import evaluate_model, evaluate_popularity, with_standard_errors
from shared_model.privacy_claim import privacy_claim
from shared_model.serialization import save_model_dir
from simulations.config import CentralizedConfig, register_schemas
from simulations.console import quiet_console
from simulations.prepare import build_model, prepare_data

log = logging.getLogger(__name__)
register_schemas()


def epoch_logger(total: int) -> Any:
    """A progress callback printing one line per epoch with loss and validation metrics."""
    started = time.perf_counter()

    def report(epoch: int, loss: float, metrics: dict[str, float] | None) -> None:
        shown = f" | valid HR@10 {metrics['hr@10']:.4f} NDCG@10 {metrics['ndcg@10']:.4f}" if metrics else ""
        log.info("epoch %d/%d loss %.4f%s (%.0fs)", epoch, total, loss, shown, time.perf_counter() - started)

    return report


def run_centralized(cfg: CentralizedConfig) -> dict[str, Any]:
    """Train and evaluate centrally; returns (and writes) the metrics document."""
    out = Path(cfg.output_dir)
    data = prepare_data(cfg.data)
    model = build_model(cfg.model, data, cache_dir=str(out / "cache"))
    train_cfg, privacy_cfg = TrainConfig(**asdict(cfg.train)), PrivacyConfig(**asdict(cfg.privacy))
    result = train(model, data.sequences, train_cfg, privacy_cfg, valid=data.sequences,
                   progress=epoch_logger(train_cfg.epochs), progress_bar=sys.stderr.isatty())
    device = resolve_device(train_cfg.device)
    metrics = {
        "data": {"name": cfg.data.name, "users": len(data.sequences), "items": len(data.catalog.item_ids),
                 "events": len(data.sequences.items), "load_report": data.events.report.summary()},
        "valid": with_standard_errors(evaluate_model(model, data.sequences, "valid", cfg.eval.batch_size,
                                                     cfg.eval.mask_history, device)),
        "test": with_standard_errors(evaluate_model(model, data.sequences, "test", cfg.eval.batch_size,
                                                    cfg.eval.mask_history, device)),
        "popularity_test": with_standard_errors(evaluate_popularity(
            data.sequences, data.sequences, "test", data.catalog.num_rows, cfg.model.max_len, cfg.eval.mask_history)),
        # The other protocol too, so numbers compare with tables that mask (or do not mask) the history.
        "test_other_protocol": {
            "mask_history": not cfg.eval.mask_history,
            "model": with_standard_errors(evaluate_model(model, data.sequences, "test", cfg.eval.batch_size,
                                                         not cfg.eval.mask_history, device)),
            "popularity": with_standard_errors(evaluate_popularity(
                data.sequences, data.sequences, "test", data.catalog.num_rows, cfg.model.max_len,
                not cfg.eval.mask_history))},
        "training": training_summary(result, str(device)),
        "privacy": privacy_summary(result),
    }
    if result.clipping is not None:
        metrics["clipping"] = {"note": "per-user gradient norms before clipping, over every DP step: a local "
                                       "diagnostic, not covered by the DP guarantee", **result.clipping.summary()}
    save_model_dir(model.cpu(), data.catalog, out / "model")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def training_summary(result: TrainResult, device: str) -> dict[str, Any]:
    """Speed, memory and the loss/validation history of a run."""
    return {"device": device, "epochs_run": len(result.epoch_losses), "best_epoch": result.best_epoch,
            "seconds": round(result.seconds, 1), "samples_per_second": round(result.samples_per_second, 1),
            "peak_memory_mb": round(result.peak_memory_mb, 1), "epoch_losses": result.epoch_losses,
            "valid_history": result.valid_history}


def privacy_summary(result: TrainResult) -> dict[str, Any]:
    """The exact DP claim, or an explicit statement that the run had no DP."""
    if result.privacy is None:
        return {"dp": False, "claim": privacy_claim(None)}
    return {"dp": True, "unit": "one user", "claim": result.privacy.claim(), **asdict(result.privacy)}


@hydra.main(config_path="conf", config_name="centralized", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run and log the headline numbers; a bad input or setting is one paragraph on stderr."""
    quiet_console()
    exit_on_error("fedrec-centralized", lambda: run_and_log(cfg))


def run_and_log(cfg: DictConfig) -> None:
    """Parse the config once, run, and log the headline numbers."""
    typed: CentralizedConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    metrics = run_centralized(typed)
    test, pop = metrics["test"], metrics["popularity_test"]
    log.info("test HR@10 %.4f NDCG@10 %.4f MRR %.4f | popularity HR@10 %.4f NDCG@10 %.4f", test["hr@10"],
             test["ndcg@10"], test["mrr"], pop["hr@10"], pop["ndcg@10"])
    log.info("privacy: %s%s", metrics["privacy"]["claim"],
             f"; {rng_note(typed.privacy.secure_mode)}" if metrics["privacy"]["dp"] else "")
    if "clipping" in metrics:
        clip = metrics["clipping"]
        log.info("clipping: %.0f%% of per-user gradients above C = %g (norms: p10 %.3g, median %.3g, p90 %.3g)",
                 100 * clip.get("clipped_fraction", 0.0), clip["max_grad_norm"], clip.get("norm_p10", 0.0),
                 clip.get("norm_median", 0.0), clip.get("norm_p90", 0.0))
    log.info("outputs in %s", typed.output_dir)


cli = console_command("fedrec-centralized", main)  # the console script: takes --debug out before Hydra parses

if __name__ == "__main__":
    cli()

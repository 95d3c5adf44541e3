"""The ServerApp: build the global model, run the configured strategy round by round with checkpoints and
central evaluation, resume after a crash, and export the final recommender."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fl_server import initial_model
from fl_server.checkpoint import RunStore
from fl_server.config import ServerConfig, server_config_from_run_config
from fl_server.popularity_release import check_release, release_popularity
from fl_server.prompt_grid import prompt_grid
from fl_server.report import progress_line, write_report
from fl_server.round_record import RoundRecord
from fl_server.schedule import Decay
from fl_server.secure_round import SecureAggregationGrid, secure_settings
from fl_server.strategy import RoundsFailedError, RunSetup, build_strategy
from shared_model import secure_sum, wire
from shared_model.adapters import load_dataset
from shared_model.catalog import ItemCatalog
from shared_model.console import quiet_library_warnings
from shared_model.device import resolve_device
from shared_model.factory import create_model
from shared_model.metrics import evaluate_model, evaluate_popularity, with_standard_errors
from shared_model.modeling_fedrec import FedRecModel
from shared_model.sequences import UserSequences, to_user_sequences
from shared_model.serialization import save_model_dir

quiet_library_warnings()  # the text encoder's loading bar and library notices an operator cannot act on

log = logging.getLogger(__name__)
progress = logging.getLogger("fedrec.progress")  # one short line per round (the full row: `log`, metrics.jsonl)
CentralEvaluator = Callable[[FedRecModel], dict[str, float]]


def central_evaluator(cfg: ServerConfig, catalog: ItemCatalog,
                      device: torch.device | None = None) -> CentralEvaluation | None:
    """Full-ranking test metrics (+ validation NDCG@10) on events the server holds (None when it holds none),
    scored on the server's GPU when it has one (a copy of the model goes there; the global model stays put)."""
    if not cfg.central_eval_path:
        return None
    sequences = to_user_sequences(load_dataset(cfg.central_eval_format, cfg.central_eval_path), catalog)
    device = device or resolve_device("auto")
    log.info("central evaluation of %d users on %s", len(sequences), device)
    popularity = with_standard_errors(evaluate_popularity(sequences, sequences, "test", catalog.num_rows,
                                                          cfg.model.max_len))
    return CentralEvaluation(sequences, device, popularity)


@dataclass
class CentralEvaluation:
    """Scores a global model on the server's own events; `popularity`: the most-popular baseline on them (the
    report draws it)."""

    sequences: UserSequences
    device: torch.device
    popularity: dict[str, float]

    def __call__(self, model: FedRecModel) -> dict[str, float]:
        scored = model
        if self.device.type != "cpu":
            scored = copy.deepcopy(model)
            torch.nn.Module.to(scored, self.device)
        test = with_standard_errors(evaluate_model(scored, self.sequences, "test", device=self.device))
        valid = evaluate_model(scored, self.sequences, "valid", device=self.device)
        return {**test, wire.VALID_NDCG10: valid["ndcg@10"]}


def round_config(cfg: ServerConfig, model: FedRecModel, catalog: ItemCatalog, training_id: str) -> ConfigRecord:
    """What every site is told each round (hyperparameters, architecture, catalog; never a site's budget, and
    noise only under distributed DP: the σ of the sum, which each site checks against its own budget)."""
    return ConfigRecord({
        wire.WIRE_VERSION: wire.VERSION,
        wire.TRAINING_ID: training_id, wire.NUM_ROUNDS: cfg.num_rounds, wire.LOCAL_EPOCHS: cfg.local_epochs,
        wire.BATCH_SIZE: cfg.batch_size, wire.LEARNING_RATE: cfg.lr, wire.OPTIMIZER: cfg.optimizer,
        wire.WEIGHT_DECAY: cfg.weight_decay, wire.NUM_NEGATIVES: cfg.num_negatives, wire.SEED: cfg.seed,
        wire.KEEP_OPTIMIZER_STATE: cfg.keep_optimizer_state, wire.ITEM_ROWS: cfg.strategy.item_rows,
        wire.UPDATE_PRECISION: cfg.strategy.update_precision,
        wire.SHARE_OPTIMIZER_STATE: cfg.share_optimizer_state,
        wire.MODEL_CONFIG: model.config.to_json_string(), wire.CATALOG_FINGERPRINT: catalog.fingerprint,
        **distributed_dp_config(cfg)})


def check_run(cfg: ServerConfig, item_row_names: list[str] | None = None) -> None:
    """ValueError for a setting the ServerApp would refuse, raised before anything starts (fedrec-server and
    fedrec-simulate call it): the strategy with its learning-rate decay (and its item rows once the model's
    per-item tensors are known), distributed DP and secure aggregation."""
    build_strategy(cfg.strategy, RunSetup(item_row_names=item_row_names,
                                          decay=Decay(cfg.decay_from_round, cfg.decay_lr, cfg.decay_server_lr)))
    distributed_dp_config(cfg)
    check_release(cfg)
    secure_settings(cfg)


def distributed_dp_config(cfg: ServerConfig) -> dict[str, float | int]:
    """The round keys that make every site take one DP-SGD step of the union (none when distributed DP is off)."""
    strategy = cfg.strategy
    if not strategy.distributed_dp:
        return {}
    if not (0 < strategy.dp_sample_rate <= 1 and strategy.dp_noise_multiplier > 0 and strategy.dp_max_grad_norm > 0
            and strategy.dp_colluders >= 0):
        raise ValueError("strategy.distributed_dp needs 0 < dp_sample_rate <= 1, dp_noise_multiplier > 0, "
                         "dp_max_grad_norm > 0 and dp_colluders >= 0")
    return {wire.DDP_SAMPLE_RATE: strategy.dp_sample_rate, wire.DDP_NOISE: strategy.dp_noise_multiplier,
            wire.DDP_CLIP: strategy.dp_max_grad_norm, wire.DDP_COLLUDERS: strategy.dp_colluders}


def run_server(grid: Grid, cfg: ServerConfig) -> dict[str, Any]:
    """Train for the configured rounds (continuing from the last checkpoint), then export the model."""
    check_release(cfg)
    store = RunStore(cfg.out_dir)
    catalog = ItemCatalog.load(cfg.catalog_path)
    torch.manual_seed(cfg.seed)  # the global model's initial weights (train.seed)
    model = create_model(cfg.model, catalog, cfg.has_timestamps, cache_dir=str(store.root / "cache"))
    secure = secure_settings(cfg)
    checkpoint = store.latest() if cfg.resume else None
    done, score_start = 0, False
    if checkpoint is not None:
        model.load_state_dict(checkpoint.state)
        done = checkpoint.round
        log.info("resuming after round %d of %d (from %s)", done, cfg.num_rounds, store.root)
    elif cfg.initial_model:
        initial_model.record(store.root, initial_model.load_initial_model(model, catalog, cfg.initial_model))
        score_start = True
    trainable = wire.trainable_state(model)
    frozen = {k: v for k, v in wire.full_state(model).items() if k not in trainable}
    strategy = build_strategy(cfg.strategy, RunSetup(
        item_row_names=model.item_row_parameters(), catalog_fingerprint=catalog.fingerprint,
        decay=Decay(cfg.decay_from_round, cfg.decay_lr, cfg.decay_server_lr), round_offset=done,
        evaluated_rounds=cfg.evaluates, frozen=ArrayRecord(frozen),
        frozen_digest=wire.tensors_digest(frozen) if frozen else ""))
    if checkpoint is not None:
        strategy.restore_optimiser_state(checkpoint.optimiser_state)
    evaluate_centrally = central_evaluator(cfg, catalog)
    baseline = evaluate_centrally.popularity if evaluate_centrally else None
    train_grid = SecureAggregationGrid(grid, secure) if secure else grid  # the rounds' training and evaluation
    recorder = RoundRecorder(cfg, store, model, strategy, train_grid, evaluate_centrally, done)
    if done < cfg.num_rounds:
        train_config = round_config(cfg, model, catalog, store.training_id())
        train_config[wire.FROZEN_DIGEST] = strategy.frozen_digest
        if score_start:
            recorder.scored_start = score_starting_model(train_grid, strategy, store, model, trainable, train_config,
                                                         cfg, evaluate_centrally)
        if cfg.strategy.dp_popularity_noise and checkpoint is None:  # round 0: the item bias from a DP release
            trainable, figures = release_popularity(train_grid, strategy, model, trainable, train_config, cfg)
            write_round(store, model, strategy, recorder.release_record(figures), None, cfg.num_rounds)
        try:
            strategy.start(grid=train_grid, initial_arrays=ArrayRecord(trainable), num_rounds=cfg.num_rounds - done,
                           timeout=cfg.round_timeout, train_config=train_config,
                           evaluate_config=ConfigRecord(dict(train_config)), evaluate_fn=recorder)
        except RoundsFailedError as err:
            export(store, model, catalog, baseline)  # the last good model, and a report naming every dropped reply
            raise RoundsFailedError(f"{err} Run directory: {store.root}") from None
    return export(store, model, catalog, baseline)


class RoundRecorder:
    """What the server does after each round (Flower's evaluate_fn): load the aggregate into the global model,
    score it centrally when the round is evaluated, write the round's record, checkpoint, log one progress line,
    and stop the run when rounds keep failing (only after the last good model is on disk)."""

    def __init__(self, cfg: ServerConfig, store: RunStore, model: FedRecModel, strategy: Any,
                 grid: Grid | SecureAggregationGrid, evaluate_centrally: CentralEvaluation | None, done: int) -> None:
        self.cfg, self.store, self.model, self.strategy, self.grid = cfg, store, model, strategy, grid
        self.evaluate_centrally, self.done = evaluate_centrally, done  # rounds completed before this start
        self.started = time.time()
        self.scored_start: RoundRecord | None = None  # round 0 of a training from an exported model, scored once

    def __call__(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if local_round == 0 and self.scored_start is not None:
            start = self.scored_start.central_eval
            return MetricRecord(dict(start)) if start else None
        wire.load_state(self.model, arrays.to_torch_state_dict(), trainable_only=True)
        evaluated = local_round == 0 or self.cfg.evaluates(local_round + self.done)
        central: dict[str, Any] = self.evaluate_centrally(self.model) if self.evaluate_centrally and evaluated \
            else {}
        if local_round == 0:
            return MetricRecord(central) if central else None
        record = self.record(local_round + self.done, evaluated, central)
        score = (validation_score(record) or 0.0) if evaluated else None
        write_round(self.store, self.model, self.strategy, record, score, self.cfg.num_rounds)
        self.strategy.raise_if_failing()  # only now: the unchanged model of the last good round is on disk
        return MetricRecord(central) if central else None

    def strategy_record(self, server_round: int, **fields: Any) -> RoundRecord:
        """What the strategy saw of the round, numbered and timed (with `fields`); under secure aggregation with
        the secure sum's figures and the bytes that crossed the network: the strategy counted its own train
        message and the rebuilt replies, what crossed is the message with the sealed shares and the masked update."""
        record = replace(self.strategy.last_round, round=server_round, seconds=round(time.time() - self.started, 2),
                         **fields)
        if isinstance(self.grid, SecureAggregationGrid):
            record.secure_aggregation = dict(self.grid.last)
            record.bytes_to_each_site = record.secure_aggregation.pop("bytes_to_site", record.bytes_to_each_site)
            record.bytes_from_each_site = record.secure_aggregation.pop("bytes_from_site",
                                                                        record.bytes_from_each_site)
        return record

    def release_record(self, figures: dict[str, float]) -> RoundRecord:
        """Round 0 of a training with a popularity release (fl_server.popularity_release)."""
        return self.strategy_record(0, popularity_release=figures)

    def record(self, server_round: int, evaluated: bool, central: dict[str, Any]) -> RoundRecord:
        """The round's record (metrics.jsonl, the report): what the strategy saw, and what the run adds."""
        strategy = self.cfg.strategy
        record = self.strategy_record(server_round)
        if strategy.distributed_dp:  # what the report's privacy claim states (fl_server.report)
            record.distributed_dp = {"sample_rate": strategy.dp_sample_rate,
                                     "noise_multiplier": strategy.dp_noise_multiplier,
                                     "max_grad_norm": strategy.dp_max_grad_norm, "colluders": strategy.dp_colluders}
            if strategy.dp_popularity_noise:
                record.distributed_dp["popularity_noise"] = strategy.dp_popularity_noise
        if isinstance(self.grid, SecureAggregationGrid):
            if record.distributed_dp and "fewest_summed" in self.grid.last:  # the noise the sum carried
                record.distributed_dp["sum_noise_multiplier"] = round(secure_sum.sum_noise_multiplier(
                    strategy.dp_noise_multiplier, self.grid.last["sites_summed"], self.grid.last["fewest_summed"],
                    strategy.dp_colluders), 6)
            if evaluated and self.strategy.asked.get("evaluate"):
                record.secure_evaluation = dict(self.grid.last_evaluation)
        if evaluated:
            record.central_eval = central
        return record


def validation_score(record: RoundRecord) -> float | None:
    """What picks the best round: validation NDCG@10, the server's when it scored centrally, else the sites'
    (None when neither scored validation). Never the test split."""
    central = record.central_eval or {}
    return central.get(wire.VALID_NDCG10, (record.federated_eval or {}).get(wire.VALID_NDCG10))


def write_round(store: RunStore, model: FedRecModel, strategy: Any, record: RoundRecord, score: float | None,
                num_rounds: int) -> None:
    """Checkpoint the round with its record (metrics.jsonl), and log it: the record in full, one progress line."""
    row = record.row()
    store.save(record.round, model.state_dict(), strategy.optimiser_state(), row, score)
    log.info("round %s", json.dumps(row))
    progress.info(progress_line(row, num_rounds))


def score_starting_model(grid: Grid | SecureAggregationGrid, strategy: Any, store: RunStore, model: FedRecModel,
                         trainable: dict[str, torch.Tensor], config: ConfigRecord, cfg: ServerConfig,
                         evaluate_centrally: CentralEvaluator | None) -> RoundRecord:
    """Round 0 of a training that starts from an exported model: the sites (and the server, when it evaluates
    centrally) score that model before anything is trained, and it is checkpointed like a round. So the report
    shows where training started, and the best model by validation is never worse than the starting one: when
    no round beats it, best_model is the starting model (DP noise can make fine-tuning a good model worse)."""
    record = strategy.evaluate_starting_model(grid, ArrayRecord(trainable), ConfigRecord(dict(config)),
                                              cfg.round_timeout)
    record = replace(record, central_eval=evaluate_centrally(model) if evaluate_centrally else {})
    write_round(store, model, strategy, record, validation_score(record), cfg.num_rounds)
    return record


def export(store: RunStore, model: FedRecModel, catalog: ItemCatalog,
           popularity: dict[str, float] | None = None) -> dict[str, Any]:
    """Write the final and the best global model as model directories; return the run summary."""
    final = store.latest()
    if final is not None:
        model.load_state_dict(final.state)
    save_model_dir(model, catalog, store.root / "model")
    best = store.best_state()
    if best is not None:
        model.load_state_dict(best)
        save_model_dir(model, catalog, store.root / "best_model")
    history = store.history()
    summary: dict[str, Any] = {"rounds": final.round if final else 0, "best_round": final.best_round if final else 0,
               "history": history, "model_dir": str(store.root / "model")}
    started_from = initial_model.recorded(store.root)
    if started_from is not None:
        summary["initial_model"] = started_from
    if popularity:
        summary["popularity"] = popularity  # on the server's own test events: the baseline the report draws
    (store.root / "summary.json").write_text(json.dumps(summary, indent=1, default=float), encoding="utf-8")
    write_report(store.root, history, summary)
    return summary


def build_server_app(resolve: Callable[[Context], ServerConfig]) -> ServerApp:
    """A ServerApp whose settings come from `resolve` (run config in deployment; Hydra in simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(prompt_grid(grid), resolve(context))

    return app


def config_from_context(context: Context) -> ServerConfig:
    """Deployment / `flwr run`: the run config (pyproject defaults + --run-config overrides)."""
    return server_config_from_run_config(dict(context.run_config))


app = build_server_app(config_from_context)

"""Flower strategies for the recommender, with the per-round behaviour every one of them needs here:
a round offset for resume, sites that declined (budget), failed, or sent a reply that fails the checks of
fl_server.reply_checks kept out of the aggregate, and a record of what each round received, including the
sites' privacy reports and every reply dropped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from fl_server.config import AVERAGING, StrategyConfig
from fl_server.frozen import with_frozen
from fl_server.item_rows import average_moments, item_weights, reweight_item_rows
from fl_server.replies import (
    declined_reason,
    failure,
    held_digest,
    payload_bytes,
    plain_record,
    privacy_report,
    reply_metrics,
    site_cost,
    training_metrics,
)
from fl_server.reply_checks import (
    ReplyGate,
    RoundsFailedError,
    check_reply_settings,
    evaluation_problem,
    finite,
)
from fl_server.round_record import RoundRecord
from fl_server.schedule import Decay, learning_rates
from shared_model import wire
from shared_model.metrics import with_standard_errors

log = logging.getLogger(__name__)
__all__ = ["RoundHooks", "RoundsFailedError", "RunSetup", "build_strategy"]
# Server-side optimiser state some strategies keep between rounds; checkpointed so a resume continues it.
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "shared_moments", "declared_users", "accepted_norms")
# What a server step (FedAdam, FedYogi, FedAvgM) or moment sharing changes: put back when its aggregate is unusable.
STEP_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "current_arrays", "shared_moments")


def with_dtypes_of(arrays: ArrayRecord | None, reference: ArrayRecord | None) -> ArrayRecord | None:
    """`arrays` with each tensor in the dtype it has in `reference`. Flower 1.41's FedAdam steps with a NumPy
    float64 scalar (its bias-corrected η), which (NumPy 2) turns float32 weights into float64: the global model
    would travel and be checkpointed at twice its size from the first server step on. Applied to every
    strategy's result, so no other server step can change the weights' dtype either."""
    if arrays is None or reference is None:
        return arrays
    changed = {k for k, v in arrays.items() if k in reference and v.dtype != reference[k].dtype}
    if not changed:
        return arrays
    return ArrayRecord({k: Array(np.ascontiguousarray(v.numpy().astype(reference[k].dtype))) if k in changed else v
                        for k, v in arrays.items()})


def flower_arguments(config: StrategyConfig) -> dict[str, Any]:
    """The arguments every Flower strategy here takes: sampling, the fewest sites, fedrec's record keys."""
    return {"fraction_train": config.fraction_train, "fraction_evaluate": config.fraction_evaluate,
            "min_train_nodes": config.min_nodes, "min_evaluate_nodes": config.min_nodes,
            "min_available_nodes": config.min_nodes, "weighted_by_key": wire.NUM_EXAMPLES,
            "arrayrecord_key": wire.ARRAYS, "configrecord_key": wire.CONFIG,
            "train_metrics_aggr_fn": training_metrics}


def adaptive_arguments(config: StrategyConfig) -> dict[str, Any]:
    """FedAdam's and FedYogi's server step."""
    return {"eta": config.server_lr, "beta_1": config.server_beta_1, "beta_2": config.server_beta_2,
            "tau": config.server_tau}


def malicious_arguments(config: StrategyConfig) -> dict[str, Any]:
    """Krum's, MultiKrum's and Bulyan's assumed attackers."""
    return {"num_malicious_nodes": config.num_malicious}


def check_item_rows(config: StrategyConfig) -> None:
    """ValueError for an item-row mode that does not exist or that this rule cannot apply."""
    if config.item_rows not in wire.ITEM_ROW_MODES:
        raise ValueError(f"strategy.item_rows {config.item_rows!r} is not one of {', '.join(wire.ITEM_ROW_MODES)}")
    if config.item_rows != "average" and config.name not in AVERAGING:
        raise ValueError(f"strategy.item_rows={config.item_rows} rescales the sites' rows before an average; "
                         f"{config.name} does not average (use item_rows=average, or one of {', '.join(AVERAGING)})")


@dataclass(frozen=True)
class RunSetup:
    """What the strategy learns from the run before its first round (fl_server.server_app builds it)."""

    # the model's per-item tensors (strategy.item_rows); None: the model is not built yet (a check at start)
    item_row_names: list[str] | None = field(default_factory=list)
    catalog_fingerprint: str = ""  # the run's catalog: a reply naming another is dropped ("" = not checked)
    decay: Decay = field(default_factory=Decay)  # from which round the sites' and the server's lr change
    round_offset: int = 0  # rounds completed before this start (a resume numbers rounds globally)
    evaluated_rounds: Callable[[int], bool] | None = None  # which global rounds are evaluated (None: all)
    frozen: ArrayRecord = field(default_factory=ArrayRecord)  # frozen public tensors, sent until a site keeps them
    frozen_digest: str = ""  # their wire.tensors_digest ("" when the model has none)


class RoundHooks(ReplyGate):
    """Mixin over a Flower FedAvg-family strategy (see module docstring)."""

    round_offset: int = 0
    last_round: RoundRecord  # what this round received (fl_server.round_record)
    frozen: ArrayRecord  # frozen public tensors (e.g. item features), sent to each site until it keeps them
    frozen_digest: str = ""  # their wire.tensors_digest, which a site names back when it keeps them
    frozen_held: set[int]  # nodes that said they keep them (forgotten when a node fails: it may have lost them)
    bytes_sent: int = 0  # payload of this round's largest train message (with the frozen tensors, if any went)
    frozen_sent: int = 0  # sites this round's train messages carried the frozen tensors to
    item_rows: str = "average"  # wire.ITEM_ROW_MODES: how the item table's rows are aggregated
    item_row_names: list[str]  # the model's per-item tensors (set by the server from its model)
    shared_moments: dict[str, np.ndarray] | None = None  # the sites' averaged optimiser moments, sent next round
    decay: Decay = Decay()  # from which round the sites' and the server's learning rates change
    # this round's site lr and server lr (None: not configured this run / no server step), for the round's record
    round_rates: tuple[float | None, float | None] = (None, None)
    asked: dict[str, int]  # sites sent this round's train / evaluate message (to count the silent ones)
    evaluated_rounds: Callable[[int], bool] | None = None  # which (global) rounds are evaluated; None: all
    min_train_nodes: int  # Flower's: the fewest trained replies a round aggregates
    select_all_but_malicious: bool = False  # MultiKrum with num_selected=0: keep all but num_malicious each round
    num_nodes_to_select: int  # MultiKrum's
    num_malicious_nodes: int  # Krum's, MultiKrum's and Bulyan's

    def __init__(self, config: StrategyConfig, setup: RunSetup | None = None) -> None:
        """The Flower rule of `config` set up for the run (`setup`); a ValueError names a fedrec setting that
        cannot work before Flower's own checks run."""
        check_reply_settings(config)
        check_item_rows(config)
        super().__init__(**flower_arguments(config), **self.rule_arguments(config))
        setup = setup or RunSetup()
        self.item_rows = config.item_rows
        self.select_all_but_malicious = config.name == "multikrum" and config.num_selected == 0
        self.item_row_names = list(setup.item_row_names or [])
        self.catalog_fingerprint = setup.catalog_fingerprint
        self.decay = setup.decay
        self.round_offset = setup.round_offset
        self.evaluated_rounds = setup.evaluated_rounds
        self.frozen, self.frozen_digest = setup.frozen, setup.frozen_digest
        self.last_round = RoundRecord()
        self.asked = {}
        self.frozen_held = set()
        self.set_reply_checks(config)
        self.decay.check(self)
        if config.item_rows != "average" and setup.item_row_names == []:
            raise ValueError(f"strategy.item_rows={config.item_rows}, but this model trains no per-item tensor "
                             "(item table frozen, no item bias): use strategy.item_rows=average")

    @staticmethod
    def rule_arguments(config: StrategyConfig) -> dict[str, Any]:
        """The Flower rule's own arguments (FedAvg's: none)."""
        return {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Ask sites to train, numbering rounds globally across resumes."""
        self.round_start = arrays
        self.decay.apply(self, server_round + self.round_offset, config)
        self.round_rates = learning_rates(self, config)
        extra = {wire.OPTIMIZER_STATE: ArrayRecord({k: Array(v) for k, v in self.shared_moments.items()})} \
            if self.shared_moments else None
        messages = with_frozen(super().configure_train(server_round + self.round_offset, arrays, config,  # type: ignore[misc]
                                                       grid), self.frozen, self.frozen_held, extra)
        self.bytes_sent = max((payload_bytes(m.content) for m in messages), default=0)
        self.frozen_sent = sum(wire.FROZEN in m.content.array_records for m in messages)
        self.asked = {"train": len(messages)}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Ask sites to evaluate, numbering rounds globally across resumes (none in a round not evaluated)."""
        if self.evaluated_rounds is not None and not self.evaluated_rounds(server_round + self.round_offset):
            self.asked["evaluate"] = 0
            return []
        messages = with_frozen(super().configure_evaluate(server_round + self.round_offset, arrays, config,  # type: ignore[misc]
                                                          grid), self.frozen, self.frozen_held)
        self.asked["evaluate"] = len(messages)
        return messages

    def evaluate_starting_model(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord,
                                timeout: float) -> RoundRecord:
        """Round 0 of a training that starts from an exported model: the sites score `arrays` before anything
        is trained; the round's record."""
        self.last_round = RoundRecord(round=0, seconds=0.0, starting_model=True)
        messages = list(self.configure_evaluate(0, arrays, config, grid))
        self.aggregate_evaluate(0, list(grid.send_and_receive(messages, timeout=timeout)) if messages else [])
        return self.last_round

    def count_silent(self, phase: str, server_round: int, replies: int) -> None:
        """Record and warn about sites that were asked but sent nothing back (federation.round_timeout)."""
        silent = max(self.asked.get(phase, replies) - replies, 0)
        if phase == "train":
            self.last_round.train_no_reply = silent
        else:
            self.last_round.evaluate_no_reply = silent
        if silent:
            log.warning("round %d: %d of %d site(s) sent no %s reply within federation.round_timeout; "
                        "they are left out of this round", server_round + self.round_offset, silent,
                        silent + replies, phase)

    def note_frozen_held(self, replies: list[Message]) -> None:
        """Remember the sites that keep the frozen tensors; forget any that failed (it may have lost them)."""
        for msg in replies:
            node = msg.metadata.src_node_id
            if failure(msg):
                self.frozen_held.discard(node)
            elif self.frozen_digest and held_digest(msg) == self.frozen_digest:
                self.frozen_held.add(node)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the sites that trained and whose replies pass every check (fl_server.reply_checks);
        failed, declined and dropped replies are counted and named, never averaged in. With fewer usable
        replies than min_nodes after a drop or failure, the global model stays unchanged."""
        replies = list(replies)
        self.note_frozen_held(replies)
        label = server_round + self.round_offset
        failures = [reason for m in replies if (reason := failure(m))]
        self.last_round = RoundRecord(round=label, train_replies=len(replies), train_failures=len(failures),
                                      bytes_to_each_site=self.bytes_sent, frozen_sent_to=self.frozen_sent,
                                      lr=self.round_rates[0], server_lr=self.round_rates[1])
        self.count_silent("train", server_round, len(replies))
        trained, dropped = self.usable_replies([m for m in replies if not failure(m)], failures)
        if len(trained) < self.min_train_nodes and (dropped or (failures and not trained)):
            return self.unusable_round(label, f"{len(trained)} usable trained replies ({len(dropped)} dropped, "
                                              f"{len(failures)} failed), fewer than "
                                              f"strategy.min_nodes={self.min_train_nodes}")
        if not trained:
            log.warning("round %d: no site trained; the global model is unchanged", label)
            return None, None
        return self.aggregated(label, trained)

    def usable_replies(self, answered: list[Message], failures: list[str]) -> tuple[list[Message], list[str]]:
        """The replies that trained and pass every check, and the reasons of those dropped; the counts, the
        privacy and cost reports and every reason go into the round's row, and the reasons into the log."""
        valid, dropped = self.checked(answered, self.per_item_tensors()[1])
        metrics = [reply_metrics(m) for m in valid]
        declined = [m for m, x in zip(valid, metrics, strict=True) if x[wire.DECLINED] == 1.0]
        trained, over_bound = self.within_norm_bound([m for m, x in zip(valid, metrics, strict=True)
                                                      if x[wire.DECLINED] == 0.0])
        dropped += over_bound
        record = self.last_round
        record.dropped, record.declined = len(dropped), len(declined)
        record.privacy, record.site_cost = privacy_report(metrics), site_cost(metrics)
        record.train_failure_reasons = warn_named(record.round, failures, "failed to train")
        record.declined_reasons = warn_named(record.round, [declined_reason(m) for m in declined], "declined")
        record.dropped_reasons = warn_named(record.round, dropped, "sent a reply dropped before aggregation")
        return trained, dropped

    def aggregated(self, label: int, trained: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The base strategy's aggregate of the usable replies. When it has none, or one that is not finite
        (a server step such as FedAdam's can overflow), the round is unusable: the global model and the
        server optimiser state stay as they were."""
        before = {name: getattr(self, name) for name in STEP_ATTRIBUTES if hasattr(self, name)}
        trained = self.with_moments_averaged(trained)
        if self.item_rows != "average":
            trained = self.with_item_rows_weighted(trained)
            if not trained:
                return self.unusable_round(label, "no trained site sent usable item weights")
        if self.select_all_but_malicious:  # MultiKrum keeps all but the assumed attackers of this round
            self.num_nodes_to_select = max(1, len(trained) - self.num_malicious_nodes)
        arrays, metrics = super().aggregate_train(label, trained)  # type: ignore[misc]
        problem = "" if arrays is not None and all(finite(a.numpy()) for a in arrays.values()) else \
            "the aggregate holds NaN or infinite values" if arrays is not None else \
            f"{type(self).__name__} aggregated nothing from {len(trained)} usable replies (see its log)"
        if problem:
            for name, value in before.items():
                setattr(self, name, value)
            return self.unusable_round(label, problem)
        self.round_succeeded()
        self.last_round.train = dict(metrics) if metrics is not None else {}
        return with_dtypes_of(plain_record(arrays), self.round_start), metrics

    def per_item_tensors(self) -> tuple[list[str], int]:
        """The per-item tensors this round trains and the item table's number of rows (none: [], 0)."""
        if self.round_start is None:
            return [], 0
        names = [name for name in self.item_row_names if name in self.round_start]
        return names, (self.round_start[names[0]].shape[0] if names else 0)  # shape without decoding

    def with_moments_averaged(self, trained: list[Message]) -> list[Message]:
        """Average the optimiser moments the trained sites sent (`share_optimizer_state`) for the next round,
        and take them out of the replies (Flower averages replies holding one ArrayRecord each)."""
        sent = [m for m in trained if wire.OPTIMIZER_STATE in m.content.array_records]
        if not sent:
            return trained
        names, rows = self.per_item_tensors()
        replies = []
        for msg in sent:
            moments = {k: v.numpy() for k, v in msg.content.array_records[wire.OPTIMIZER_STATE].items()}
            try:
                weights = item_weights(msg, rows) if self.item_rows != "average" and rows else None
            except ValueError:
                weights = None  # with_item_rows_weighted leaves such a site out and says why
            replies.append((moments, reply_metrics(msg)[wire.NUM_EXAMPLES], weights))
            msg.content = RecordDict({k: v for k, v in msg.content.items() if k != wire.OPTIMIZER_STATE})
        try:
            self.shared_moments = average_moments(replies, names)
        except ValueError as err:
            log.warning("optimiser moments not shared this round: %s", err)
        steps = (self.shared_moments or {}).get(wire.MOMENTS_STEP)
        self.last_round.shared_moments = {"sites": len(sent), "step": float(steps[0]) if steps is not None else 0.0}
        return trained

    def with_item_rows_weighted(self, trained: list[Message]) -> list[Message]:
        """The trained replies, their item-table rows rescaled (see reweight_item_rows) and their per-item
        weights removed. A site whose weights are missing or unusable is left out, counted and logged."""
        if self.round_start is None:
            raise RuntimeError("aggregate_train before configure_train: no round start weights to rescale from")
        # Only the per-item tensors change: the others stay the sites' own Arrays, never decoded or re-encoded.
        names, rows = self.per_item_tensors()
        if not names:
            raise RuntimeError(f"strategy.item_rows={self.item_rows}, but no per-item tensor is trained")
        start = {name: self.round_start[name].numpy() for name in names}
        usable, left_out = [], []
        for msg in trained:
            try:
                weights = item_weights(msg, rows)
            except ValueError as err:
                left_out.append(f"node {msg.metadata.src_node_id}: {err}")
                continue
            sent = msg.content.array_records[wire.ARRAYS]
            usable.append((msg, {k: sent[k].numpy() for k in names}, reply_metrics(msg)[wire.NUM_EXAMPLES], weights))
        self.last_round.item_rows = {"mode": self.item_rows, "sites": len(usable), "left_out": left_out}
        if left_out:
            log.warning("strategy.item_rows=%s: %d trained site(s) left out of the aggregate: %s", self.item_rows,
                        len(left_out), "; ".join(left_out))
        if not usable:
            log.warning("no usable trained site; the global model is unchanged")
            return []
        rescaled = reweight_item_rows(start, [(arrays, n, a) for _, arrays, n, a in usable], names)
        for (msg, *_), scaled in zip(usable, rescaled, strict=True):
            sent = msg.content.array_records[wire.ARRAYS]
            arrays = ArrayRecord({k: Array(scaled[k]) if k in scaled else sent[k] for k in sent})
            msg.content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: msg.content.metric_records[wire.METRICS]})
        return [msg for msg, *_ in usable]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted federated evaluation over the sites that answered."""
        replies = list(replies)
        self.note_frozen_held(replies)  # evaluate replies name no digest: only failures count here
        failures = [reason for m in replies if (reason := failure(m))]
        checked = [(m, evaluation_problem(m, self.max_site_users))
                   for m in replies if not failure(m)]
        answered, dropped = [m for m, why in checked if not why], [why for _, why in checked if why]
        record, label = self.last_round, server_round + self.round_offset
        record.evaluate_failures, record.evaluate_dropped = len(failures), len(dropped)
        record.evaluate_failure_reasons = warn_named(label, failures, "failed to evaluate")
        record.evaluate_dropped_reasons = warn_named(label, dropped, "sent an evaluation dropped unpooled")
        self.count_silent("evaluate", server_round, len(replies))
        if not answered:
            return None
        metrics = super().aggregate_evaluate(server_round + self.round_offset, answered)  # type: ignore[misc]
        if metrics is None:
            self.last_round.federated_eval = {}
            return None
        # Sites partition the users, so the user-weighted means and second moments are the pooled users' own.
        users = sum(float(reply_metrics(m).get(wire.NUM_EXAMPLES, 0.0)) for m in answered)
        self.last_round.federated_eval = with_standard_errors(dict(metrics), users)
        return metrics

    def optimiser_state(self) -> dict[str, Any]:
        """Server-side optimiser state to checkpoint (empty for stateless strategies)."""
        return {name: getattr(self, name) for name in STATE_ATTRIBUTES if getattr(self, name, None) is not None}

    def restore_optimiser_state(self, state: dict[str, Any]) -> None:
        """Put checkpointed optimiser state back before resuming."""
        for name, value in state.items():
            setattr(self, name, value)


def warn_named(server_round: int, reasons: list[str], what: str) -> list[str] | None:
    """Log the sites named in `reasons` (one warning); the reasons for the round record, None when there are none."""
    if not reasons:
        return None
    log.warning("round %d: %d site(s) %s: %s", server_round, len(reasons), what, "; ".join(reasons))
    return reasons


class FedRecFedAvg(RoundHooks, FedAvg):
    """FedAvg (McMahan et al.) with fedrec's round hooks."""


class FedRecFedProx(RoundHooks, FedProx):
    """FedProx: FedAvg whose sites add a proximal term (strategy.proximal_mu)."""

    @staticmethod
    def rule_arguments(config: StrategyConfig) -> dict[str, Any]:
        return {"proximal_mu": config.proximal_mu}


class FedRecFedAdam(RoundHooks, FedAdam):
    """FedAdam: an Adam step at the server on the averaged update."""

    rule_arguments = staticmethod(adaptive_arguments)


class FedRecFedYogi(RoundHooks, FedYogi):
    """FedYogi: a Yogi step at the server on the averaged update."""

    rule_arguments = staticmethod(adaptive_arguments)


class FedRecFedAvgM(RoundHooks, FedAvgM):
    """FedAvgM: a momentum step at the server on the averaged update."""

    @staticmethod
    def rule_arguments(config: StrategyConfig) -> dict[str, Any]:
        return {"server_learning_rate": config.server_lr, "server_momentum": config.server_momentum}


class FedRecFedTrimmedAvg(RoundHooks, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (strategy.trim_beta cut at each end)."""

    @staticmethod
    def rule_arguments(config: StrategyConfig) -> dict[str, Any]:
        return {"beta": config.trim_beta}


class FedRecFedMedian(RoundHooks, FedMedian):
    """Coordinate-wise median."""


class FedRecKrum(RoundHooks, Krum):
    """Krum: the one update closest to its neighbours (strategy.num_malicious assumed attackers)."""

    rule_arguments = staticmethod(malicious_arguments)


class FedRecMultiKrum(RoundHooks, MultiKrum):
    """MultiKrum: the average of the updates Krum ranks best (strategy.num_selected; 0 = all but the attackers)."""

    @staticmethod
    def rule_arguments(config: StrategyConfig) -> dict[str, Any]:
        return {**malicious_arguments(config), "num_nodes_to_select": config.num_selected or 1}  # 0: set each round


class FedRecBulyan(RoundHooks, Bulyan):
    """Bulyan: Krum selection, then a trimmed mean (needs 4 x num_malicious + 3 sites)."""

    rule_arguments = staticmethod(malicious_arguments)


STRATEGIES: dict[str, type[RoundHooks]] = {
    "fedavg": FedRecFedAvg, "fedprox": FedRecFedProx, "fedadam": FedRecFedAdam, "fedyogi": FedRecFedYogi,
    "fedavgm": FedRecFedAvgM, "fedtrimmedavg": FedRecFedTrimmedAvg, "fedmedian": FedRecFedMedian,
    "krum": FedRecKrum, "multikrum": FedRecMultiKrum, "bulyan": FedRecBulyan}


def build_strategy(config: StrategyConfig, setup: RunSetup | None = None) -> Any:
    """The configured strategy (STRATEGIES[strategy.name]), set up for the run."""
    if config.name not in STRATEGIES:
        raise ValueError(f"strategy.name {config.name!r} is not one of {', '.join(STRATEGIES)}")
    return STRATEGIES[config.name](config, setup)

"""What a site's training reply must be before it may touch the global model, and the rounds it leaves
unusable.

A reply that has no error and speaks this server's wire version (fl_server.replies.failure) is still dropped,
with a reason naming its node and the field or tensor, unless:
- its records are exactly the ones a site sends (arrays, metrics, notes; item weights and optimiser moments
  when present) and its notes name the run's catalog fingerprint (wire.CATALOG_FINGERPRINT);
- its weights have exactly the round's tensor names, shapes and dtypes, their bytes decode (never unpickling)
  to exactly the dtype and shape each declares (shared_model.npy.decode_array), all finite. With
  strategy.update_precision=float16 a site may send, instead of its weights (arrays), their change from the
  round's global weights in float16 (update: the same names and shapes, all finite), which is added back to
  the float32 global weights before any other check: what follows sees float32 weights either way;
- its metrics have exactly the keys of fl_client.training_round.RoundReply.metrics, all finite, `declined` 0 or 1;
- a declined reply reports 0 examples (it is counted, never averaged in); a trained one a whole number of
  users from 1 to strategy.max_site_users and to the site's declared user count;
- its per-item weights are one finite, non-negative vector over the item table's rows, and its optimiser
  moments finite and shaped like the weights they belong to;
- its update (its weights minus the round's start, L2 over every trainable tensor) is at most
  `norm_bound_factor` times the median update of the round's otherwise valid replies (with fewer than
  MIN_SITES_FOR_MEDIAN of those, the median of earlier rounds' accepted medians, when there are any) and at
  most `max_update_norm` (each 0 = off). A longer update is still accepted, within `max_update_norm`, when
  its pull on the average (its users times its norm) is at most `norm_bound_factor` times the round's median
  pull, with MIN_SITES_FOR_MEDIAN replies or more, under a rule that averages weighted by users
  (AVERAGING) with item_rows=average: a site moves such an average by its pull over all the round's users,
  so it moves it no more than `norm_bound_factor` sites of median pull would. Under DP this keeps honest
  small sites, whose update is mostly noise of norm about σ·C·√d / users (3 users send an update 6 times as
  long as 19 users do, with the same pull); a scaled update of a site of typical size (norm and pull both
  scaled) is still dropped, and so is a long update that claims few users but still pulls too hard. Under
  secure aggregation every reply carries the one secure average,
  so neither norm check nor the direction check can judge a site: the norm bound is off, `max_update_norm` and
  `min_cosine` are refused, and `secagg_clip` bounds each coordinate of each site's update instead;
- with `min_cosine` above -1, its update's cosine with the round's coordinate-wise median update is at least
  that (fl_server.direction: 0 drops a sign-flipped update, which has an honest length).

Declared user count: the first num-examples the server accepts from a node in a training pins that node's
user count (kept in the strategy's checkpointed state, so a resume keeps it). A later reply claiming more
users is dropped: a site cannot grow its weight in the average after the fact. The first claim itself is
bounded only by strategy.max_site_users, so set that near the largest site's real size. A site whose data
really grew has to start a new training (a new out_dir) to weigh in with the new count.

A round whose replies leave fewer than strategy.min_nodes usable sites (when any was dropped or failed), or
whose aggregate is not finite, leaves the global model unchanged; `max_failed_rounds` such rounds in a row
stop the run (RoundsFailedError) once the unchanged model of the last one is checkpointed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from statistics import median

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fl_server.config import AVERAGING, StrategyConfig
from fl_server.direction import flat_update, median_cosines
from fl_server.replies import checked_record, payload_bytes, reply_metrics
from fl_server.round_record import RoundRecord
from shared_model import wire
from shared_model.npy import ArrayDataError, decode_array

log = logging.getLogger(__name__)
TRAIN_METRICS = frozenset({wire.NUM_EXAMPLES, wire.TRAIN_LOSS, wire.DP_ENABLED, wire.EPSILON, wire.DELTA,
                           wire.DECLINED, wire.TRAIN_SECONDS, wire.PEAK_MEMORY_MB})
TRAIN_RECORDS = frozenset({wire.METRICS, wire.NOTES})  # and one of WEIGHT_RECORDS
WEIGHT_RECORDS = frozenset({wire.ARRAYS, wire.UPDATE})  # the weights, or (float16) their change from the start
OPTIONAL_RECORDS = frozenset({wire.ITEM_WEIGHTS, wire.OPTIMIZER_STATE})
MIN_SITES_FOR_MEDIAN = 3  # with fewer valid updates, one attacker moves the median: earlier rounds' is used
KEPT_NORMS = 20  # earlier rounds' accepted medians kept (checkpointed) for rounds with too few sites
# Evaluate metrics that are means of per-user values in [0, 1] (shared_model.metrics.RankingMetrics: hr@k,
# ndcg@k, mrr@k, mrr, and their second moments "<name>:m2"; validation NDCG@10).
RANKING_PREFIXES = ("hr@", "ndcg@", "mrr", wire.VALID_NDCG10)
REASONS_SHOWN = 3  # dropped replies named per round in the error that stops a run (metrics.jsonl has all)


class RoundsFailedError(RuntimeError):
    """Too many rounds in a row produced no usable global model: the run stops, its checkpoints intact."""


def finite(values: np.ndarray) -> bool:
    """Whether every value is finite (integer arrays always are)."""
    return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())


def metrics_problem(msg: Message) -> str:
    """Why the reply's MetricRecord is unusable ("" when it is fine)."""
    record = msg.content.metric_records.get(wire.METRICS)
    if record is None:
        return f"no {wire.METRICS!r} record"
    keys = set(record)
    if keys != TRAIN_METRICS:
        return f"metric keys: missing {sorted(TRAIN_METRICS - keys)}, unexpected {sorted(keys - TRAIN_METRICS)}"
    numbers = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and math.isfinite(v)}
    bad = sorted(set(record) - set(numbers))
    if bad:
        return f"metrics {bad} are not finite numbers"
    if numbers[wire.DECLINED] not in (0.0, 1.0):
        return f"{wire.DECLINED}={numbers[wire.DECLINED]} is neither 0 nor 1"
    return ""


def examples_problem(examples: float, declared: int | None, max_site_users: int) -> str:
    """Why a trained reply's num-examples cannot weigh in the average ("" when it can)."""
    if examples != int(examples) or examples < 1:
        return f"{wire.NUM_EXAMPLES}={examples} is not a whole number of users >= 1"
    if examples > max_site_users:
        return f"{wire.NUM_EXAMPLES}={examples:.0f} is above strategy.max_site_users={max_site_users}"
    if declared is not None and examples > declared:
        return f"{wire.NUM_EXAMPLES}={examples:.0f} is above the {declared} users this site declared earlier"
    return ""


def arrays_problem(sent: ArrayRecord | None, start: ArrayRecord, dtype: str | None = None) -> str:
    """Why the reply's weights (or, with `dtype`, its update in that dtype) do not fit the round's global
    weights ("" when they do)."""
    if sent is None:
        return f"no {wire.ARRAYS!r} record"
    if set(sent) != set(start):
        return f"tensors: missing {sorted(set(start) - set(sent))}, unexpected {sorted(set(sent) - set(start))}"
    for name, array in sent.items():
        expected = start[name]
        if tuple(array.shape) != tuple(expected.shape) or array.dtype != (dtype or expected.dtype):
            return (f"tensor {name}: {tuple(array.shape)} {array.dtype}, expected {tuple(expected.shape)} "
                    f"{dtype or expected.dtype}")
        try:
            if not finite(decode_array(array, name)):
                return f"tensor {name} holds NaN or infinite values"
        except ArrayDataError as err:
            return str(err)
    return ""


def weights_problem(msg: Message, start: ArrayRecord, precision: str) -> str:
    """Why the reply's weights, or its float16 update where the round asked for one, are unusable."""
    sent = [key for key in WEIGHT_RECORDS if key in msg.content.array_records]
    if sent == [wire.UPDATE]:
        if precision != "float16":
            return f"an {wire.UPDATE!r} record, but this run asks for the weights themselves ({wire.ARRAYS!r})"
        return f"{wire.UPDATE}: " + problem if (problem := arrays_problem(
            msg.content.array_records[wire.UPDATE], start, "float16")) else ""
    if len(sent) > 1:
        return f"both {wire.ARRAYS!r} and {wire.UPDATE!r} records"
    return arrays_problem(msg.content.array_records.get(wire.ARRAYS), start)


def with_weights(msg: Message, start: Mapping[str, np.ndarray]) -> Message:
    """A checked `msg` with a float16 update replaced by the float32 weights it stands for (start + update), and
    every tensor decoded once (fl_server.replies.CheckedArray)."""
    update = msg.content.array_records.get(wire.UPDATE)
    if update is not None:
        msg.content[wire.ARRAYS] = ArrayRecord({name: Array(start[name] + array.numpy().astype(np.float32))
                                                for name, array in checked_record(update).items()})
        del msg.content[wire.UPDATE]
    for key, record in list(msg.content.array_records.items()):
        msg.content[key] = checked_record(record)
    return msg


def moments_problem(moments: ArrayRecord, start: ArrayRecord) -> str:
    """Why shared optimiser moments ("<param>:<moment>" and wire.MOMENTS_STEP) are unusable ("" when fine)."""
    for key, array in moments.items():
        try:
            values = decode_array(array, key)
        except ArrayDataError as err:
            return f"{wire.OPTIMIZER_STATE}: {err}"
        param = key.split(":", 1)[0]
        if key == wire.MOMENTS_STEP:
            expected: tuple[int, ...] | None = (1,)
        else:
            expected = tuple(start[param].shape) if ":" in key and param in start else None
        if expected is None:
            return f"{wire.OPTIMIZER_STATE}: {key} belongs to no trained tensor"
        if tuple(values.shape) != expected:
            return f"{wire.OPTIMIZER_STATE}: {key} has shape {tuple(values.shape)}, expected {expected}"
        if not finite(values):
            return f"{wire.OPTIMIZER_STATE}: {key} holds NaN or infinite values"
    return ""


def optional_problem(msg: Message, start: ArrayRecord, rows: int) -> str:
    """Why the per-item weights or optimiser moments a reply carries are unusable ("" when they are fine)."""
    weights = msg.content.array_records.get(wire.ITEM_WEIGHTS)
    if weights is not None:
        try:
            values = decode_array(weights[wire.ITEM_WEIGHTS], wire.ITEM_WEIGHTS) \
                if set(weights) == {wire.ITEM_WEIGHTS} else None
        except ArrayDataError:
            values = None
        if values is None or values.ndim != 1 or (rows and values.shape != (rows,)) or not finite(values) \
                or (values < 0).any():
            return f"{wire.ITEM_WEIGHTS}: expected one finite, non-negative vector of {rows} rows"
    moments = msg.content.array_records.get(wire.OPTIMIZER_STATE)
    return moments_problem(moments, start) if moments is not None else ""


def reply_problem(msg: Message, start: ArrayRecord, fingerprint: str, declared: int | None, max_site_users: int,
                  item_rows: int = 0, precision: str = "float32") -> str:
    """Why a (non-error, right-version) training reply must be dropped, naming its node ("" when it is usable)."""
    records = set(msg.content)
    problem = ""
    known = TRAIN_RECORDS | WEIGHT_RECORDS | OPTIONAL_RECORDS
    missing = sorted(TRAIN_RECORDS - records) + ([] if records & WEIGHT_RECORDS else [wire.ARRAYS])
    if missing or records - known:
        problem = f"records: missing {missing}, unexpected {sorted(records - known)}"
    notes = msg.content.config_records.get(wire.NOTES)
    said = notes.get(wire.CATALOG_FINGERPRINT) if notes is not None else None
    if not problem and said != fingerprint:
        problem = f"catalog fingerprint {said!r}, not this run's {fingerprint!r}"
    problem = problem or metrics_problem(msg) or weights_problem(msg, start, precision)
    if not problem:
        metrics = reply_metrics(msg)
        examples = metrics[wire.NUM_EXAMPLES]
        if metrics[wire.DECLINED] == 1.0:
            problem = f"declined, but {wire.NUM_EXAMPLES}={examples:g} (a declined reply reports 0)" if examples else ""
        else:
            problem = examples_problem(examples, declared, max_site_users) or optional_problem(msg, start, item_rows)
    return f"node {msg.metadata.src_node_id}: {problem}" if problem else ""


def evaluation_problem(msg: Message, max_site_users: int) -> str:
    """Why a (non-error, right-version) evaluate reply must not be pooled, naming its node ("" when it may be).
    Its scores pick the exported best model, so: only the metrics a site sends (fl_client.evaluation.evaluate_round),
    all finite, users a whole number from 0 to max_site_users, and the ranking metrics (HR, NDCG, MRR and
    their second moments) within [0, 1]. (A site of another catalog refuses to evaluate: an error reply.)"""
    record = msg.content.metric_records.get(wire.METRICS)
    if record is None:
        return f"node {msg.metadata.src_node_id}: no {wire.METRICS!r} record"
    numbers = {k: float(v) for k, v in record.items() if isinstance(v, int | float) and math.isfinite(v)}
    users = numbers.get(wire.NUM_EXAMPLES)
    ranking = [k for k in numbers if k.split(":", 1)[0].startswith(RANKING_PREFIXES)]
    unknown = sorted(set(numbers) - set(ranking) - {wire.NUM_EXAMPLES, wire.TRAIN_CE})
    outside = [k for k in ranking if not 0.0 <= numbers[k] <= 1.0]
    if len(numbers) < len(record):
        problem = f"metrics {sorted(set(record) - set(numbers))} are not finite numbers"
    elif unknown:
        problem = f"unexpected metrics {unknown}"
    elif outside:
        problem = f"metrics {outside} outside [0, 1]"
    elif users is None or users != int(users) or not 0 <= users <= max_site_users:
        problem = f"{wire.NUM_EXAMPLES}={users} is not a whole number of users from 0 to {max_site_users}"
    else:
        return ""
    return f"node {msg.metadata.src_node_id}: {problem}"


def update_norm(sent: ArrayRecord, start: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the update (sent weights, checked, minus the round's start), over every trainable tensor."""
    return math.sqrt(sum(float(np.sum((sent[k].numpy().astype(np.float64) - start[k]) ** 2)) for k in sent))


def norm_bound(norms: list[float], earlier: list[float], factor: float, max_norm: float) -> float:
    """The largest update norm this round accepts (inf when no bound applies)."""
    bound = max_norm if max_norm > 0 else math.inf
    reference = median(norms) if len(norms) >= MIN_SITES_FOR_MEDIAN else (median(earlier) if earlier else None)
    if factor > 0 and reference:  # a zero median (no site moved) bounds nothing
        bound = min(bound, factor * reference)
    return bound


def pull_bound(norms: list[float], users: list[float], factor: float) -> float | None:
    """The largest pull on the average (users x update norm) that lets an update above the norm bound in; None
    when none does (no factor, too few sites for a median of their own, or no site moved)."""
    pulls = [u * n for u, n in zip(users, norms, strict=True)]
    if factor <= 0 or len(pulls) < MIN_SITES_FOR_MEDIAN or not median(pulls):
        return None
    return factor * median(pulls)


def check_reply_settings(config: StrategyConfig) -> None:
    """ValueError naming a reply-check or robust-aggregation setting that cannot work."""
    if config.norm_bound_factor and config.norm_bound_factor < 1:
        raise ValueError(f"strategy.norm_bound_factor={config.norm_bound_factor}: use 0 (off) or a factor >= 1 (below "
                         "1, honest updates longer than the round's median would be dropped every round)")
    for name in ("max_update_norm", "max_failed_rounds"):
        if getattr(config, name) < 0:
            raise ValueError(f"strategy.{name}={getattr(config, name)} must be >= 0 (0 = off)")
    if not -1 <= config.min_cosine <= 1:
        raise ValueError(f"strategy.min_cosine={config.min_cosine} must be in [-1, 1] (-1 = off)")
    if config.secure_aggregation and (config.max_update_norm or config.min_cosine > -1):
        raise ValueError(f"strategy.max_update_norm={config.max_update_norm:g} and strategy.min_cosine="
                         f"{config.min_cosine:g} judge each site's own update, which secure aggregation hides: the "
                         "server sees only the average, so the check would drop every site or none. Use 0 and -1 "
                         "(off); under secure aggregation strategy.secagg_clip bounds each coordinate of a site's "
                         "update")
    if config.update_precision not in wire.UPDATE_PRECISIONS:
        raise ValueError(f"strategy.update_precision={config.update_precision!r} must be one of "
                         f"{', '.join(wire.UPDATE_PRECISIONS)}")
    if config.secure_aggregation and config.update_precision != "float32":
        raise ValueError(f"strategy.update_precision={config.update_precision} does not apply under secure "
                         "aggregation, whose masked update is already quantized (strategy.secagg_bits): use float32")
    if config.max_site_users < 1:
        raise ValueError(f"strategy.max_site_users={config.max_site_users} must be >= 1")
    if config.num_selected < 0:
        raise ValueError(f"strategy.num_selected={config.num_selected} must be >= 1, or 0 for the round's usable "
                         "replies less num_malicious")


class ReplyGate:
    """Mixin of the strategies (fl_server.strategy.RoundHooks): the checks above, per round, and the count of
    rounds in a row that left the global model unchanged."""

    round_start: ArrayRecord | None = None  # the global weights this round's training started from
    decoded_start: tuple[ArrayRecord, dict[str, np.ndarray]] | None = None  # round_start, and as arrays
    last_round: RoundRecord  # what this round received (fl_server.round_record)
    catalog_fingerprint: str = ""  # the run's catalog: a reply naming another is dropped
    declared_users: dict[int, int]  # node -> the users it declared with its first accepted reply (checkpointed)
    accepted_norms: list[float]  # medians of the accepted update norms of the last rounds (checkpointed)
    norm_bound_factor: float = 0.0  # drop updates longer than this times the round's median norm (0 = off)
    weighs_pull: bool = False  # the rule averages weighted by users: a longer update of a small pull is kept
    max_update_norm: float = 0.0  # drop updates longer than this (0 = off)
    min_cosine: float = -1.0  # drop updates whose cosine with the round's median update is below this (-1 = off)
    max_site_users: int = 10_000_000  # no reply may claim more users
    max_failed_rounds: int = 3  # stop after this many rounds in a row without a usable aggregate (0 = never)
    update_precision: str = "float32"  # float16: sites may send their update in half precision (wire.UPDATE)
    failed_rounds: int = 0  # rounds in a row that left the global model unchanged
    failed_reasons: list[str]  # why, one line per such round

    def set_reply_checks(self, config: StrategyConfig) -> None:
        """Take the reply-check settings; no site has declared its users yet, no round has failed."""
        # under secure aggregation every reply carries the one average: no site's own length to bound
        self.norm_bound_factor = 0.0 if config.secure_aggregation else config.norm_bound_factor
        # a users-weighted average, and no row weights: a site's users are its whole weight in the average
        self.weighs_pull = config.name in AVERAGING and config.item_rows == "average"
        self.max_update_norm = config.max_update_norm
        self.min_cosine = config.min_cosine
        self.max_site_users, self.max_failed_rounds = config.max_site_users, config.max_failed_rounds
        self.update_precision = config.update_precision
        self.declared_users, self.accepted_norms, self.failed_reasons = {}, [], []

    def checked(self, replies: list[Message], item_rows: int) -> tuple[list[Message], list[str]]:
        """The replies that pass reply_problem, float16 updates made float32 weights, and the reasons of those
        that do not; the largest valid reply's bytes as sent go into the round's row."""
        if self.round_start is None:
            raise RuntimeError("aggregate_train before configure_train: no round start weights to check against")
        valid, dropped = [], []
        for msg in replies:
            problem = reply_problem(msg, self.round_start, self.catalog_fingerprint,
                                    self.declared_users.get(msg.metadata.src_node_id), self.max_site_users, item_rows,
                                    self.update_precision)
            if problem:
                dropped.append(problem)
            else:
                valid.append(msg)
        self.last_round.bytes_from_each_site = max((payload_bytes(m.content) for m in valid), default=0)
        return [with_weights(m, self.start_values()) for m in valid], dropped

    def start_values(self) -> dict[str, np.ndarray]:
        """The round's start weights as NumPy arrays, decoded once per round (not once per reply)."""
        if self.round_start is None:
            raise RuntimeError("no round start weights: configure_train has not run")
        if self.decoded_start is None or self.decoded_start[0] is not self.round_start:
            self.decoded_start = (self.round_start, {k: decode_array(v, k) for k, v in self.round_start.items()})
        return self.decoded_start[1]

    def within_norm_bound(self, trained: list[Message]) -> tuple[list[Message], list[str]]:
        """The trained replies whose update norm is within this round's bound (norm_bound), and the reasons of
        those above it; the norms go into the round's row, and the accepted sites' user counts are pinned as
        their declared ones (see the module docstring)."""
        start = self.start_values()
        norms = [update_norm(m.content.array_records[wire.ARRAYS], start) for m in trained]
        bound = norm_bound(norms, self.accepted_norms, self.norm_bound_factor, self.max_update_norm)
        users = [float(reply_metrics(m)[wire.NUM_EXAMPLES]) for m in trained]
        pulls = pull_bound(norms, users, self.norm_bound_factor) if self.weighs_pull else None  # None: norm alone
        hard = self.max_update_norm if self.max_update_norm > 0 else math.inf
        accepted = [n <= bound or (pulls is not None and u * n <= pulls and n <= hard)
                    for n, u in zip(norms, users, strict=True)]
        kept = [(m, n) for m, n, ok in zip(trained, norms, accepted, strict=True) if ok]
        over = [f"node {m.metadata.src_node_id}: update norm {n:.4g} above this round's bound {bound:.4g}"
                + (f", and its pull on the average (users x norm) {u * n:.4g} above {pulls:.4g}"
                   if pulls is not None and n <= hard else "")
                for m, n, u, ok in zip(trained, norms, users, accepted, strict=True) if not ok]
        if self.min_cosine > -1 and kept:
            cosines = median_cosines([flat_update(m.content.array_records[wire.ARRAYS], start) for m, _ in kept])
            over += [f"node {m.metadata.src_node_id}: update at cosine {c:.3f} to the round's median update, below "
                     f"{self.min_cosine:g}" for (m, _), c in zip(kept, cosines, strict=True) if c < self.min_cosine]
            kept = [pair for pair, c in zip(kept, cosines, strict=True) if c >= self.min_cosine]
        if kept:
            self.accepted_norms = [*self.accepted_norms, median(n for _, n in kept)][-KEPT_NORMS:]
        for msg, _ in kept:
            self.declared_users.setdefault(msg.metadata.src_node_id, int(reply_metrics(msg)[wire.NUM_EXAMPLES]))
        if norms:  # JSON has no infinity: an unbounded round says null
            self.last_round.update_norms = {"median": median(norms), "max_accepted": max((n for _, n in kept),
                                               default=0.0), "bound": bound if math.isfinite(bound) else None,
                                            "pull_bound": pulls}
        return [m for m, _ in kept], over

    def unusable_round(self, global_round: int, why: str) -> tuple[None, None]:
        """Leave the global model unchanged, say why (log and the round's row), and count the round."""
        self.failed_rounds += 1
        self.last_round.unusable = why
        dropped = self.last_round.dropped_reasons or []
        shown = "; ".join(dropped[:REASONS_SHOWN]) + (f" and {len(dropped) - REASONS_SHOWN} more"
                                                       if len(dropped) > REASONS_SHOWN else "")
        self.failed_reasons = [*self.failed_reasons,
                               f"round {global_round}: {why}" + (f" (dropped {shown})" if dropped else "")]
        log.warning("round %d: %s; the global model is unchanged (%d such round(s) in a row)", global_round, why,
                    self.failed_rounds)
        return None, None

    def round_succeeded(self) -> None:
        """A round changed the global model: the count of failed rounds in a row starts again."""
        self.failed_rounds, self.failed_reasons = 0, []

    def raise_if_failing(self) -> None:
        """Stop the run after `max_failed_rounds` unusable rounds in a row, naming why each failed. Called once
        the round is checkpointed: the unchanged model of the last good round is on disk, and a resume
        continues from it."""
        if self.max_failed_rounds and self.failed_rounds >= self.max_failed_rounds:
            raise RoundsFailedError(
                f"stopping: {self.failed_rounds} rounds in a row left the global model unchanged "
                f"(strategy.max_failed_rounds={self.max_failed_rounds}): {' | '.join(self.failed_reasons)}. The "
                "model of the last good round is checkpointed and exported, and metrics.jsonl and report.md name "
                "every dropped reply; fix or remove the sites named, then resume (rounds continue from the "
                "checkpoint).")

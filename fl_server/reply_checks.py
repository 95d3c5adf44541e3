"""What a site's training reply must be before it may touch the global model.

A reply is dropped, with a reason naming the node and the field, unless: its records are exactly the ones a
site sends; its weights have exactly the round's tensor names, shapes and dtypes and are all finite; its
metrics have exactly the expected keys, all finite; its catalog fingerprint is the run's; and (when it
trained) its num-examples is a whole number from 1 to the site's declared user count and to
`max_site_users`. A site declares its user count with the first num-examples the server accepts from it in
a training (the server keeps that per node, across resumes); a later reply claiming more users is dropped,
so a site cannot grow its weight in the average after the fact. Then the update norms: a trained reply whose
update (its weights minus the round's start) is longer than `norm_bound_factor` times the median of the
round's valid updates (of earlier rounds' medians when fewer than three sites are valid), or than
`max_update_norm`, is dropped.
"""

from __future__ import annotations

import math
from statistics import median
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, Message

from shared_model import wire

TRAIN_METRICS = frozenset({wire.NUM_EXAMPLES, wire.TRAIN_LOSS, wire.DP_ENABLED, wire.EPSILON, wire.DELTA,
                           wire.DECLINED, wire.TRAIN_SECONDS, wire.PEAK_MEMORY_MB})
TRAIN_RECORDS = frozenset({wire.ARRAYS, wire.METRICS, wire.NOTES})
OPTIONAL_RECORDS = frozenset({wire.ITEM_WEIGHTS, wire.OPTIMIZER_STATE})
MIN_SITES_FOR_MEDIAN = 3  # with fewer valid updates, one attacker moves the median: earlier rounds' is used


def finite(values: np.ndarray) -> bool:
    """Whether every value is finite (integer arrays always are)."""
    return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())


def metric(msg: Message, key: str) -> float:
    """One metric of a reply whose MetricRecord passed metrics_problem."""
    return float(cast(float, msg.content.metric_records[wire.METRICS][key]))


def metrics_problem(msg: Message) -> str:
    """Why the reply's MetricRecord is unusable ("" when it is fine)."""
    record = msg.content.metric_records.get(wire.METRICS)
    if record is None:
        return f"no {wire.METRICS!r} record"
    keys = set(record)
    if keys != TRAIN_METRICS:
        return f"metric keys: missing {sorted(TRAIN_METRICS - keys)}, unexpected {sorted(keys - TRAIN_METRICS)}"
    bad = [k for k, v in record.items() if not isinstance(v, int | float) or not math.isfinite(float(v))]
    if bad:
        return f"metrics {bad} are not finite numbers"
    if metric(msg, wire.DECLINED) not in (0.0, 1.0):
        return f"{wire.DECLINED}={record[wire.DECLINED]} is neither 0 nor 1"
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


def arrays_problem(sent: ArrayRecord | None, start: ArrayRecord) -> str:
    """Why the reply's weights do not fit the round's global weights ("" when they do)."""
    if sent is None:
        return f"no {wire.ARRAYS!r} record"
    if set(sent) != set(start):
        return f"tensors: missing {sorted(set(start) - set(sent))}, unexpected {sorted(set(sent) - set(start))}"
    for name, array in sent.items():
        expected = start[name]
        if tuple(array.shape) != tuple(expected.shape) or array.dtype != expected.dtype:
            return (f"tensor {name}: {tuple(array.shape)} {array.dtype}, expected {tuple(expected.shape)} "
                    f"{expected.dtype}")
        if not finite(array.numpy()):
            return f"tensor {name} holds NaN or infinite values"
    return ""


def optional_problem(msg: Message, rows: int) -> str:
    """Why the per-item weights or optimiser moments a reply carries are unusable ("" when they are fine)."""
    weights = msg.content.array_records.get(wire.ITEM_WEIGHTS)
    if weights is not None:
        values = [a.numpy() for a in weights.values()]
        if set(weights) != {wire.ITEM_WEIGHTS} or (rows and values[0].shape != (rows,)) or not finite(values[0]):
            return f"{wire.ITEM_WEIGHTS}: expected one finite vector of {rows} rows"
    moments = msg.content.array_records.get(wire.OPTIMIZER_STATE)
    if moments is not None and not all(finite(a.numpy()) for a in moments.values()):
        return f"{wire.OPTIMIZER_STATE} holds NaN or infinite values"
    return ""


def reply_problem(msg: Message, start: ArrayRecord, fingerprint: str, declared: int | None, max_site_users: int,
                  item_rows: int = 0) -> str:
    """Why a (non-error, right-version) training reply must be dropped, naming its node ("" when it is usable)."""
    records = set(msg.content)
    problem = ""
    if not records >= TRAIN_RECORDS or records - TRAIN_RECORDS - OPTIONAL_RECORDS:
        problem = (f"records: missing {sorted(TRAIN_RECORDS - records)}, unexpected "
                   f"{sorted(records - TRAIN_RECORDS - OPTIONAL_RECORDS)}")
    notes = msg.content.config_records.get(wire.NOTES)
    said = notes.get(wire.CATALOG_FINGERPRINT) if notes is not None else None
    if not problem and said != fingerprint:
        problem = f"catalog fingerprint {said!r}, not this run's {fingerprint!r}"
    problem = problem or metrics_problem(msg) or arrays_problem(msg.content.array_records.get(wire.ARRAYS), start)
    if not problem and metric(msg, wire.DECLINED) == 0.0:
        examples = metric(msg, wire.NUM_EXAMPLES)
        problem = examples_problem(examples, declared, max_site_users) or optional_problem(msg, item_rows)
    return f"node {msg.metadata.src_node_id}: {problem}" if problem else ""


def update_norm(sent: ArrayRecord, start: ArrayRecord) -> float:
    """L2 norm of the update (sent weights minus the round's start), over every trainable tensor."""
    return math.sqrt(sum(float(np.sum((sent[k].numpy().astype(np.float64) - start[k].numpy()) ** 2))
                         for k in sent))


def norm_bound(norms: list[float], earlier: list[float], factor: float, max_norm: float) -> float:
    """The largest update norm this round accepts (inf when no bound applies)."""
    bound = max_norm if max_norm > 0 else math.inf
    reference = median(norms) if len(norms) >= MIN_SITES_FOR_MEDIAN else (median(earlier) if earlier else None)
    if factor > 0 and reference:  # a zero median (no site moved) bounds nothing
        bound = min(bound, factor * reference)
    return bound

"""What the sites' replies report, summed up for a round's log line: their metrics, privacy reports, costs
and reasons for declining, and the bytes each message carries."""

from __future__ import annotations

from statistics import mean
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from shared_model import wire
from shared_model.npy import decode_array

PRIVACY_KEYS = (wire.EPSILON, wire.DELTA, wire.DP_ENABLED, wire.DECLINED)
COST_KEYS = (wire.TRAIN_SECONDS, wire.PEAK_MEMORY_MB)  # reported as max/mean over sites, not user-weighted


def reply_metrics(msg: Message) -> dict[str, float]:
    """The MetricRecord of a site's reply, as plain floats."""
    record = msg.content.metric_records[wire.METRICS]
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


class CheckedArray(Array):
    """A site's Array whose bytes were decoded and checked once (`decode_array`): `numpy()` returns those values
    instead of parsing the bytes again, as Flower's `Array.numpy()` does on every call (the aggregation, the norm
    bound and the direction check each asked for every tensor of every reply)."""

    values: np.ndarray

    @classmethod
    def of(cls, array: Array, name: str) -> CheckedArray:
        """`array` decoded (ArrayDataError when its bytes are not what it declares), same bytes on the wire."""
        checked = cls(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=array.data)
        checked.values = decode_array(array, name)
        return checked

    def numpy(self) -> np.ndarray:
        return self.values.copy()  # a fresh array each call, as Flower's: no caller can alter the checked one


def checked_record(record: ArrayRecord) -> ArrayRecord:
    """`record` with every Array a CheckedArray (ArrayDataError for the first whose bytes do not check)."""
    checked = ArrayRecord()  # item by item: ArrayRecord(dict) would copy each into a plain Array
    for name, array in record.items():
        checked[name] = CheckedArray.of(array, name)
    return checked


def plain_record(record: ArrayRecord) -> ArrayRecord:
    """`record` of plain Arrays (the same bytes): Flower serializes an Array under its class name, so a
    CheckedArray must never reach a message to a site."""
    return ArrayRecord(dict(record.items()))  # ArrayRecord(dict) copies each into a plain Array


def reply_note(msg: Message, key: str, without_notes: str = "") -> str:
    """One of the words a site's reply carries (wire.NOTES); "" for a key it left out, `without_notes` when
    the reply has no notes at all."""
    notes = msg.content.config_records.get(wire.NOTES)
    return str(notes.get(key, "")) if notes is not None else without_notes


def failure(msg: Message) -> str:
    """Why a site's reply cannot be used ("" when it can): the error it sent, or a wire version other than
    this server's (a site of another fedrec release)."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        return f"node {node}: {msg.error.reason}"
    notes = msg.content.config_records.get(wire.NOTES)
    return wire.version_problem(dict(notes) if notes is not None else {}, f"node {node}")


def declined_reason(msg: Message) -> str:
    """Why a site declined to train, in its own words."""
    return reply_note(msg, wire.DECLINED_REASON, without_notes="no reason given")


def held_digest(msg: Message) -> str:
    """The digest of the frozen tensors a site says it keeps ("" when it keeps none or says nothing)."""
    return reply_note(msg, wire.FROZEN_HELD)


def privacy_report(metrics: list[dict[str, float]]) -> dict[str, Any]:
    """Max and mean ε over the sites that trained with DP, and how many sites had DP off."""
    private = [m for m in metrics if m.get(wire.DP_ENABLED, 0.0) == 1.0]
    report: dict[str, Any] = {"sites": len(metrics), "sites_with_dp": len(private),
                              "sites_without_dp": len(metrics) - len(private)}
    if private:
        report.update(epsilon_max=max(m[wire.EPSILON] for m in private),
                      epsilon_mean=mean(m[wire.EPSILON] for m in private),
                      delta_max=max(m[wire.DELTA] for m in private))
    return report


def site_cost(metrics: list[dict[str, float]]) -> dict[str, float]:
    """The slowest and the mean site's training time, and the largest peak memory, over the sites that trained
    (replies from sites older than these keys carry none: then nothing is reported)."""
    trained = [m for m in metrics if m.get(wire.DECLINED, 0.0) == 0.0 and wire.TRAIN_SECONDS in m]
    if not trained:
        return {}
    return {"train_seconds_max": max(m[wire.TRAIN_SECONDS] for m in trained),
            "train_seconds_mean": mean(m[wire.TRAIN_SECONDS] for m in trained),
            "peak_memory_mb_max": max(m.get(wire.PEAK_MEMORY_MB, 0.0) for m in trained)}


def training_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of the sites' training metrics, without privacy keys (a mean ε would mislead) or cost
    keys (site_cost reports those)."""
    aggregated = aggregate_metricrecords(records, weight_key)
    return MetricRecord({k: v for k, v in aggregated.items() if k not in PRIVACY_KEYS + COST_KEYS})


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's records: arrays and metrics as Flower counts them, configs serialised
    (Flower 1.41's ConfigRecord.count_bytes raises on an empty string)."""
    return sum(len(record.deflate()) if isinstance(record, ConfigRecord) else record.count_bytes()
               for record in content.values())

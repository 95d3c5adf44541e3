"""Secure aggregation of a training round over Flower's Message API (SecAgg+, shared_model.secure_sum): the
server learns the weighted sum of the sites' updates, never one site's.

A round is four exchanges instead of one: (1) each site makes fresh key pairs and sends the public halves;
(2) each site seals Shamir shares of its two secrets for its neighbours, which the server forwards unread;
(3) the train message, which carries the shares sealed for the site, is answered with the site's weighted update
quantized and masked (its weights never travel); (4) the survivors send the shares that remove the private masks
of the survivors and the pairwise masks of the sites that dropped after (2). A site may drop at any stage: while
each neighbourhood keeps its threshold of shares, the sum of the others is still recovered.

`SecureAggregationGrid` wraps the Grid a Flower strategy drives: it answers the strategy's train messages with the
sites' own replies (metrics and notes as sent) whose weights are all the one secure average, so the strategy's
weighted averaging, server steps, reply checks and bookkeeping run unchanged. Rules that need each site's own
update (median, trimmed mean, Krum, Bulyan, per-item row weights, shared moments) cannot run on it (refused by
`secure_settings`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fl_server.config import AVERAGING, ServerConfig
from fl_server.replies import payload_bytes
from shared_model import secure_sum, wire
from shared_model.npy import ArrayDataError, decode_array
from shared_model.secure_sum import SecureSumError, SecureSumSettings

log = logging.getLogger(__name__)
SECAGG_FAILED = 4101  # Error code standing for a site's reply the secure sum could not use (reason attached)
KEY_BYTES = 32  # X25519 public keys
Roster = dict[int, tuple[bytes, bytes, int]]  # node -> (enc-key, mask-key, trainable users)


def secure_settings(cfg: ServerConfig) -> SecureSumSettings | None:
    """The run's secure-aggregation settings (None when it is off); a ValueError for what it cannot serve."""
    strategy = cfg.strategy
    if not strategy.secure_aggregation:
        return None
    if strategy.name not in AVERAGING:
        raise ValueError(f"strategy.secure_aggregation needs an averaging strategy ({', '.join(AVERAGING)}): "
                         f"{strategy.name} needs each site's own update, which secure aggregation hides")
    if strategy.item_rows != "average" or cfg.share_optimizer_state:
        raise ValueError("strategy.secure_aggregation sums only the weights: use strategy.item_rows=average and "
                         "share_optimizer_state=false (per-item weights and moments would travel in clear)")
    settings = SecureSumSettings(clip=strategy.secagg_clip, bits=strategy.secagg_bits,
                                 modulus_bits=strategy.secagg_modulus_bits, threshold=strategy.secagg_threshold,
                                 neighbours=strategy.secagg_neighbours)
    settings.check(2)
    return settings


class SecureAggregationGrid:
    """The Grid a strategy drives, with each training and evaluation round secure-aggregated (see module
    docstring)."""

    def __init__(self, grid: Grid, settings: SecureSumSettings) -> None:
        self.grid = grid
        self.settings = settings
        self.last: dict[str, int] = {}  # the last training round's SecureRound.stats
        self.last_evaluation: dict[str, int] = {}  # the last evaluation round's

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Train and evaluate messages: the secure round's replies; anything else: passed on."""
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        if kind == MessageType.TRAIN:
            secure = SecureRound(self.grid, self.settings, timeout)
            self.last = secure.stats  # filled once the sum is recovered: empty for a round that failed
        elif kind == MessageType.EVALUATE:  # sums of per-user metrics: integers mod 2^64 (encode_sums)
            secure = SecureRound(self.grid, replace(self.settings, modulus_bits=64), timeout, evaluation=True)
            self.last_evaluation = secure.stats
        else:
            return self.grid.send_and_receive(messages, timeout=timeout)
        return secure.run(messages)


@dataclass
class SecureRound:
    """One secure-aggregated training round (see module docstring)."""

    grid: Grid
    settings: SecureSumSettings
    timeout: float | None
    evaluation: bool = False  # the round's evaluation (sums of the sites' metrics), not its training
    failed: list[Message] = field(default_factory=list)  # error replies, passed on to the strategy's bookkeeping
    sent: dict[int, Message] = field(default_factory=dict)  # this round's train message to each node
    stats: dict[str, int] = field(default_factory=dict)  # what the round's log row says of the secure sum
    traffic: dict[int, int] = field(default_factory=dict)  # bytes of the key, share and unmask stages, by site
    wire_bytes: dict[str, int] = field(default_factory=dict)  # the largest train message and masked reply as sent

    def refused(self, reply: Message, reason: str) -> Message:
        """An error reply from `reply`'s node: the secure sum could not use what it sent."""
        return Message(Error(code=SECAGG_FAILED, reason=f"secure aggregation: {reason}"),
                       reply_to=self.sent[reply.metadata.src_node_id])

    def count(self, node: int, content: RecordDict) -> None:
        """Add a stage message's bytes to its site's protocol traffic (both directions)."""
        self.traffic[node] = self.traffic.get(node, 0) + payload_bytes(content)

    def ask(self, action: str, records: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Send one stage's query to each node; the SECAGG records of the nodes that answered without error."""
        messages = [Message(content=RecordDict({wire.SECAGG: ConfigRecord(record)}), dst_node_id=node,
                            message_type=f"{MessageType.QUERY}.{action}") for node, record in records.items()]
        answers: dict[int, dict[str, Any]] = {}
        for msg in messages:
            self.count(msg.metadata.dst_node_id, msg.content)
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_content():
                self.count(reply.metadata.src_node_id, reply.content)
            if reply.has_error() or wire.SECAGG not in reply.content.config_records:
                self.failed.append(reply)
                continue
            answers[reply.metadata.src_node_id] = dict(reply.content.config_records[wire.SECAGG])
        return answers

    def run(self, messages: list[Message]) -> list[Message]:
        """The four exchanges; the strategy's train replies (see module docstring)."""
        config = messages[0].content.config_records[wire.CONFIG]
        tag = secure_sum.round_tag(str(config[wire.TRAINING_ID]), int(str(config[wire.SERVER_ROUND])),
                                   self.evaluation)
        common = {"tag": tag, **self.settings.to_record()}
        keys = self.ask(wire.SECAGG_KEYS_QUERY, {m.metadata.dst_node_id: common for m in messages})
        roster: Roster = {n: (k["enc-key"], k["mask-key"], int(k["users"])) for n, k in keys.items()
                          if valid_keys(k)}
        if len(roster) < 2:
            return self.failed
        self.settings.check(len(roster))
        listed = sorted(roster)
        shares = self.ask(wire.SECAGG_SHARES_QUERY, {n: {**common, "roster": listed,
                                                         "roster-enc": [roster[m][0] for m in listed],
                                                         "roster-mask": [roster[m][1] for m in listed]}
                                                     for n in listed})
        inbox = forward(shares)
        max_weight = max((roster[n][2] for n in shares), default=1)
        train = [with_secagg(m, {**common, "max-weight": max_weight, "sources": sorted(inbox.get(n, {})),
                                 "sealed": [inbox[n][s] for s in sorted(inbox.get(n, {}))]})
                 for m in messages if (n := m.metadata.dst_node_id) in shares]
        self.wire_bytes["to_site"] = max((payload_bytes(m.content) for m in train), default=0)
        masked, replies, names = self.collect_masked(train)
        if len(masked) < 2:  # the sum of one would be that site's update: not unmasked
            return self.failed + [self.refused(r, "only one site sent a masked update") for r in replies]
        graph = secure_sum.neighbourhoods(listed, self.settings.neighbours, tag)
        try:
            total = self.unmask(tag, common, masked, sorted(set(shares) - set(masked)), graph, roster)
            if self.evaluation:
                means, users = secure_sum.decode_sums(total, len(replies))
            else:  # the levels, then the weight's and the clipped count's digits
                tail = 2 * self.settings.count_digits
                summed = secure_sum.decode(total[:-tail], self.settings)
                weight, clipped = secure_sum.decode_counts(total[-tail:], len(replies), self.settings)
        except SecureSumError as err:
            return self.failed + [self.refused(r, str(err)) for r in replies]
        outcome = {"sites_summed": len(masked), "dropped_after_sharing": len(shares) - len(masked),
                   "fewest_summed": max(self.settings.fewest_summed(len(listed), len(graph[n]) + 1) for n in masked),
                   "protocol_bytes_max": max(self.traffic.values())}
        if self.evaluation:
            self.stats.update(outcome)
            return self.failed + with_pooled_metrics(replies, dict(zip(names, means, strict=True)), users,
                                                     self.sent)
        problem = sum_problem(summed, weight, clipped, len(replies), max_weight, self.settings)
        if problem:
            return self.failed + [self.refused(r, problem) for r in replies]
        self.stats.update(outcome, clipped_coordinates=clipped)
        self.stats.update({f"bytes_{k}": v for k, v in self.wire_bytes.items()})  # what crossed the network
        return self.failed + with_average(replies, summed, weight, max_weight, self.sent,
                                          messages[0].content.array_records[wire.ARRAYS])

    def collect_masked(self, stage3: list[Message]) -> tuple[dict[int, np.ndarray], list[Message], list[str]]:
        """Stage 3: the replies carrying a masked vector of the round's length, by node; and for an evaluation,
        the metrics' names (the ones most sites sent: a site that names others is refused)."""
        dtype = secure_sum.MODULUS_BITS[self.settings.modulus_bits]
        self.sent = {m.metadata.dst_node_id: m for m in stage3}
        got = []
        for reply in self.grid.send_and_receive(stage3, timeout=self.timeout):
            record = None if reply.has_error() else reply.content.array_records.get(wire.MASKED)
            vector, problem = None, "no masked vector"
            if record is not None and wire.MASKED in record:
                try:
                    vector = decode_array(record[wire.MASKED], wire.MASKED)
                except ArrayDataError as err:
                    problem = str(err)
            if vector is None:
                self.failed.append(reply if reply.has_error() else self.refused(reply, problem))
            else:
                got.append((reply, vector, metric_names(reply) if self.evaluation else []))
                self.wire_bytes["from_site"] = max(self.wire_bytes.get("from_site", 0), payload_bytes(reply.content))
        if self.evaluation:  # one value per metric, then the user count
            common = Counter(tuple(n) for _, _, n in got if n).most_common(1)
            names = common[0][0] if common else ()
            length, what = len(names) + 1, f"sums of the metrics {list(names)} and the users,"
        else:  # levels, then the weight's and the clipped count's digits
            start = stage3[0].content.array_records[wire.ARRAYS] if stage3 else ArrayRecord({})
            length = sum(int(np.prod(a.shape)) for a in start.values()) + 2 * self.settings.count_digits
            names, what = (), "update of"
        masked, kept = {}, []
        for reply, vector, sent_names in got:
            if vector.shape != (length,) or vector.dtype != dtype or tuple(sent_names) != names:
                self.failed.append(self.refused(reply, f"no masked {what} {length} {np.dtype(dtype).name} values"))
                continue
            masked[reply.metadata.src_node_id] = vector
            kept.append(reply)
        return masked, kept, list(names)

    def unmask(self, tag: bytes, common: dict[str, Any], masked: dict[int, np.ndarray], dropped: list[int],
               graph: dict[int, list[int]], roster: Roster) -> np.ndarray:
        """Stage 4: the sum of the masked vectors with every mask removed."""
        survivors = sorted(masked)
        answers = self.ask(wire.SECAGG_UNMASK_QUERY, {n: {**common, "survivors": survivors, "dropped": dropped}
                                                      for n in survivors})
        held: dict[int, list[bytes]] = {}
        for answer in answers.values():
            for node, share in zip(answer.get("nodes", []), answer.get("shares", []), strict=False):
                held.setdefault(int(node), []).append(bytes(share))
        total = np.sum(np.stack(list(masked.values())), axis=0, dtype=masked[survivors[0]].dtype)
        for node in survivors:
            seed = secure_sum.combine_secret(held.get(node, []), self.settings.shares_needed(len(graph[node]) + 1))
            total -= secure_sum.mask(seed, len(total), self.settings)
        for node in dropped:
            key = secure_sum.combine_secret(held.get(node, []), self.settings.shares_needed(len(graph[node]) + 1))
            for other in (o for o in graph[node] if o in masked):
                pair = secure_sum.pair_mask(key, roster[other][1], tag, node, other, len(total), self.settings)
                total = total - pair if secure_sum.pair_sign(other, node) > 0 else total + pair
        return total


def valid_keys(record: dict[str, Any]) -> bool:
    """Whether a stage-1 answer holds two 32-byte public keys and a positive user count."""
    return (all(isinstance(record.get(k), bytes) and len(record[k]) == KEY_BYTES for k in ("enc-key", "mask-key"))
            and isinstance(record.get("users"), int) and record["users"] > 0)


def forward(shares: dict[int, dict[str, Any]]) -> dict[int, dict[int, bytes]]:
    """Stage 2's sealed shares regrouped by destination: dst -> {src: sealed} (the server cannot open them)."""
    inbox: dict[int, dict[int, bytes]] = {}
    for src, record in shares.items():
        for dst, blob in zip(record.get("destinations", []), record.get("sealed", []), strict=False):
            if int(dst) in shares and int(dst) != src:
                inbox.setdefault(int(dst), {})[src] = bytes(blob)
    return inbox


def with_secagg(msg: Message, record: dict[str, Any]) -> Message:
    """The strategy's train message for one site with the round's SECAGG record added."""
    content = RecordDict({**msg.content.array_records, **msg.content.config_records,
                          wire.SECAGG: ConfigRecord(record)})
    return Message(content=content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)


def sum_problem(summed: np.ndarray, weight: int, clipped: int, sites: int, max_weight: int,
                settings: SecureSumSettings) -> str:
    """Why an unmasked sum (the decoded updates, the weights', the clipped counts') cannot be the sum of `sites`
    honest sites' vectors ("" when it can be): a site that sends integers outside its quantization range shows
    only here."""
    limit = sites * 2 ** (settings.bits - 1)
    levels = np.abs(summed / settings.step)
    if not 0 <= weight <= sites * max_weight or not 0 <= clipped <= sites * len(levels) or \
            levels.max(initial=0.0) > limit:
        return "the unmasked sum lies outside what honest sites can send (a site sent integers out of range)"
    return ""


def with_average(replies: list[Message], summed: np.ndarray, weight: int, max_weight: int,
                 sent: dict[int, Message], start: ArrayRecord) -> list[Message]:
    """Each survivor's reply (its metrics and notes) carrying the secure weighted average as its weights: the
    decoded sum (D,) of the updates, each × its users / max_weight, over the summed users `weight`."""
    # every survivor declined (weight 0): their replies say so, and carry the unchanged start
    average = ArrayRecord(unflatten(summed * max_weight / weight if weight else np.zeros_like(summed), start))
    return [Message(RecordDict({**r.content.metric_records, **r.content.config_records, wire.ARRAYS: average}),
                    reply_to=sent[r.metadata.src_node_id]) for r in replies]


def metric_names(reply: Message) -> list[str]:
    """The metric names an evaluate reply lists for its masked sums ([] when it lists none properly)."""
    record = reply.content.config_records.get(wire.SECAGG)
    names = record.get("names") if record is not None else None
    return [str(n) for n in names] if isinstance(names, list) and all(isinstance(n, str) for n in names) else []


def with_pooled_metrics(replies: list[Message], means: dict[str, float], users: int,
                        sent: dict[int, Message]) -> list[Message]:
    """Each survivor's evaluate reply (its notes) carrying the pooled per-user means of every survivor's users,
    and a share of their count (whole numbers that add up to it): the strategy's user-weighted average of the
    replies is then the pooled means, and no site's own figures are ever known."""
    share, extra = divmod(users, len(replies))
    out = []
    for i, reply in enumerate(replies):
        metrics = MetricRecord({**means, wire.NUM_EXAMPLES: share + (1 if i < extra else 0)})
        notes = reply.content.config_records.get(wire.NOTES, ConfigRecord())
        out.append(Message(RecordDict({wire.METRICS: metrics, wire.NOTES: notes}),
                           reply_to=sent[reply.metadata.src_node_id]))
    return out


def unflatten(update: np.ndarray, start: ArrayRecord) -> dict[str, Array]:
    """The round's starting weights plus `update` (name order, as the sites flatten it), in their dtypes."""
    arrays, offset = {}, 0
    for name in sorted(start):
        base = start[name].numpy()
        step = update[offset:offset + base.size].reshape(base.shape)
        arrays[name] = Array(np.ascontiguousarray((base + step).astype(base.dtype)))
        offset += base.size
    return arrays

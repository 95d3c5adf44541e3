"""Which sites get the run's frozen public tensors: every site until it says it keeps them (fl_client.frozen_cache)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from shared_model import wire


def with_frozen(messages: Iterable[Message], frozen: ArrayRecord, held: Collection[int] = (),
                extra: Mapping[str, ArrayRecord] | None = None) -> list[Message]:
    """The same messages with the frozen public tensors beside the weights for every node not in `held` (the
    sites that said they keep them), and `extra` records (the shared optimiser moments) for all (server ->
    site only).

    The strategy itself aggregates and keeps only the trainable weights (sites send nothing else back);
    a site needs the frozen ones too to rebuild the model, once.
    """
    messages = list(messages)
    if not frozen and not extra:
        return messages
    merged: dict[tuple[int, bool], RecordDict] = {}  # FedAvg sends one shared RecordDict to every node
    for msg in messages:
        content = msg.content
        send = bool(frozen) and msg.metadata.dst_node_id not in held
        if (id(content), send) not in merged:
            records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {
                wire.ARRAYS: content.array_records[wire.ARRAYS], wire.CONFIG: content.config_records[wire.CONFIG],
                **(extra or {}), **({wire.FROZEN: frozen} if send else {})}
            merged[id(content), send] = RecordDict(records)
        msg.content = merged[id(content), send]
    return messages

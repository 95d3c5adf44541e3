"""Choosing the rows a `model.trained_item_rows` model trains, before round 1: every site sends its user-level
item histogram (noisy under DP, paid from its own budget), the server sums them and keeps the K largest rows.

The choice travels to the sites as the model's frozen `item_row_mask` and is kept in every checkpoint, so a
resumed run never asks again (a query resent before the first checkpoint gets each site's stored answer).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fl_server.replies import failure
from shared_model import wire
from shared_model.modeling_fedrec import FedRecModel

log = logging.getLogger(__name__)


def choose_trained_rows(grid: Grid, model: FedRecModel, config: ConfigRecord, min_nodes: int,
                        timeout: float) -> dict[str, Any] | None:
    """Ask every connected site (at least `min_nodes`) for its item counts, select the model's rows from their
    sum and return what happened; None when the model trains every row or its rows are already chosen."""
    if not model.config.trained_item_rows or model.item_rows_selected:
        return None
    _, nodes = sample_nodes(grid, min_nodes, min_nodes)
    # Settings only: a site's histogram needs the catalog (pinned by the config's fingerprint), not the weights.
    content = RecordDict({wire.CONFIG: ConfigRecord({**config, wire.SERVER_ROUND: 0})})
    messages = [Message(content=content, dst_node_id=node, message_type=f"{MessageType.QUERY}.{wire.COUNT_QUERY}")
                for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    total = torch.zeros(model.config.num_item_rows, dtype=torch.float64)
    counted, declined, failed = 0, [], 0
    for reply in replies:
        if reason := failure(reply):
            failed += 1
            log.warning("item counts: %s", reason)
            continue
        if wire.ITEM_COUNTS not in reply.content.array_records:
            reason = str(reply.content.config_records[wire.NOTES][wire.DECLINED_REASON])
            declined.append(reason)
            log.warning("item counts: site %s declined: %s", reply.metadata.src_node_id, reason)
            continue
        total += reply.content.array_records[wire.ITEM_COUNTS].to_torch_state_dict()[wire.ITEM_COUNTS].double()
        counted += 1
    summary = {"trained_item_rows": model.config.trained_item_rows, "sites_counted": counted,
               "sites_declined": len(declined), "sites_failed": failed, "sites_no_reply": len(nodes) - len(replies)}
    if not counted:
        raise RuntimeError(f"no site sent item counts to choose the model's trained item rows from ({summary}); "
                           "without them the sites cannot train a model.trained_item_rows model")
    model.select_most_counted_rows(total)
    log.info("trained item rows chosen: %s", summary)
    return summary

"""What the server's checks and average cost per training reply (issue: scale and speed, item 2).

python benchmarks/aggregate_cost.py [--replies 50] [--items 500] [--feature-dim 384]

`replies` replies of the demo model's trainable weights (hidden 64, 2 blocks, item bias, title features of
`feature-dim`, a catalog of `items`), each the start weights plus small noise, go through FedAvg's
aggregate_train as the ServerApp calls it: every check (fl_server.reply_checks), the norm bound, the average.
Prints the median of 5 calls, and per reply. Run it against two commits' fl_server to compare them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_server.config import StrategyConfig
from fl_server.strategy import build_strategy
from shared_model import wire
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel
from simulations.console import quiet_console


def reply(state: dict[str, np.ndarray], node: int) -> Message:
    """A trained site's reply, as fl_client.client_app builds it."""
    metrics = {wire.NUM_EXAMPLES: 20.0, wire.TRAIN_LOSS: 1.0, wire.EPSILON: 1.0, wire.DELTA: 1e-5,
               wire.DP_ENABLED: 1.0, wire.DECLINED: 0.0, wire.TRAIN_SECONDS: 0.1, wire.PEAK_MEMORY_MB: 100.0}
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
                          wire.METRICS: MetricRecord(metrics),
                          wire.NOTES: ConfigRecord({wire.WIRE_VERSION: wire.VERSION, wire.DECLINED_REASON: "",
                                                    wire.CATALOG_FINGERPRINT: ""})})
    return Message(content=content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=50)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--feature-dim", type=int, default=384)
    args = parser.parse_args()
    quiet_console()
    for name in ("_run_id", "_node_id", "_task_id"):  # what a running ServerApp process has set
        setattr(TaskIdentity, name, 1)
    config = FedRecConfig(num_items=args.items, hidden_size=64, max_len=50, item_bias=True,
                          feature_dim=args.feature_dim, feature_scoring=True)
    start = {k: v.numpy() for k, v in wire.trainable_state(FedRecModel(config)).items()}
    rng = np.random.default_rng(0)
    seconds = []
    for _ in range(6):
        strategy = build_strategy(StrategyConfig(name="fedavg", min_nodes=2))
        strategy.round_start, strategy.catalog_fingerprint = ArrayRecord({k: Array(v) for k, v in start.items()}), ""
        replies = [reply({k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in start.items()},
                         node) for node in range(1, args.replies + 1)]
        began = time.perf_counter()
        arrays, _ = strategy.aggregate_train(2, replies)
        seconds.append(time.perf_counter() - began)
        assert arrays is not None and strategy.last_round.dropped == 0
    took = statistics.median(seconds[1:])
    print(f"machine: {platform.node()}, {platform.machine()}; {len(start)} tensors, "
          f"{sum(v.size for v in start.values()):,} weights a reply")
    print(f"aggregate_train of {args.replies} replies: {took:.3f} s ({took / args.replies * 1000:.1f} ms a reply)")


if __name__ == "__main__":
    main()

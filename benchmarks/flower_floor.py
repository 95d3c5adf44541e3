"""Flower's own cost of a round in the simulation engine, without fedrec (issue: scale and speed, item 2).

python benchmarks/flower_floor.py SITES PER_ROUND ROUNDS [--weights N] [--busy-ms MS]

run_simulation with SITES nodes on 2 CPUs (a node 1 CPU, as fedrec-simulate's default), a ClientApp whose train
handler returns the weights it was sent at once, and Flower's FedAvg asking PER_ROUND nodes a round to train a
float32 vector of N weights (default 150,000: about the demo model's trainable weights). Prints each round's wall
time and the median over rounds 2 and on (the first also starts Ray's workers): the floor under
benchmarks/many_sites.py's overhead, which adds fedrec's per-message work (each site's data, model, DP
accounting) and the server's checks, aggregation and checkpoints.

With --busy-ms, the handler first keeps its CPU busy for MS ms of CPU time, as a site's training would, and
reports the wall time that took; the overhead printed is then the round time less the sum of those times over
the 2 CPUs, as many_sites.py counts it. Flower's engine polls every node for new messages every 0.1 s while a
round's messages wait for a site (vce_api.add_messages_to_queue), so its own cost grows with the round's length.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sites", type=int)
    parser.add_argument("per_round", type=int)
    parser.add_argument("rounds", type=int)
    parser.add_argument("--weights", type=int, default=150_000)
    parser.add_argument("--busy-ms", type=float, default=0.0, help="CPU time each train message takes (training)")
    args = parser.parse_args()
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        started, until = time.perf_counter(), time.process_time() + args.busy_ms / 1000
        while time.process_time() < until:
            pass
        return Message(RecordDict({"arrays": msg.content.array_records["arrays"],
                                   "metrics": MetricRecord({"num-examples": 1.0,
                                                            "train-seconds": time.perf_counter() - started})}),
                       reply_to=msg)

    server = ServerApp()
    stamps: list[float] = []
    busy: list[float] = []  # each round's sum of the handlers' busy seconds, over the 2 CPUs

    class Timed(FedAvg):
        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
            replies = list(replies)
            seconds = [r.content.metric_records["metrics"]["train-seconds"] for r in replies if r.has_content()]
            busy.append(sum(s for s in seconds if isinstance(s, float)) / 2)
            out = super().aggregate_train(server_round, replies)
            stamps.append(time.perf_counter())
            return out

    @server.main()
    def run(grid: Grid, context: Context) -> None:
        strategy = Timed(fraction_train=args.per_round / args.sites, min_train_nodes=args.per_round,
                         min_available_nodes=args.sites, fraction_evaluate=0.0)
        stamps.append(time.perf_counter())
        strategy.start(grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(args.weights, np.float32))}),
                       num_rounds=args.rounds)
        gaps = np.diff(stamps)
        print(f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs\n"
              f"{args.sites} sites, {args.per_round} a round, {args.weights:,} weights: round s "
              f"{', '.join(f'{g:.2f}' for g in gaps)}; median of rounds 2-{args.rounds}: {np.median(gaps[1:]):.2f}; "
              f"busy {args.busy_ms:g} ms a message: busy s a round {np.median(busy[1:]):.2f}, overhead s "
              f"{np.median(gaps[1:] - np.array(busy[1:])):.2f}", flush=True)

    run_simulation(server_app=server, client_app=client, num_supernodes=args.sites,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False}})


if __name__ == "__main__":
    main()

"""Round times of a real deployment on loopback: `fedrec-server` and N `fedrec-client` SuperNodes as separate
processes (Flower starts one ClientApp process per message), each site with its own events file, DP at ε = 8.

python benchmarks/loopback_rounds.py OUT_DIR [--sites 3] [--users 60] [--rounds 3]

The setting of CI's deployment test without its crashes (tests/fl_server/test_deploy.py: 60 users a site of the
embedded synthetic generator, 40 items, hidden size 16, title features): every round trained and evaluated.
Prints each round's seconds (from the ServerApp's metrics.jsonl), the whole run's wall time, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from fl_client.site import SiteConfig
from simulations.config import DataConfig
from simulations.federation import write_sites
from simulations.partition import PartitionConfig, partition_users
from simulations.prepare import prepare_data

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True)
    data = prepare_data(DataConfig(name="synthetic",
                                   synthetic={"num_users": args.users * args.sites, "num_items": 40, "seed": 5}))
    parts = partition_users(data.sequences, PartitionConfig(kind="iid", num_partitions=args.sites))
    sites = write_sites(data, parts, args.out / "sites", SiteConfig(data_path="", catalog_path="", state_dir=""))
    link, *ports = free_ports(1 + args.sites)
    logs = args.out / "logs"
    logs.mkdir()
    run_config = "batch-size=32 lr=0.005 model.hidden-size=16 model.max-len=20 round-timeout=120.0"
    start = time.monotonic()
    clients = [subprocess.Popen(
        [str(BIN / "fedrec-client"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
         "--data", site.data_path, "--catalog", site.catalog_path, "--state-dir", site.state_dir, "--epsilon", "8",
         "--device", "cpu"], stdout=(logs / f"client{i}.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True) for i, (site, port) in enumerate(zip(sites, ports, strict=True))]
    try:
        server = subprocess.run(
            [str(BIN / "fedrec-server"), "--insecure", "--host", "127.0.0.1", "--port", str(link), "--catalog",
             sites[0].catalog_path, "--out-dir", str(args.out / "server"), "--num-rounds", str(args.rounds),
             "--min-sites", str(args.sites), "--run-config", run_config],
            stdout=(logs / "server.log").open("w"), stderr=subprocess.STDOUT, timeout=1800, check=False)
    finally:
        for client in clients:
            client.terminate()
        for client in clients:
            client.wait(60)
    wall = time.monotonic() - start
    if server.returncode != 0:
        raise SystemExit(f"fedrec-server failed (exit {server.returncode}); see {logs / 'server.log'}")
    rows = [json.loads(line) for line in (args.out / "server" / "metrics.jsonl").read_text().splitlines()]
    seconds = [row["seconds"] for row in rows]
    rounds = [round(b - a, 1) for a, b in zip([0.0, *seconds], seconds, strict=False)]
    print(f"machine: {platform.node() or 'unknown'}, {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs; "
          f"{args.sites} sites x {args.users} users, {args.rounds} rounds")
    print(f"seconds of rounds {[row['round'] for row in rows]}: {rounds} (the first from the ServerApp's start); "
          f"{wall:.0f} s from the sites' start to the server's exit")


if __name__ == "__main__":
    main()

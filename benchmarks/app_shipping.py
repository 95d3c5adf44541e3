"""What shipping the simulation's ClientApp costs per message (issue: scale and speed, item 2).

python benchmarks/app_shipping.py [--sites 100 1000]

Flower's Ray backend pickles the ClientApp (through its loader closure) with every message it hands a site's
worker, and the worker unpickles it. This times cloudpickle's dumps (the driver) and loads (a worker) of the app
as fedrec-simulate built it before (build_client_app over a closure holding every site's settings) and as it
ships now (SimulatedClientApp: its sites file's path and SHA-256), in a process with the driver's imports (their
count matters: cloudpickle scans the loaded modules for each function it takes by value).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ray import cloudpickle

import simulations.simulate  # noqa: F401 (the driver's imports)
from fl_client.client_app import build_client_app
from fl_client.site import SiteConfig
from simulations.sites_app import SimulatedClientApp, write_sites_file


def timed(call: Callable[[], object], repeats: int = 20) -> float:
    """Median milliseconds of `call`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {platform.machine()}; {len(sys.modules)} modules loaded\n")
    print("| sites | app | pickled bytes | dumps ms | loads ms |")
    print("|---|---|---|---|---|")
    for count in args.sites:
        sites = [SiteConfig(data_path=f"/data/site-{i}/events.parquet", catalog_path="/data/catalog.json",
                            state_dir=f"/data/site-{i}/state") for i in range(count)]
        closure = build_client_app(lambda context, sites=sites: sites[int(context.node_config["partition-id"])])
        with tempfile.TemporaryDirectory() as folder:
            shipped = SimulatedClientApp(*write_sites_file(sites, Path(folder)))
            for name, app in (("closure over the sites (before)", closure), ("sites file (now)", shipped)):
                def loader(app: object = app) -> object:  # what Flower's backend pickles: a closure over the app
                    return app

                data = cloudpickle.dumps(loader)
                dumps = timed(lambda loader=loader: cloudpickle.dumps(loader))
                loads = timed(lambda data=data: cloudpickle.loads(data))
                print(f"| {count} | {name} | {len(data):,} | {dumps:.2f} | {loads:.2f} |")


if __name__ == "__main__":
    main()

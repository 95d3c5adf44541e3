"""The simulated sites' ClientApp: what each of the simulation engine's workers (Ray actors) unpickles and runs.

Kept apart from simulations.federation, which drives a simulation (the ServerApp, the data preparation, Flower's
simulation engine): a worker serves sites only, and importing the driver cost each worker 3-4 s of CPU at start
(Opacus through the Hydra configs, matplotlib through the report; BENCHMARKS.md, "An evaluate message without
torch._dynamo, simulated workers without the driver, and CI").
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from fl_client.client_app import serve_sites
from fl_client.site import SiteConfig
from simulations.attacks import AttackConfig, attack_mod

Attack = tuple[AttackConfig, Sequence[int]]  # how, and which sites (partition ids) misbehave


class SimulatedClientApp(ClientApp):
    """fedrec's ClientApp serving the simulated sites of a sites file (write_sites_file).

    Flower's Ray backend pickles the ClientApp with every message it hands a site's worker, and cloudpickle
    takes closures by value: the handlers, and through them every site's settings. That cost the driver 6.9 ms
    a message at 100 sites, 12.1 ms (194 KB) at 1,000 (benchmarks/app_shipping.py; BENCHMARKS.md, "Many simulated
    sites"). This app pickles as the file's path and SHA-256 instead; each worker process builds it from the
    file once (simulated_client_app) and refuses a file that changed since."""

    def __init__(self, sites_file: str, digest: str) -> None:
        path = Path(sites_file)
        content = path.read_bytes()
        if hashlib.sha256(content).hexdigest() != digest:
            raise ValueError(f"{path}: the simulated sites file changed after the simulation wrote it")
        payload = json.loads(content)
        self.sites = [SiteConfig.from_node_config(node) for node in payload["sites"]]
        self.attack: Attack | None = None
        if payload["attack"]:
            self.attack = (AttackConfig(**payload["attack"]["config"]), payload["attack"]["sites"])
        super().__init__(mods=[attack_mod(*self.attack)] if self.attack else None)
        self.sites_file, self.digest = sites_file, digest
        serve_sites(self, lambda context: self.sites[int(context.node_config["partition-id"])])

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return simulated_client_app, (self.sites_file, self.digest)


@functools.cache
def simulated_client_app(sites_file: str, digest: str) -> SimulatedClientApp:
    """The app of a sites file, built once per process (what a pickled SimulatedClientApp unpickles to)."""
    return SimulatedClientApp(sites_file, digest)


def write_sites_file(sites: Sequence[SiteConfig], folder: Path, attack: Attack | None = None) -> tuple[str, str]:
    """Every simulated site's settings as a SuperNode's node config, and the attack, in `folder`; the file's path
    and SHA-256."""
    path = folder / "sites.json"
    attack_fields = {"config": asdict(attack[0]), "sites": [int(s) for s in attack[1]]} if attack else None
    content = json.dumps({"sites": [site.node_config() for site in sites], "attack": attack_fields}).encode()
    path.write_bytes(content)
    return str(path), hashlib.sha256(content).hexdigest()

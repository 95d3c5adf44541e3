"""Running the real ServerApp and ClientApp on Flower's simulation engine with one site per partition.

Each simulated site gets its own events file, state directory (ledger, cache) and budget, exactly as a
deployed site would; only the transport differs.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.simulation import run_simulation

from fl_client.site import SiteConfig
from fl_server.config import ServerConfig
from fl_server.server_app import build_server_app
from simulations.prepare import PreparedData
from simulations.sites_app import Attack, SimulatedClientApp, write_sites_file

log = logging.getLogger(__name__)


def write_sites(data: PreparedData, parts: Sequence[np.ndarray], root: Path, template: SiteConfig) -> list[SiteConfig]:
    """One events file and state directory per partition, plus the shared public catalog."""
    root.mkdir(parents=True, exist_ok=True)
    catalog_path = data.catalog.save(root)
    frame = data.events.frame
    sites = []
    for index, users in enumerate(parts):
        site_dir = root / f"site-{index}"
        site_dir.mkdir(exist_ok=True)
        user_ids = {data.sequences.user_ids[u] for u in users}
        events = frame.loc[frame["user_id"].isin(user_ids)]
        path = site_dir / "events.parquet"
        events.to_parquet(path, index=False)
        trainable = len(data.sequences.subset(users).trainable_users())
        # Benchmark partitions are public data and often small (ML-100K by region: 18-170 users a site); a
        # deployed site this small refuses DP (SiteConfig.min_users), a simulated one trains and says so.
        min_users = template.min_users if trainable >= template.min_users else 1
        if template.privacy.enabled and min_users < template.min_users:
            log.warning("site %d: %d trainable users, below the %d a deployed site needs for DP training "
                        "(--min-users); simulated anyway", index, trainable, template.min_users)
        sites.append(replace(template, data_path=str(path), catalog_path=str(catalog_path),
                             state_dir=str(site_dir / "state"), data_format="events", min_users=min_users))
        log.info("site %d: %d users, %d events", index, len(user_ids), len(events))
    return sites


@dataclass(frozen=True)
class Resources:
    """What Flower's simulation engine (Ray) may use, and what each simulated site takes of it."""

    num_cpus: int = 2
    cpus_per_client: float = 1.0
    num_gpus: int = 0
    gpus_per_client: float = 0.0

    @classmethod
    def resolve(cls, num_cpus: int, cpus_per_client: float, num_gpus: int | None = None,
                gpus_per_client: float | None = None, device: str = "auto") -> Resources:
        """Fill in the GPU defaults and refuse what Ray could never schedule (Flower would wait forever).

        `num_gpus` None means every GPU torch sees. `gpus_per_client` None shares them evenly among the sites
        that train at once (num_cpus / cpus_per_client of them), at most one GPU each; 0 without GPUs.
        Ray hides the GPUs from a site given none, so such a site trains on CPU.
        """
        if num_cpus < 1 or not 0 < cpus_per_client <= num_cpus:
            raise ValueError(f"federation.cpus_per_client={cpus_per_client} must be > 0 and at most "
                             f"federation.num_cpus={num_cpus}, or no site could ever be scheduled")
        gpus = torch.cuda.device_count() if num_gpus is None else num_gpus
        if gpus < 0:
            raise ValueError(f"federation.num_gpus={num_gpus} must be >= 0 (or null: every GPU torch sees)")
        if gpus_per_client is None:
            gpus_per_client = min(1.0, gpus * cpus_per_client / num_cpus) if gpus else 0.0
        if gpus_per_client < 0 or gpus_per_client > gpus or (gpus_per_client > 1 and gpus_per_client % 1):
            raise ValueError(f"federation.gpus_per_client={gpus_per_client} must be between 0 and "
                             f"federation.num_gpus={gpus} (a whole number above 1), or no site could be scheduled")
        if device == "cuda" and not gpus_per_client:
            raise ValueError("train.device=cuda, but the simulated sites get no GPU (federation.gpus_per_client=0 "
                             f"with {gpus} GPU(s)); use train.device=auto or give them GPUs")
        return cls(num_cpus, cpus_per_client, gpus, gpus_per_client)

    def backend_config(self) -> dict[str, Any]:
        """Flower's backend_config for run_simulation."""
        return {"client_resources": {"num_cpus": self.cpus_per_client, "num_gpus": self.gpus_per_client},
                "init_args": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "include_dashboard": False}}

    def describe(self) -> str:
        """One log line: what each site gets and how many train at once."""
        at_once = int(self.num_cpus / self.cpus_per_client + 1e-9)  # 1 / 0.1 is 9.999...
        if self.gpus_per_client:
            at_once = min(at_once, int(self.num_gpus / self.gpus_per_client + 1e-9))
            return (f"{self.num_cpus} CPUs and {self.num_gpus} GPU(s); each site gets {self.cpus_per_client} CPU and "
                    f"{self.gpus_per_client:g} GPU, {at_once} train at once")
        return f"{self.num_cpus} CPUs, no GPU; each site gets {self.cpus_per_client} CPU, {at_once} train at once"


def run_federation(sites: Sequence[SiteConfig], server: ServerConfig, resources: Resources | None = None,
                   attack: Attack | None = None) -> None:
    """Run the ServerApp and ClientApp in Flower's simulation engine; outputs land in server.out_dir
    (`attack`: sites that rewrite their training replies, simulations.attacks)."""
    resources = resources or Resources()
    log.info("simulation engine: %s", resources.describe())
    with tempfile.TemporaryDirectory(prefix="fedrec-sites-") as folder:
        client_app = SimulatedClientApp(*write_sites_file(sites, Path(folder), attack))
        run_simulation(server_app=build_server_app(lambda _context: server), client_app=client_app,
                       num_supernodes=len(sites), backend_config=resources.backend_config())

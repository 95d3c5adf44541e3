"""Running the real ServerApp and ClientApp on Flower's simulation engine with one site per partition.

Each simulated site gets its own events file, state directory (ledger, cache) and budget, exactly as a
deployed site would; only the transport differs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.simulation import run_simulation

from fl_client.client_app import build_client_app
from fl_client.site import SiteConfig
from fl_server.config import ServerConfig
from fl_server.server_app import build_server_app
from simulations.prepare import PreparedData

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
        sites.append(replace(template, data_path=str(path), catalog_path=str(catalog_path),
                             state_dir=str(site_dir / "state"), data_format="events"))
        log.info("site %d: %d users, %d events", index, len(user_ids), len(events))
    return sites


def backend_config(num_cpus: int, cpus_per_client: float) -> dict[str, Any]:
    """Ray settings for a CPU machine: how many simulated sites train at once."""
    return {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False}}


def run_federation(sites: Sequence[SiteConfig], server: ServerConfig, num_cpus: int = 2,
                   cpus_per_client: float = 1.0) -> None:
    """Run the ServerApp and ClientApp in Flower's simulation engine; outputs land in server.out_dir."""

    def site_of(context: Context) -> SiteConfig:
        return sites[int(context.node_config["partition-id"])]

    run_simulation(server_app=build_server_app(lambda _context: server), client_app=build_client_app(site_of),
                   num_supernodes=len(sites), backend_config=backend_config(num_cpus, cpus_per_client))

"""`fedrec-simulate`: the real ServerApp and ClientApp with N simulated sites on Flower's simulation engine.

Users are partitioned into sites (natural region/merchant, Dirichlet or iid); each site gets its own events
file, privacy ledger and budget; the server checkpoints, evaluates and exports as in a deployment.
`federation.mode=local` runs the local-only baseline on the same partition instead (each site trains alone).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fl_client.site import SiteConfig
from fl_client.train import TrainConfig
from fl_server.config import ServerConfig, StrategyConfig
from fl_server.secure_round import secure_settings
from fl_server.server_app import check_run
from shared_model import secure_sum
from shared_model.console import console_command, exit_on_error, rng_note
from shared_model.metrics import evaluate_popularity, with_standard_errors
from simulations.attacks import AttackConfig, attackers
from simulations.config import RunConfig, register_schemas
from simulations.console import quiet_console
from simulations.federation import Resources, run_federation, write_sites
from simulations.local_only import run_local_only
from simulations.partition import PartitionConfig, partition_users
from simulations.prepare import PreparedData, absolute, prepare_data

log = logging.getLogger(__name__)

# train.* settings that only fedrec-centralized uses: refused here when changed, never silently ignored.
CENTRALIZED_ONLY = {
    "epochs": "set federation.num_rounds and federation.local_epochs instead",
    "patience": "every round is evaluated and the best round is chosen on validation NDCG@10",
    "eval_every": "the sites evaluate every round",
    "proximal_mu": "use strategy.name=fedprox strategy.proximal_mu=...",
}


@dataclass
class FederationConfig:
    """Rounds and the simulation engine's resources."""

    mode: str = "federated"  # (str) federated (ServerApp + ClientApps) or local (each site trains alone)
    num_rounds: int = 5  # (int) federated rounds
    local_epochs: int = 2  # (int) local passes over each site's users per round
    num_cpus: int = 2  # (int) CPUs Ray may use
    cpus_per_client: float = 1.0  # (float) CPUs per simulated site (how many train at once)
    num_gpus: int | None = None  # (int) GPUs Ray may use; null = every GPU torch sees (0 on a CPU machine)
    gpus_per_client: float | None = None  # (float) GPU share per site; null = the GPUs shared by the sites at once
    round_timeout: float = 600.0  # (float) seconds to wait for the sites in each phase
    eval_every: int = 1  # (int) evaluate (sites and server) every k-th round and the last round
    initial_model: str = ""  # (str) exported model directory training starts from ("" = fresh weights)
    central_eval: bool = True  # (bool) the server also evaluates on every user's test event (simulation only)
    keep_optimizer_state: bool = False  # (bool) sites carry their Adam moments across rounds (moot with share)
    share_optimizer_state: bool = False  # (bool) sites start each round from the average of their optimiser states
    decay_from_round: int = 0  # (int) from this round on, decay_lr / decay_server_lr replace lr / server_lr (0 = never)
    decay_lr: float = 0.0  # (float) the sites' learning rate from decay_from_round (0 = unchanged)
    decay_server_lr: float = 0.0  # (float) FedAvgM/FedAdam/FedYogi server lr from decay_from_round (0 = unchanged)


@dataclass
class SimulateConfig(RunConfig):
    """Root schema of `fedrec-simulate`: sites/ and server/ (checkpoints, report, model) go to output_dir."""

    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)



def dropout_margin_note(server: ServerConfig, sites: int) -> str:
    """What distributed DP's tolerance of dropouts costs in noise when all `sites` stay (fl_server.report)."""
    strategy = server.strategy
    settings = secure_settings(server)
    assert settings is not None
    graph = secure_sum.neighbourhoods(list(range(sites)), strategy.secagg_neighbours, b"")  # every site's size
    needed = settings.fewest_summed(sites, len(graph[0]) + 1)
    full = secure_sum.sum_noise_multiplier(1.0, sites, needed, strategy.dp_colluders)
    return (f"distributed DP: each site adds σ/√{needed - strategy.dp_colluders} of the noise, enough for a sum "
            f"over as few as {needed} of the {sites} sites (strategy.secagg_threshold={strategy.secagg_threshold:g}"
            f"{f', {strategy.dp_colluders} colluding' if strategy.dp_colluders else ''}); a round that sums all "
            f"{sites} carries {full:.3f}σ" + ("" if full <= 1 + 1e-9 else ": less accurate than central DP-SGD at "
                                              "σ (secagg_threshold=1.0 gives σ when no site drops)"))

def register_simulate_schemas() -> None:
    """Register the root and the federated groups' schemas (the shared ones come from simulations.config)."""
    register_schemas()
    store = ConfigStore.instance()
    store.store(name="simulate_schema", node=SimulateConfig)
    store.store(group="partition", name="partition_schema", node=PartitionConfig)
    store.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    store.store(group="federation", name="federation_schema", node=FederationConfig)


def run_simulate(cfg: SimulateConfig) -> dict[str, Any]:
    """Partition, then run the federation (or, in local mode, every site alone); return the run's summary."""
    refuse_centralized_only(cfg.train)
    out = Path(cfg.output_dir).resolve()
    if cfg.train.num_threads:  # the server (central evaluation) and local mode run in this process
        torch.set_num_threads(cfg.train.num_threads)
    resources = check_federation(cfg, out) if cfg.federation.mode == "federated" else None  # fail before the work
    data = prepare_data(cfg.data)
    parts = partition_users(data.sequences, cfg.partition, data.catalog)
    write_popularity(data, cfg.model.max_len, out / "popularity.json")
    match cfg.federation.mode:
        case "federated":
            if cfg.strategy.min_nodes > len(parts):  # Flower would wait for the missing sites for ever
                raise ValueError(f"strategy.min_nodes={cfg.strategy.min_nodes}, but the partition has only "
                                 f"{len(parts)} site(s): set strategy.min_nodes={len(parts)} or more partitions")
            assert resources is not None
            return run_federated(cfg, data, parts, out, resources)
        case "local":
            start = absolute(cfg.federation.initial_model) if cfg.federation.initial_model else ""
            return run_local_only(data, parts, cfg.model, cfg.train, cfg.privacy,
                                  cfg.federation.num_rounds * cfg.federation.local_epochs, out / "local", start)
        case _:
            raise ValueError(f"federation.mode must be federated or local, got {cfg.federation.mode!r}")


def refuse_centralized_only(train: TrainConfig) -> None:
    """A clear error for train.* settings fedrec-simulate has no use for, when they differ from the defaults."""
    defaults = OmegaConf.load(Path(__file__).parent / "conf" / "train" / "default.yaml")
    assert isinstance(defaults, DictConfig)
    changed = [f"train.{name}={getattr(train, name)} ({why})" for name, why in CENTRALIZED_ONLY.items()
               if getattr(train, name) != defaults[name]]
    if changed:
        raise ValueError("fedrec-simulate does not use " + "; ".join(changed))


def write_popularity(data: PreparedData, max_len: int, path: Path) -> dict[str, float]:
    """The pooled popularity baseline on every user's test event (a reference row; no site shares counts)."""
    metrics = with_standard_errors(evaluate_popularity(data.sequences, data.sequences, "test", data.catalog.num_rows,
                                                       max_len))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def check_federation(cfg: SimulateConfig, out: Path) -> Resources:
    """The federation's settings, checked before any data is read or site written: what the sites' privacy needs
    from the server, what the ServerApp would refuse, and the simulation engine's CPUs and GPUs."""
    if cfg.privacy.popularity_noise:  # every site would refuse
        raise ValueError("privacy.popularity_noise is for centralized training (fedrec-centralized, or "
                         "federation.mode=local): a federation's sites do not release popularity")
    if cfg.strategy.distributed_dp and not cfg.privacy.enabled:  # every site would refuse
        raise ValueError("strategy.distributed_dp needs DP at the sites (privacy=dp): each adds a share of the noise")
    if cfg.privacy.enabled and cfg.strategy.item_rows != "average":  # every site would decline
        raise ValueError(f"strategy.item_rows={cfg.strategy.item_rows} needs per-item weights from the sites, which "
                         "DP does not cover: use strategy.item_rows=average with DP")
    check_run(server_config(cfg, out))
    fed = cfg.federation
    return Resources.resolve(fed.num_cpus, fed.cpus_per_client, fed.num_gpus, fed.gpus_per_client, cfg.train.device)


def server_config(cfg: SimulateConfig, out: Path, has_timestamps: bool = True, central_eval: str = "") -> ServerConfig:
    """The ServerApp's settings for this simulation (its sites written under out/sites)."""
    fed, train = cfg.federation, cfg.train
    return ServerConfig(
        out_dir=str(out / "server"), catalog_path=str(out / "sites" / "catalog.json"), num_rounds=fed.num_rounds,
        local_epochs=fed.local_epochs, batch_size=train.batch_size, lr=train.lr, optimizer=train.optimizer,
        weight_decay=train.weight_decay, num_negatives=train.num_negatives, seed=train.seed,
        keep_optimizer_state=fed.keep_optimizer_state, share_optimizer_state=fed.share_optimizer_state,
        decay_from_round=fed.decay_from_round, decay_lr=fed.decay_lr, decay_server_lr=fed.decay_server_lr,
        round_timeout=fed.round_timeout, eval_every=fed.eval_every, central_eval_path=central_eval,
        initial_model=absolute(fed.initial_model) if fed.initial_model else "", has_timestamps=has_timestamps,
        model=cfg.model, strategy=cfg.strategy)


def run_federated(cfg: SimulateConfig, data: PreparedData, parts: Sequence[np.ndarray], out: Path,
                  resources: Resources) -> dict[str, Any]:
    """Write the sites, run the ServerApp and ClientApps, and return the server's summary."""
    template = SiteConfig(data_path="", catalog_path="", state_dir="", privacy=cfg.privacy, device=cfg.train.device,
                          min_events=cfg.data.min_events, micro_batch_tokens=cfg.train.micro_batch_tokens,
                          micro_batch_users=cfg.train.micro_batch_users)
    sites = write_sites(data, parts, out / "sites", template)
    central = ""
    if cfg.federation.central_eval:
        central = str(out / "sites" / "central_test_events.parquet")
        data.events.frame.to_parquet(central, index=False)
    server = server_config(cfg, out, data.events.has_timestamps, central)
    if (settings := secure_settings(server)) is not None:
        settings.check(len(sites))  # a round may sum every site: a modulus they would overflow fails here, not there
    if cfg.privacy.enabled:
        strategy = cfg.strategy
        mechanism = (f"distributed DP, one DP-SGD step a round over the union of the sites' users (q = "
                     f"{strategy.dp_sample_rate:g}, σ = {strategy.dp_noise_multiplier:g}, C = "
                     f"{strategy.dp_max_grad_norm:g}), each site adding "
                     + ("its share of the noise under secure aggregation" if strategy.secure_aggregation
                        else "all of it")
                     if strategy.distributed_dp else "DP-SGD per user at every site")
        log.info("privacy: %s; each site's budget ε = %g over all rounds; %s", mechanism, cfg.privacy.epsilon,
                 rng_note(cfg.privacy.secure_mode))
        if strategy.distributed_dp and strategy.secure_aggregation:
            log.info(dropout_margin_note(server, len(sites)))
    attack = None
    if cfg.attack.kind != "none":
        bad = attackers(cfg.attack, len(sites))
        log.warning("attack: sites %s send %s updates (factor %g)", bad, cfg.attack.kind, cfg.attack.factor)
        (out / "attack.json").write_text(json.dumps({"kind": cfg.attack.kind, "sites": bad,
                                                     "factor": cfg.attack.factor}), encoding="utf-8")
        attack = (cfg.attack, bad)
    run_federation(sites, server, resources, attack)
    return dict(json.loads((out / "server" / "summary.json").read_text(encoding="utf-8")))


register_simulate_schemas()


@hydra.main(config_path="conf", config_name="simulate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run and point at the report; a bad input or setting is one paragraph on stderr."""
    quiet_console()
    exit_on_error("fedrec-simulate", lambda: run_and_log(cfg))


def run_and_log(cfg: DictConfig) -> None:
    """Parse the config once, run, and log where the report is."""
    typed: SimulateConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    summary = run_simulate(typed)
    out = Path(typed.output_dir).resolve()
    if typed.federation.mode == "local":
        log.info("local-only: HR@10 %.4f NDCG@10 %.4f (user-weighted over %d sites); report: %s",
                 summary["test"]["hr@10"], summary["test"]["ndcg@10"], summary["sites"], out / "local" / "report.md")
    else:
        log.info("%d rounds done; report: %s", summary["rounds"], out / "server" / "report.md")


cli = console_command("fedrec-simulate", main)  # the console script: takes --debug out before Hydra parses

if __name__ == "__main__":
    cli()

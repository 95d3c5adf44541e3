"""The server's settings: rounds, local-training hyperparameters, the strategy, where outputs go."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from shared_model.factory import ModelConfig

# Strategies that average the sites' updates weighted by their users (before a server step): row-weighted item
# tables work by pre-scaling their input, and the norm bound may weigh an update's pull on the average.
AVERAGING = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")


@dataclass
class StrategyConfig:
    """Which Flower strategy aggregates the sites' updates, and its knobs."""

    # (str) fedavg, fedprox, fedadam, fedyogi, fedavgm, fedtrimmedavg, fedmedian, krum, multikrum, bulyan
    name: str = "fedavg"
    fraction_train: float = 1.0  # (float) share of connected sites asked to train each round
    fraction_evaluate: float = 1.0  # (float) share of connected sites asked to evaluate each round
    min_nodes: int = 2  # (int) sites that must be connected (and answer) before a round starts
    proximal_mu: float = 0.01  # (float) FedProx: pull of local weights towards the global ones
    server_lr: float = 0.1  # (float) FedAdam/FedYogi eta, FedAvgM server learning rate
    server_momentum: float = 0.9  # (float) FedAvgM momentum
    server_beta_1: float = 0.9  # (float) FedAdam/FedYogi first-moment decay
    server_beta_2: float = 0.99  # (float) FedAdam/FedYogi second-moment decay
    server_tau: float = 1e-3  # (float) FedAdam/FedYogi adaptivity floor (added to the root of the second moment)
    trim_beta: float = 0.2  # (float) FedTrimmedAvg: share cut from each end
    num_malicious: int = 0  # (int) Krum, MultiKrum, Bulyan: sites assumed malicious (Bulyan needs 4x+3 sites)
    item_rows: str = "average"  # (str) item-table rows: average or counts (FedAvg family, no DP)
    num_selected: int = 0  # (int) MultiKrum: updates averaged after Krum's selection; 0 = the round's usable
    # replies less num_malicious (a site that drops out lowers it, so an attacker is still left out)
    norm_bound_factor: float = 3.0  # (float) drop updates longer than this times the round's median norm (0 = off),
    # unless (averaging rules, item rows averaged) the update's pull on the average, users x norm, is within this
    # times the round's median pull: honest small DP sites, whose updates are mostly noise, are kept; honest sites
    # measured at most 1.9x the median (BENCHMARKS.md, Robust aggregation), 10x attacks caught; off under secure
    # aggregation (the server sees only the average; secagg_clip bounds each site instead)
    max_update_norm: float = 0.0  # (float) drop updates longer than this L2 norm (0 = off)
    min_cosine: float = -1.0  # (float) drop updates whose cosine with the round's coordinate-wise median update
    # is below this (-1 = off; 0 drops sign-flipped updates, which the norm bound cannot see)
    max_site_users: int = 10_000_000  # (int) a reply claiming more users (num-examples) is dropped
    max_failed_rounds: int = 3  # (int) stop after this many rounds in a row with no usable aggregate (0 = never)
    update_precision: str = "float32"  # (str) how sites send their trained weights: float32, or float16 (their
    # change from the global weights in half precision: half the bytes; not with secure aggregation, which quantizes)
    secure_aggregation: bool = False  # (bool) SecAgg+: the server sees only the sum of the sites' updates
    secagg_clip: float = 0.5  # (float) secure aggregation: largest |coordinate| of a site's update (weighted by
    # its users over the round's largest site's); larger ones are clipped
    secagg_bits: int = 16  # (int) secure aggregation: quantization levels 2^bits over ±secagg_clip
    secagg_modulus_bits: int = 32  # (int) secure aggregation: the sum mod 2^16, 2^32 or 2^64 (2, 4 or 8 bytes a value)
    secagg_threshold: float = 0.67  # (float) secure aggregation: share of a site's neighbourhood whose shares rebuild
    # its masks; the rest may drop out
    secagg_neighbours: int = 0  # (int) secure aggregation: SecAgg+ neighbours per site (even); 0 = every site
    distributed_dp: bool = False  # (bool) each round is one DP-SGD step over the union of the sites' users: each
    # site sends its clipped, noised gradient sum and adds only its share of the noise (with secure aggregation)
    dp_sample_rate: float = 0.01  # (float) distributed DP: the rate q at which every site samples its users
    dp_noise_multiplier: float = 1.0  # (float) distributed DP: σ of the summed gradient (units of dp_max_grad_norm)
    dp_max_grad_norm: float = 1.0  # (float) distributed DP: per-user clipping bound C
    dp_colluders: int = 0  # (int) distributed DP: sites assumed to collude with the server (their noise not counted)
    dp_popularity_noise: float = 0.0  # (float) distributed DP: σ of a popularity release in round 0 that starts
    # the item bias (fl_server.popularity_release; 0 = none); the rounds' σ must leave room for it in the budget


@dataclass
class ServerConfig:
    """One federated training run, as the ServerApp sees it."""

    out_dir: str  # (str) ABSOLUTE directory for checkpoints, metrics and the exported model
    catalog_path: str  # (str) the public catalog.json every site uses
    num_rounds: int = 5  # (int) rounds of training
    local_epochs: int = 2  # (int) local passes over each site's users per round
    batch_size: int = 128  # (int) users per local step
    lr: float = 0.003  # (float) local learning rate
    optimizer: str = "adam"  # (str) local optimizer: adam or sgd
    weight_decay: float = 0.0  # (float) local decoupled weight decay (AdamW)
    num_negatives: int = 0  # (int) sampled-softmax negatives a user, drawn each step; 0 = full-catalog cross-entropy
    seed: int = 0  # (int) seeds the sites' sampling and dropout without DP (DP sites draw fresh entropy)
    keep_optimizer_state: bool = False  # (bool) sites carry their Adam moments across rounds (moot with share)
    share_optimizer_state: bool = False  # (bool) sites start each round from the average of their optimiser states
    decay_from_round: int = 0  # (int) from this round on, decay_lr / decay_server_lr replace lr / server_lr (0 = never)
    decay_lr: float = 0.0  # (float) the sites' learning rate from decay_from_round (0 = unchanged)
    decay_server_lr: float = 0.0  # (float) FedAvgM/FedAdam/FedYogi server lr from decay_from_round (0 = unchanged)
    round_timeout: float = 600.0  # (float) seconds to wait for the sites in each phase of a round
    eval_every: int = 1  # (int) evaluate (sites and server) every k-th round and the last round; 1 = every round
    resume: bool = True  # (bool) continue from the last completed round found in out_dir
    initial_model: str = ""  # (str) ABSOLUTE exported model directory the first round starts from ("" = fresh)
    central_eval_path: str = ""  # (str) events the server holds for central evaluation ("" = none)
    central_eval_format: str = "events"  # (str) adapter for central_eval_path
    has_timestamps: bool = True  # (bool) whether the sites' data has real timestamps (time-gap input)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)

    def __post_init__(self) -> None:
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1 (evaluate every k-th round), got {self.eval_every}")
        if self.num_negatives < 0:
            raise ValueError(f"num-negatives must be 0 (the full softmax) or a number of negatives, got "
                             f"{self.num_negatives}")

    def evaluates(self, server_round: int) -> bool:
        """Whether round `server_round` is evaluated: every eval_every-th round, and always the last."""
        return server_round % self.eval_every == 0 or server_round >= self.num_rounds


def _section(cls: type, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Pick `prefix`+kebab-case keys of a dataclass out of a flat run config."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        key = prefix + f.name.replace("_", "-")
        if key in values:
            value = values[key]
            out[f.name] = [v for v in str(value).split(",") if v] if f.name == "item_features" else value
    return out


def server_config_from_run_config(run_config: Mapping[str, Any]) -> ServerConfig:
    """Parse Flower's flat run config (`model.hidden-size`, `strategy.name`, `num-rounds`, ...) once."""
    flat = dict(run_config)
    for required in ("out-dir", "catalog-path"):
        if not flat.get(required):
            raise ValueError(f"run config needs {required!r} (an absolute path; the ServerApp runs from an "
                             "installed copy of the app, so relative paths would land somewhere unexpected)")
    top = {k: v for k, v in _section(ServerConfig, flat, "").items() if k not in ("model", "strategy")}
    model = ModelConfig(**_section(ModelConfig, flat, "model."))
    return ServerConfig(**top, model=model, strategy=StrategyConfig(**_section(StrategyConfig, flat, "strategy.")))

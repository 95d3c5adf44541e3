"""One federated training round at a site, as plain functions: check the catalog and the budget, train,
account, reply (the round's settings and the evaluation are fl_client.round_config).

Nothing here sees a Flower Message or Context; the ClientApp handlers decode and encode around these.
"""

from __future__ import annotations

import logging
import math
import pickle
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl_client.dp.enrolment import site_lock
from fl_client.dp.ledger import BudgetExceededError, PrivacyLedger
from fl_client.dp.settings import AccountantHistory, PrivacyConfig
from fl_client.moments import from_named_moments, to_named_moments, trainable_names
from fl_client.round_config import RoundConfig, RoundConfigError, check_training_id, global_model
from fl_client.site import SiteConfig, SiteData, check_users, site_delta
from fl_client.train import TrainConfig, TrainingDivergedError, TrainResult, build_optimizer, train
from shared_model import wire
from shared_model.atomic import write_atomically
from shared_model.modeling_fedrec import FedRecModel

log = logging.getLogger(__name__)
# What torch.load(weights_only=True) may fail with on a damaged or foreign state file (never code to run).
UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, TypeError, pickle.UnpicklingError)


@dataclass
class RoundReply:
    """A site's answer to a train request."""

    state: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    dp: bool
    epsilon: float  # cumulative over every round this site trained (0 when DP is off)
    delta: float
    declined: str = ""  # the reason, when the site refused to train
    train_seconds: float = 0.0  # local training time
    peak_memory_mb: float = 0.0  # peak memory while training (GPU allocator, or the process' resident set)
    item_weights: torch.Tensor | None = None  # per catalog row, when the server asked (wire.ITEM_ROWS)
    moments: dict[str, torch.Tensor] | None = None  # the optimiser state after training, when shared

    def metrics(self) -> dict[str, float]:
        """The MetricRecord content; keys are identical for every reply, as Flower's strategies require."""
        return {wire.NUM_EXAMPLES: float(self.num_examples), wire.TRAIN_LOSS: self.train_loss,
                wire.DP_ENABLED: float(self.dp), wire.EPSILON: self.epsilon, wire.DELTA: self.delta,
                wire.DECLINED: float(bool(self.declined)), wire.TRAIN_SECONDS: self.train_seconds,
                wire.PEAK_MEMORY_MB: self.peak_memory_mb}


def plan_round(site: SiteConfig, data: SiteData, round_cfg: RoundConfig, delta: float
               ) -> tuple[float, AccountantHistory]:
    """σ that spreads the site's whole budget over all planned rounds, and this round's planned steps."""
    return planned_sigma(site, data, round_cfg.num_rounds, round_cfg.local_epochs, round_cfg.batch_size, delta)


def planned_sigma(site: SiteConfig, data: SiteData, num_rounds: int, local_epochs: int, batch_size: int,
                  delta: float, cache: bool = True) -> tuple[float, AccountantHistory]:
    """`plan_round` for a plan of `num_rounds` x `local_epochs` at `batch_size` (`cache`: keep the σ search in
    the site's state dir)."""
    from fl_client.dp.engine import calibrate_noise  # Opacus' accountant: imported under DP only

    steps_per_epoch, round_steps = plan_steps(site, data, num_rounds, local_epochs, batch_size)
    privacy = site.round_privacy(delta)
    sigma = calibrate_noise(privacy, 1.0 / steps_per_epoch, num_rounds * round_steps, delta,
                            cache_path=sigma_plans_path(site) if cache else None)
    return sigma, [(sigma, 1.0 / steps_per_epoch, round_steps)]


def plan_steps(site: SiteConfig, data: SiteData, num_rounds: int, local_epochs: int, batch_size: int
               ) -> tuple[int, int]:
    """The plan's steps per epoch and per round; refused (RoundConfigError) past site.max_plan_steps: under DP
    the steps of all planned rounds, which the σ search and the ledger's accountant compose (10^6 steps: 39 s and
    3.9 GB), without DP one round's (a round of 10^6 epochs was still running when stopped at 120 s)."""
    users = len(data.sequences.trainable_users())
    steps_per_epoch = math.ceil(users / batch_size)
    round_steps = local_epochs * steps_per_epoch
    planned = num_rounds * round_steps if site.privacy.enabled else round_steps
    if planned > site.max_plan_steps:
        scope = f"{num_rounds} rounds x " if site.privacy.enabled else "one round: "
        raise RoundConfigError(f"the plan is {planned:,} steps ({scope}{local_epochs} epochs x "
                               f"{steps_per_epoch:,} steps of batch size {batch_size} over {users:,} users); this "
                               f"site takes at most max_plan_steps={site.max_plan_steps:,} (--max-plan-steps)")
    return steps_per_epoch, round_steps


def sigma_plans_path(site: SiteConfig) -> Path | None:
    """Where the site keeps the σ it has searched (none without a state dir): each round in deployment is a
    fresh process, and Opacus' σ search takes seconds, the same answer every round of a run."""
    return Path(site.state_dir) / "sigma_plans.json" if site.state_dir else None


def reply_path(site: SiteConfig, training_id: str, server_round: int) -> Path:
    """Where a trained round's reply is kept, so a resent round is answered without spending ε again."""
    return Path(site.state_dir) / "replies" / f"{safe_name(training_id)}_round{server_round}.pt"


def safe_name(training_id: str) -> str:
    """`training_id` as a file name: refused (RoundConfigError) unless it is lowercase letters, digits and '-',
    so no id leaves the state dir and no two ids share a file."""
    return check_training_id(training_id)


def train_round(site: SiteConfig, data: SiteData, round_cfg: RoundConfig, state: Mapping[str, torch.Tensor],
                shared_moments: Mapping[str, torch.Tensor] | None = None) -> RoundReply:
    """Train the global model on the site's users for one round, within the site's privacy budget.

    Everything that can be refused is refused before the ledger is read (another catalog, no users, a plan of
    more steps than the site takes, a global model that is non-finite, misshapen or too large); under DP the
    site's lock is then held from the budget check through training to the ledger record. `shared_moments`: the
    server's average of the sites' optimiser states (`share_optimizer_state`; none in the first round), which
    this round's optimiser starts from.
    """
    data.catalog.check_matches(round_cfg.catalog_fingerprint)
    check_users(site, data)
    plan_steps(site, data, round_cfg.num_rounds, round_cfg.local_epochs, round_cfg.batch_size)
    with global_model(round_cfg, state, site.max_model_parameters) as model:
        if not site.privacy.enabled:
            delta = site_delta(site, data)
            result = local_training(site, data, round_cfg, model, site.round_privacy(delta), shared_moments)
            return trained_reply(site, data, round_cfg, model, result, 0.0, delta)
        with site_lock(site.state_dir):
            ledger = site.open_ledger(len(data.sequences))
            return train_private_round(site, data, round_cfg, model, ledger, shared_moments)


def train_private_round(site: SiteConfig, data: SiteData, round_cfg: RoundConfig, model: FedRecModel,
                        ledger: PrivacyLedger, shared_moments: Mapping[str, torch.Tensor] | None) -> RoundReply:
    """A DP round against the site's ledger (held under its lock): a resent round from its kept reply, else
    check the budget, train, record the steps, keep the reply."""
    training_id, server_round = round_cfg.training_id, round_cfg.server_round
    resent = resent_reply(site, round_cfg, model, ledger)
    if resent is not None:
        return resent
    if round_cfg.item_rows != "average":
        return declined(model, ledger.delta, ledger.spent(),
                        f"the server asks for per-item weights (strategy.item_rows={round_cfg.item_rows}); they "
                        "tell which items this site's users interacted with, which DP does not cover")
    sigma, planned = plan_round(site, data, round_cfg, ledger.delta)
    try:
        ledger.check(planned, site.privacy.epsilon)
    except BudgetExceededError as err:
        return declined(model, ledger.delta, ledger.spent(), str(err))
    try:
        result = local_training(site, data, round_cfg, model, site.round_privacy(ledger.delta, sigma), shared_moments)
    except TrainingDivergedError as err:
        # The failure itself is released, so the round is charged in full (at most the planned steps ran).
        spent_now = ledger.record(training_id, server_round, planned).epsilon_after
        raise TrainingDivergedError(f"{err} (this round's planned DP steps were charged to the site's "
                                    f"ledger: ε = {spent_now:.3f})") from err
    history = result.privacy.history if result.privacy is not None else planned
    epsilon = ledger.record(training_id, server_round, history).epsilon_after
    return keep_reply(site, round_cfg, trained_reply(site, data, round_cfg, model, result, epsilon, ledger.delta))


def resent_reply(site: SiteConfig, round_cfg: RoundConfig, model: FedRecModel,
                 ledger: PrivacyLedger) -> RoundReply | None:
    """A round the site already paid for (the server resent it): its kept reply, or a decline when that is
    lost; None for a round not yet charged."""
    if not ledger.has(round_cfg.training_id, round_cfg.server_round):
        return None
    kept = load_reply(reply_path(site, round_cfg.training_id, round_cfg.server_round))
    return kept or declined(model, ledger.delta, ledger.spent(), "this round was already trained here and its "
                                                                "reply is lost")


def keep_reply(site: SiteConfig, round_cfg: RoundConfig, reply: RoundReply) -> RoundReply:
    """Keep a charged round's reply (so a resend is answered without spending ε again) in place of older ones."""
    # Not synced to disk: the ledger record before it is, and a reply that a machine crash damages or loses is
    # refused as unreadable (load_reply), which declines the resent round, never trains it twice.
    save_atomically(reply_payload(reply), reply_path(site, round_cfg.training_id, round_cfg.server_round),
                    durable=False)
    drop_older_replies(site, round_cfg.training_id, round_cfg.server_round)
    return reply


def local_training(site: SiteConfig, data: SiteData, round_cfg: RoundConfig, model: FedRecModel,
                   privacy: PrivacyConfig, shared_moments: Mapping[str, torch.Tensor] | None) -> TrainResult:
    """Train `model` in place for the round, from the optimiser state the round asks for (the site's kept
    one, or the server's shared average), keeping the site's own when asked."""
    keep = round_cfg.keep_optimizer_state and not round_cfg.share_optimizer_state
    optimizer_path = optimizer_state_path(site, round_cfg.training_id) if keep else None
    local = local_train_config(site, round_cfg)
    start = load_optimizer_state(optimizer_path)
    if round_cfg.share_optimizer_state and shared_moments:
        start = from_named_moments(shared_moments, model, build_optimizer(model, local).state_dict())
    result = train(model, data.sequences, local, privacy, optimizer_state=start)
    if optimizer_path is not None and result.optimizer_state is not None:
        save_atomically(result.optimizer_state, optimizer_path)
    return result


def trained_reply(site: SiteConfig, data: SiteData, round_cfg: RoundConfig, model: FedRecModel,
                  result: TrainResult, epsilon: float, delta: float) -> RoundReply:
    """The reply of a trained round: the trainable weights, the site's users, what it cost."""
    reply = RoundReply(state=wire.trainable_state(model.cpu()), num_examples=len(data.sequences.trainable_users()),
                       train_loss=float(result.epoch_losses[-1]), dp=site.privacy.enabled, epsilon=epsilon, delta=delta,
                       train_seconds=float(result.seconds), peak_memory_mb=float(result.peak_memory_mb),
                       item_weights=item_row_weights(data, round_cfg.item_rows, model.config.num_item_rows))
    if round_cfg.share_optimizer_state and result.optimizer_state is not None:
        reply.moments = to_named_moments(result.optimizer_state, trainable_names(model))
    return reply


def reply_payload(reply: RoundReply) -> dict[str, Any]:
    """A reply as tensors and plain types only, so torch.load(weights_only=True) reads it back."""
    payload = dict(reply.__dict__)
    for key in ("epsilon", "delta", "train_loss", "train_seconds", "peak_memory_mb"):
        payload[key] = float(payload[key])
    payload.update(num_examples=int(reply.num_examples), dp=bool(reply.dp), declined=str(reply.declined))
    return payload


def load_reply(path: Path) -> RoundReply | None:
    """The kept reply of a round (None when it is gone or unreadable: the round is then declined, never
    trained and paid for again). Read with weights_only=True: a state file never runs code."""
    if not path.exists():
        return None
    try:
        return RoundReply(**torch.load(path, weights_only=True))
    except UNREADABLE as err:
        log.warning("%s: kept round reply is unreadable (%s); the round is declined, not trained again", path, err)
        return None


def drop_older_replies(site: SiteConfig, training_id: str, server_round: int) -> None:
    """Remove this training's kept replies of rounds before the last two. A server resends only the round after
    its last checkpoint, and it checkpoints every round before asking for the next; a round resent after
    its reply is gone is still never trained (or paid for) twice: the ledger declines it. The folder is listed
    (a few files) rather than every earlier round's name looked up (a stat per round, every message)."""
    prefix = f"{safe_name(training_id)}_round"  # lowercase letters, digits and '-': no glob pattern in it
    removed = [path for path in reply_path(site, training_id, server_round).parent.glob(f"{prefix}*.pt")
               if (number := path.name[len(prefix):-len(".pt")]).isdigit() and int(number) < server_round - 1]
    for path in removed:
        path.unlink()
    if removed:
        log.info("removed %d kept round replies of training %s before round %d", len(removed), training_id,
                 server_round - 1)


def item_row_weights(data: SiteData, mode: str, rows: int) -> torch.Tensor | None:
    """What the server weighs this site's rows of the item table by (None for plain averaging): its count of
    each item in its training events (counts)."""
    if mode == "average":
        return None
    return torch.from_numpy(data.sequences.item_counts(rows)).to(torch.float32)


def local_train_config(site: SiteConfig, round_cfg: RoundConfig) -> TrainConfig:
    """The round's local training: the server's recipe, the site's device and memory bounds."""
    return TrainConfig(epochs=round_cfg.local_epochs, batch_size=round_cfg.batch_size, lr=round_cfg.lr,
                       weight_decay=round_cfg.weight_decay, optimizer=round_cfg.optimizer,
                       num_negatives=round_cfg.num_negatives, device=site.device, patience=0, eval_every=0,
                       seed=round_seed(site, round_cfg), micro_batch_tokens=site.micro_batch_tokens,
                       micro_batch_users=site.micro_batch_users, proximal_mu=round_cfg.proximal_mu)


def optimizer_state_path(site: SiteConfig, training_id: str) -> Path:
    """Where the site keeps its optimiser state between rounds (deployment starts a fresh process per round).

    It is computed from the site's own (under DP: already noised) gradients and never leaves the site.
    A round the server resends after a crash starts from the state its lost first attempt left.
    """
    return Path(site.state_dir) / "optimizer" / f"{safe_name(training_id)}.pt"


def load_optimizer_state(path: Path | None) -> dict[str, Any] | None:
    """The saved optimiser state, or None on a first round (or when the server does not ask for it). Read with
    weights_only=True; an unreadable one is removed and the round starts afresh (it is the site's own cache)."""
    if path is None or not path.exists():
        return None
    try:
        return dict(torch.load(path, weights_only=True))
    except UNREADABLE as err:
        log.warning("%s: optimiser state is unreadable (%s); removed it, this round's optimiser starts afresh",
                    path, err)
        path.unlink(missing_ok=True)
        return None


def save_atomically(value: Any, path: Path, durable: bool = True) -> None:
    """torch.save through a temporary file, so a crash never leaves a half-written file behind (shared_model.atomic;
    `durable`: synced to disk before the rename)."""
    write_atomically(path, lambda out: torch.save(value, out), durable)


def round_seed(site: SiteConfig, round_cfg: RoundConfig) -> int:
    """The seed of one round's user sampling, dropout and noise at this site.

    Under DP it is fresh OS entropy every round. A seed that repeats would repeat the Poisson sample and the
    noise of every round: the noise would add up round after round instead of averaging out, and the
    accountant's assumption of independent noise at every step would be false. A seed the server could
    derive would let it subtract the noise. (`privacy.secure_mode` goes further: noise and samples then come
    from the OS CSPRNG, fl_client/dp/secure_rng.py.) Without DP the seed is derived from the training (its seed
    and its id, drawn when it starts), the round and the site: a resent or resumed round repeats itself, while
    two trainings with the same settings differ (measured: `make demo` without DP gave HR@10 0.8230 and 0.8265).
    """
    if site.privacy.enabled:
        return secrets.randbits(63)
    return zlib.crc32(f"{round_cfg.seed}|{round_cfg.training_id}|{round_cfg.server_round}|{site.data_path}".encode())


def declined(model: FedRecModel, delta: float, epsilon: float, reason: str) -> RoundReply:
    """A refusal: the incoming trainable weights back unchanged, zero examples, and the reason."""
    return RoundReply(state=wire.trainable_state(model), num_examples=0, train_loss=0.0, dp=True, epsilon=epsilon,
                      delta=delta, declined=reason)

"""`fedrec-audit`: check a training's DP claim empirically, in one run (Steinke, Nasr & Jagielski 2023).

m canary users (random item sequences) are made; each joins the training data with probability 1/2, independently.
The model is trained as usual: by the centralized trainer (`audit.mode=central`), or federated on Flower's
simulation engine with every included canary a user of site 0 (`audit.mode=federated`: the claim audited is
that site's ε, from its ledger). Then every canary is scored: black box (`audit.score=loss`), by the trained
model's next-item loss on its own events; white box (`audit.score=gradient`), by how far training moved the
weights along the canary's own loss gradient at the starting weights. Guessing the highest scored canaries "in"
and the lowest "out", the count of right guesses gives a lower bound on ε (simulations.audit_bound). A DP run
whose lower bound exceeds its accountant's ε is a bug, and the command fails;
a run without DP is the control, whose bound shows the audit can see memorisation at all.
Writes audit.json to the run dir.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fl_client.dp.ledger import PrivacyLedger
from fl_client.dp.settings import PrivacyConfig
from fl_client.train import TrainConfig, train
from shared_model.catalog import PADDING_ROW
from shared_model.console import console_command, exit_on_error
from shared_model.device import resolve_device
from shared_model.events import EVENT_TYPE_CODES
from shared_model.modeling_fedrec import FedRecModel, sequence_loss
from shared_model.privacy_claim import privacy_claim
from shared_model.sequences import FIRST_EVENT_BUCKET, UserSequences, make_batch
from shared_model.serialization import load_model_dir, save_model_dir
from simulations.audit_bound import AuditResult, audit_scores
from simulations.console import quiet_console
from simulations.partition import partition_users
from simulations.prepare import PreparedData, build_model, prepare_data
from simulations.simulate import SimulateConfig, check_federation, run_federated

log = logging.getLogger(__name__)
CANARY_GAP_BUCKET = 8  # time-gap bucket between a canary's events (a few hours), when the data has timestamps


@dataclass
class Claim:
    """The DP claim an audit checks: what the accountant (or the site's ledger) says."""

    epsilon: float
    delta: float
    text: str


class ClaimRefutedError(RuntimeError):
    """The audit's lower bound on ε exceeds the accountant's ε: the DP claim (or its pipeline) is wrong."""


@dataclass
class AuditConfig:
    """How many canaries, how long, and the confidence of the bound."""

    mode: str = "central"  # (str) central (the centralized trainer) or federated (canaries at site 0)
    score: str = "loss"  # (str) loss (black box: the model's loss on the canary) or gradient (white box: the
    # update's projection on the canary's loss gradient at the starting weights)
    canaries: int = 1000  # (int) m canary users, each in the training data with probability 1/2
    length: int = 20  # (int) events per canary: random catalog items (length - 3 of them are trained on)
    seed: int = 0  # (int) which canaries are made and which of them are included
    significance: float = 0.05  # (float) the bound is wrong with at most this probability
    delta: float = 1e-5  # (float) δ of the bound for a run without DP (a DP run uses its own δ)


@dataclass
class AuditRunConfig(SimulateConfig):
    """Root schema of `fedrec-audit`: fedrec-simulate's groups (train.epochs for the central mode) plus `audit`."""

    audit: AuditConfig = field(default_factory=AuditConfig)


def make_canaries(count: int, length: int, num_rows: int, timestamps: bool, rng: np.random.Generator) -> UserSequences:
    """`count` users of `length` uniformly random catalog items each ("canary-00000", ...): sequences no real
    user shares, so only training on them can make the model expect them."""
    if length < 4:
        raise ValueError(f"audit.length={length}: a canary needs at least 4 events (one is trained on)")
    items = rng.integers(PADDING_ROW + 1, num_rows, size=count * length)
    buckets = np.full(count * length, CANARY_GAP_BUCKET if timestamps else 0, dtype=np.int64)
    if timestamps:
        buckets[::length] = FIRST_EVENT_BUCKET
    return UserSequences(user_ids=[f"canary-{i:05d}" for i in range(count)],
                         offsets=np.arange(count + 1, dtype=np.int64) * length, items=items,
                         event_types=np.full(count * length, EVENT_TYPE_CODES["view"], dtype=np.int64),
                         time_buckets=buckets)


def joined(data: UserSequences, extra: UserSequences) -> UserSequences:
    """`data` followed by `extra`'s users (regions and merchants marked "canary" when `data` has them)."""
    tag = ["canary"] * len(extra)
    return UserSequences(
        user_ids=data.user_ids + extra.user_ids,
        offsets=np.concatenate([data.offsets, data.offsets[-1] + extra.offsets[1:]]),
        items=np.concatenate([data.items, extra.items]), event_types=np.concatenate([data.event_types,
                                                                                      extra.event_types]),
        time_buckets=np.concatenate([data.time_buckets, extra.time_buckets]),
        regions=data.regions + tag if data.regions else [], merchants=data.merchants + tag if data.merchants else [])


@torch.no_grad()
def canary_scores(model: FedRecModel, canaries: UserSequences, max_len: int, device: torch.device,
                  batch_size: int = 256) -> np.ndarray:
    """Each canary's score: minus the trained model's mean next-item loss on its training events."""
    model.eval()
    scores = []
    for start in range(0, len(canaries), batch_size):
        users = np.arange(start, min(start + batch_size, len(canaries)))
        batch = {k: v.to(device) for k, v in make_batch(canaries, users, "train", max_len).items()}
        scores.append(-sequence_loss(model, batch, per_user=True).cpu().numpy())  # (B,)
    return np.concatenate(scores)


def gradient_scores(model: FedRecModel, start: dict[str, torch.Tensor], canaries: UserSequences, max_len: int,
                    device: torch.device) -> np.ndarray:
    """White box: how far training moved the weights along each canary's own descent direction at the starting
    weights: minus the update's projection on the canary's normalised loss gradient there."""
    model.eval()
    update = {n: p.detach() - start[n].to(p.device) for n, p in model.named_parameters() if p.requires_grad}
    initial = copy.deepcopy(model)
    initial.load_state_dict(start)
    params = [p for n, p in initial.named_parameters() if n in update]
    names = [n for n, _ in initial.named_parameters() if n in update]
    scores = np.zeros(len(canaries))
    for user in range(len(canaries)):
        batch = {k: v.to(device) for k, v in make_batch(canaries, [user], "train", max_len).items()}
        grads = torch.autograd.grad(sequence_loss(initial, batch, per_user=True).sum(), params, allow_unused=True)
        pairs = [(update[n], g) for n, g in zip(names, grads, strict=True) if g is not None]
        norm = sum(float(g.square().sum()) for _, g in pairs) ** 0.5
        scores[user] = -sum(float((u * g).sum()) for u, g in pairs) / max(norm, 1e-12)
    return scores


def run_audit(cfg: AuditRunConfig) -> dict[str, Any]:
    """Train with canaries, score them, bound ε; returns (and writes) audit.json's content."""
    out = Path(cfg.output_dir).resolve()
    data = prepare_data(cfg.data)
    rng = np.random.default_rng(cfg.audit.seed)
    canaries = make_canaries(cfg.audit.canaries, cfg.audit.length, data.catalog.num_rows,
                             data.events.has_timestamps, rng)
    included = rng.random(len(canaries)) < 0.5  # (m,) each canary in with probability 1/2
    initial = build_model(cfg.model, data, cache_dir=str(out / "cache"))
    start = {k: v.detach().clone() for k, v in initial.state_dict().items()}
    match cfg.audit.mode:
        case "central":
            model, privacy = train_central(cfg, data, canaries.subset(np.flatnonzero(included)), initial)
        case "federated":
            model, privacy = train_federated(cfg, data, canaries.subset(np.flatnonzero(included)), initial, out)
        case _:
            raise ValueError(f"audit.mode must be central or federated, got {cfg.audit.mode!r}")
    device = resolve_device(cfg.train.device)
    match cfg.audit.score:
        case "loss":
            scores = canary_scores(model, canaries, cfg.model.max_len, device)
        case "gradient":
            scores = gradient_scores(model, start, canaries, cfg.model.max_len, device)
        case _:
            raise ValueError(f"audit.score must be loss (black box) or gradient (white box), got {cfg.audit.score!r}")
    delta = privacy.delta if privacy else cfg.audit.delta
    bound = audit_scores(scores, included, delta, cfg.audit.significance)
    report = audit_report(cfg, bound, privacy, int(included.sum()), delta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    if privacy is not None and bound.epsilon_lower_bound > privacy.epsilon:
        raise ClaimRefutedError(f"the audit's lower bound ε ≥ {bound.epsilon_lower_bound:.3f} exceeds the claimed "
                                f"ε = {privacy.epsilon:.3f}: the DP claim is wrong (see {out / 'audit.json'})")
    return report


def train_central(cfg: AuditRunConfig, data: PreparedData, members: UserSequences,
                  model: FedRecModel) -> tuple[FedRecModel, Claim | None]:
    """The centralized trainer on the data plus the included canaries, from `model`; the model and its claim."""
    train_cfg, privacy_cfg = TrainConfig(**asdict(cfg.train)), PrivacyConfig(**asdict(cfg.privacy))
    result = train(model, joined(data.sequences, members), train_cfg, privacy_cfg, valid=data.sequences)
    if result.privacy is None:
        return model, None
    return model, Claim(result.privacy.epsilon, result.privacy.delta, result.privacy.claim())


def train_federated(cfg: AuditRunConfig, data: PreparedData, members: UserSequences, initial: FedRecModel,
                    out: Path) -> tuple[FedRecModel, Claim | None]:
    """fedrec-simulate's federation from `initial` with the included canaries as users of site 0; the final
    global model and site 0's DP claim (its ledger: every round it trained)."""
    parts = partition_users(data.sequences, cfg.partition, data.catalog)
    first = len(data.sequences)
    parts = [np.concatenate([parts[0], first + np.arange(len(members))]), *parts[1:]]
    frame = pd.concat([data.events.frame, canary_events(members, data)], ignore_index=True)
    with_canaries = PreparedData(replace(data.events, frame=frame), data.catalog, joined(data.sequences, members))
    start = save_model_dir(initial, data.catalog, out / "initial_model")
    cfg = replace(cfg, federation=replace(cfg.federation, initial_model=str(start)))
    run_federated(cfg, with_canaries, parts, out, check_federation(cfg, out))
    model, _ = load_model_dir(out / "server" / "model")
    if not cfg.privacy.enabled:
        return model, None
    ledger = PrivacyLedger(out / "sites" / "site-0" / "state" / "privacy_ledger.json", None, cfg.privacy.accountant)
    epsilon = ledger.spent()
    claim = privacy_claim(epsilon, ledger.delta, unit="user of site 0",
                          mechanism=f"over its {len(ledger.entries)} ledger entries")
    return model, Claim(epsilon, ledger.delta, claim)


def canary_events(members: UserSequences, data: PreparedData) -> pd.DataFrame:
    """The included canaries as event rows in the data's columns (an hour apart, from the data's first time)."""
    frame = data.events.frame
    titles = dict(zip(frame["item_id"], frame["item_title"], strict=False)) if "item_title" in frame else {}
    ids = [data.catalog.item_ids[row - 1] for row in members.items]
    rows = {"user_id": np.repeat(members.user_ids, members.lengths()), "item_id": ids,
            "timestamp": int(frame["timestamp"].min()) + 3600 * np.arange(len(ids)),
            "event_type": "view"}
    extra: dict[str, Any] = {c: "canary" for c in frame.columns if c not in rows}
    if titles:
        extra["item_title"] = [titles.get(i, "") for i in ids]
    return pd.DataFrame({**rows, **extra})[list(frame.columns)]


def audit_report(cfg: AuditRunConfig, bound: AuditResult, privacy: Claim | None, included: int,
                 delta: float) -> dict[str, Any]:
    """audit.json: the claim, the bound and how it was obtained."""
    claim = privacy.text if privacy is not None else "no differential privacy (DP was off): the control"
    return {"claim": claim, "claimed_epsilon": privacy.epsilon if privacy is not None else None, "delta": delta,
            "epsilon_lower_bound": bound.epsilon_lower_bound, "significance": cfg.audit.significance,
            "mode": cfg.audit.mode, "canaries": cfg.audit.canaries, "canaries_included": included,
            "canary_length": cfg.audit.length,
            "guesses": bound.guesses, "correct": bound.correct, "auc": bound.auc,
            "score": cfg.audit.score,
            "method": "one-run audit (Steinke, Nasr & Jagielski 2023), canaries scored by their loss (black box) "
                      "or by the update's projection on their loss gradient (white box); guesses at "
                      "k = m/100 ... m/2 from each end, Bonferroni over the k"}


ConfigStore.instance().store(name="audit_schema", node=AuditRunConfig)  # simulate registered the groups


@hydra.main(config_path="conf", config_name="audit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; a refuted claim or a bad setting is one paragraph on stderr and a non-zero exit."""
    quiet_console()
    exit_on_error("fedrec-audit", lambda: run_and_log(cfg))


def run_and_log(cfg: DictConfig) -> None:
    """Parse the config once, audit, log the verdict."""
    typed: AuditRunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    report = run_audit(typed)
    log.info("claim: %s", report["claim"])
    log.info("audit: ε ≥ %.3f with confidence %.0f%% (%d of %d guesses right, AUC %.3f, %d of %d canaries in)",
             report["epsilon_lower_bound"], 100 * (1 - report["significance"]), report["correct"],
             report["guesses"], report["auc"], report["canaries_included"], report["canaries"])
    log.info("outputs in %s", typed.output_dir)


cli = console_command("fedrec-audit", main)

if __name__ == "__main__":
    cli()

"""Misbehaving sites for robustness experiments: a Flower mod that rewrites chosen sites' training replies.

Simulation only (nothing in the deployed apps imports it). A site's honest update is u = w_sent - w_global;
the attacker replaces it before the reply leaves the site:
  sign_flip  w_global - u                      (pushes the model back the way the site's data pulls it)
  scale      w_global + factor * u             (a boosted update, `factor` times as long)
  noise      w_global + g, |g| = factor * |u|  (Gaussian direction, no signal, `factor` times as long)
Its metrics (num-examples, ε, ...) stay honest, so only the defences that look at the weights can notice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.common import MessageType

from shared_model import wire

log = logging.getLogger(__name__)
ATTACKS = ("none", "sign_flip", "scale", "noise")
Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


@dataclass
class AttackConfig:
    """Which sites misbehave, and how."""

    kind: str = "none"  # (str) none, sign_flip, scale or noise
    num_sites: int = 0  # (int) how many sites misbehave (chosen at random with `seed` among all sites)
    factor: float = 10.0  # (float) scale: update multiplier; noise: noise norm over the honest update's norm
    seed: int = 0  # (int) picks the misbehaving sites and seeds their noise

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"attack.kind must be one of {', '.join(ATTACKS)}, got {self.kind!r}")
        if self.num_sites < 0 or (self.kind != "none" and self.num_sites == 0):
            raise ValueError(f"attack.kind={self.kind} with attack.num_sites={self.num_sites}: an attack needs "
                             "num_sites > 0 (kind=none ignores num_sites, so a sweep can include the clean run)")


def attackers(config: AttackConfig, num_sites: int) -> list[int]:
    """The partition ids of the misbehaving sites (sorted; none without an attack)."""
    if config.num_sites > num_sites:
        raise ValueError(f"attack.num_sites={config.num_sites}, but the partition has only {num_sites} site(s)")
    chosen = np.random.default_rng(config.seed).choice(num_sites, size=config.num_sites, replace=False)
    return sorted(int(i) for i in chosen)


def attacked_update(kind: str, update: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """The update an attacker sends instead of the honest `update` (one flattened vector)."""
    match kind:
        case "sign_flip":
            return -update
        case "scale":
            return factor * update
        case "noise":
            direction = rng.standard_normal(update.shape)
            return direction * (factor * float(np.linalg.norm(update)) / max(float(np.linalg.norm(direction)), 1e-12))
        case _:
            raise ValueError(f"unknown attack {kind!r}")


def rewrite_reply(config: AttackConfig, msg: Message, reply: Message, rng: np.random.Generator) -> Message:
    """The reply with its weights attacked (a declined or failed reply is left alone)."""
    if reply.has_error() or reply.content.metric_records[wire.METRICS].get(wire.DECLINED, 0.0) == 1.0:
        return reply
    start = {k: v.numpy() for k, v in msg.content.array_records[wire.ARRAYS].items()}
    sent = {k: v.numpy() for k, v in reply.content.array_records[wire.ARRAYS].items()}
    names = sorted(sent)
    flat = np.concatenate([(sent[k] - start[k]).astype(np.float64).ravel() for k in names])
    bad = attacked_update(config.kind, flat, config.factor, rng)
    arrays, offset = {}, 0
    for name in names:
        size = sent[name].size
        values = start[name] + bad[offset:offset + size].reshape(sent[name].shape)
        arrays[name] = Array(np.ascontiguousarray(values.astype(sent[name].dtype)))
        offset += size
    reply.content[wire.ARRAYS] = ArrayRecord(arrays)
    return reply


def attack_mod(config: AttackConfig, bad_sites: Sequence[int]) -> Mod:
    """A ClientApp mod under which the sites `bad_sites` (partition ids) attack every training reply (a reply's
    noise from a generator seeded afresh by the attack's seed and the site, as when Ray shipped each message a
    fresh copy of the mod)."""
    bad = set(bad_sites)

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        site = int(context.node_config.get("partition-id", -1))
        if msg.metadata.message_type != MessageType.TRAIN or site not in bad:
            return reply
        return rewrite_reply(config, msg, reply, np.random.default_rng([config.seed, site]))

    return mod

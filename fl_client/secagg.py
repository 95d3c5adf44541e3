"""A site's side of secure aggregation (shared_model.secure_sum): fresh keys each round, Shamir shares of its
secrets sealed for its neighbours, its weighted update sent only masked, and the shares that unmask the sum,
given at most once a round and never both secrets of one site (which would unmask that site alone)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fl_client.dp.enrolment import site_lock
from shared_model import secure_sum
from shared_model.atomic import write_text_atomically
from shared_model.secure_sum import SecureSumError, SecureSumSettings, pair_context

if TYPE_CHECKING:  # the protocol stages import no torch (fl_client.client_app)
    import torch

RELEASED_FILE = "secagg_released.json"  # rounds this site has sent a masked update for (one per round, ever)
Roster = dict[int, tuple[bytes, bytes]]  # node id -> its (enc-key, mask-key)


@dataclass
class SecAggState:
    """What a site keeps between the stages of one round (Flower's Context.state holds it between messages)."""

    tag: bytes = b""
    node: int = 0
    stage: int = 0  # the last stage done: 1 keys, 2 shares, 3 masked update, 4 unmask shares (nothing after it)
    enc_private: bytes = b""
    mask_private: bytes = b""
    roster: Roster = field(default_factory=dict)
    neighbours: list[int] = field(default_factory=list)
    needed: int = 0  # shares that rebuild one of this site's secrets
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # holder's view: node -> (seed, key) share
    alive: list[int] = field(default_factory=list)  # neighbours whose shares arrived (they hold a pairwise mask)
    seed: bytes = b""  # the private mask's seed (never leaves the site; only shares of it do)

    def to_record(self) -> dict[str, Any]:
        """A flat ConfigRecord content."""
        nodes = sorted(self.roster)
        held = sorted(self.held)
        return {"tag": self.tag, "node": self.node, "stage": self.stage, "enc-private": self.enc_private,
                "mask-private": self.mask_private, "seed": self.seed, "needed": self.needed,
                "roster": nodes, "roster-enc": [self.roster[n][0] for n in nodes],
                "roster-mask": [self.roster[n][1] for n in nodes], "neighbours": self.neighbours,
                "held": held, "held-seed": [self.held[n][0] for n in held],
                "held-key": [self.held[n][1] for n in held], "alive": self.alive}

    @classmethod
    def from_record(cls, record: dict) -> SecAggState:
        """The state `to_record` wrote."""
        def ints(key: str) -> list[int]:
            return [int(v) for v in record.get(key, [])]

        return cls(tag=record["tag"], node=int(record["node"]), stage=int(record["stage"]),
                   enc_private=record["enc-private"], mask_private=record["mask-private"], seed=record["seed"],
                   needed=int(record["needed"]),
                   roster=dict(zip(ints("roster"), zip(record.get("roster-enc", []),
                                                       record.get("roster-mask", []), strict=True), strict=True)),
                   neighbours=ints("neighbours"),
                   held=dict(zip(ints("held"), zip(record.get("held-seed", []), record.get("held-key", []),
                                                   strict=True), strict=True)),
                   alive=ints("alive"))

    def fewest_summed(self) -> int:
        """The fewest sites of this round's roster whose secure sum can be unmasked (secure_sum.fewest_unmasked):
        what this site's share of distributed DP's noise must cover."""
        return secure_sum.fewest_unmasked(len(self.roster), len(self.neighbours) + 1, self.needed)

    def expect(self, tag: bytes, stage: int) -> None:
        """Refuse a message for another round, or out of order (a repeated stage included)."""
        if self.tag != tag:
            raise SecureSumError("secure aggregation: this message belongs to another round than the keys this "
                                 "site made (it restarted, or the server skipped a stage)")
        if self.stage != stage - 1:
            raise SecureSumError(f"secure aggregation: stage {stage} asked after stage {self.stage} (each stage "
                                 "runs once a round, in order)")


def check_tag(tag: bytes, training_id: str, server_round: int, evaluation: bool) -> None:
    """Refuse a train or evaluate message whose secure-sum tag names another training, round or purpose: each
    (training, round, purpose) gets one secure sum from this site (`released`), never one under a borrowed tag."""
    if tag != secure_sum.round_tag(training_id, server_round, evaluation):
        raise SecureSumError(f"secure aggregation: the round's tag does not name this message's training, round "
                             f"{server_round} and purpose ({'evaluate' if evaluation else 'train'})")


def make_keys(tag: bytes, node: int) -> tuple[SecAggState, tuple[bytes, bytes]]:
    """Stage 1: this round's key pairs (for sealing shares, for pairwise masks); the public halves to send."""
    enc_private, enc_public = secure_sum.new_key_pair()
    mask_private, mask_public = secure_sum.new_key_pair()
    state = SecAggState(tag=tag, node=node, stage=1, enc_private=enc_private, mask_private=mask_private)
    return state, (enc_public, mask_public)


def parse_roster(record: dict) -> Roster:
    """Stage 2's roster (node ids and their two public keys, as parallel lists); a SecureSumError when malformed."""
    try:
        nodes, enc, masks = [int(n) for n in record["roster"]], record["roster-enc"], record["roster-mask"]
        roster = {n: (bytes(e), bytes(m)) for n, e, m in zip(nodes, enc, masks, strict=True)}
    except (KeyError, TypeError, ValueError) as err:
        raise SecureSumError(f"secure aggregation: malformed roster ({type(err).__name__}: {err})") from None
    if len(roster) != len(nodes):
        raise SecureSumError("secure aggregation: the roster names a node twice")
    return roster


def parse_sealed(record: dict) -> dict[int, bytes]:
    """Stage 3's shares sealed for this site: source node -> sealed bytes; a SecureSumError when malformed."""
    try:
        return {int(n): bytes(b) for n, b in zip(record["sources"], record["sealed"], strict=True)}
    except (KeyError, TypeError, ValueError) as err:
        raise SecureSumError(f"secure aggregation: malformed sealed shares ({type(err).__name__}: {err})") from None


def parse_nodes(record: dict, key: str) -> list[int]:
    """A list of node ids in a stage record; a SecureSumError when missing or malformed."""
    try:
        return [int(n) for n in record[key]]
    except (KeyError, TypeError, ValueError) as err:
        raise SecureSumError(f"secure aggregation: malformed {key!r} ({type(err).__name__}: {err})") from None


def make_shares(state: SecAggState, tag: bytes, roster: Roster, settings: SecureSumSettings) -> dict[int, bytes]:
    """Stage 2: check the roster, pick this site's neighbours, and seal for each a share of the private mask's
    seed and of the pairwise-mask key; returns node -> sealed shares."""
    state.expect(tag, 2)
    own = (secure_sum.public_key(state.enc_private), secure_sum.public_key(state.mask_private))
    if roster.get(state.node) != own:
        raise SecureSumError("secure aggregation: the roster does not list this site's own public keys")
    keys = [k for pair in roster.values() for k in pair]
    if len(set(keys)) != len(keys):
        raise SecureSumError("secure aggregation: the roster repeats a public key")
    settings.check(len(roster))
    state.roster = roster
    state.neighbours = secure_sum.neighbourhoods(sorted(roster), settings.neighbours, tag)[state.node]
    holders = sorted([state.node, *state.neighbours])
    state.needed = settings.shares_needed(len(holders))
    if len(holders) < state.needed:
        raise SecureSumError(f"secure aggregation: {len(holders)} share holders, {state.needed} needed")
    state.seed = os.urandom(secure_sum.SECRET_BYTES)
    seed_shares = secure_sum.split_secret(state.seed, state.needed, len(holders))
    key_shares = secure_sum.split_secret(state.mask_private, state.needed, len(holders))
    sealed = {}
    for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
        if holder == state.node:
            state.held[holder] = (seed_share, key_share)
            continue
        key = secure_sum.agree(state.enc_private, roster[holder][0], pair_context(tag, state.node, holder, b"seal"))
        context = pair_context(tag, state.node, holder, b"share") + state.node.to_bytes(8, "big")
        sealed[holder] = secure_sum.seal(key, seed_share + key_share, context)
    state.stage = 2
    return sealed


def open_shares(state: SecAggState, tag: bytes, sealed: dict[int, bytes]) -> None:
    """Stage 3, first half: keep the shares the neighbours sealed for this site (their senders are alive)."""
    state.expect(tag, 3)
    for src, blob in sealed.items():
        if src not in state.neighbours:
            raise SecureSumError(f"secure aggregation: a share from node {src}, not a neighbour of this site")
        key = secure_sum.agree(state.enc_private, state.roster[src][0], pair_context(tag, src, state.node, b"seal"))
        plain = secure_sum.unseal(key, blob, pair_context(tag, src, state.node, b"share") + src.to_bytes(8, "big"))
        half = len(plain) // 2
        state.held[src] = (plain[:half], plain[half:])
    state.alive = sorted(sealed)
    if len(state.alive) + 1 < state.needed:
        raise SecureSumError(f"secure aggregation: shares from {len(state.alive)} neighbours, {state.needed - 1} "
                             "needed: too few sites left to hide this site's update")


def flat_update(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> np.ndarray:
    """Trained minus starting weights, every trainable tensor in name order, as one float64 vector."""
    return np.concatenate([(trained[k].double() - start[k].double()).reshape(-1).numpy() for k in sorted(start)])


def mask_update(state: SecAggState, update: np.ndarray, weight: int, max_weight: int,
                settings: SecureSumSettings, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Stage 3: the update × weight / max_weight, quantized, then the weight and the count of coordinates the
    quantizer clipped (as secure_sum.encode_counts digits; the server learns only their sums), all under the
    private mask and one pairwise mask per live neighbour; and that count."""
    weight = min(weight, max_weight)
    levels, clipped = secure_sum.encode(update, weight / max_weight, settings, rng)
    vector = np.concatenate([levels, secure_sum.encode_counts([weight, clipped], settings)])  # (D + 2 digits,)
    return add_masks(state, vector, settings), clipped


def add_masks(state: SecAggState, vector: np.ndarray, settings: SecureSumSettings) -> np.ndarray:
    """Stage 3: `vector` (integers mod 2^modulus_bits) under the private mask and one pairwise mask per live
    neighbour: what the site sends in place of its values."""
    vector = vector + secure_sum.mask(state.seed, len(vector), settings)
    for other in state.alive:
        pair = secure_sum.pair_mask(state.mask_private, state.roster[other][1], state.tag, state.node, other,
                                    len(vector), settings)
        vector = vector + pair if secure_sum.pair_sign(state.node, other) > 0 else vector - pair
    state.stage = 3
    return vector


def unmask_shares(state: SecAggState, tag: bytes, survivors: list[int],
                  dropped: list[int]) -> dict[int, bytes]:
    """Stage 4: the seed share of each surviving neighbour and the mask-key share of each dropped one, once. A
    site named both survivor and dropped, or too few survivors to hide one update, is refused."""
    state.expect(tag, 4)
    if set(survivors) & set(dropped):
        raise SecureSumError("secure aggregation: a site is named both survivor and dropped: answering would "
                             "unmask it alone")
    if state.node not in survivors:
        raise SecureSumError("secure aggregation: this site is not among the survivors it is asked to unmask")
    mine = [n for n in survivors if n in state.held]
    if len(mine) < state.needed:
        raise SecureSumError(f"secure aggregation: {len(mine)} survivors around this site, {state.needed} needed")
    state.stage = 4
    shares = {n: state.held[n][0] for n in mine}
    shares.update({n: state.held[n][1] for n in dropped if n in state.held})
    return shares


def released(state_dir: str | Path, tag: bytes) -> bool:
    """Whether this site already sent a masked update for the round `tag` names. Sending the same round's update
    again, into a sum over other survivors (after a server restart), would let the difference of the two sums
    reveal it: such a round is declined instead."""
    path = Path(state_dir) / RELEASED_FILE
    return path.exists() and tag.hex() in json.loads(path.read_text(encoding="utf-8"))


def mark_released(state_dir: str | Path, tag: bytes) -> None:
    """Record that the round `tag` names had its masked update sent (before the reply leaves the site)."""
    path = Path(state_dir) / RELEASED_FILE
    with site_lock(state_dir):
        tags = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
        write_text_atomically(path, json.dumps(sorted({*tags, tag.hex()})))

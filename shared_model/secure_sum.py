"""Secure summation (SecAgg+: Bell et al. 2020, on Bonawitz et al. 2017): the arithmetic and cryptography the
sites and the server share. A site sends its weighted update quantized to integers, plus a private mask and one
pairwise mask per neighbour, all mod 2^modulus_bits; the pairwise masks cancel in the sum and the server removes
the private masks (and the masks a dropped site left behind) from secrets it rebuilds out of the survivors'
Shamir shares. No single site's update is ever visible to the server.

The primitives come from maintained libraries: X25519 + HKDF-SHA256 (key agreement), ChaCha20-Poly1305 (the
shares in transit), ChaCha20 (the mask stream, keyed by the full 256-bit secret) from `cryptography`; Shamir over
GF(2^128) from pycryptodome. Not Flower's `pseudo_rand_gen`: it folds the secret into a 32-bit NumPy seed, so a
mask could be found by trying 2^32 seeds."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES = 32  # private mask seeds and X25519 private keys: two 16-byte Shamir chunks
MODULUS_BITS = {16: np.uint16, 32: np.uint32, 64: np.uint64}  # unsigned wrap-around arithmetic is the modular sum
SIGNED = {16: np.int16, 32: np.int32, 64: np.int64}  # the same bits read as two's complement
COUNT_BITS = 48  # a site's weight and clipped count (encode_counts) are below 2^48
RAW = serialization.Encoding.Raw
SUM_FRACTION_BITS = 16  # evaluation sums (encode_sums) are fixed point: 2^-16 a unit
SUM_LIMIT = 2 ** 47  # the largest value one site may put in an evaluation sum: 2^16 sites stay below 2^63


class SecureSumError(ValueError):
    """A secure-summation step cannot go on safely (too few parties, a bad share, a range overflow)."""


@dataclass(frozen=True)
class SecureSumSettings:
    """How updates are quantized and masked, and how many shares rebuild a secret."""

    clip: float = 0.5  # (float) largest |coordinate| of a site's weighted update; larger ones are clipped (counted)
    bits: int = 16  # (int) quantization: 2^bits levels over [-clip, clip]
    modulus_bits: int = 32  # (int) the sum is taken mod 2^16, 2^32 (2 or 4 bytes a coordinate) or 2^64
    threshold: float = 0.67  # (float) fraction of a site's neighbourhood (itself included) whose shares rebuild it
    neighbours: int = 0  # (int) SecAgg+ graph degree (even); 0 = every other site (SecAgg)

    def check(self, num_sites: int) -> None:
        """Refuse settings that are unsafe or would overflow the modular sum for `num_sites` sites."""
        if self.modulus_bits not in MODULUS_BITS:
            raise SecureSumError(f"secagg.modulus_bits={self.modulus_bits}: use 16, 32 or 64")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecureSumError(f"secagg.clip={self.clip}: must be a positive number")
        if not 2 <= self.bits <= self.modulus_bits - 2:
            raise SecureSumError(f"secagg.bits={self.bits}: must be 2..{self.modulus_bits - 2}")
        if not 0.5 < self.threshold <= 1.0:
            raise SecureSumError(f"secagg.threshold={self.threshold}: must be in (0.5, 1] (a majority of the "
                                 "neighbourhood, so two disjoint groups can never both rebuild a secret)")
        if self.neighbours < 0 or self.neighbours % 2:
            raise SecureSumError(f"secagg.neighbours={self.neighbours}: must be 0 (all) or a positive even number")
        if num_sites * 2 ** (self.bits - 1) >= 2 ** (self.modulus_bits - 1):
            raise SecureSumError(f"{num_sites} sites x 2^{self.bits - 1} overflows a sum mod 2^{self.modulus_bits}: "
                                 "lower secagg.bits or use a wider secagg.modulus_bits")

    @property
    def step(self) -> float:
        """The value of one quantization level."""
        return 2 * self.clip / 2 ** self.bits

    @property
    def count_digits(self) -> int:
        """How many values one count takes in a masked vector (encode_counts)."""
        return math.ceil(COUNT_BITS / (self.bits - 1))

    def to_record(self) -> dict[str, float | int]:
        """The settings as a flat ConfigRecord content (every stage message names them)."""
        return {"clip": self.clip, "bits": self.bits, "modulus-bits": self.modulus_bits,
                "threshold": self.threshold, "neighbours": self.neighbours}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SecureSumSettings:
        """The settings `to_record` wrote; a SecureSumError naming a missing, mistyped or unsafe one (`check`: a
        site parses every stage's settings from the server's message and must not act on ones no honest server
        sends, such as 1-bit levels)."""
        try:
            settings = cls(clip=float(record["clip"]), bits=int(record["bits"]),
                           modulus_bits=int(record["modulus-bits"]), threshold=float(record["threshold"]),
                           neighbours=int(record["neighbours"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SecureSumError(f"secure aggregation settings: missing or mistyped {err}") from None
        settings.check(1)  # what any number of sites needs; the sum's range is checked against the roster
        return settings

    def shares_needed(self, neighbourhood: int) -> int:
        """How many of a site's `neighbourhood` share holders (itself included) rebuild its secrets."""
        return max(2, math.ceil(self.threshold * neighbourhood))

    def fewest_summed(self, sites: int, neighbourhood: int) -> int:
        """fewest_unmasked for a round of `sites` whose sites share over `neighbourhood` holders each."""
        return fewest_unmasked(sites, neighbourhood, self.shares_needed(neighbourhood))


def fewest_unmasked(sites: int, neighbourhood: int, needed: int) -> int:
    """The fewest of a round's `sites` whose secure sum a server following the protocol can unmask, each site's
    secrets shared over its `neighbourhood` (itself included) of which `needed` rebuild them (more than half:
    SecureSumSettings.check). On the complete graph that is `needed`. On SecAgg+'s ring, where a sum of
    `needed` sites cannot be unmasked, it is at least ⌈sites × needed / neighbourhood⌉ (100 sites, 4 neighbours,
    4 of 5 shares: 80, not 4). Proof, h = (neighbourhood − 1) / 2 sites on each side: a survivor's private mask
    needs `needed` shares from survivors of its window, and a dropped site beside a survivor needs `needed`
    shares of its pairwise key from the survivors of its window, itself excluded; so a run of more than h
    dropped sites cannot border a survivor (its end would see at most h survivors, fewer than `needed`), every
    site is within h of a survivor, and every window holds at most neighbourhood − needed dropped sites.
    Summing over the `sites` windows, dropped × neighbourhood ≤ sites × (neighbourhood − needed)."""
    return max(needed, math.ceil(sites * needed / neighbourhood))


def sum_noise_multiplier(noise_multiplier: float, summed: int, needed: int, colluders: int) -> float:
    """The noise of a distributed-DP secure sum (fl_client.distributed_dp), in units of the clipping bound: each
    of the `summed` sites added σ/√(needed − colluders), enough for a sum unmasked over as few as `needed` sites
    (fewest_unmasked) when `colluders` of them told the server their noise. σ when
    summed == needed; more when more sites are summed, so a federation whose sites all stay pays for the
    dropouts it tolerates in accuracy: σ·√((summed − colluders) / (needed − colluders))."""
    return noise_multiplier * math.sqrt(max(0, summed - colluders) / (needed - colluders))


def encode(update: np.ndarray, scale: float, settings: SecureSumSettings,
           rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """`update` × `scale`, clipped to ±clip and stochastically rounded to levels (unbiased), as unsigned
    integers mod 2^modulus_bits; and how many coordinates were clipped."""
    scaled = np.asarray(update, dtype=np.float64) * scale / settings.step  # (D,) in levels
    limit = 2 ** (settings.bits - 1)
    clipped = int(np.count_nonzero(np.abs(scaled) > limit))
    scaled = np.clip(scaled, -limit, limit)
    floor = np.floor(scaled)
    levels = (floor + (rng.random(scaled.shape) < scaled - floor)).astype(np.int64)
    return levels.astype(MODULUS_BITS[settings.modulus_bits]), clipped


def encode_counts(counts: list[int], settings: SecureSumSettings) -> np.ndarray:
    """Counts (a site's weight, its clipped coordinates) for the masked vector: each as `count_digits` digits in
    base 2^(bits − 1), least significant first. A digit lies within a level's range, so the digits of as many
    sites as `check` allows sum without wrapping, and the counts add up exactly whatever the modulus (at 16 bits
    a count itself would wrap at 65,536)."""
    width = settings.bits - 1
    if any(not 0 <= count < 2 ** COUNT_BITS for count in counts):
        raise SecureSumError(f"counts {counts} for a secure sum must lie in [0, 2^{COUNT_BITS})")
    digits = [(count >> (width * i)) & (2 ** width - 1) for count in counts for i in range(settings.count_digits)]
    return np.array(digits, dtype=MODULUS_BITS[settings.modulus_bits])


def decode_counts(total: np.ndarray, sites: int, settings: SecureSumSettings) -> list[int]:
    """The counts that `sites` sites' encode_counts vectors summed to (mod 2^modulus_bits); a SecureSumError
    when a digit's sum is more than `sites` honest sites can send."""
    width, digits = settings.bits - 1, settings.count_digits
    sums = [int(d) for d in total]
    if len(sums) % digits or any(d > sites * (2 ** width - 1) for d in sums):
        raise SecureSumError("the unmasked counts lie outside what honest sites can send (a site sent integers out "
                             "of range)")
    return [sum(d << (width * i) for i, d in enumerate(sums[j:j + digits])) for j in range(0, len(sums), digits)]


def encode_sums(means: list[float], count: int) -> np.ndarray:
    """A site's evaluation for a secure sum: each per-user mean × `count` (its sum over the site's users) in
    fixed point (2^-SUM_FRACTION_BITS a unit), then `count`, as uint64 (a 64-bit modulus: the sums are summed,
    never averaged, so they need the range). Means must be finite and non-negative (HR, NDCG, MRR, their second
    moments, a cross-entropy); a SecureSumError otherwise or when a value reaches SUM_LIMIT."""
    values = np.array([*(float(m) * count for m in means), 0.0]) * 2.0 ** SUM_FRACTION_BITS
    values[-1] = count
    if not (np.all(np.isfinite(values)) and np.all(values >= 0) and np.all(values < SUM_LIMIT)):
        raise SecureSumError(f"an evaluation of {count} users with means {means} cannot be summed securely "
                             f"(each mean × users must be finite, non-negative and below {SUM_LIMIT:.3g} units)")
    return np.rint(values).astype(np.uint64)


def decode_sums(total: np.ndarray, sites: int) -> tuple[np.ndarray, int]:
    """The per-user means of `sites` sites' `encode_sums` vectors summed (mod 2^64), and their users; a
    SecureSumError when the sum lies outside what `sites` honest sites can send."""
    if np.any(total >= np.uint64(min(sites * SUM_LIMIT, 2 ** 64 - 1))):
        raise SecureSumError("the unmasked evaluation sum lies outside what honest sites can send (a site sent "
                             "integers out of range)")
    users = int(total[-1])
    means = total[:-1].astype(np.float64) / 2.0 ** SUM_FRACTION_BITS / max(users, 1)
    return means, users


def decode(total: np.ndarray, settings: SecureSumSettings) -> np.ndarray:
    """The signed sum (two's complement mod 2^modulus_bits) back in the updates' units."""
    signed = total.astype(MODULUS_BITS[settings.modulus_bits]).view(SIGNED[settings.modulus_bits])
    return signed.astype(np.float64) * settings.step


def mask(key: bytes, length: int, settings: SecureSumSettings) -> np.ndarray:
    """`length` uniform integers mod 2^modulus_bits from the ChaCha20 stream under the 32-byte `key`."""
    dtype = MODULUS_BITS[settings.modulus_bits]
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(length * np.dtype(dtype).itemsize)), dtype=dtype).copy()


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair (private, public), raw 32 bytes each."""
    private = X25519PrivateKey.generate()
    raw_private = private.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return raw_private, private.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def public_key(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, public: bytes, context: bytes) -> bytes:
    """The 32-byte secret two parties share (X25519, then HKDF-SHA256 bound to `context`)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as err:
        raise SecureSumError(f"bad public key: {err}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt and authenticate `plaintext` for the holder of `key`, bound to `context`."""
    nonce = os.urandom(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    """The plaintext of `seal`; a SecureSumError when it was altered or sealed for another context."""
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], context)
    except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce and a tag
        raise SecureSumError("a share failed authentication (altered, or sealed for another site or round)") \
            from None


def split_secret(secret: bytes, needed: int, holders: int) -> list[bytes]:
    """Shamir shares of a 32-byte `secret`, any `needed` of the `holders` rebuild it: 1 index byte pair + chunks."""
    if len(secret) != SECRET_BYTES:
        raise SecureSumError(f"secrets are {SECRET_BYTES} bytes, not {len(secret)}")
    chunks = [Shamir.split(needed, holders, secret[i:i + 16], ssss=False) for i in range(0, SECRET_BYTES, 16)]
    return [index.to_bytes(2, "big") + b"".join(chunk[h][1] for chunk in chunks)
            for h, index in enumerate(c[0] for c in chunks[0])]


def combine_secret(shares: list[bytes], needed: int) -> bytes:
    """The secret behind `shares` (at least `needed` distinct ones)."""
    distinct = {share[:2]: share for share in shares if len(share) == 2 + SECRET_BYTES}
    if len(distinct) < needed:
        raise SecureSumError(f"{len(distinct)} usable shares, {needed} needed to rebuild a secret")
    picked = list(distinct.values())[:needed]
    return b"".join(Shamir.combine([(int.from_bytes(s[:2], "big"), s[2 + i:2 + i + 16]) for s in picked],
                                   ssss=False) for i in range(0, SECRET_BYTES, 16))


def neighbourhoods(nodes: list[int], degree: int, seed: bytes) -> dict[int, list[int]]:
    """Each node's neighbours: every other node (degree 0, or at least nodes - 1), else the degree / 2 nodes on
    each side of it on a ring shuffled by `seed` (a public value both sides know)."""
    if degree == 0 or degree >= len(nodes) - 1:
        return {n: [m for m in nodes if m != n] for n in nodes}
    ring = sorted(nodes, key=lambda n: hashlib.sha256(seed + n.to_bytes(8, "big")).digest())
    half = degree // 2
    return {n: sorted(ring[(i + k) % len(ring)] for k in range(-half, half + 1) if k)
            for i, n in enumerate(ring)}


def pair_sign(me: int, other: int) -> int:
    """+1 when `me` adds the mask it shares with `other`, -1 when it subtracts it: the two cancel in the sum."""
    return 1 if me < other else -1


def round_tag(training_id: str, server_round: int, evaluation: bool = False) -> bytes:
    """What binds every key, share and mask to one round of one training (its training sum, or its evaluation
    sum: two secure sums, never mixed)."""
    return f"fedrec-secagg|{training_id}|{server_round}{'|evaluate' if evaluation else ''}".encode()


def pair_context(tag: bytes, a: int, b: int, what: bytes) -> bytes:
    """The HKDF / AEAD context of what nodes a and b share in a round (the same from both ends)."""
    low, high = sorted((a, b))
    return tag + b"|" + what + b"|" + low.to_bytes(8, "big") + high.to_bytes(8, "big")


def pair_mask(private: bytes, public: bytes, tag: bytes, me: int, other: int, length: int,
              settings: SecureSumSettings) -> np.ndarray:
    """The mask nodes `me` and `other` share this round, from either's private key and the other's public key."""
    return mask(agree(private, public, pair_context(tag, me, other, b"mask")), length, settings)

"""The consortium's signature on the fedrec app (the FAB that `flwr run` builds), made offline.

Flower 1.41 verifies a FAB at each SuperNode started with `--trusted-entities`: an Ed25519 signature over
`signed_at` (8 bytes, big-endian) + SHA-256(FAB), by a key the site trusts. Flower gets such signatures only from
Flower Hub (`flwr app review`, online); fedrec makes the same signature locally (`fedrec-admin sign-app`), its
SuperLink hands it out with the FAB, and every site checks it with Flower's own code before any app code runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from shared_model.key_files import check_private_file, key_id, load_signing_public_key


@dataclass(frozen=True)
class AppSignature:
    """One signature on one FAB: what `fedrec-admin sign-app` writes and `fedrec-server --app-signature` reads."""

    fab_sha256: str  # hex digest of the FAB bytes
    key_id: str  # the signer's id in the sites' --trusted-entities file
    public_key: str  # the signer's OpenSSH public key line (ssh-ed25519 ...)
    signature: str  # base64url without padding, as Flower's verification records carry it
    signed_at: int  # unix seconds, part of the signed message

    def save(self, path: Path) -> Path:
        """Write the signature as JSON (it is public: it proves, it does not grant)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> AppSignature:
        """Read and verify a signature file; an error names the file and what is wrong."""
        try:
            signature = cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a fedrec app signature ({err}); make one with fedrec-admin sign-app") \
                from err
        try:
            expected = key_id(signature.public_key)
        except (ValueError, IndexError, AttributeError) as err:
            raise ValueError(f"{path}: public_key is not an OpenSSH public key line ({err})") from err
        if signature.key_id != expected:
            raise ValueError(f"{path}: key_id {signature.key_id} does not belong to its public key")
        signature.verify(signature.fab_sha256, str(path))
        return signature

    def verify(self, fab_sha256: str, where: str = "app signature") -> None:
        """Raise ValueError unless this is a valid signature of the FAB with digest `fab_sha256`."""
        if fab_sha256 != self.fab_sha256:
            raise ValueError(f"{where}: signs FAB {self.fab_sha256[:12]}..., not this app's FAB {fab_sha256[:12]}...; "
                             "the app changed since it was signed: sign it again (fedrec-admin sign-app)")
        try:
            key = serialization.load_ssh_public_key(self.public_key.encode())
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            key.verify(_decode(self.signature), signed_message(bytes.fromhex(fab_sha256), self.signed_at))
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as err:
            raise ValueError(f"{where}: the signature does not verify with key {self.key_id}") from err

    def verification_records(self) -> dict[str, str]:
        """This signature as Flower's FAB verification records (`Fab.verifications`), which a SuperNode with
        `--trusted-entities` checks."""
        return {self.key_id: json.dumps({"signature": self.signature, "signed_at": self.signed_at}),
                "valid_license": "Valid"}


def signed_message(fab_digest: bytes, signed_at: int) -> bytes:
    """What is signed, byte for byte as Flower verifies it: signed_at (8 bytes, big-endian) + SHA-256(FAB)."""
    return signed_at.to_bytes(8, byteorder="big") + fab_digest


def sign_fab(fab: bytes, private_key_path: Path, public_key_path: Path, signed_at: int | None = None,
             ) -> AppSignature:
    """Sign a FAB with the consortium's Ed25519 private key (OpenSSH file, 0600)."""
    private = serialization.load_ssh_private_key(check_private_file(private_key_path).read_bytes(), password=None)
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{private_key_path}: not an Ed25519 private key (make one with fedrec-admin signing-key)")
    public = load_signing_public_key(public_key_path)
    mine = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if mine.decode() != public:
        raise ValueError(f"{public_key_path} is not the public half of {private_key_path}")
    digest = hashlib.sha256(fab).digest()
    when = int(time.time()) if signed_at is None else signed_at
    raw = private.sign(signed_message(digest, when))
    return AppSignature(fab_sha256=digest.hex(), key_id=key_id(public), public_key=public,
                        signature=base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii"), signed_at=when)


def trusted_entities(public_key_path: Path) -> dict[str, str]:
    """A site's `--trusted-entities` content: the consortium's key id -> its OpenSSH public key line."""
    public = load_signing_public_key(public_key_path)
    return {key_id(public): public}


def _decode(text: str) -> bytes:
    """base64url without padding (Flower's form) to bytes."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

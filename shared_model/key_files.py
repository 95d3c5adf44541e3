"""Key pairs of a locked-down deployment, as OpenSSH files Flower reads: a site's SuperNode key, the consortium's
app-signing key. Private keys are written 0600 and never overwritten."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # site and key names become file names


def check_name(name: str, what: str = "name") -> str:
    """`name` if it is safe as a file name (letters, digits, `_.-`, at most 64), else a ValueError."""
    if not NAME.match(name):
        raise ValueError(f"{what} {name!r}: use 1-64 letters, digits, '_', '.' or '-' (it becomes a file name)")
    return name


def write_private(path: Path, data: bytes) -> Path:
    """Create `path` readable by its owner only (0600); an existing file is an error, never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise FileExistsError(f"{path} already exists; a private key is never overwritten (move it away first)") \
            from err
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.chmod(path, 0o600)  # the umask may have cleared bits, never added them; make the mode exact anyway
    return path


def write_public(path: Path, data: bytes) -> Path:
    """Write a public file (certificate, public key), replacing an older one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def check_private_file(path: Path) -> Path:
    """Refuse a private key that is missing or that users other than its owner may read (as ssh does)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such private key file")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"{path}: mode {mode:o} lets other users read this private key; run chmod 600 {path}")
    return path


def make_site_keys(out_dir: Path, name: str) -> tuple[Path, Path]:
    """A site's SuperNode key pair (EC P-384, OpenSSH): `<name>.key` stays at the site, `<name>.pub` goes to the
    operator, who registers it."""
    key = ec.generate_private_key(ec.SECP384R1())
    return _write_pair(out_dir, check_name(name, "site name"), key)


def make_signing_keys(out_dir: Path, name: str = "consortium") -> tuple[Path, Path]:
    """The consortium's app-signing key pair (Ed25519, OpenSSH): the private key signs the app, every site
    trusts the public key (Flower's --trusted-entities)."""
    return _write_pair(out_dir, check_name(name, "key name"), ed25519.Ed25519PrivateKey.generate())


def _write_pair(out_dir: Path, name: str, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
                ) -> tuple[Path, Path]:
    """Write `<name>.key` (0600) and `<name>.pub` (one OpenSSH line)."""
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private_path = write_private(out_dir / f"{name}.key", private)
    return private_path, write_public(out_dir / f"{name}.pub", public + f" {name}\n".encode())


def load_site_public_key(path: Path) -> str:
    """The OpenSSH line of a site's public key, checked: Flower registers only NIST EC curve keys."""
    text = _read_public(path)
    key = serialization.load_ssh_public_key(text.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey) or not key.curve.name.startswith("secp"):
        raise ValueError(f"{path}: not an EC P-256/384/521 public key (make one with fedrec-admin site-keys)")
    return text


def load_signing_public_key(path: Path) -> str:
    """The OpenSSH line of the consortium's app-signing public key, checked to be Ed25519 (as Flower needs)."""
    text = _read_public(path)
    if not isinstance(serialization.load_ssh_public_key(text.encode()), ed25519.Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key (make one with fedrec-admin signing-key)")
    return text


def _read_public(path: Path) -> str:
    """The first two fields of an OpenSSH public key file (type and key; the comment is dropped)."""
    try:
        fields = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read an OpenSSH public key ({err})") from err
    if len(fields) < 2:
        raise ValueError(f"{path}: not an OpenSSH public key line ('<type> <base64> [comment]')")
    text = " ".join(fields[:2])
    try:
        serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:  # malformed or of a kind cryptography lacks
        raise ValueError(f"{path}: not a valid OpenSSH public key ({err})") from err
    return text


def key_id(public_key_line: str) -> str:
    """A stable id for a public key (the name its signatures are filed under): `fedrec_` + 16 hex of its SHA-256."""
    blob = base64.b64decode(public_key_line.split()[1])
    return "fedrec_" + hashlib.sha256(blob).hexdigest()[:16]

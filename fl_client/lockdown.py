"""fedrec-client's locked-down deployment (the default): the site checks the server's TLS certificate, proves
who it is with its registered key, and runs only apps signed by the consortium. `--insecure` turns all three off."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared_model.app_signature import trusted_entities
from shared_model.key_files import check_private_file

log = logging.getLogger("fedrec-client")
TRUSTED_ENTITIES = "trusted_entities.yaml"  # JSON, which is YAML: Flower reads it with yaml.safe_load

INSECURE_WARNING = """\
--insecure: this site runs WITHOUT the locked-down deployment. It gives up:
  - TLS: the server is not authenticated and everything this site sends (model updates, ε, counts) crosses
    the network in clear text;
  - its SuperNode key: the server cannot tell this site from an impostor;
  - the app check: this SuperNode runs ANY app the SuperLink hands it, and that code can read the events file
    given with --data and send it anywhere.
Use --insecure for tests on one machine or on a network you fully trust; see docs/deployment.md."""


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """The site's security options: locked down (CA, own key, trusted publisher) or --insecure."""
    security = parser.add_mutually_exclusive_group()  # one of them is required to connect (check_security_args)
    security.add_argument("--insecure", action="store_true",
                          help="no TLS, no site key, runs any app (tests only; prints what it gives up)")
    security.add_argument("--root-certificates", help="the consortium CA certificate (PEM) that signed the server's")
    parser.add_argument("--auth-key", help="this site's private key (fedrec-admin site-keys; mode 0600); the "
                                           "operator registers its public half")
    parser.add_argument("--trusted-publisher",
                        help="the consortium's app-signing public key (.pub): this site runs only apps it signed")


def check_security_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a half-configured locked-down site (argparse error naming what is missing)."""
    if not args.insecure and not args.root_certificates:
        if getattr(args, "check", None):  # fedrec-client --check connects to nothing
            return
        parser.error("one of the arguments --insecure --root-certificates is required")
    flags = {"--auth-key": args.auth_key, "--trusted-publisher": args.trusted_publisher}
    if args.insecure and any(flags.values()):
        parser.error(f"--insecure turns TLS, the site key and the app check off; drop "
                     f"{[flag for flag, value in flags.items() if value]}")
    missing = [flag for flag, value in flags.items() if not value]
    if not args.insecure and missing:
        parser.error(f"the locked-down deployment needs {missing} with --root-certificates (or use --insecure for "
                     "tests); see docs/deployment.md")


def check_site_key(path: Path) -> Path:
    """The site's private key, checked now rather than by a SuperNode that exits: owner-only, NIST EC, OpenSSH."""
    check_private_file(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except ValueError as err:
        raise ValueError(f"--auth-key {path}: not an unencrypted OpenSSH private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"--auth-key {path}: not an EC key (make one with fedrec-admin site-keys)")
    return path


def security_flags(args: argparse.Namespace, state_dir: Path) -> list[str]:
    """The `flower-supernode` security options; writes the --trusted-entities file into `state_dir`."""
    if args.insecure:
        return ["--insecure"]
    entities = state_dir / TRUSTED_ENTITIES
    entities.parent.mkdir(parents=True, exist_ok=True)
    trusted = trusted_entities(Path(args.trusted_publisher))
    entities.write_text(json.dumps(trusted, indent=2) + "\n", encoding="utf-8")
    log.info("locked down: TLS checked against %s, site key %s, runs only apps signed by %s", args.root_certificates,
             args.auth_key, ", ".join(trusted))
    return ["--root-certificates", str(Path(args.root_certificates).resolve()),
            "--auth-supernode-private-key", str(check_site_key(Path(args.auth_key)).resolve()),
            "--trusted-entities", str(entities)]


def warn_insecure() -> None:
    """Print what --insecure gives up, framed, to stderr and the log."""
    bar = "!" * 100
    sys.stderr.write(f"{bar}\n{INSECURE_WARNING}\n{bar}\n")
    sys.stderr.flush()
    log.warning("running --insecure: no TLS, no site key, and this site runs any app it is sent")

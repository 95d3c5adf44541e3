"""fedrec-server's locked-down deployment (the default): TLS, SuperNode authentication with registered site
keys, a signed app, and Control/Runtime APIs only for this machine. `--insecure` turns the first three off."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fl_server.app_bundle import fab_sha256
from fl_server.sites import registry
from shared_model.app_signature import AppSignature
from shared_model.key_files import check_private_file

log = logging.getLogger("fedrec-server")

INSECURE_WARNING = """\
--insecure: this SuperLink runs WITHOUT the locked-down deployment. It gives up:
  - TLS: models, updates and run settings cross the network in clear text, and sites cannot tell this server
    from an impostor;
  - SuperNode authentication: ANY SuperNode that reaches this port joins, is asked to train and is averaged in;
  - the app signature: sites started with --insecure run whatever app this SuperLink hands them, with read
    access to their events file.
Still on: the Control and Runtime APIs answer only this machine. Use --insecure for tests on one machine or on
a network you fully trust; see docs/deployment.md for the locked-down setup."""


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """The server's security options: locked down (TLS files, --sites, --app-signature) or --insecure."""
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--insecure", action="store_true",
                          help="no TLS, no SuperNode authentication, no app signature (tests only; prints what it "
                               "gives up)")
    security.add_argument("--ssl-certfile", help="server TLS certificate (PEM, fedrec-admin server-cert)")
    parser.add_argument("--ssl-keyfile", help="server TLS private key (PEM, mode 0600)")
    parser.add_argument("--ssl-ca-certfile", help="the consortium CA certificate (PEM) the sites trust")
    parser.add_argument("--sites", help="directory of registered site public keys (<name>.pub, fedrec-admin "
                                        "site-add); only these SuperNodes may join")
    parser.add_argument("--app-signature",
                        help="the consortium's signature on this app (fedrec-admin sign-app); sites run nothing else")


LOCKDOWN_OPTIONS = ("ssl_keyfile", "ssl_ca_certfile", "sites", "app_signature")  # with --ssl-certfile


def check_security_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a half-configured locked-down deployment (argparse error naming what is missing)."""
    flags = {f"--{name.replace('_', '-')}": getattr(args, name) for name in LOCKDOWN_OPTIONS}
    if args.insecure and any(flags.values()):
        parser.error("--insecure turns TLS, SuperNode authentication and app signatures off; drop "
                     f"{[flag for flag, value in flags.items() if value]}")
    missing = [flag for flag, value in flags.items() if not value]
    if not args.insecure and missing:
        parser.error(f"the locked-down deployment needs {missing} with --ssl-certfile (or use --insecure for tests); "
                     "see docs/deployment.md")


def security_flags(args: argparse.Namespace) -> list[str]:
    """The `flower-superlink` security options (TLS and SuperNode authentication, or --insecure)."""
    if args.insecure:
        return ["--insecure"]
    return ["--ssl-certfile", str(Path(args.ssl_certfile).resolve()), "--ssl-keyfile",
            str(Path(args.ssl_keyfile).resolve()), "--ssl-ca-certfile", str(Path(args.ssl_ca_certfile).resolve()),
            "--enable-supernode-auth"]


def check_lockdown_files(args: argparse.Namespace, app_dir: Path) -> AppSignature:
    """Check before anything starts what would otherwise fail later: the server key's mode, every registered
    site key, and the app signature against this app."""
    check_private_file(Path(args.ssl_keyfile))
    registry(Path(args.sites))
    return check_app_signature(app_dir, args.app_signature)


def check_app_signature(app_dir: Path, signature_path: str) -> AppSignature:
    """The app's signature, checked against the FAB `flwr run` will build from `app_dir` (a FAB is
    deterministic), so a changed app fails here rather than at every site."""
    signature = AppSignature.load(Path(signature_path))
    signature.verify(fab_sha256(app_dir), f"--app-signature {signature_path}")
    log.info("app signed by %s (FAB %s...): sites that trust this key run it, and nothing else",
             signature.key_id, signature.fab_sha256[:12])
    return signature


def warn_insecure(what: str = INSECURE_WARNING) -> None:
    """Print `what` framed, to stderr and the log, so nobody misses it."""
    bar = "!" * 100
    sys.stderr.write(f"{bar}\n{what}\n{bar}\n")
    sys.stderr.flush()
    log.warning("running --insecure: no TLS, no SuperNode authentication, no app signature")

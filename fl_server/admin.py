"""`fedrec-admin`: the keys, certificates, app signature and site registry of a locked-down deployment.

The operator makes the CA and the server certificate, the consortium's signing key and the app signature, and
registers each site's public key; each site makes its own key pair (`site-keys`) and keeps the private half.
Step by step: docs/deployment.md.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

from fl_server.app_bundle import build_fab
from fl_server.certificates import make_ca, make_server_certificate
from fl_server.control import cli_env, cli_home, flwr
from fl_server.sites import add_site, json_answer, list_command, register, registered, registry, remove_site, unregister
from shared_model.app_signature import sign_fab
from shared_model.console import EXPECTED_ERRORS, run_command
from shared_model.items_file import catalog_from_items_file
from shared_model.key_files import make_signing_keys, make_site_keys

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The operator's (and a site's `site-keys`) command line."""
    parser = argparse.ArgumentParser(prog="fedrec-admin", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    ca = commands.add_parser("ca", help="make the consortium CA (ca.pem for everyone, ca.key 0600 for you)")
    ca.add_argument("--out", required=True, help="directory for ca.pem and ca.key")
    ca.add_argument("--name", default="fedrec consortium CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days")
    cert = commands.add_parser("server-cert", help="make the SuperLink's certificate, signed by the CA")
    cert.add_argument("--ca-dir", required=True, help="directory with ca.pem and ca.key")
    cert.add_argument("--out", required=True, help="directory for server.pem and server.key")
    cert.add_argument("--host", action="append", default=[],
                      help="a name or IP address sites dial (repeat; localhost, 127.0.0.1 and ::1 are always in)")
    cert.add_argument("--days", type=int, default=825, help="validity in days")
    keys = commands.add_parser("site-keys", help="(at a site) make its SuperNode key pair; send only <name>.pub")
    keys.add_argument("--name", required=True, help="the site's name")
    keys.add_argument("--out", required=True, help="directory for <name>.key (0600) and <name>.pub")
    signing = commands.add_parser("signing-key", help="make the consortium's app-signing key pair (Ed25519)")
    signing.add_argument("--out", required=True, help="directory for <name>.key (0600) and <name>.pub")
    signing.add_argument("--name", default="consortium", help="file name of the key pair")
    sign = commands.add_parser("sign-app", help="sign the app's FAB (what `flwr run` builds) with the signing key")
    sign.add_argument("--key", required=True, help="the consortium's private signing key")
    sign.add_argument("--public-key", default="", help="its public key (default: the .pub next to --key)")
    sign.add_argument("--app", default=str(PROJECT_ROOT), help="the app directory (fedrec's source tree)")
    sign.add_argument("--out", required=True, help="the signature file (give it to fedrec-server --app-signature)")
    catalog = commands.add_parser("catalog", help="build the shared catalog.json from the consortium's items file")
    catalog.add_argument("--items", required=True,
                         help="CSV, TSV or Parquet: an item_id column, optional title, other columns public "
                              "attributes ('|' between several values)")
    catalog.add_argument("--out", required=True, help="directory for catalog.json (give it to every site)")
    for name, text in (("site-add", "register a site's public key"), ("site-remove", "unregister a site"),
                       ("site-list", "list the registered sites")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--sites", required=True, help="the registry: a directory of <name>.pub files")
        if name != "site-list":
            sub.add_argument("--name", required=True, help="the site's name")
        if name == "site-add":
            sub.add_argument("--public-key", required=True, help="the site's <name>.pub")
        sub.add_argument("--server-out-dir", default="",
                         help="--out-dir of a running fedrec-server: change (or show) its SuperLink now, too")
    return parser.parse_args(argv)


def run_ca(args: argparse.Namespace) -> None:
    """Make the CA."""
    cert, key = make_ca(Path(args.out), args.name, args.days)
    print(f"CA certificate {cert} (give it to every site); CA key {key} (0600: keep it offline)")


def run_server_cert(args: argparse.Namespace) -> None:
    """Make the server certificate."""
    ca_dir = Path(args.ca_dir)
    cert, key = make_server_certificate(ca_dir / "ca.pem", ca_dir / "ca.key", Path(args.out), args.host, args.days)
    print(f"server certificate {cert} for {', '.join([*args.host, 'localhost', '127.0.0.1', '::1'])}; key {key}")


def run_site_keys(args: argparse.Namespace) -> None:
    """Make a site's key pair."""
    private, public = make_site_keys(Path(args.out), args.name)
    print(f"private key {private} (0600: stays at the site, fedrec-client --auth-key); public key {public} "
          "(send it to the operator)")


def run_signing_key(args: argparse.Namespace) -> None:
    """Make the consortium's signing key pair."""
    private, public = make_signing_keys(Path(args.out), args.name)
    print(f"signing key {private} (0600: keep it with whoever approves app releases); public key {public} "
          "(every site: fedrec-client --trusted-publisher)")


def run_sign_app(args: argparse.Namespace) -> None:
    """Build the app's FAB as `flwr run` does and sign its hash."""
    key = Path(args.key)
    public = Path(args.public_key) if args.public_key else key.with_suffix(".pub")
    fab = build_fab(Path(args.app))
    signature = sign_fab(fab, key, public)
    signature.save(Path(args.out))
    print(f"signed FAB sha256 {hashlib.sha256(fab).hexdigest()} with {signature.key_id}: {args.out}")


def run_catalog(args: argparse.Namespace) -> None:
    """Build the shared catalog and print its fingerprint (each site's reply names it; the server checks it)."""
    catalog, report = catalog_from_items_file(args.items)
    path = catalog.save(Path(args.out))
    print(f"{args.items}: {report.summary()}")
    print(f"{path}: {len(catalog.item_ids):,} items, fingerprint {catalog.fingerprint}")


def run_site_add(args: argparse.Namespace) -> None:
    """Add a site to the registry (and to a running SuperLink)."""
    path = add_site(Path(args.sites), args.name, Path(args.public_key))
    print(f"site {args.name}: {path}")
    if args.server_out_dir:
        home = cli_home(Path(args.server_out_dir))
        print(f"registered with the running SuperLink as node {register(args.name, path, home.parent, cli_env(home))}")


def run_site_remove(args: argparse.Namespace) -> None:
    """Remove a site from the registry (and from a running SuperLink)."""
    print(f"removed {remove_site(Path(args.sites), args.name)}")
    if args.server_out_dir:
        home = cli_home(Path(args.server_out_dir))
        print(f"unregistered node {unregister(args.name, home.parent, cli_env(home))} from the running SuperLink")


def run_site_list(args: argparse.Namespace) -> None:
    """List the registry (with each node's status on a running SuperLink)."""
    sites = registry(Path(args.sites))
    status: dict[str, str] = {}
    if args.server_out_dir:
        home = cli_home(Path(args.server_out_dir))
        ids = registered(home.parent)
        nodes = json_answer(flwr(list_command(), cli_env(home)), list_command()).get("nodes", [])
        by_id = {int(node["node-id"]): node["status"] for node in nodes}
        status = {name: f"node {node} {by_id.get(node, 'unknown')}" for name, node in ids.items()}
    for name, path in sites.items():
        print(f"{name}\t{path}\t{status.get(name, 'not registered with a running SuperLink')}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "ca": run_ca, "server-cert": run_server_cert, "site-keys": run_site_keys, "signing-key": run_signing_key,
    "sign-app": run_sign_app, "catalog": run_catalog, "site-add": run_site_add, "site-remove": run_site_remove,
    "site-list": run_site_list}


def dispatch(argv: list[str]) -> None:
    """Parse the command line and run its command."""
    args = parse_args(argv)
    COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Run one fedrec-admin command; errors are one paragraph (the traceback with --debug)."""
    arguments = sys.argv[1:] if argv is None else argv
    return run_command("fedrec-admin", lambda: dispatch(arguments), arguments,
                       expected=(*EXPECTED_ERRORS, RuntimeError, KeyError))


if __name__ == "__main__":
    sys.exit(main())

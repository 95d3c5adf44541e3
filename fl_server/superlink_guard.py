"""Flower's SuperLink with fedrec's two guards, run as `python -m fl_server.superlink_guard [fedrec options]
<flower-superlink options>` (fedrec-server starts it).

Flower 1.41 serves its Fleet API (for SuperNodes), Control API (`flwr run`, `flwr supernode register`, ...) and
Runtime API (for ServerApps) on one HTTP port, and without Flower's enterprise OIDC plugin the Control API lets
every caller in. Sites must reach the Fleet API, so the port cannot simply be bound to loopback. The guards:

1. Only the operator may use Control and Runtime: a request for anything but the Fleet API (`/v1/fleet/`) is
   refused (HTTP 403) unless it comes from this machine (loopback, or the address the SuperLink is bound to).
   It wraps Flower's own app as the outermost middleware, before Flower parses the request.
2. The consortium's signature on the fedrec app travels with it: the FAB that SuperNodes download (Fleet GetFab)
   carries the signature from `--app-signature` as Flower's verification records, which each site checks with
   its `--trusted-entities` before any app code runs (a FAB with another hash gets no signature: sites refuse it).

Everything else is Flower's `flower-superlink`, unchanged. These hooks use two Flower internals
(`flwr.superlink.main.create_app`, `fleet_handlers.get_fab`); tests/fl_server/test_lockdown.py fails if a
Flower upgrade moves them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from shared_model.app_signature import AppSignature

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PREFIX = "/v1/fleet/"
# Flower's switches for its legacy gRPC Control and Fleet servers (own ports, outside this guard): kept off.
LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")
FORBIDDEN_CODE = 9  # Flower's ApiErrorCode.NO_PERMISSIONS; the `flwr` CLI prints `detail` from this JSON shape
log = logging.getLogger("fedrec-superlink")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> Address | None:
    """An IP address (IPv4-mapped IPv6 as IPv4, zone dropped), or None for anything else."""
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def bound_addresses(host: str) -> frozenset[Address]:
    """The addresses a SuperLink bound to `host` listens on, when `host` is specific: this machine dials them
    for its own Runtime and Control calls, and only this machine can connect from them."""
    literal = parse_address(host)
    if literal is not None:
        return frozenset() if literal.is_unspecified else frozenset({literal})
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return frozenset()
    return frozenset(a for a in (parse_address(str(info[4][0])) for info in infos) if a is not None)


def is_operator(client: tuple[str, int] | list[Any] | None, bound: frozenset[Address]) -> bool:
    """Whether a peer is this machine: a loopback address, or an address the SuperLink is bound to."""
    address = parse_address(str(client[0])) if client else None
    return address is not None and (address.is_loopback or address in bound)


class OperatorOnly:
    """ASGI middleware: non-Fleet requests from other machines get 403 before Flower sees them."""

    def __init__(self, app: ASGIApp, bound_host: str) -> None:
        self.app = app
        self.bound = bound_addresses(bound_host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass Fleet traffic and the operator's own requests; refuse the rest."""
        if scope["type"] not in ("http", "websocket") or str(scope.get("path", "")).startswith(FLEET_PREFIX) \
                or is_operator(scope.get("client"), self.bound):
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        log.warning("refused %s %s from %s: Control and Runtime APIs answer only this machine",
                    scope.get("method", "WS"), scope.get("path"), peer[0] if peer else "an unknown peer")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"code": FORBIDDEN_CODE, "detail": "fedrec SuperLink: the Control and Runtime APIs answer "
                           "only the operator on the server machine; other addresses may use the Fleet API only"})
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


def install_operator_guard(bound_host: str) -> None:
    """Make Flower's `create_app` wrap its SuperLink app in OperatorOnly (outermost)."""
    from flwr.superlink import main as superlink_main  # Flower only in this process, not at import time

    create_app = superlink_main.create_app

    def guarded_create_app(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        app.add_middleware(OperatorOnly, bound_host=bound_host)
        return app

    superlink_main.create_app = guarded_create_app


def install_app_signature(signature: AppSignature) -> None:
    """Make the Fleet API's GetFab hand out `signature` with the FAB it signs."""
    from flwr.superlink.servicer.fleet import fleet_handlers

    get_fab = fleet_handlers.get_fab

    def signed_get_fab(request: Any, state: Any) -> Any:
        response = get_fab(request=request, state=state)
        records = signature.verification_records()
        if response.fab.hash_str != signature.fab_sha256:  # say "verification is on", with no signature to show
            log.warning("FAB %s is not the signed fedrec app (%s): sites will refuse it", response.fab.hash_str,
                        signature.fab_sha256)
            records = {"valid_license": records["valid_license"]}
        response.fab.verifications.update(records)
        return response

    fleet_handlers.get_fab = signed_get_fab


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """fedrec's options; the rest goes to `flower-superlink` unchanged."""
    parser = argparse.ArgumentParser(prog="python -m fl_server.superlink_guard", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)  # never mistake one of Flower's options for ours
    parser.add_argument("--app-signature", default="", help="the consortium's signature on the app (sign-app)")
    ours, rest = parser.parse_known_args(argv)
    hosts = [rest[i + 1] for i, arg in enumerate(rest[:-1]) if arg == "--host"]
    ours.host = hosts[-1] if hosts else "127.0.0.1"  # flower-superlink's default
    return ours, rest


def main(argv: list[str] | None = None) -> None:
    """Install the guards, then run Flower's own `flower-superlink` entry point with the remaining options."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ours, rest = parse_args(sys.argv[1:] if argv is None else argv)
    for switch in LEGACY_GRPC_SWITCHES:
        if os.environ.pop(switch, None) is not None:
            log.warning("ignored %s: its gRPC server would bypass the guard", switch)
    install_operator_guard(ours.host)
    if ours.app_signature:
        install_app_signature(AppSignature.load(Path(ours.app_signature)))
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *rest]  # Flower parses sys.argv itself
    flower_superlink()


if __name__ == "__main__":
    main()

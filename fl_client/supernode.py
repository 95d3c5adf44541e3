"""`fedrec-client`: run a data site in a real deployment, as a Flower SuperNode with the site's settings.

The site's events are checked and preprocessed once here (errors show before anything connects), the
settings go to the SuperNode as its --node-config, and every round then runs fl_client.client_app in a
fresh process that reads the cached preprocessing.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import time
from pathlib import Path

from fl_client.check import DEFAULT_PLAN, Plan, check_site
from fl_client.dp.settings import ACCOUNTANTS, GRAD_SAMPLE_MODES, PrivacyConfig
from fl_client.lockdown import add_security_args, check_security_args, security_flags, warn_insecure
from fl_client.site import MAX_MODEL_PARAMETERS, MAX_PLAN_STEPS, MIN_USERS, SiteConfig, check_site_start, load_site_data
from shared_model.console import EXPECTED_ERRORS, console_command, quiet_library_warnings, rng_note
from shared_model.device import describe_device, resolve_device
from shared_model.launch import (
    exit_on_sigterm,
    flower_command,
    parent_command,
    process_alive,
    running_commands,
    start,
    stop,
    stop_app_processes,
    write_toml,
)

log = logging.getLogger("fedrec-client")


def build_parser() -> argparse.ArgumentParser:
    """The site's command line: where the server is, where the data is, and the site's privacy budget."""
    parser = argparse.ArgumentParser(prog="fedrec-client", description=__doc__.splitlines()[0])
    parser.add_argument("--superlink", default="127.0.0.1:9092", help="the server's address HOST:PORT")
    parser.add_argument("--data", required=True, help="this site's events file (or folder for folder formats)")
    parser.add_argument("--catalog", required=True, help="the public catalog.json every site shares")
    parser.add_argument("--state-dir", required=True,
                        help="this site's identity, privacy ledger, caches and replies (required, and kept for the "
                             "site's lifetime: a new state dir is a new site whose ε starts from 0)")
    parser.add_argument("--format", default="events", help="events, movielens, s3rec or tianchi")
    parser.add_argument("--epsilon", type=float, default=8.0, help="total ε this site may spend over all rounds")
    parser.add_argument("--delta", type=float, default=None,
                        help="δ, below 1/#users (default min(1e-5, 1/(10 · #users)) at the site's first start; "
                             "fixed in its ledger from then on)")
    parser.add_argument("--min-users", type=int, default=MIN_USERS,
                        help="fewer trainable users and this site refuses DP training at start")
    parser.add_argument("--max-model-parameters", type=int, default=MAX_MODEL_PARAMETERS,
                        help="largest global model (weights + buffers) this site accepts from the server")
    parser.add_argument("--max-plan-steps", type=int, default=MAX_PLAN_STEPS,
                        help="most training steps this site accepts to plan: all rounds' under DP (its σ search "
                             "and ledger compose them), one round's without")
    parser.add_argument("--no-dp", action="store_true", help="train without DP (no privacy claim is made)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-user clipping bound C")
    parser.add_argument("--noise-multiplier", type=float, default=None,
                        help="fixed σ (default: calibrated so the budget lasts all the rounds the server plans)")
    parser.add_argument("--accountant", default="prv", choices=ACCOUNTANTS,
                        help="Opacus accountant for σ and the ledger (keep it for the site's lifetime)")
    parser.add_argument("--grad-sample-mode", default="bookkeeping", choices=GRAD_SAMPLE_MODES,
                        help="per-user clipping: bookkeeping (fast) or hooks (Opacus' own, about 5x slower)")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192,
                        help="padded positions per micro-batch (fewer where their catalog scores would pass 2^28)")
    parser.add_argument("--micro-batch-users", type=int, default=128, help="DP in hooks mode: users per micro-batch")
    parser.add_argument("--cache-keep", type=int, default=3,
                        help="preprocessing caches and frozen-tensor copies this site keeps, each kind (latest used)")
    parser.add_argument("--secure-mode", action="store_true", help="DP sampling and noise from the OS CSPRNG (slower)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--min-events", type=int, default=3, help="users with fewer events are dropped (counted)")
    parser.add_argument("--port", type=int, default=9094, help="local port for this SuperNode's ClientApps")
    parser.add_argument("--rejoin-delay", type=float, default=5.0, help="seconds before rejoining a restarted server")
    parser.add_argument("--check", nargs="?", const=DEFAULT_PLAN, metavar="ROUNDSxEPOCHSxBATCH",
                        help="check the data against the catalog and print what this site would use (users, "
                             "events, dropped rows, δ, σ for the server's plan, default %(const)s), then exit "
                             "without connecting or enrolling")
    add_security_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and its security flags checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_security_args(parser, args)
    return args


def site_config(args: argparse.Namespace) -> SiteConfig:
    """The site's settings with absolute paths (ClientApps run from another working directory)."""
    data = Path(args.data).resolve()
    if not data.exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or folder")
    # Required, never derived from the data file's name or place: the state dir holds the site's identity and
    # ledger, and a renamed or moved data file must not start a new site with ε = 0.
    state_dir = Path(args.state_dir).resolve()
    return SiteConfig(data_path=str(data), catalog_path=str(Path(args.catalog).resolve()), state_dir=str(state_dir),
                      data_format=args.format,
                      privacy=PrivacyConfig(enabled=not args.no_dp, epsilon=args.epsilon, delta=args.delta,
                                            max_grad_norm=args.max_grad_norm, noise_multiplier=args.noise_multiplier,
                                            accountant=args.accountant, grad_sample_mode=args.grad_sample_mode,
                                            secure_mode=args.secure_mode),
                      device=args.device, min_events=args.min_events,
                      micro_batch_tokens=args.micro_batch_tokens, micro_batch_users=args.micro_batch_users,
                      cache_keep=args.cache_keep, min_users=args.min_users,
                      max_model_parameters=args.max_model_parameters, max_plan_steps=args.max_plan_steps)


def supernode_command(args: argparse.Namespace, config_path: Path) -> list[str]:
    """The `flower-supernode` command line for this site: TLS, its key and the consortium's app-signing key
    (its --trusted-entities file is written next to `config_path`), or --insecure."""
    command = [flower_command("flower-supernode"), "--superlink", args.superlink, "--port", str(args.port),
               "--node-config", str(config_path)]
    return command + security_flags(args, config_path.parent)


def leftover_supernodes(config_path: Path) -> list[int]:
    """Running SuperNodes started with this site's node config (Linux: reads /proc). A fedrec-client that was
    killed (SIGKILL, the OOM killer) leaves its SuperNode running: it lives in a session of its own."""
    wanted = [b"--node-config", str(config_path).encode()]
    return [pid for pid, args in running_commands()
            if any(Path(a.decode(errors="replace")).name == "flower-supernode" for a in args[:3])
            and any(args[i:i + 2] == wanted for i in range(len(args))) and process_alive(pid)]


def stop_leftover_supernodes(config_path: Path, port: int, grace_s: float = 10.0) -> None:
    """Stop the SuperNode (with its SuperExec and ClientApps) an earlier, killed fedrec-client of this site left
    running: it would serve the site with the old settings, and this one's SuperNode could not take --port.
    A SuperNode whose fedrec-client still runs is another fedrec-client on this state dir: refused."""
    for pid in leftover_supernodes(config_path):
        parent, parent_line = parent_command(pid)
        if "fedrec-client" in parent_line:
            raise RuntimeError(f"another fedrec-client (pid {parent}) runs this site (node config {config_path}); "
                               "stop it first: one state dir is one site, served by one fedrec-client")
        log.warning("stopping SuperNode %d, left running by an earlier fedrec-client of this site", pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGTERM first: the SuperNode leaves the federation cleanly
            try:
                if os.getpgid(pid) == pid:  # started by fedrec-client: its group holds its SuperExec too
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not process_alive(pid):
                break
    stop_app_processes(port)  # a ClientApp of the dead SuperNode that is still training
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SuperNode binds it
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise RuntimeError(f"--port {port}: this site's SuperNode cannot listen there ({err.strerror}); another "
                               "program uses it: give this site another --port") from err


def main(argv: list[str] | None = None) -> int:
    """Check and cache the site's data, then run the SuperNode until it is stopped."""
    # force: importing opacus already configured the root logger (at WARNING), which hid these lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    args = parse_args(argv)
    quiet_library_warnings()
    if args.check:
        for line in check_site(site_config(args), Plan.parse(args.check)):
            print(line)
        return 0
    if args.insecure:
        warn_insecure()
    site = site_config(args)
    data = load_site_data(site)  # parses, validates and caches now, so bad input fails before connecting
    log.info("site %s: %d users (%d trainable), %d items in the catalog; filtered: %s", site.data_path,
             len(data.sequences), len(data.sequences.trainable_users()), len(data.catalog.item_ids),
             data.sequences.dropped or "nothing")
    log.info("%s", check_site_start(site, data))  # no users, too few for DP, a ledger that does not fit: refused
    log.info("training device: %s", describe_device(resolve_device(site.device)))  # a missing GPU fails here
    off = "DP is OFF: this site's updates carry no privacy guarantee"
    log.info("privacy: %s", f"DP-SGD per user, budget ε = {site.privacy.epsilon} over all rounds; "
             f"{rng_note(site.privacy.secure_mode)}" if site.privacy.enabled else off)
    state = Path(site.state_dir)
    config_path = write_toml(state / "node_config.toml", site.node_config())
    exit_on_sigterm()
    stop_leftover_supernodes(config_path, args.port)
    command, env = supernode_command(args, config_path), {"FLWR_HOME": str(state / "flower")}
    supernode = start(command, env=env)
    try:
        while True:  # a restarted server forgets this node and the SuperNode exits: rejoin as a new node
            code = supernode.wait()
            log.warning("the SuperNode exited with code %d; rejoining in %.0f s (stop with Ctrl-C)", code,
                        args.rejoin_delay)
            time.sleep(args.rejoin_delay)
            supernode = start(command, env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        stop(supernode)
        stop_app_processes(args.port)


# The console script: bad settings, files or a failed start are one paragraph (the traceback with --debug).
cli = console_command("fedrec-client", main, expected=(*EXPECTED_ERRORS, RuntimeError))

if __name__ == "__main__":
    cli()

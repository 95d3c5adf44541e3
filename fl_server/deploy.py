"""`fedrec-server`: the server side of a real deployment in one command.

It starts Flower's SuperLink (locked down by default: TLS, only registered sites, only the signed app, Control
API for this machine only; see fl_server.lockdown), registers the sites, submits the fedrec app with `flwr run`
(the ServerApp in fl_server.server_app), follows the run until it ends and leaves checkpoints, metrics, the report
and the exported model in --out-dir. Run it again with the same --out-dir after a crash to continue from the last
completed round.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from fl_server.app_bundle import stage_app
from fl_server.config import server_config_from_run_config
from fl_server.control import CONNECTION, ControlAPI, flwr, local_host, write_connection
from fl_server.initial_model import load_initial_model
from fl_server.lockdown import (
    add_security_args,
    check_lockdown_files,
    check_security_args,
    security_flags,
    warn_insecure,
)
from fl_server.report import progress_line
from fl_server.server_app import check_run
from fl_server.sites import json_answer, register_all
from shared_model.catalog import ItemCatalog
from shared_model.console import EXPECTED_ERRORS, console_command
from shared_model.factory import create_model
from shared_model.launch import exit_on_sigterm, flower_env, start, stop, stop_app_processes, write_toml

log = logging.getLogger("fedrec-server")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    """The server's command line."""
    parser = argparse.ArgumentParser(prog="fedrec-server", description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True, help="the public catalog.json every site shares")
    parser.add_argument("--out-dir", required=True, help="checkpoints, metrics, report and model go here")
    parser.add_argument("--central-eval", default="", help="held-out events the server may score (optional)")
    parser.add_argument("--central-eval-format", default="events", help="adapter for --central-eval")
    parser.add_argument("--initial-model", default="",
                        help="an exported model directory the first round starts from (default: fresh weights)")
    parser.add_argument("--num-rounds", type=int, help="federated rounds (default: the app's)")
    parser.add_argument("--min-sites", type=int, help="sites that must be connected before a round starts")
    parser.add_argument("--strategy", help="fedavg, fedprox, fedadam, fedyogi, fedavgm, fedtrimmedavg, ...")
    parser.add_argument("--run-config", action="append", default=[],
                        help="more settings, e.g. \"local-epochs=2 model.hidden-size=32\" (keys of "
                             "[tool.flwr.app.config] in pyproject.toml)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="interface the SuperLink listens on (sites reach its Fleet API there; its Control and "
                             "Runtime APIs answer only this machine)")
    parser.add_argument("--port", type=int, default=9092, help="the SuperLink's port (sites connect here)")
    add_security_args(parser)
    parser.add_argument("--stall-timeout", type=float, default=None,
                        help="stop when no round completes for this many seconds (fewer sites than --min-sites "
                             "connected: Flower waits for them without a deadline); at least 2 x round-timeout "
                             "(default: the larger of 3600 and 3 x round-timeout); completed rounds are kept for "
                             "a resume")
    parser.add_argument("--app", default=str(PROJECT_ROOT), help="the Flower app directory (fedrec's source tree)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed and its security flags checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_security_args(parser, args)
    return args


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's run-config defaults ([tool.flwr.app.config]), flattened as Flower flattens them."""
    pyproject = app_dir / "pyproject.toml"
    try:
        config = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError) as err:
        raise FileNotFoundError(f"{pyproject}: no [tool.flwr.app.config]; --app must be fedrec's source tree "
                                "(the directory with its pyproject.toml)") from err
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def run_overrides(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """What this run changes from the app's defaults, checked here rather than by a failing ServerApp."""
    overrides: dict[str, Any] = {"out-dir": str(Path(args.out_dir).resolve()),
                                 "catalog-path": str(Path(args.catalog).resolve())}
    if args.central_eval:
        overrides.update({"central-eval-path": str(Path(args.central_eval).resolve()),
                          "central-eval-format": args.central_eval_format})
    for key, value in (("num-rounds", args.num_rounds), ("strategy.min-nodes", args.min_sites),
                       ("strategy.name", args.strategy)):
        if value is not None:
            overrides[key] = value
    # One --run-config at a time: Flower's parser merges them shallowly, so a second `model.x=...` would drop
    # the first's `model.y=...` (flwr 1.41).
    for settings in args.run_config:
        overrides.update(parse_config_args([settings]))
    if args.initial_model or overrides.get("initial-model"):  # the ServerApp runs elsewhere: an absolute path
        overrides["initial-model"] = str(Path(args.initial_model or overrides["initial-model"]).resolve())
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown run-config keys {unknown}; known: {sorted(defaults)}")
    for path_key in ("catalog-path", "central-eval-path", "initial-model"):
        if overrides.get(path_key) and not Path(overrides[path_key]).exists():
            raise FileNotFoundError(f"{path_key}: {overrides[path_key]} does not exist")
    config = server_config_from_run_config({**defaults, **overrides})
    check_run(config)  # fail here, not in the ServerApp
    # The model the ServerApp will build: checks the catalog and its public features (titles for 'text'),
    # and leaves the encoded features in the ServerApp's cache.
    catalog = ItemCatalog.load(config.catalog_path)
    model = create_model(config.model, catalog, config.has_timestamps, cache_dir=str(Path(config.out_dir) / "cache"))
    check_run(config, model.item_row_parameters())  # strategy.item_rows against the model's per-item tensors
    if config.initial_model:  # its catalog, its tensors and its frozen public tensors against this run's
        load_initial_model(model, catalog, config.initial_model)
    return overrides


def stall_seconds(args: argparse.Namespace, round_timeout: float) -> float:
    """Seconds without a completed round before the run is stopped. A site that dies mid-round costs its round
    up to round-timeout for training and again for evaluation (the round then completes without it), so a
    shorter stall timeout would stop a run that is only waiting out a dead site."""
    if args.stall_timeout is None:
        return max(3600.0, 3 * round_timeout)
    if args.stall_timeout < 2 * round_timeout:
        raise ValueError(f"--stall-timeout {args.stall_timeout:g} s is shorter than 2 x round-timeout "
                         f"({2 * round_timeout:g} s): a round whose site died waits round-timeout for its training "
                         "reply and again for its evaluation, and would be stopped as stalled; raise "
                         "--stall-timeout or lower round-timeout")
    return float(args.stall_timeout)


def superlink_command(args: argparse.Namespace) -> list[str]:
    """Flower's `flower-superlink` behind fedrec's guards (fl_server.superlink_guard), with this deployment's
    security options (no `uv sync` of the app's dependencies at run time)."""
    signature = ["--app-signature", str(Path(args.app_signature).resolve())] if args.app_signature else []
    return [sys.executable, "-m", "fl_server.superlink_guard", *signature, "--host", args.host, "--port",
            str(args.port), "--disable-runtime-dependency-installation", *security_flags(args)]


def wait_for_port(host: str, port: int, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Block until the SuperLink accepts connections; fail with its log if it exits first."""
    host = local_host(host)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {process.returncode}; see its log")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the SuperLink did not open {host}:{port} within {timeout_s:.0f} s")


def wait_for_control(control: ControlAPI, tries: int = 10) -> None:
    """Block until the Control API answers the operator (the port opens a moment before it does)."""
    for attempt in range(tries):
        try:
            control.run_statuses()
            return
        except RuntimeError as err:
            if attempt == tries - 1:
                raise RuntimeError(f"the SuperLink's Control API did not answer over loopback: {err}") from err
            time.sleep(2.0)


def submit(app_dir: Path, run_config: Path, env: dict[str, str]) -> int:
    """Submit the app (built into a FAB by `flwr run`) and return Flower's run id."""
    last_error: Exception | None = None
    for _ in range(5):  # the port can open a moment before the Control API answers
        try:
            command = ["run", str(app_dir), CONNECTION, "--format", "json", "--run-config", str(run_config)]
            return int(json_answer(flwr(command, env), command)["run-id"])  # Flower's errors come as JSON
        except (RuntimeError, ValueError, KeyError) as err:
            last_error = err
            time.sleep(2.0)
    raise RuntimeError(f"could not submit the run: {last_error}")


def follow(run_id: int, control: ControlAPI, env: dict[str, str], out_dir: Path, num_rounds: int,
           stall_timeout: float) -> str:
    """Wait for the run to end, printing each completed round; stop it when nothing happens for too long."""
    metrics = out_dir / "metrics.jsonl"
    seen = len(metrics.read_text(encoding="utf-8").splitlines()) if metrics.exists() else 0
    status, last_progress = "", time.monotonic()
    while not status.startswith("finished"):
        time.sleep(1.0)
        current = control.run_status(run_id)
        if current != status:
            status, last_progress = current, time.monotonic()
            log.info("run %d: %s", run_id, status)
        rows = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
        for line in rows[seen:]:
            log.info(progress_line(json.loads(line), num_rounds))
            last_progress = time.monotonic()
        seen = max(seen, len(rows))
        if time.monotonic() - last_progress > stall_timeout:
            log.error("no round completed for %.0f s (fewer sites than strategy.min-nodes are connected: a round "
                      "waits for them without a deadline); stopping run %d. Completed rounds are checkpointed: run "
                      "fedrec-server again with the same --out-dir to resume.", stall_timeout, run_id)
            flwr(["stop", str(run_id), CONNECTION], env)
            return "stalled"
    return status


def main(argv: list[str] | None = None) -> int:
    """Check the settings, stage the app and serve the run."""
    # force: importing opacus already configured the root logger (at WARNING), which hid these lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    args = parse_args(argv)
    app_dir = Path(args.app).resolve()
    defaults = app_defaults(app_dir)
    overrides = run_overrides(args, defaults)
    stall_s = stall_seconds(args, float(overrides.get("round-timeout", defaults["round-timeout"])))
    num_rounds = int(overrides.get("num-rounds", defaults["num-rounds"]))
    # The files `flwr run` packs (the signature is checked on them), staged in the out-dir: a server killed
    # mid-run leaves them there, and the next start with that out-dir (a resume) replaces them; in a temporary
    # folder each killed server left a copy of the app behind (2.4 MB).
    staging = Path(overrides["out-dir"]) / "flower" / "app"
    try:
        app = stage_app(app_dir, staging)
        if args.insecure:
            warn_insecure()
        else:
            check_lockdown_files(args, app)
        return serve(args, app, overrides, num_rounds, stall_s)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def serve(args: argparse.Namespace, app: Path, overrides: dict[str, Any], num_rounds: int, stall_s: float) -> int:
    """Start the SuperLink, submit the app, follow the run, and clean up whatever happens."""
    out_dir = Path(overrides["out-dir"])
    flower_dir = out_dir / "flower"
    env = flower_env({"FLWR_HOME": str(flower_dir / "cli")})
    write_connection(flower_dir / "cli", args.host, args.port, None if args.insecure else args.ssl_ca_certfile)
    control = ControlAPI(flower_dir / "cli")
    run_config = write_toml(flower_dir / "run_config.toml", overrides)
    exit_on_sigterm()
    superlink = start(superlink_command(args), flower_dir / "superlink.log",
                      {"FLWR_HOME": str(flower_dir / "superlink")})
    run_id, status = 0, ""
    try:
        wait_for_port(args.host, args.port, superlink)
        wait_for_control(control)
        if args.sites:
            register_all(Path(args.sites), flower_dir, env)
        log.info("SuperLink listening on %s:%d (log: %s); sites connect with "
                 "fedrec-client --superlink <this host>:%d", args.host, args.port, flower_dir / "superlink.log",
                 args.port)
        run_id = submit(app, run_config, env)
        log.info("submitted run %d; outputs go to %s", run_id, out_dir)
        status = follow(run_id, control, env, out_dir, num_rounds, stall_s)
    finally:
        if run_id:
            save_serverapp_log(run_id, env, flower_dir / "serverapp.log")
            if not status.startswith("finished"):
                try:
                    flwr(["stop", str(run_id), CONNECTION], env, timeout_s=30)
                except (RuntimeError, subprocess.TimeoutExpired):
                    log.warning("could not stop run %d cleanly", run_id)
        stop(superlink)
        stop_app_processes(args.port)
    if status != "finished:completed":
        log.error("run %d ended as %s; the ServerApp's log is in %s", run_id, status, flower_dir / "serverapp.log")
        return 1
    log.info("done: report %s, model %s", out_dir / "report.md", out_dir / "model")
    return 0


def save_serverapp_log(run_id: int, env: dict[str, str], path: Path) -> None:
    """Keep the ServerApp's log next to the outputs (Flower keeps it only while the SuperLink runs)."""
    try:
        path.write_text(flwr(["log", str(run_id), CONNECTION, "--show"], env, timeout_s=30), encoding="utf-8")
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        log.warning("could not fetch the ServerApp log: %s", err)


# The console script: bad settings, files or a failed start are one paragraph (the traceback with --debug).
cli = console_command("fedrec-server", main, expected=(*EXPECTED_ERRORS, RuntimeError))

if __name__ == "__main__":
    cli()

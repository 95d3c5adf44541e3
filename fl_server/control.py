"""The operator's `flwr` CLI against fedrec's SuperLink: always over loopback, the only place its Control API
answers (see fl_server.superlink_guard)."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared_model.launch import flower_command, flower_env, write_toml

if TYPE_CHECKING:
    from flwr.supercore.control import ControlHttpClient

CONNECTION = "fedrec"  # the connection name in the CLI's config.toml


def local_host(host: str) -> str:
    """Where this machine reaches a SuperLink listening on `host` (a wildcard address is not dialable)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def cli_home(out_dir: Path) -> Path:
    """The `flwr` CLI's home (FLWR_HOME) that fedrec-server writes for the run in `out_dir`."""
    return Path(out_dir).resolve() / "flower" / "cli"


def write_connection(flwr_home: Path, host: str, port: int, ca_certfile: str | None) -> Path:
    """The `flwr` CLI's connection to our SuperLink (Flower 1.41 keeps these in $FLWR_HOME/config.toml);
    `ca_certfile` None means plain HTTP (--insecure)."""
    values: dict[str, Any] = {"superlink.default": CONNECTION,
                              f"superlink.{CONNECTION}.address": f"{local_host(host)}:{port}"}
    if ca_certfile is None:
        values[f"superlink.{CONNECTION}.insecure"] = True
    else:
        values[f"superlink.{CONNECTION}.root-certificates"] = str(Path(ca_certfile).resolve())
    return write_toml(flwr_home / "config.toml", values)


def flwr(args: list[str], env: dict[str, str], timeout_s: float = 120.0) -> str:
    """Run the `flwr` CLI against our SuperLink and return its stdout (an error names the command)."""
    done = subprocess.run([flower_command("flwr"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return done.stdout


def cli_env(flwr_home: Path) -> dict[str, str]:
    """The environment for `flwr` commands that use the connection in `flwr_home`."""
    if not (flwr_home / "config.toml").exists():
        raise FileNotFoundError(f"{flwr_home / 'config.toml'}: no SuperLink connection there; give the --out-dir "
                                "of a running fedrec-server")
    return flower_env({"FLWR_HOME": str(flwr_home)})


class ControlAPI:
    """Flower's own Control API client for the connection in `flwr_home`, built as `flwr ls` builds it and kept
    for the run: fedrec-server polls the run's status every second, and a `flwr` process per poll cost 2.3 s of
    CPU (the CLI's imports) every 3 s of a run."""

    def __init__(self, flwr_home: Path) -> None:
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import init_http_client_from_connection

        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per status poll in the server's log
        previous = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(flwr_home)  # where Flower's CLI code reads the connection and credentials
        try:
            self.client: ControlHttpClient = init_http_client_from_connection(read_superlink_connection(CONNECTION))
        finally:
            if previous is None:
                os.environ.pop("FLWR_HOME")
            else:
                os.environ["FLWR_HOME"] = previous

    def run_statuses(self, run_id: int | None = None) -> dict[int, str]:
        """Each run's status as `flwr ls` prints it (pending, starting, running, finished:completed|failed|
        stopped): all runs, or only `run_id`."""
        import httpx
        from flwr.proto.control_pb2 import ListRunsRequest

        request = ListRunsRequest() if run_id is None else ListRunsRequest(run_id=run_id)
        try:
            runs = self.client.ListRuns(request).run_dict
        except (httpx.HTTPError, ValueError) as err:  # refused, unreachable, or not a Control API answer
            raise RuntimeError(f"the SuperLink's Control API did not answer: {err!r}") from err
        return {i: f"{r.status.status}:{r.status.sub_status}" if r.status.sub_status else r.status.status
                for i, r in runs.items()}

    def run_status(self, run_id: int) -> str:
        """The status of `run_id` (a RuntimeError when the SuperLink does not know it)."""
        statuses = self.run_statuses(run_id)
        if run_id not in statuses:
            raise RuntimeError(f"the SuperLink has no run {run_id}")
        return statuses[run_id]

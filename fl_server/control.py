"""The operator's `flwr` CLI against fedrec's SuperLink: always over loopback, the only place its Control API
answers (see fl_server.superlink_guard)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from shared_model.launch import flower_command, flower_env, write_toml

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

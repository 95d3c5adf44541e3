"""Starting and stopping Flower's own processes (SuperLink, SuperNode, the `flwr` CLI) for the fedrec commands.

Standard library only: the server and client commands both use it and must not import each other.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

TomlValue = str | int | float | bool


def flower_command(name: str) -> str:
    """Path of a Flower console script (`flower-superlink`, `flwr`, ...), preferring this environment's."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; install flwr[simulation]")
    return found


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process' environment with this Python's bin directory first on PATH: Flower's processes start
    their helpers (`flower-superexec`, `flwr-serverapp`, `flwr-clientapp`) by name, and an environment that
    was never activated (CI, cron, systemd) would not find them."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **(extra or {})}


def toml_text(values: Mapping[str, TomlValue]) -> str:
    """Flat `key = value` TOML; dotted keys (`model.hidden-size`) become nested tables, as Flower expects."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a JSON string is a valid TOML basic string
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def write_toml(path: Path, values: Mapping[str, TomlValue]) -> Path:
    """Write `values` as a TOML file (for --node-config / --run-config, which accept a .toml path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(values), encoding="utf-8")
    return path


def start(command: Sequence[str], log_path: Path | None = None,
          env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start a process in its own session (so its whole group can be stopped); output to `log_path` if given,
    else to this terminal."""
    environment = flower_env(env)
    if log_path is None:
        return subprocess.Popen(list(command), stdin=subprocess.DEVNULL, env=environment, start_new_session=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=environment, start_new_session=True)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `finally` blocks stop the processes this command started."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))


def stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process' group, then SIGKILL whatever is left after `grace_s`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(grace_s)
    except ProcessLookupError:
        pass


def running_commands() -> Iterator[tuple[int, list[bytes]]]:
    """Every process' pid and command-line arguments (Linux: reads /proc; processes that end meanwhile are
    skipped)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        yield int(cmdline.parent.name), args


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state, parent pid, ...); OSError once it is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def parent_command(pid: int) -> tuple[int, str]:
    """The parent of `pid` and its command line (0 and "" once either is gone)."""
    try:
        parent = int(_stat_fields(pid)[1])
        return parent, Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError, ValueError):
        return 0, ""


def stop_app_processes(port: int) -> int:
    """Stop `flwr-serverapp` / `flwr-clientapp` / `flower-superexec` processes that talk to `port` on any host.

    Flower starts them in sessions of their own, so stopping the SuperLink or SuperNode's group can leave
    them behind. Linux only (reads /proc); returns how many were signalled.
    """
    stopped = 0
    for pid, args in running_commands():
        text = b" ".join(args).decode(errors="replace")
        flower_app = any(name in text for name in ("flwr-serverapp", "flwr-clientapp", "flower-superexec"))
        if flower_app and f":{port} " in text + " ":
            try:
                os.kill(pid, signal.SIGTERM)
                stopped += 1
            except (ProcessLookupError, PermissionError):
                continue
    return stopped

"""What fedrec-server's own book-keeping costs: building the app's FAB, and asking the SuperLink a run's status.

python benchmarks/server_overhead.py [APP_DIR]   (default: this checkout, with whatever .venv it holds)

1. The FAB of APP_DIR, built by Flower's `build_fab_from_disk` (what `flwr run <dir>` and `flwr build` do: list
   every file under the directory, then filter) and by fl_server.app_bundle (the same FAB without walking the
   directories the .gitignore drops); both hashes are printed, and must be equal.
2. A run's status from a SuperLink started here (`flower-superlink --insecure` on free loopback ports): a
   `flwr ls --format json` process per poll (fedrec-server before this change) against one in-process Control
   API client (fl_server.control.ControlAPI); CPU seconds are this process' and its children's.
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from flwr.cli.build import build_fab_from_disk

from fl_server.app_bundle import app_files, build_fab
from fl_server.control import CONNECTION, ControlAPI, flwr, write_connection
from shared_model.launch import flower_command, flower_env

POLLS = 5
T = TypeVar("T")


def cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(what: str, fn: Callable[[], T], repeat: int = 1) -> T:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    for _ in range(repeat - 1):
        result = fn()
    print(f"{what}: {(time.perf_counter() - wall) / repeat:.3f} s wall, {(cpu_seconds() - cpu) / repeat:.3f} s CPU "
          f"(mean of {repeat})")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    app = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve()
    print(f"app {app}: {sum(len(f) for _, _, f in os.walk(app))} files under it, {len(app_files(app))} outside "
          "the directories its .gitignore drops")
    flowers = timed("Flower's build_fab_from_disk", lambda: build_fab_from_disk(app))
    ours = timed("fl_server.app_bundle.build_fab", lambda: build_fab(app), repeat=5)
    print(f"  sha256 {hashlib.sha256(flowers).hexdigest()[:16]} (Flower) {hashlib.sha256(ours).hexdigest()[:16]} "
          "(app_bundle)")
    port, home = free_port(), Path(tempfile.mkdtemp(prefix="fedrec-bench-"))
    link = subprocess.Popen([flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                             str(port), "--fleet-api-address", f"127.0.0.1:{free_port()}"],
                            env=flower_env({"FLWR_HOME": str(home / "superlink")}), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        write_connection(home / "cli", "127.0.0.1", port, None)
        env = flower_env({"FLWR_HOME": str(home / "cli")})
        for _ in range(60):  # until the Control API answers
            try:
                flwr(["ls", CONNECTION, "--format", "json"], env)
                break
            except RuntimeError:
                time.sleep(0.5)
        timed("a `flwr ls` process per poll", lambda: flwr(["ls", CONNECTION, "--format", "json"], env), POLLS)
        control = timed("opening the in-process ControlAPI", lambda: ControlAPI(home / "cli"))
        timed("a poll through it", control.run_statuses, POLLS * 20)
    finally:
        link.terminate()
        link.wait(30)


if __name__ == "__main__":
    main()

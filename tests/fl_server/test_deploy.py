"""A real deployment on loopback: `fedrec-server` (SuperLink + ServerApp) and two `fedrec-client` SuperNodes as
separate processes, each site with its own events file. Training starts from an exported model, which the sites
score as round 0; a site is killed while it trains round 1 and restarted; the server side is killed mid-round 2
and restarted."""

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fl_client.site import SiteConfig
from fl_server.config import server_config_from_run_config
from fl_server.deploy import PROJECT_ROOT, app_defaults, parse_args, stall_seconds
from shared_model.catalog import ItemCatalog
from shared_model.factory import create_model
from shared_model.launch import running_commands
from shared_model.serialization import load_model_dir, save_model_dir
from simulations.config import DataConfig
from simulations.federation import write_sites
from simulations.partition import PartitionConfig, partition_users
from simulations.prepare import prepare_data

BIN = Path(sys.executable).parent
SITES = 2  # SuperNodes, each with its own events file (two: each Flower process of a site costs CI time)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def kill_server_side(server: subprocess.Popen, port: int) -> None:
    """SIGKILL everything on the server side, as a crash would: fedrec-server, SuperLink (behind fedrec's guard),
    SuperExec, ServerApp."""
    os.killpg(server.pid, signal.SIGKILL)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        server_side = ("fl_server.superlink_guard", "flower-superlink", "flower-superexec", "flwr-serverapp")
        if any(n in text for n in server_side) and str(port) in text:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
    server.wait(10)


def site_processes(port: int) -> list[int]:
    """A site's Flower processes: its SuperNode (`--port`), SuperExec and ClientApps (its Runtime API `:port`)."""
    pids = []
    for pid, args in running_commands():
        text = b" ".join(args).decode(errors="replace") + " "
        flower = any(n in text for n in ("flower-supernode", "flower-superexec", "flwr-clientapp"))
        if flower and (f"--port {port} " in text or f":{port} " in text):
            pids.append(pid)
    return pids


def kill_site(client: subprocess.Popen, port: int) -> None:
    """SIGKILL a site as a crash of its machine would: fedrec-client, its SuperNode and SuperExec, its ClientApp;
    returns once none of them is left (a killed process leaves /proc a moment later, on a loaded machine)."""
    os.killpg(client.pid, signal.SIGKILL)
    client.wait(10)
    deadline = time.monotonic() + 10
    while pids := site_processes(port):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError(f"site processes {pids} outlived SIGKILL")
        time.sleep(0.1)


def training_process(site: SiteConfig) -> int:
    """The pid of the ClientApp holding the site's ledger lock (it is training a round), else 0."""
    lock = Path(site.state_dir) / "site.lock"
    if not lock.exists():
        return 0
    with lock.open("a+") as handle:
        try:  # free: nobody trains (released at once, the site never waits on this probe)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return 0
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
    with contextlib.suppress(OSError, ValueError):
        if b"flwr-clientapp" in Path(f"/proc/{int(holder)}/cmdline").read_bytes():  # not the start-up check
            return int(holder)
    return 0


def ledger_rounds(site: SiteConfig) -> list[int]:
    path = site.ledger_path
    return [e["round"] for e in json.loads(path.read_text())["entries"]] if path.exists() else []


def exported_model(directory: Path, catalog_path: str, run_config: str) -> Path:
    """What an earlier training exported (fresh weights here) for the model `run_config` describes."""
    settings = {**app_defaults(PROJECT_ROOT), **parse_config_args([run_config]), "out-dir": "o", "catalog-path": "c"}
    catalog = ItemCatalog.load(catalog_path)
    return save_model_dir(create_model(server_config_from_run_config(settings).model, catalog), catalog, directory)


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


# The GPU variant leaves out the public title features: they are the server's CPU work (covered on CPU), and
# their 83 MB text encoder would not fit the GPU test machines' 64 MB upload here.
ON_GPU = pytest.param("cuda", ' model.item-features="" model.feature-scoring=false', id="cuda", marks=pytest.mark.gpu)


@pytest.mark.slow(seconds=300)
@pytest.mark.parametrize(("device", "features"), [pytest.param("cpu", "", id="cpu"), ON_GPU])
def test_two_supernodes_two_rounds_survive_a_server_crash_and_export_a_model(tmp_path, device, features):
    data = prepare_data(DataConfig(name="synthetic", synthetic={"num_users": 60 * SITES, "num_items": 40, "seed": 5}))
    parts = partition_users(data.sequences, PartitionConfig(kind="iid", num_partitions=SITES))
    sites = write_sites(data, parts, tmp_path / "sites", SiteConfig(data_path="", catalog_path="", state_dir=""))
    link, *site_ports = free_ports(1 + SITES)
    out = tmp_path / "server"
    # eval-every=2: round 1 is trained and checkpointed, not scored (the sites score the starting model and round 2)
    run_config = ("batch-size=32 lr=0.005 model.hidden-size=16 model.max-len=20 round-timeout=120.0 eval-every=2"
                  + features)
    initial = exported_model(tmp_path / "exported", sites[0].catalog_path, run_config)
    server_cmd = [str(BIN / "fedrec-server"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                  "--catalog", sites[0].catalog_path, "--out-dir", str(out), "--num-rounds", "2",
                  "--min-sites", str(SITES), "--initial-model", str(initial),
                  "--stall-timeout", "300", "--run-config", run_config]
    logs = tmp_path / "logs"
    logs.mkdir()

    def start_client(i: int, log_name: str) -> subprocess.Popen:
        site = sites[i]
        return subprocess.Popen(
            [str(BIN / "fedrec-client"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(site_ports[i]),
             "--data", site.data_path, "--catalog", site.catalog_path, "--state-dir", site.state_dir,
             "--epsilon", "8", "--device", device, "--rejoin-delay", "1"],
            stdout=(logs / log_name).open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    clients = [start_client(i, f"client{i}.log") for i in range(SITES)]
    try:
        first = subprocess.Popen(server_cmd, stdout=(logs / "server1.log").open("w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
        # The sites score the exported model as round 0 (fresh ClientApp processes, the frozen tensors with the
        # evaluate message), spending nothing. Then kill site 0 (every process of it) while it trains round 1,
        # past its budget check, and start it again: round 1 completes with the other site (not scored:
        # eval-every=2), and site 0 rejoins for round 2.
        def site_zero_trains() -> bool:
            assert first.poll() is None, (logs / "server1.log").read_text()[-3000:]  # fail fast, with the log
            return training_process(sites[0]) != 0

        wait_until(site_zero_trains, 400, "site 0 never trained round 1")
        assert ledger_rounds(sites[0]) == []
        kill_site(clients[0], site_ports[0])
        assert ledger_rounds(sites[0]) == [] and site_processes(site_ports[0]) == []  # killed before its record
        clients[0] = start_client(0, "client0_restarted.log")
        # Crash the server side as soon as a site has trained (and paid for) round 2, before round 2 completes.
        def round_two_trained() -> bool:
            assert first.poll() is None, (logs / "server1.log").read_text()[-3000:]  # fail fast, with the log
            return any(2 in ledger_rounds(s) for s in sites)

        wait_until(round_two_trained, 400, "no site trained round 2")
        kill_server_side(first, link)
        assert (out / "flower" / "app" / "pyproject.toml").exists()  # what it staged stays in its out-dir, not /tmp
        rows = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["round"] for r in rows] == [0, 1]
        second = subprocess.run(server_cmd, stdout=(logs / "server2.log").open("w"), stderr=subprocess.STDOUT,
                                timeout=500, check=False)  # the same command: it resumes, keeping its round 0
        assert second.returncode == 0, (logs / "server2.log").read_text()[-3000:]
    finally:
        for client in clients:
            client.send_signal(signal.SIGTERM)
        for client in clients:
            client.wait(30)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]  # round 0 and 1 kept, round 2 completed once
    assert rows[0]["starting_model"] and rows[0]["evaluate_failures"] == 0
    assert rows[0]["federated_eval"]["users"] == len(data.sequences)
    assert "federated_eval" not in rows[1] and rows[2]["federated_eval"]["users"] == len(data.sequences)
    assert "round 0/2 (the starting model, before any training): HR@10 0." in (logs / "server1.log").read_text()
    rows = rows[1:]
    # Round 1 went on without the killed site: silent until round-timeout, or reported unavailable by the
    # SuperLink once its heartbeats stopped (whichever came first); the other one trained and was aggregated.
    dead = rows[0].get("train_no_reply", 0) + rows[0]["train_failures"]
    assert (rows[0]["train_replies"] - rows[0]["train_failures"], dead, rows[0]["declined"]) == (SITES - 1, 1, 0)
    assert rows[0]["privacy"]["sites"] == SITES - 1
    assert rows[1]["train_replies"] == SITES and rows[1]["train_failures"] == 0 and rows[1]["declined"] == 0
    # Every site paid for each round it trained exactly once, crashes or not; scoring round 0 cost nothing; site 0
    # paid nothing for the round it was killed in, and trained round 2 after it rejoined.
    assert [ledger_rounds(site) for site in sites] == [[2]] + [[1, 2]] * (SITES - 1)
    if not features:  # title features: sent with each server process' first messages, kept by the sites
        assert [r["frozen_sent_to"] for r in rows] == [SITES, SITES]  # the restarted server knew no site yet
        assert all(len(list((Path(s.state_dir) / "frozen").glob("*.safetensors"))) == 1 for s in sites)
    assert 0 < rows[1]["privacy"]["epsilon_max"] <= 8.0 * 1.01
    assert rows[1]["site_cost"]["train_seconds_max"] > 0 and rows[1]["site_cost"]["peak_memory_mb_max"] > 0
    assert not (out / "flower" / "app").exists()  # the resumed server replaced it, and removed it when done
    model, catalog = load_model_dir(out / "model")
    assert model.config.hidden_size == 16 and catalog.fingerprint == data.catalog.fingerprint
    assert (out / "report.md").exists() and "ε max" in (out / "report.md").read_text()
    for log_name in [f"client{i}.log" for i in range(SITES)] + ["client0_restarted.log"]:  # as each site started
        assert f"training device: {device}" in (logs / log_name).read_text()


def test_the_stall_timeout_outlasts_a_round_that_waits_out_a_dead_site():
    # A round whose site died waits round-timeout for training and again for evaluation: a stall timeout below
    # twice that stopped such a run as stalled while it was about to complete without the site.
    base = ["--insecure", "--catalog", "catalog.json", "--out-dir", "out"]
    assert stall_seconds(parse_args(base), 600.0) == 3600.0
    assert stall_seconds(parse_args(base), 1800.0) == 5400.0  # the default grows with round-timeout
    assert stall_seconds(parse_args([*base, "--stall-timeout", "300"]), 120.0) == 300.0
    with pytest.raises(ValueError, match=r"--stall-timeout 200 s is shorter than 2 x round-timeout \(240 s\)"):
        stall_seconds(parse_args([*base, "--stall-timeout", "200"]), 120.0)

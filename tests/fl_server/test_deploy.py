"""A real deployment on loopback: `fedrec-server` (SuperLink + ServerApp) and three `fedrec-client` SuperNodes as
separate processes, each site with its own events file. The server side is killed mid-round and restarted."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_client.site import SiteConfig
from shared_model.serialization import load_model_dir
from simulations.config import DataConfig
from simulations.federation import write_sites
from simulations.partition import PartitionConfig, partition_users
from simulations.prepare import prepare_data

BIN = Path(sys.executable).parent
SITES = 3  # SuperNodes, each with its own events file


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


def ledger_rounds(site: SiteConfig) -> list[int]:
    path = site.ledger_path
    return [e["round"] for e in json.loads(path.read_text())["entries"]] if path.exists() else []


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


# The GPU variant leaves out the public title features: they are the server's CPU work (covered on CPU), and
# their 83 MB text encoder would not fit the GPU test machines' 64 MB upload here.
ON_GPU = pytest.param("cuda", ' model.item-features="" model.feature-scoring=false', id="cuda", marks=pytest.mark.gpu)


@pytest.mark.slow
@pytest.mark.parametrize(("device", "features"), [pytest.param("cpu", "", id="cpu"), ON_GPU])
def test_three_supernodes_two_rounds_survive_a_server_crash_and_export_a_model(tmp_path, device, features):
    data = prepare_data(DataConfig(name="synthetic", synthetic={"num_users": 60 * SITES, "num_items": 40, "seed": 5}))
    parts = partition_users(data.sequences, PartitionConfig(kind="iid", num_partitions=SITES))
    sites = write_sites(data, parts, tmp_path / "sites", SiteConfig(data_path="", catalog_path="", state_dir=""))
    link, *site_ports = free_ports(1 + SITES)
    out = tmp_path / "server"
    server_cmd = [str(BIN / "fedrec-server"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                  "--catalog", sites[0].catalog_path, "--out-dir", str(out), "--num-rounds", "2",
                  "--min-sites", str(SITES),
                  "--stall-timeout", "240", "--run-config",
                  "batch-size=32 lr=0.005 model.hidden-size=16 model.max-len=20 round-timeout=120.0" + features]
    logs = tmp_path / "logs"
    logs.mkdir()
    clients = [subprocess.Popen(
        [str(BIN / "fedrec-client"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
         "--data", site.data_path, "--catalog", site.catalog_path, "--state-dir", site.state_dir,
         "--epsilon", "8", "--device", device, "--rejoin-delay", "1"],
        stdout=(logs / f"client{i}.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        for i, (site, port) in enumerate(zip(sites, site_ports, strict=True))]
    try:
        first = subprocess.Popen(server_cmd, stdout=(logs / "server1.log").open("w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
        # Crash the server side as soon as a site has trained (and paid for) round 2, before round 2 completes.
        def round_two_trained() -> bool:
            assert first.poll() is None, (logs / "server1.log").read_text()[-3000:]  # fail fast, with the log
            return any(2 in ledger_rounds(s) for s in sites)

        wait_until(round_two_trained, 400, "no site trained round 2")
        kill_server_side(first, link)
        rows = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["round"] for r in rows] == [1]
        second = subprocess.run(server_cmd, stdout=(logs / "server2.log").open("w"), stderr=subprocess.STDOUT,
                                timeout=500, check=False)
        assert second.returncode == 0, (logs / "server2.log").read_text()[-3000:]
        # A new training from the exported model: the sites score it as round 0 (fresh ClientApp processes, the
        # frozen tensors with the evaluate message), then decline round 1: their ε = 8 was spent above.
        started = out.parent / "from_exported"
        third = subprocess.run([*server_cmd[:server_cmd.index("--out-dir")], "--out-dir", str(started),
                                "--num-rounds", "1", "--initial-model", str(out / "model"),
                                *server_cmd[server_cmd.index("--min-sites"):]],
                               stdout=(logs / "server3.log").open("w"), stderr=subprocess.STDOUT, timeout=500,
                               check=False)
        assert third.returncode == 0, (logs / "server3.log").read_text()[-3000:]
    finally:
        for client in clients:
            client.send_signal(signal.SIGTERM)
        for client in clients:
            client.wait(30)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]  # round 1 kept, round 2 completed once
    assert all(r["train_replies"] == SITES and r["train_failures"] == 0 and r["declined"] == 0 for r in rows)
    for site in sites:  # every site paid for each round exactly once, crash or not
        assert ledger_rounds(site) == [1, 2]
    if not features:  # title features: sent with each server process' first messages, kept by the sites
        assert [r["frozen_sent_to"] for r in rows] == [SITES, SITES]  # the restarted server knew no site yet
        assert all(len(list((Path(s.state_dir) / "frozen").glob("*.safetensors"))) == 1 for s in sites)
    assert 0 < rows[1]["privacy"]["epsilon_max"] <= 8.0 * 1.01
    assert rows[1]["site_cost"]["train_seconds_max"] > 0 and rows[1]["site_cost"]["peak_memory_mb_max"] > 0
    model, catalog = load_model_dir(out / "model")
    assert model.config.hidden_size == 16 and catalog.fingerprint == data.catalog.fingerprint
    assert (out / "report.md").exists() and "ε max" in (out / "report.md").read_text()
    rows = [json.loads(r) for r in (started / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[0]["starting_model"]
    assert rows[0]["evaluate_failures"] == 0 and rows[0]["federated_eval"]["users"] == len(data.sequences)
    assert rows[1]["declined"] == SITES and all(ledger_rounds(s) == [1, 2] for s in sites)  # scoring spends no ε
    assert "round 0/1 (the starting model, before any training): HR@10 0." in (logs / "server3.log").read_text()
    for i in range(SITES):  # each SuperNode names the device its rounds train on
        assert f"training device: {device}" in (logs / f"client{i}.log").read_text()

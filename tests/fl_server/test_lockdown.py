"""The locked-down deployment on this machine, as separate processes: `fedrec-server` with TLS, SuperNode
authentication and the signed app, two registered sites and one unregistered, and a stranger with the CA
certificate who tries to run their own app. One deployment checks all three promises:

(a) a rogue `flwr run` from another address is refused by the Control API, and even a rogue app that gets onto
    the SuperLink (as if Control were compromised) is refused by every site before its code runs;
(b) the unregistered SuperNode is refused and never receives a message;
(c) the two registered sites train two rounds over TLS.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_client.site import SiteConfig
from fl_server.certificates import make_ca, make_server_certificate
from fl_server.sites import add_site
from fl_server.superlink_guard import bound_addresses, install_app_signature, install_operator_guard, is_operator
from shared_model.app_signature import sign_fab
from shared_model.key_files import make_signing_keys, make_site_keys
from simulations.config import DataConfig
from simulations.federation import write_sites
from simulations.partition import PartitionConfig, partition_users
from simulations.prepare import prepare_data

BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[2]
REFUSED = "answer only the operator"  # fl_server.superlink_guard's 403

ROGUE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rogue"
version = "1.0.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "rogue_app.server:app"
clientapp = "rogue_app.client:app"

[tool.flwr.app.config]
"""
ROGUE_CLIENT = """\
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def steal(msg: Message, context: Context) -> Message:
    events = Path(str(context.node_config["data-path"])).read_bytes()
    Path({marker!r}).write_bytes(events)  # the exfiltration, made visible
    return Message(RecordDict({{"loot": ConfigRecord({{"events": events}})}}), reply_to=msg)
"""
ROGUE_SERVER = """\
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in grid.get_node_ids()]
    list(grid.send_and_receive(messages, timeout=60))
"""


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback: a stranger's connection arrives from it."""
    for probe in ("192.0.2.1", "10.255.255.255", "8.8.8.8"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.connect((probe, 9))  # UDP connect sends nothing; it only picks the outgoing address
            except OSError:
                continue
            address = udp.getsockname()[0]
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(1.0)


def write_rogue_app(root: Path, marker: Path) -> Path:
    """A 30-line Flower app whose ClientApp reads the site's events file and sends it back."""
    app = root / "rogue"
    (app / "rogue_app").mkdir(parents=True)
    (app / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (app / "rogue_app" / "__init__.py").write_text("")
    (app / "rogue_app" / "client.py").write_text(ROGUE_CLIENT.format(marker=str(marker)))
    (app / "rogue_app" / "server.py").write_text(ROGUE_SERVER)
    return app


def copy_app(target: Path) -> Path:
    """fedrec's app files (what its FAB holds), so other edits to the tree cannot change the signed FAB."""
    target.mkdir()
    shutil.copy(PROJECT / "pyproject.toml", target / "pyproject.toml")
    for package in ("shared_model", "fl_client", "fl_server"):
        shutil.copytree(PROJECT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def flwr_cli(home: Path, address: str, ca: Path, *args: str) -> subprocess.CompletedProcess:
    """The `flwr` CLI with a connection named `x` to `address`, trusting `ca` (as any site could)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'superlink.default = "x"\nsuperlink.x.address = "{address}"\n'
                                      f'superlink.x.root-certificates = "{ca}"\n')
    return subprocess.run([str(BIN / "flwr"), *args], env={**os.environ, "FLWR_HOME": str(home)},
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_only_registered_sites_train_with_secure_aggregation_and_distributed_dp_and_no_stranger_app_runs(tmp_path):
    public = non_loopback_address()
    if public is None:
        pytest.skip("this machine has no non-loopback address to play the stranger from")
    from flwr.cli.build import build_fab_from_disk

    pki = tmp_path / "pki"
    ca, ca_key = make_ca(pki)
    cert, cert_key = make_server_certificate(ca, ca_key, pki, [public])
    signing_key, signing_pub = make_signing_keys(pki)
    keys = [make_site_keys(tmp_path / f"site{i}", f"site{i}") for i in range(3)]
    for i in range(2):  # site2 made a key but was never registered
        add_site(tmp_path / "registry", f"site{i}", keys[i][1])
    app = copy_app(tmp_path / "fedrec")
    sign_fab(build_fab_from_disk(app), signing_key, signing_pub).save(tmp_path / "app.sig")

    data = prepare_data(DataConfig(name="synthetic", synthetic={"num_users": 180, "num_items": 30, "seed": 7}))
    parts = partition_users(data.sequences, PartitionConfig(kind="iid", num_partitions=3))
    sites = write_sites(data, parts, tmp_path / "sites", SiteConfig(data_path="", catalog_path="", state_dir=""))
    link = free_port()
    out, logs, marker = tmp_path / "server", tmp_path / "logs", tmp_path / "exfiltrated.csv"
    logs.mkdir()
    rogue = write_rogue_app(tmp_path, marker)
    clients = [subprocess.Popen(
        [str(BIN / "fedrec-client"), "--superlink", f"{public}:{link}", "--root-certificates", str(ca),
         "--auth-key", str(keys[i][0]), "--trusted-publisher", str(signing_pub), "--port", str(free_port()),
         "--data", site.data_path, "--catalog", site.catalog_path, "--state-dir", site.state_dir,
         "--epsilon", "8", "--rejoin-delay", "1" if i < 2 else "30"],
        stdout=(logs / f"client{i}.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        for i, site in enumerate(sites)]
    server = subprocess.Popen(
        [str(BIN / "fedrec-server"), "--ssl-certfile", str(cert), "--ssl-keyfile", str(cert_key), "--ssl-ca-certfile",
         str(ca), "--sites", str(tmp_path / "registry"), "--app-signature", str(tmp_path / "app.sig"), "--app",
         str(app), "--port", str(link), "--catalog", sites[0].catalog_path, "--out-dir", str(out),
         "--num-rounds", "2", "--min-sites", "2", "--stall-timeout", "240", "--run-config",
         "batch-size=32 model.hidden-size=16 model.max-len=20 round-timeout=120.0 model.item-features='' eval-every=2 "
         "model.feature-scoring=false strategy.secure-aggregation=true strategy.distributed-dp=true "
         'strategy.name="fedadam" strategy.server-lr=0.003 strategy.dp-sample-rate=0.5'],
        stdout=(logs / "server.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    client_log = [logs / f"client{i}.log" for i in range(3)]
    try:
        wait_until(lambda: "submitted run" in (logs / "server.log").read_text() or server.poll() is not None, 300,
                   "fedrec-server did not submit its run")
        assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
        # As if Control were compromised: the operator's own CLI submits the rogue app. Every site refuses its FAB.
        # (Submitted first, while fedrec's own run still keeps the SuperLink up.)
        submitted = flwr_cli(tmp_path / "operator", f"127.0.0.1:{link}", ca, "run", str(rogue), "x")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        # (a) A stranger holding the CA certificate, from another address: Control refuses them, whatever they ask.
        stranger = tmp_path / "stranger"
        for args in (["run", str(rogue), "x"], ["supernode", "register", str(keys[2][1]), "x"], ["ls", "x"]):
            done = flwr_cli(stranger, f"{public}:{link}", ca, *args)
            printed = " ".join((done.stdout + done.stderr).replace("│", " ").split())  # unwrap the CLI's error box
            assert done.returncode != 0 and REFUSED in printed, (args, printed)
        # The operator sees who is in (fedrec-admin over loopback, TLS): the two registered sites, online.
        listed = subprocess.run([sys.executable, "-m", "fl_server.admin", "site-list", "--sites",
                                 str(tmp_path / "registry"), "--server-out-dir", str(out)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert listed.returncode == 0, listed.stderr
        table = [line.split("\t") for line in listed.stdout.splitlines()]
        assert [row[0] for row in table] == ["site0", "site1"] and all(row[2].startswith("node ") for row in table)
        wait_until(lambda: all("FAB verification failed" in p.read_text() for p in client_log[:2]), 240,
                   "the registered sites never refused the rogue FAB")
        assert server.wait(500) == 0, (logs / "server.log").read_text()[-3000:]
    finally:
        for process in [server, *clients]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in clients:
            process.wait(30)
    assert not marker.exists()  # no site ran the stranger's code
    # (b) The unregistered SuperNode never got in, so it never received a message.
    unregistered = client_log[2].read_text()
    assert "Failed to initialize the connection" in unregistered and "Receiving:" not in unregistered
    ledger = sites[2].ledger_path  # it may be enrolled at start, but it never paid for a round
    assert not ledger.exists() or json.loads(ledger.read_text())["entries"] == []
    # (c) The registered sites trained both rounds over TLS, under secure aggregation (each stage a fresh
    # ClientApp process: the round's secrets live in the SuperNode's context) and distributed DP; only they
    # were asked.
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["train_replies"] == 2 and r["train_failures"] == 0 for r in rows)
    assert all(r["secure_aggregation"]["sites_summed"] == 2 for r in rows)
    # the last round's evaluation (eval-every=2: the first round is not evaluated) was a secure sum too
    assert "secure_evaluation" not in rows[0] and rows[1]["secure_evaluation"]["sites_summed"] == 2
    assert rows[1]["federated_eval"]["users"] > 0
    # ... and with distributed DP: each round one DP-SGD step, charged as (σ of the sum, q, 1 step)
    for site in sites[:2]:
        assert [e["history"] for e in json.loads(site.ledger_path.read_text())["entries"]] == [[[1.0, 0.5, 1]]] * 2
    assert json.loads((out / "flower" / "registered_sites.json").read_text()).keys() == {"site0", "site1"}


@pytest.mark.parametrize(("peer", "bound", "operator"), [
    ("127.0.0.1", "0.0.0.0", True), ("::1", "0.0.0.0", True), ("::ffff:127.0.0.1", "0.0.0.0", True),
    ("127.0.0.5", "::", True), ("192.0.2.9", "0.0.0.0", False), ("10.0.0.5", "10.0.0.5", True),
    ("10.0.0.6", "10.0.0.5", False), ("testclient", "0.0.0.0", False), (None, "0.0.0.0", False)])
def test_only_this_machine_counts_as_the_operator(peer, bound, operator):
    assert is_operator((peer, 1234) if peer else None, bound_addresses(bound)) is operator


def test_flowers_own_superlink_app_refuses_control_and_runtime_calls_from_elsewhere(monkeypatch):
    from flwr.superlink import main as superlink_main
    from starlette.testclient import TestClient

    monkeypatch.setattr(superlink_main, "create_app", superlink_main.create_app)  # undone after the test
    install_operator_guard("0.0.0.0")
    app = superlink_main.create_app()  # what flower-superlink serves, now behind the guard
    stranger = TestClient(app, client=("192.0.2.9", 5000))
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/control/list-runs",
                 "/v1/runtime/acquire-task", "/docs"):
        refused = stranger.post(path)
        assert refused.status_code == 403 and REFUSED in refused.json()["detail"], path
    assert stranger.post("/v1/fleet/pull-messages").status_code != 403  # sites keep the Fleet API
    operator = TestClient(app, client=("127.0.0.1", 5000))
    assert operator.post("/v1/control/list-runs").status_code != 403  # Flower answers (here: no protobuf body)


def test_the_fab_the_signature_names_carries_it_and_any_other_fab_does_not(monkeypatch, tmp_path):
    from flwr.proto.fab_pb2 import Fab, GetFabRequest, GetFabResponse
    from flwr.superlink.servicer.fleet import fleet_handlers

    signed, other = b"the fedrec FAB", b"a stranger's FAB"
    key, pub = make_signing_keys(tmp_path)
    signature = sign_fab(signed, key, pub)
    fabs = {signature.fab_sha256: signed, "other": other}
    monkeypatch.setattr(fleet_handlers, "get_fab", lambda request, state: GetFabResponse(
        fab=Fab(hash_str=request.hash_str, content=fabs[request.hash_str])))
    install_app_signature(signature)
    good = fleet_handlers.get_fab(request=GetFabRequest(hash_str=signature.fab_sha256), state=None)
    assert dict(good.fab.verifications) == signature.verification_records()
    bad = fleet_handlers.get_fab(request=GetFabRequest(hash_str="other"), state=None)
    assert dict(bad.fab.verifications) == {"valid_license": "Valid"}  # checking is on, but nothing vouches for it

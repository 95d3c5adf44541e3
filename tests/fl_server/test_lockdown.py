"""The locked-down deployment on this machine, run from the deployment guide's own commands.

docs/deployment.md takes a newcomer from a fresh clone to a two-site TLS deployment; this test runs its fenced
`bash` commands (sections 0-5, 7, 8 and 9) as separate processes, with only the substitutions of LOOPBACK and
the few options each call below adds (LOOPBACK_ADDITIONS says which and why), so the guide stays true: the
operator's directory and each site's directory are separate, and the files the guide says to send (the
catalog, the CA certificate, the signing key's public half, each site's public key) are copied between them.
A guide command the test does not run is in NOT_RUN with the reason, and a command in neither fails the test.

One deployment checks the three promises too:

(a) a rogue `flwr run` from another address is refused by the Control API, and even a rogue app that gets onto
    the SuperLink (as if Control were compromised) is refused by every site before its code runs;
(b) the unregistered SuperNode (a third site, `gamma`, that made its key but was never registered) is refused and
    never receives a message;
(c) the two registered sites (`acme`, and `beta` with the same commands) train two rounds over TLS, under
    secure aggregation (section 7) and distributed DP.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fl_client.dp.enrolment import LEDGER_FILE
from fl_server.superlink_guard import bound_addresses, install_app_signature, install_operator_guard, is_operator
from shared_model.app_signature import sign_fab
from shared_model.key_files import make_signing_keys
from simulations.config import DataConfig
from simulations.partition import PartitionConfig, partition_users
from simulations.prepare import prepare_data

BIN = Path(sys.executable).parent
PROJECT = Path(__file__).resolve().parents[2]
GUIDE = PROJECT / "docs" / "deployment.md"
REFUSED = "answer only the operator"  # fl_server.superlink_guard's 403
SITES = ("acme", "beta", "gamma")  # the guide's site acme; beta, registered in its section 3; gamma, never registered

# Guide text -> what it is on loopback, applied in this order to every guide command (`{tmp}`: the test's
# directory, `{public}`: this machine's non-loopback address, `{link}`: a free port). Every entry must occur.
LOOPBACK = (
    ("fedrec.example.org", "{public}"),  # the server's name: sites (and the stranger) dial this machine's address
    ("203.0.113.10", "127.0.0.1"),  # the server's other address in its certificate
    ("9092", "{link}"),  # the SuperLink's port: a free one
    ("/srv/fedrec/", "{tmp}/srv/"),  # the run's out dir
    ("/data/", "{tmp}/data/"),  # each site's events (generated: {tmp}/data/<site>/events.parquet)
    ("/var/lib/fedrec/", "{tmp}/state/"),  # each site's state dir
    ("--num-rounds 20", "--num-rounds 1"),  # (`--check 20x2x128` stays: the cheapest σ search of the plans tried)
)
# What the test adds to guide commands, and why (nothing else is added; see the calls below).
SMALL_RUN = ("batch-size=32 model.hidden-size=16 model.max-len=20 round-timeout=120.0 model.item-features='' "
             "model.feature-scoring=false strategy.distributed-dp=true "
             'strategy.name="fedadam" strategy.server-lr=0.003 strategy.dp-sample-rate=0.5')
LOOPBACK_ADDITIONS = {
    "fedrec-admin sign-app": "--app <a copy of the app>: edits to the working tree during the test cannot change "
                             "the signed FAB",
    "fedrec-server": "--app <the same copy>; --stall-timeout 480 (fail fast; the round's eight secure stages took "
                     "over 240 s under CI's load); --run-config SMALL_RUN (a model small enough for CI, and "
                     "distributed DP on top of section 7's secure aggregation)",
    "fedrec-client": "--port <a free port>: three SuperNodes on one machine each need their own local port (the "
                     "guide says so); --rejoin-delay 1 (30 for the unregistered site: its refusals stay few)",
}
# Guide commands this test does not run: (section heading prefix, command prefix) -> why.
NOT_RUN = {
    ("Install", "make install"): "the test runs in the environment the project is installed in (installing needs "
                                 "the network)",
    ("6.", "fedrec-server ..."): "the direction check reads each site's update, which section 7's secure "
                                 "aggregation (run here) hides; its flags and settings are checked by "
                                 "test_every_command_of_the_deployment_guide_parses",
    ("10.", "fedrec-admin sign-app"): "the same command as section 4's (checked equal), run here",
    ("10.", "fedrec-server"): "a second run would double this test's time; --initial-model runs in "
                              "tests/fl_server/test_deploy.py, and the command's flags are checked by "
                              "test_every_command_of_the_deployment_guide_parses",
}

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


def guide_sections(text: str) -> dict[str, list[str]]:
    """Each `## ` section of a guide (by its heading) and the commands of its ```bash blocks: backslash
    continuations joined, `# comments` dropped, split as the shell splits them (and joined again, one space
    between words)."""
    sections: dict[str, list[str]] = {}
    for part in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        heading, _, body = part.partition("\n")
        commands = []
        for block in re.findall(r"^```bash\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append(shlex.join(words))
        sections[heading.strip()] = commands
    return sections


def test_guide_sections_join_continuations_and_drop_comments():
    text = ("# Title\n\n## 1. One\n\n```bash\nfedrec-admin ca --out pki   # pki/ca.pem\n"
            "fedrec-server --run-config 'a=1 b=\"x\"' \\\n    --port 9092\n```\n\n```toml\nnot = \"a command\"\n```\n"
            "## 2. Two\n\nno commands\n")
    assert guide_sections(text) == {"1. One": ["fedrec-admin ca --out pki",
                                               "fedrec-server --run-config 'a=1 b=\"x\"' --port 9092"],
                                    "2. Two": []}


class Guide:
    """docs/deployment.md's commands with the LOOPBACK substitutions; remembers which were handed out to run."""

    def __init__(self, values: dict[str, str]) -> None:
        self.sections = guide_sections(GUIDE.read_text(encoding="utf-8"))
        self.table = [(old, new.format(**values)) for old, new in LOOPBACK]
        for _, new in self.table:  # substituted before the shell split: words that need no quoting
            assert shlex.join(new.split(" ")) == new, new
        self.used: set[str] = set()
        self.ran: set[tuple[str, int]] = set()

    def heading(self, prefix: str) -> str:
        [heading] = [h for h in self.sections if h.startswith(prefix)]
        return heading

    def commands(self, section: str, site: str = "acme") -> list[list[str]]:
        """Every command of a section (each one is run by the caller), for `site` where the guide says acme."""
        return [self.command(section, "", site, index=i) for i in range(len(self.sections[self.heading(section)]))]

    def command(self, section: str, start: str, site: str = "acme", index: int | None = None) -> list[str]:
        """The one command of a section that starts with `start` (the caller runs it)."""
        heading = self.heading(section)
        lines = self.sections[heading]
        if index is None:
            [index] = [i for i, line in enumerate(lines) if line.startswith(start)]
        self.ran.add((heading, index))
        line = lines[index]
        for old, new in [*self.table, ("acme", site)]:
            if old in line:
                line = line.replace(old, new)
                self.used.add(old)
        return shlex.split(line)

    def unaccounted(self) -> list[str]:
        """Guide commands neither run nor listed in NOT_RUN."""
        return [f"{heading}: {line}" for heading, lines in self.sections.items() for i, line in enumerate(lines)
                if (heading, i) not in self.ran
                and not any(heading.startswith(s) and line.startswith(c) for s, c in NOT_RUN)]


def expand(command: list[str], server: list[str]) -> list[str]:
    """`fedrec-server ... --more` (sections 6 and 7): section 4's server command with `--more` added."""
    return [*server, *command[2:]] if command[:2] == ["fedrec-server", "..."] else command


def added(command: list[str], *more: str) -> list[str]:
    """A guide command with what the test adds on loopback: only options LOOPBACK_ADDITIONS names for it."""
    key = " ".join(command[:2]) if command[0] == "fedrec-admin" else command[0]
    assert all(f"{word} " in LOOPBACK_ADDITIONS[key] for word in more if word.startswith("--")), (key, more)
    return [*command, *more]


def argv(command: list[str]) -> tuple[list[str], dict[str, str]]:
    """A guide command as a process: leading `NAME=value` words are its environment; fedrec's and Flower's
    commands are this environment's."""
    env = dict(os.environ)
    while re.fullmatch(r"[A-Z_]+=.*", command[0]):
        name, _, value = command[0].partition("=")
        env[name], command = value, command[1:]
    program = BIN / command[0]
    return [str(program) if program.exists() else command[0], *command[1:]], env


def run(command: list[str], cwd: Path, timeout_s: float = 120.0) -> str:
    """Run a guide command where the guide runs it; its output (it must succeed)."""
    args, env = argv(command)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, f"{shlex.join(command)} (in {cwd}) failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def start(command: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    args, env = argv(command)
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_every_command_of_the_deployment_guide_parses():
    """Each fedrec command in the guide, those the deployment test does not run included, is accepted by its real
    command line, with run-config keys the app knows; the substitutions and NOT_RUN name what the guide says."""
    from flwr.common.config import parse_config_args

    from fl_client.supernode import parse_args as client_args
    from fl_server.admin import parse_args as admin_args
    from fl_server.deploy import app_defaults
    from fl_server.deploy import parse_args as server_args

    sections = guide_sections(GUIDE.read_text(encoding="utf-8"))
    lines = [line for commands in sections.values() for line in commands]
    [server] = [shlex.split(line) for line in sections[next(h for h in sections if h.startswith("4."))]
                if line.startswith("fedrec-server")]
    parsers = {"fedrec-admin": admin_args, "fedrec-server": server_args, "fedrec-client": client_args}
    known = set(app_defaults(PROJECT))
    checked = 0
    for line in lines:
        command = expand(shlex.split(line), server)
        if command[0] in parsers:
            args = parsers[command[0]](command[1:])  # argparse exits on an unknown or missing option
            for settings in getattr(args, "run_config", []):
                assert set(parse_config_args([settings])) <= known, line
            checked += 1
    assert checked >= 15
    assert all(any(old in line for line in lines) for old, _ in LOOPBACK)
    assert all(any(h.startswith(s) and line.startswith(c) for h, commands in sections.items() for line in commands)
               for s, c in NOT_RUN)
    # the upgrade signs the app exactly as section 4 does
    assert [c for c in sections[next(h for h in sections if h.startswith("10."))] if "sign-app" in c] == \
           [c for c in sections[next(h for h in sections if h.startswith("4."))] if "sign-app" in c]


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


def write_consortium_data(tmp_path: Path, operator: Path) -> None:
    """The consortium's items file (the guide's products.csv) and each site's events (its /data/<site>/)."""
    data = prepare_data(DataConfig(name="synthetic", synthetic={"num_users": 180, "num_items": 30, "seed": 7}))
    catalog = data.catalog
    pd.DataFrame({"item_id": catalog.item_ids, "title": [catalog.titles.get(i, "") for i in catalog.item_ids]}
                 ).to_csv(operator / "products.csv", index=False)
    parts = partition_users(data.sequences, PartitionConfig(kind="iid", num_partitions=len(SITES)))
    frame = data.events.frame
    for site, users in zip(SITES, parts, strict=True):
        (tmp_path / "data" / site).mkdir(parents=True)
        user_ids = {data.sequences.user_ids[u] for u in users}
        frame.loc[frame["user_id"].isin(user_ids)].to_parquet(tmp_path / "data" / site / "events.parquet", index=False)


def send(source: Path, target: Path) -> None:
    """What the guide says to send from one party to another."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)


def ledger_entries(tmp_path: Path, site: str) -> list[dict]:
    """The rounds a site has paid for: its privacy ledger in its state dir (the guide's /var/lib/fedrec/<site>)."""
    ledger = tmp_path / "state" / site / LEDGER_FILE
    return json.loads(ledger.read_text())["entries"] if ledger.exists() else []


def flwr_cli(home: Path, address: str, ca: Path, *args: str) -> subprocess.CompletedProcess:
    """The `flwr` CLI with a connection named `x` to `address`, trusting `ca` (as any site could)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'superlink.default = "x"\nsuperlink.x.address = "{address}"\n'
                                      f'superlink.x.root-certificates = "{ca}"\n')
    return subprocess.run([str(BIN / "flwr"), *args], env={**os.environ, "FLWR_HOME": str(home)},
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow(seconds=140)
def test_the_deployment_guide_on_loopback_trains_only_registered_sites_and_runs_no_stranger_app(tmp_path):
    public = non_loopback_address()
    if public is None:
        pytest.skip("this machine has no non-loopback address to play the stranger from")
    link = free_port()
    guide = Guide({"public": public, "link": str(link), "tmp": str(tmp_path)})
    operator, logs, marker = tmp_path / "operator", tmp_path / "logs", tmp_path / "exfiltrated.csv"
    site_dirs = {site: tmp_path / site for site in SITES}
    for directory in (operator, logs, *site_dirs.values()):
        directory.mkdir()
    write_consortium_data(tmp_path, operator)

    # The parties work side by side, as on their own machines: each site makes its key pair (section 2) and acme
    # checks its data (section 5: it needs only the catalog) while the operator does sections 0, 1, 3 and 4.
    # beta's and gamma's data are checked by their fedrec-client at start (the same checks, and the same refusals).
    keys = [start(command, site_dirs[site], logs / f"{site}.keys") for site in SITES
            for command in guide.commands("2.", site)]
    [catalog_command] = guide.commands("0.")
    fingerprint = re.search(r"fingerprint ([0-9a-f]{64})", run(catalog_command, operator)).group(1)
    for site in SITES:  # what the operator sends every site: the catalog ...
        send(operator / "catalog.json", site_dirs[site] / "catalog.json")
    check = start(guide.command("5.", "fedrec-client --data"), site_dirs["acme"], logs / "acme.check")
    for command in guide.commands("1."):
        run(command, operator)
    for site in SITES:  # ... the CA certificate and the signing key's public half
        send(operator / "pki" / "ca.pem", site_dirs[site] / "ca.pem")
        send(operator / "pki" / "consortium.pub", site_dirs[site] / "consortium.pub")
    # 4. The operator signs the app (while the sites' keys arrive and are registered) ...
    app = copy_app(tmp_path / "fedrec")
    signing = start(added(guide.command("4.", "fedrec-admin sign-app"), "--app", str(app)), operator, logs / "sign-app")
    assert all(process.wait(60) == 0 for process in keys)
    for site in SITES[:2]:  # acme and beta send their public key to the operator; gamma never does
        send(site_dirs[site] / "keys" / f"{site}.pub", operator / f"{site}.pub")
    server, clients, rogue = None, {}, write_rogue_app(tmp_path, marker)
    client_log = {site: logs / f"{site}.log" for site in SITES}

    def start_client(site: str) -> None:
        command = guide.command("5.", "fedrec-client --superlink", site)
        clients[site] = start(added(command, "--port", str(free_port()), "--rejoin-delay",
                                    "30" if site == "gamma" else "1"), site_dirs[site], client_log[site])

    try:
        # 3. The operator registers acme and beta.
        *adds, listing = guide.commands("3.")
        for command in adds:
            run(command, operator)
        assert [line.split("\t")[0] for line in run(listing, operator).splitlines()] == ["acme", "beta"]
        assert signing.wait(120) == 0, (logs / "sign-app").read_text()
        # 4 and 7. ... and starts the server, with section 7's secure aggregation.
        server_command = expand(guide.command("7.", "fedrec-server"), guide.command("4.", "fedrec-server"))
        server = start(added(server_command, "--app", str(app), "--stall-timeout", "480", "--run-config", SMALL_RUN),
                       operator, logs / "server.log")
        # 5. Each site starts its client (it retries until the server lets it in); acme once its check has passed.
        for site in ("beta", "gamma"):
            start_client(site)
        printed = (logs / "acme.check").read_text() if check.wait(300) == 0 else ""
        assert f"fingerprint {fingerprint}" in printed and "ready: this site can join" in printed, \
            (logs / "acme.check").read_text()
        start_client("acme")
        wait_until(lambda: "submitted run" in (logs / "server.log").read_text() or server.poll() is not None, 300,
                   "fedrec-server did not submit its run")
        assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
        run_id = re.search(r"submitted run (\d+)", (logs / "server.log").read_text()).group(1)
        # 8. The operator monitors the run: once the registered sites' SuperNodes are in (each logs its node id),
        # it sees both online (over loopback, TLS).
        wait_until(lambda: all("SuperNode ID:" in client_log[s].read_text() for s in ("acme", "beta")), 240,
                   "the registered sites never joined")
        table = [line.split("\t") for line in run(guide.command("8.", "fedrec-admin site-list"), operator).splitlines()]
        assert [(row[0], row[2].split()[0], row[2].split()[-1]) for row in table] == \
            [("acme", "node", "online"), ("beta", "node", "online")], table
        # As if Control were compromised: the operator's own CLI submits the rogue app. Every site refuses its FAB.
        # (Submitted first, while fedrec's own run still keeps the SuperLink up.)
        ca = operator / "pki" / "ca.pem"
        submitted = flwr_cli(tmp_path / "operator-cli", f"127.0.0.1:{link}", ca, "run", str(rogue), "x")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        # (a) A stranger holding the CA certificate, from another address: Control refuses them, whatever they ask.
        stranger = tmp_path / "stranger"
        for args in (["run", str(rogue), "x"], ["supernode", "register", str(site_dirs["gamma"] / "keys" / "gamma.pub"),
                                                "x"], ["ls", "x"]):
            done = flwr_cli(stranger, f"{public}:{link}", ca, *args)
            printed = " ".join((done.stdout + done.stderr).replace("│", " ").split())  # unwrap the CLI's error box
            assert done.returncode != 0 and REFUSED in printed, (args, printed)
        # 8. ... and sees the run.
        assert run_id in run(guide.command("8.", "FLWR_HOME="), operator)
        # 9. What a dead fedrec-server would leave running: its SuperLink, with its port.
        [leftovers] = guide.commands("9.")
        assert any("fl_server.superlink_guard" in line and f"--port {link}" in line
                   for line in run(leftovers, operator).splitlines())
        wait_until(lambda: all("FAB verification failed" in client_log[s].read_text() for s in ("acme", "beta")), 240,
                   "the registered sites never refused the rogue FAB")
        # 8. A site's ε, from its ledger, once it has recorded the round (read while the run ends).
        wait_until(lambda: server.poll() is not None or len(ledger_entries(tmp_path, "acme")) == 1, 400,
                   "acme never recorded the round")
        spent = start(guide.command("8.", "fedrec-client"), site_dirs["acme"], logs / "acme.spent")
        assert server.wait(500) == 0, (logs / "server.log").read_text()[-3000:]
    finally:
        for process in [server, *clients.values()]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in clients.values():
            process.wait(30)
    printed = (logs / "acme.spent").read_text() if spent.wait(300) == 0 else "fedrec-client failed"
    assert re.search(r"of ε = 8(\.0)? spent in 1 round\b", printed), (logs / "acme.spent").read_text()
    assert guide.unaccounted() == []  # every guide command was run, or NOT_RUN says why not
    assert guide.used == {old for old, _ in LOOPBACK} | {"acme"}
    assert not marker.exists()  # no site ran the stranger's code
    # (b) The unregistered SuperNode never got in, so it never received a message.
    unregistered = client_log["gamma"].read_text()
    assert "Failed to initialize the connection" in unregistered and "Receiving:" not in unregistered
    assert ledger_entries(tmp_path, "gamma") == []  # it may be enrolled at start, but it never paid for a round
    # (c) The registered sites trained the round over TLS, under secure aggregation (each stage a fresh
    # ClientApp process: the round's secrets live in the SuperNode's context) and distributed DP; only they
    # were asked. (One round: several rounds of the same stages are the simulations' tests.)
    out = tmp_path / "srv" / "run1"
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    [row] = rows
    assert row["round"] == 1 and row["train_replies"] == 2 and row["train_failures"] == 0
    assert row["secure_aggregation"]["sites_summed"] == 2
    assert row["secure_evaluation"]["sites_summed"] == 2 and row["federated_eval"]["users"] > 0  # a secure sum too
    # ... and with distributed DP: the round one DP-SGD step, charged as (σ of the sum, q, 1 step)
    for site in SITES[:2]:
        assert [e["history"] for e in ledger_entries(tmp_path, site)] == [[[1.0, 0.5, 1]]]
    assert json.loads((out / "flower" / "registered_sites.json").read_text()).keys() == {"acme", "beta"}


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

"""A site killed mid-round and started again, with real processes: a round process SIGKILLed between its budget
check and its ledger record is charged exactly once when the round is sent again, and a restarted fedrec-client
stops the SuperNode its killed predecessor left running."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_client.dp.ledger import PrivacyLedger
from fl_client.round_config import RoundConfig
from fl_client.site import SiteConfig, load_site_data
from fl_client.supernode import stop_leftover_supernodes
from fl_client.training_round import train_round
from shared_model.launch import process_alive
from tests.fl_client.server_round import round_record

ROOT = Path(__file__).resolve().parents[2]
# The site's own process for one round, as a SuperNode starts it, except that training says it has begun (the
# budget check and the σ plan are behind it, the site's lock held) and then hangs until it is killed.
KILLED_SITE = """
import json, sys, time
from pathlib import Path
import fl_client.training_round as federated
from fl_client.round_config import RoundConfig
from fl_client.site import SiteConfig, load_site_data
from tests.fl_client.server_round import round_record

def stuck_in_training(*args, **kwargs):
    Path(sys.argv[2]).write_text("training")
    time.sleep(600)

site = SiteConfig.from_node_config(json.loads(sys.argv[1]))
data = load_site_data(site)
record, state = round_record(data.catalog, 1)
federated.train = stuck_in_training
federated.train_round(site, data, RoundConfig.from_record(record), state)
"""


def recorded_rounds(site: SiteConfig) -> list[tuple[str, int]]:
    if not site.ledger_path.exists():
        return []
    return [(entry.run_id, entry.round) for entry in PrivacyLedger(site.ledger_path, None).entries]


def kill_while_training(site: SiteConfig, marker: Path) -> tuple[int, int]:
    """Run round 1 in a subprocess and SIGKILL it once it trains: its pid, and the pid holding the site's lock
    at that moment."""
    process = subprocess.Popen([sys.executable, "-c", KILLED_SITE, json.dumps(site.node_config()), str(marker)],
                               cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, "the site process ended before it trained"
            assert time.monotonic() < deadline, "the site process never started training"
            time.sleep(0.1)
        holder = int((Path(site.state_dir) / "site.lock").read_text())
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    return process.pid, holder


@pytest.mark.slow
def test_a_site_killed_while_training_is_charged_once_when_the_round_is_sent_again(site, tmp_path):
    killed, lock_holder = kill_while_training(site, tmp_path / "training")
    assert lock_holder == killed  # killed past its budget check, with the site's ledger lock held
    assert recorded_rounds(site) == []  # it died before its record: nothing was released, nothing charged
    data = load_site_data(site)
    record, state = round_record(data.catalog, 1)
    config = RoundConfig.from_record(record)
    # The server resends the round to the restarted site; the kernel released the dead process' lock.
    reply = train_round(site, data, config, state)
    assert not reply.declined and reply.num_examples == len(data.sequences.trainable_users())
    assert 0 < reply.epsilon <= site.privacy.epsilon
    assert recorded_rounds(site) == [("train-7", 1)]
    # Sent once more after it completed (a reply lost on its way back): the kept reply, nothing charged again.
    again = train_round(site, data, config, state)
    assert again.epsilon == reply.epsilon and not again.declined
    assert all(torch.equal(again.state[name], reply.state[name]) for name in reply.state)
    assert recorded_rounds(site) == [("train-7", 1)]


def fake_command(folder: Path, name: str, body: str = "import time; time.sleep(120)") -> list[str]:
    """A Python script named like one of Flower's or fedrec's commands (what /proc shows of the real ones)."""
    script = folder / name
    script.write_text(body)
    return [sys.executable, str(script)]


def test_a_restarted_site_stops_the_supernode_its_killed_fedrec_client_left_running(tmp_path):
    config = tmp_path / "state" / "node_config.toml"
    other = tmp_path / "other" / "node_config.toml"  # another site's SuperNode on this machine: left alone
    supernode = fake_command(tmp_path, "flower-supernode")
    left = subprocess.Popen([*supernode, "--node-config", str(config)], start_new_session=True)
    kept = subprocess.Popen([*supernode, "--node-config", str(other)], start_new_session=True)
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        deadline = time.monotonic() + 30
        while b"--node-config" not in Path(f"/proc/{left.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stop_leftover_supernodes(config, port)
        assert left.wait(15) is not None and not process_alive(left.pid)
        assert kept.poll() is None
    finally:
        for process in (left, kept):
            process.kill()
            process.wait(15)


def test_a_site_refuses_to_start_beside_a_running_fedrec_client_or_on_a_taken_port(tmp_path):
    config = tmp_path / "state" / "node_config.toml"
    spawn = (f"import subprocess, sys, time; subprocess.Popen({fake_command(tmp_path, 'flower-supernode')!r} + "
             f"['--node-config', {str(config)!r}]); time.sleep(120)")
    running = subprocess.Popen(fake_command(tmp_path, "fedrec-client", spawn), start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        with pytest.raises(RuntimeError, match=f"another fedrec-client \\(pid {running.pid}\\) runs this site"):
            while time.monotonic() < deadline:  # until its SuperNode shows up
                stop_leftover_supernodes(config, 0)
                time.sleep(0.1)
    finally:
        os.killpg(running.pid, signal.SIGKILL)
        running.wait(15)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"--port {port}: this site's SuperNode cannot listen there"):
            stop_leftover_supernodes(tmp_path / "nothing.toml", port)

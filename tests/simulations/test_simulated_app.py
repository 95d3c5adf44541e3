"""The simulation's ClientApp as Flower's Ray backend ships it with every message: pickled, it is its sites file's
path and SHA-256 (not every site's settings and the handlers' closures), and a worker builds it once."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ray import cloudpickle

from fl_client.dp.settings import PrivacyConfig
from fl_client.site import SiteConfig
from simulations.attacks import AttackConfig
from simulations.sites_app import SimulatedClientApp, simulated_client_app, write_sites_file
from tests.simulations.test_attacks import HONEST, START, context, honest_site, sent_update, train_message


def sites(count: int) -> list[SiteConfig]:
    """`count` sites whose settings differ from the defaults, and from one another."""
    return [SiteConfig(data_path=f"/data/site-{i}/events.parquet", catalog_path="/data/catalog.json",
                       state_dir=f"/data/site-{i}/state", device="cpu", min_users=1 + i % 3, micro_batch_users=7,
                       privacy=PrivacyConfig(enabled=i % 2 == 0, epsilon=2.0 + i, delta=1e-5 if i % 3 else None,
                                             accountant="rdp" if i % 4 else "prv", secure_mode=i == 1))
            for i in range(count)]


def app_of(folder: Path, count: int, attack=None) -> SimulatedClientApp:
    folder.mkdir()
    return SimulatedClientApp(*write_sites_file(sites(count), folder, attack))


def test_pickled_the_app_is_its_sites_file_whatever_the_number_of_sites(tmp_path):
    small, large = app_of(tmp_path / "a", 2), app_of(tmp_path / "b", 1000)
    sizes = [len(cloudpickle.dumps(lambda app=app: app)) for app in (small, large)]  # as Flower's backend ships it
    assert sizes[0] == sizes[1] < 2_000  # the handlers and 1,000 sites' settings were 181,668 bytes
    shipped = pickle.loads(pickle.dumps(large))
    assert shipped is simulated_client_app(large.sites_file, large.digest)  # built once per process
    assert shipped.sites == sites(1000) and shipped.attack is None


def test_the_attack_travels_with_the_sites_and_draws_each_replys_noise_afresh(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attribute in ("_run_id", "_node_id", "_task_id"):  # as in a running app, so messages can be built
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    attack = (AttackConfig(kind="noise", num_sites=2, factor=3.0, seed=4), [0, 2])
    app = pickle.loads(pickle.dumps(app_of(tmp_path / "a", 3, attack)))
    assert app.attack == (attack[0], [0, 2])
    [mod] = app._mods
    first, again = (sent_update(mod(train_message(), context(2), honest_site)) for _ in range(2))
    np.testing.assert_array_equal(first["w"], again["w"])  # as when every message shipped a fresh copy of the mod
    assert not np.allclose(first["w"], HONEST["w"] - START["w"])
    honest = sent_update(mod(train_message(), context(1), honest_site))  # site 1 does not attack
    np.testing.assert_allclose(honest["w"], HONEST["w"] - START["w"])


def test_a_sites_file_changed_after_it_was_written_is_refused(tmp_path):
    app = app_of(tmp_path / "a", 2)
    Path(app.sites_file).write_text(Path(app.sites_file).read_text().replace("site-1", "site-9"))
    with pytest.raises(ValueError, match=r"sites\.json: the simulated sites file changed"):
        SimulatedClientApp(app.sites_file, app.digest)


def test_a_worker_that_unpickles_the_app_imports_no_part_of_the_simulation_driver(tmp_path):
    """Each of the engine's workers unpickles the app before its first message: it needs the sites' code only.
    (Unpickled from simulations.federation, it imported the ServerApp with its report's matplotlib, and Opacus
    and Hydra through the simulation's configs: 3-4 s of CPU in every worker.)"""
    app = app_of(tmp_path / "a", 2)
    script = ("import pickle, sys; app = pickle.loads(sys.stdin.buffer.read()); assert len(app.sites) == 2; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fl_server', 'opacus', 'matplotlib', "
              "'hydra', 'omegaconf', 'pandas') or m in ('simulations.federation', 'simulations.prepare', "
              "'simulations.config', 'torch._dynamo')))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], input=cloudpickle.dumps(app), cwd=root,
                          capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.decode().strip().splitlines()[-1] == "[]"

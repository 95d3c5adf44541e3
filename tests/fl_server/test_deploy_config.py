"""fedrec-server's command line: run settings are checked against the app's own defaults before anything starts."""

import os
import re
import socket
import tomllib

import pytest

from fl_server.control import ControlAPI, write_connection
from fl_server.deploy import PROJECT_ROOT, app_defaults, parse_args, run_overrides, superlink_command
from fl_server.lockdown import warn_insecure
from fl_server.report import progress_line
from fl_server.superlink_guard import parse_args as guard_args
from shared_model.catalog import ItemCatalog
from shared_model.launch import toml_text


@pytest.fixture
def catalog(tmp_path):
    return ItemCatalog.from_items(["a", "b", "c"]).save(tmp_path)  # no titles


def test_overrides_are_absolute_known_and_typed(tmp_path, catalog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--insecure", "--catalog", "catalog.json", "--out-dir", "out", "--num-rounds", "4",
                       "--strategy", "fedprox", "--run-config",
                       "local-epochs=2 model.hidden-size=32 model.item-features=''"])  # ids only: no titles here
    overrides = run_overrides(args, app_defaults(PROJECT_ROOT))
    assert overrides["out-dir"] == str(tmp_path / "out") and overrides["catalog-path"] == str(catalog)
    assert overrides["num-rounds"] == 4 and overrides["strategy.name"] == "fedprox"
    assert overrides["model.hidden-size"] == 32
    # Several --run-config options add up, also within one section (Flower's own parser keeps the last's only).
    twice = run_overrides(parse_args(["--insecure", "--catalog", "catalog.json", "--out-dir", "out", "--run-config",
                                      "model.item-features=''", "--run-config", "model.hidden-size=32"]),
                          app_defaults(PROJECT_ROOT))
    assert twice["model.item-features"] == "" and twice["model.hidden-size"] == 32
    flat = tomllib.loads(toml_text(overrides))  # the --run-config file Flower reads: dotted keys nest
    assert flat["model"]["hidden-size"] == 32 and flat["out-dir"] == str(tmp_path / "out")


def test_the_app_is_staged_in_the_out_dir_and_removed_when_the_server_stops(tmp_path, catalog, monkeypatch):
    """The copy of the app that `flwr run` packs lives in the out-dir: a fedrec-server killed mid-run (SIGKILL
    runs no clean-up) left it in a temporary folder of its own, one more for each crash; now the next start with
    that out-dir replaces it."""
    import fl_server.deploy as deploy

    monkeypatch.chdir(tmp_path)
    left_over = tmp_path / "out" / "flower" / "app" / "stale.py"  # from a killed server
    left_over.parent.mkdir(parents=True)
    left_over.write_text("x = 1\n")
    served: list = []

    def serve(args, app, overrides, num_rounds, stall_s):  # what a killed server sees
        served.append((app, sorted(p.name for p in app.iterdir())))
        return 0

    monkeypatch.setattr(deploy, "serve", serve)
    argv = ["--insecure", "--catalog", "catalog.json", "--out-dir", "out", "--run-config", "model.item-features=''"]
    assert deploy.main(argv) == 0
    [(app, names)] = served
    assert app == tmp_path / "out" / "flower" / "app" and "stale.py" not in names
    assert {"pyproject.toml", "fl_server", "fl_client", "shared_model"} <= set(names)
    assert not app.exists()  # removed once the server stops


def test_unknown_keys_bad_values_and_missing_files_are_refused_up_front(tmp_path, catalog):
    defaults = app_defaults(PROJECT_ROOT)
    base = ["--insecure", "--catalog", str(catalog), "--out-dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=re.escape("unknown run-config keys ['model.hiden-size']")):
        run_overrides(parse_args([*base, "--run-config", "model.hiden-size=32"]), defaults)
    with pytest.raises(ValueError, match=re.escape("strategy.name 'fedsgd'")):
        run_overrides(parse_args([*base, "--strategy", "fedsgd"]), defaults)
    with pytest.raises(ValueError, match="need item titles"):  # the catalog cannot feed the asked-for features
        run_overrides(parse_args([*base, "--run-config", "model.item-features='text'"]), defaults)
    with pytest.raises(FileNotFoundError, match="central-eval-path"):
        run_overrides(parse_args([*base, "--central-eval", str(tmp_path / "missing.csv")]), defaults)
    # what the ServerApp would refuse, refused here (it used to fail in the ServerApp, after the run was submitted)
    with pytest.raises(ValueError, match="secure_aggregation needs an averaging strategy"):
        run_overrides(parse_args([*base, "--strategy", "fedmedian", "--run-config",
                                  "strategy.secure-aggregation=true"]), defaults)
    with pytest.raises(ValueError, match="distributed_dp needs 0 < dp_sample_rate"):
        run_overrides(parse_args([*base, "--run-config", "strategy.distributed-dp=true "
                                  "strategy.dp-noise-multiplier=0"]), defaults)
    with pytest.raises(ValueError, match="this model trains no per-item tensor"):
        run_overrides(parse_args([*base, "--run-config", "strategy.item-rows='counts' model.item-features='' "
                                  "model.train-item-embeddings=false model.item-bias=false"]), defaults)


def test_item_rows_by_counts_are_accepted_for_a_model_with_per_item_tensors(tmp_path, catalog):
    args = ["--insecure", "--catalog", str(catalog), "--out-dir", str(tmp_path / "out"), "--run-config",
            "strategy.item-rows='counts' model.item-features=''"]
    assert run_overrides(parse_args(args), app_defaults(PROJECT_ROOT))["strategy.item-rows"] == "counts"


def test_an_initial_model_is_made_absolute_and_checked_against_the_run_before_anything_starts(tmp_path, catalog,
                                                                                            monkeypatch):
    from fl_server.config import server_config_from_run_config
    from shared_model.factory import create_model
    from shared_model.serialization import save_model_dir

    monkeypatch.chdir(tmp_path)
    ids_only = server_config_from_run_config({**app_defaults(PROJECT_ROOT), "out-dir": "o", "catalog-path": "c",
                                              "model.item-features": ""}).model  # the app's model, ids only
    fits = save_model_dir(create_model(ids_only, ItemCatalog.load(catalog)), ItemCatalog.load(catalog), "fits")
    other = ItemCatalog.from_items(["a", "b", "x"])
    elsewhere = save_model_dir(create_model(ids_only, other), other, "elsewhere")
    base = ["--insecure", "--catalog", str(catalog), "--out-dir", "out", "--run-config", "model.item-features=''"]
    overrides = run_overrides(parse_args([*base, "--initial-model", str(fits)]), app_defaults(PROJECT_ROOT))
    assert overrides["initial-model"] == str(tmp_path / "fits")
    with pytest.raises(ValueError, match=f"initial model {tmp_path / 'elsewhere'}: its catalog.json"):
        run_overrides(parse_args([*base, "--initial-model", str(elsewhere)]), app_defaults(PROJECT_ROOT))
    with pytest.raises(ValueError, match="does not fit this run's model"):
        run_overrides(parse_args([*base, "--initial-model", str(fits), "--run-config", "model.hidden-size=32"]),
                      app_defaults(PROJECT_ROOT))
    with pytest.raises(FileNotFoundError, match="initial-model"):
        run_overrides(parse_args([*base, "--run-config", "initial-model='missing'"]), app_defaults(PROJECT_ROOT))


def test_the_locked_down_deployment_needs_all_its_parts_and_is_passed_to_the_superlink(tmp_path, monkeypatch,
                                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    base = ["--catalog", "c.json", "--out-dir", "o", "--port", "9300"]
    with pytest.raises(SystemExit):  # TLS alone: no site registry, no app signature
        parse_args(["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem", "--ssl-ca-certfile", "ca.pem", *base])
    assert "needs ['--sites', '--app-signature']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --insecure with TLS files: a contradiction, not a silent downgrade
        parse_args(["--insecure", "--ssl-keyfile", "k.pem", *base])
    args = parse_args(["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem", "--ssl-ca-certfile", "ca.pem",
                       "--sites", "sites", "--app-signature", "app.sig", *base])
    command = superlink_command(args)
    assert command[1:3] == ["-m", "fl_server.superlink_guard"]  # Flower's SuperLink behind fedrec's guards
    assert "--insecure" not in command and "--enable-supernode-auth" in command
    assert command[command.index("--ssl-keyfile") + 1] == str(tmp_path / "k.pem")
    assert command[command.index("--app-signature") + 1] == str(tmp_path / "app.sig")
    assert "--disable-runtime-dependency-installation" in command  # never `uv sync` a CUDA torch at run time
    ours, flowers = guard_args(command[3:])  # the guard keeps --app-signature, Flower gets the rest unchanged
    assert ours.app_signature == str(tmp_path / "app.sig") and ours.host == "0.0.0.0"
    assert "--app-signature" not in flowers and flowers[flowers.index("--port") + 1] == "9300"
    insecure = superlink_command(parse_args(["--insecure", *base]))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure and "--app-signature" not in insecure


def test_insecure_says_loudly_what_it_gives_up(capsys):
    warn_insecure()
    err = capsys.readouterr().err
    assert err.startswith("!" * 100) and "ANY SuperNode" in err and "TLS" in err and "whatever app" in err


def test_the_progress_line_names_privacy_and_the_sites_cost():
    row = {"round": 2, "train_replies": 3, "declined": 0, "train_failures": 0,
           "federated_eval": {"hr@10": 0.25, "ndcg@10": 0.125}, "privacy": {"epsilon_max": 1.5},
           "site_cost": {"train_seconds_max": 4.25, "train_seconds_mean": 2.0, "peak_memory_mb_max": 1234.0}}
    assert progress_line(row, 5) == ("round 2/5: 3 sites answered, 0 declined, 0 failed; HR@10 0.2500 NDCG@10 "
                                     "0.1250, ε max 1.500; slowest site 4.2 s, peak 1,234 MB")
    silent = {**row, "train_replies": 1, "train_no_reply": 2}
    assert progress_line(silent, 5).startswith("round 2/5: 1 sites answered, 0 declined, 0 failed, "
                                               "2 silent (round timeout); HR@10 0.2500")
    start = {"round": 0, "starting_model": True, "federated_eval": {"hr@10": 0.25, "ndcg@10": 0.125}}
    assert progress_line(start, 5) == "round 0/5 (the starting model, before any training): HR@10 0.2500 NDCG@10 0.1250"


def test_the_control_api_client_reads_its_own_connection_and_names_a_superlink_that_does_not_answer(tmp_path,
                                                                                                    monkeypatch):
    monkeypatch.setenv("FLWR_HOME", "/elsewhere")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_connection(tmp_path / "cli", "0.0.0.0", port, None)
    control = ControlAPI(tmp_path / "cli")
    assert os.environ["FLWR_HOME"] == "/elsewhere"  # read from tmp_path/cli, and the process' own left as it was
    with pytest.raises(RuntimeError, match="Control API did not answer"):
        control.run_statuses()

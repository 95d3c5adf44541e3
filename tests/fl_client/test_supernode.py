"""fedrec-client's command line: the site's settings reach the SuperNode's node config unchanged."""

import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from fl_client.lockdown import warn_insecure
from fl_client.site import SiteConfig
from fl_client.supernode import parse_args, site_config, supernode_command
from shared_model.app_signature import trusted_entities
from shared_model.device import describe_device, resolve_device
from shared_model.key_files import make_signing_keys, make_site_keys
from shared_model.launch import toml_text


def test_site_settings_round_trip_through_the_node_config_file(tmp_path):
    data = tmp_path / "my events.csv"  # a space in the path must survive the TOML file
    data.write_text("user_id,item_id\n")
    args = parse_args(["--insecure", "--data", str(data), "--catalog", "catalog.json", "--epsilon", "3",
                       "--superlink", "10.0.0.5:9092", "--port", "9200", "--accountant", "rdp",
                       "--micro-batch-users", "32", "--cache-keep", "5", "--state-dir", str(tmp_path / "my state")])
    site = site_config(args)
    assert site.state_dir == str(tmp_path / "my state") and site.privacy.epsilon == 3.0 and site.privacy.delta is None
    assert (site.privacy.accountant, site.privacy.noise_multiplier) == ("rdp", None)
    assert (site.micro_batch_users, site.cache_keep) == (32, 5)
    parsed = tomllib.loads(toml_text(site.node_config()))
    assert SiteConfig.from_node_config(parsed) == site
    command = supernode_command(args, tmp_path / "node_config.toml")
    assert command[1:5] == ["--superlink", "10.0.0.5:9092", "--port", "9200"] and command[-1] == "--insecure"


def test_no_dp_and_the_locked_down_options_are_passed_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "e.csv"
    data.write_text("")
    key, _ = make_site_keys(tmp_path / "keys", "acme")
    _, publisher = make_signing_keys(tmp_path / "keys")
    args = parse_args(["--root-certificates", "ca.pem", "--auth-key", str(key), "--trusted-publisher",
                       str(publisher), "--data", str(data), "--catalog", "c.json", "--state-dir", "s", "--no-dp",
                       "--delta", "1e-6", "--noise-multiplier", "1.5", "--grad-sample-mode", "hooks"])
    site = site_config(args)
    assert not site.privacy.enabled and site.privacy.delta == 1e-6
    assert SiteConfig.from_node_config(tomllib.loads(toml_text(site.node_config()))) == site
    command = supernode_command(args, tmp_path / "state" / "n.toml")
    assert "--insecure" not in command
    assert command[command.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")  # absolute
    assert command[command.index("--auth-supernode-private-key") + 1] == str(key)
    entities = Path(command[command.index("--trusted-entities") + 1])
    assert entities.parent == tmp_path / "state"  # next to the node config, in the site's state dir
    assert yaml.safe_load(entities.read_text()) == trusted_entities(publisher)  # how Flower reads it
    key.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):  # a private key others may read is refused
        supernode_command(args, tmp_path / "state" / "n.toml")


def test_missing_data_and_a_missing_or_partial_security_choice_are_refused(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        site_config(parse_args(["--insecure", "--data", str(tmp_path / "nowhere.csv"), "--catalog", "c.json",
                                "--state-dir", "s"]))
    with pytest.raises(SystemExit):  # neither --insecure nor --root-certificates: no silent plain HTTP
        parse_args(["--data", "x", "--catalog", "c.json"])
    with pytest.raises(SystemExit):  # TLS alone is not the locked-down deployment
        parse_args(["--root-certificates", "ca.pem", "--data", "x", "--catalog", "c.json", "--state-dir", "s"])
    assert "needs ['--auth-key', '--trusted-publisher']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --insecure with a key: a contradiction, not a silent downgrade
        parse_args(["--insecure", "--auth-key", "k", "--data", "x", "--catalog", "c.json", "--state-dir", "s"])


def test_insecure_says_loudly_what_it_gives_up(capsys):
    warn_insecure()
    err = capsys.readouterr().err
    assert err.startswith("!" * 100) and "runs ANY app" in err and "TLS" in err and "impostor" in err


def test_unknown_accountant_or_gradient_mode_in_a_node_config_is_refused():
    base = {"data-path": "d", "catalog-path": "c", "state-dir": "s"}
    with pytest.raises(ValueError, match="accountant must be one of"):
        SiteConfig.from_node_config({**base, "accountant": "moments"})
    with pytest.raises(ValueError, match="grad_sample_mode must be one of"):
        SiteConfig.from_node_config({**base, "grad-sample-mode": "functorch"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_fails_at_startup_with_the_reason():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu" and describe_device(resolve_device("auto")).startswith("cpu (")


def test_a_node_config_cannot_reach_the_privacy_settings_except_by_their_flat_keys():
    """A node config naming the nested field or PrivacyConfig's own name for `dp` is refused, not half-applied:
    a site whose file says `privacy = ...` or `enabled = false` must not start with settings it did not mean."""
    base = {"data-path": "d", "catalog-path": "c", "state-dir": "s"}
    for key, value in (("privacy", "off"), ("enabled", False), ("selection-noise", 5.0)):
        with pytest.raises(ValueError, match=rf"unknown node config keys \['{key}'\]"):
            SiteConfig.from_node_config({**base, key: value})
    assert SiteConfig.from_node_config({**base, "dp": False}).privacy.enabled is False
    assert SiteConfig.from_node_config(base).privacy.enabled is True  # DP on unless the site says otherwise

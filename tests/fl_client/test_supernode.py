"""fedrec-client's command line: the site's settings reach the SuperNode's node config unchanged."""

import tomllib

import pytest
import torch

from fl_client.site import SiteConfig
from fl_client.supernode import node_config, parse_args, site_config, supernode_command
from shared_model.device import describe_device, resolve_device
from shared_model.launch import toml_text


def test_site_settings_round_trip_through_the_node_config_file(tmp_path):
    data = tmp_path / "my events.csv"  # a space in the path must survive the TOML file
    data.write_text("user_id,item_id\n")
    args = parse_args(["--insecure", "--data", str(data), "--catalog", "catalog.json", "--epsilon", "3",
                       "--superlink", "10.0.0.5:9092", "--port", "9200", "--accountant", "rdp",
                       "--micro-batch-users", "32", "--cache-keep", "5"])
    site = site_config(args)
    assert site.state_dir == str(tmp_path / ".fedrec-my events") and site.epsilon == 3.0 and site.delta is None
    assert (site.accountant, site.micro_batch_users, site.noise_multiplier, site.cache_keep) == ("rdp", 32, None, 5)
    parsed = tomllib.loads(toml_text(node_config(site)))
    assert SiteConfig.from_node_config(parsed) == site
    command = supernode_command(args, tmp_path / "node_config.toml")
    assert command[1:5] == ["--superlink", "10.0.0.5:9092", "--port", "9200"] and command[-1] == "--insecure"


def test_no_dp_and_tls_are_passed_on(tmp_path):
    data = tmp_path / "e.csv"
    data.write_text("")
    args = parse_args(["--root-certificates", "ca.pem", "--data", str(data), "--catalog", "c.json", "--no-dp",
                       "--delta", "1e-6", "--noise-multiplier", "1.5", "--grad-sample-mode", "ghost"])
    site = site_config(args)
    assert not site.dp and site.delta == 1e-6
    assert SiteConfig.from_node_config(tomllib.loads(toml_text(node_config(site)))) == site
    assert supernode_command(args, tmp_path / "n.toml")[-2:] == ["--root-certificates", "ca.pem"]


def test_missing_data_and_missing_security_choice_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        site_config(parse_args(["--insecure", "--data", str(tmp_path / "nowhere.csv"), "--catalog", "c.json"]))
    with pytest.raises(SystemExit):  # neither --insecure nor --root-certificates: no silent plain HTTP
        parse_args(["--data", "x", "--catalog", "c.json"])


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

"""The simulation engine's resources: GPU shares for the simulated sites, and what Ray could never schedule."""

import pytest
import torch

from simulations.federation import Resources


def test_a_cpu_machine_gives_the_sites_no_gpu():
    resources = Resources.resolve(num_cpus=2, cpus_per_client=1.0, num_gpus=0)
    assert resources.backend_config() == {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                                          "init_args": {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False}}
    assert "no GPU" in resources.describe() and "2 train at once" in resources.describe()


def test_by_default_the_visible_gpus_are_shared_by_the_sites_that_train_at_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    resources = Resources.resolve(num_cpus=8, cpus_per_client=2.0)
    assert (resources.num_gpus, resources.gpus_per_client) == (1, 0.25)
    assert resources.backend_config()["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    assert "4 train at once" in resources.describe()
    many = Resources.resolve(num_cpus=2, cpus_per_client=1.0, num_gpus=8)
    assert many.gpus_per_client == 1.0  # never more than a whole GPU per site unless asked for
    assert Resources.resolve(4, 1.0, num_gpus=1, gpus_per_client=1.0).describe().endswith("1 train at once")
    assert Resources.resolve(10, 1.0, num_gpus=1).describe().endswith("0.1 GPU, 10 train at once")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_cpus": 2, "cpus_per_client": 3.0}, "cpus_per_client=3.0"),
    ({"num_cpus": 2, "cpus_per_client": 1.0, "num_gpus": 1, "gpus_per_client": 2.0}, "gpus_per_client=2.0"),
    ({"num_cpus": 2, "cpus_per_client": 1.0, "num_gpus": 2, "gpus_per_client": 1.5}, "whole number"),
    ({"num_cpus": 2, "cpus_per_client": 1.0, "num_gpus": -1}, "num_gpus=-1"),
    ({"num_cpus": 2, "cpus_per_client": 1.0, "num_gpus": 0, "device": "cuda"}, "train.device=cuda"),
])
def test_what_ray_could_never_schedule_is_refused_before_the_run(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Resources.resolve(**kwargs)

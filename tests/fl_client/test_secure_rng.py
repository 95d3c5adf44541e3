"""privacy.secure_mode: Poisson sampling and Gaussian noise from the OS CSPRNG, with the same σ and ε."""

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from fl_client.dp.engine import PrivacyConfig, SecurePoissonSampler
from fl_client.dp.secure_rng import secure_gaussian, secure_standard_normal, secure_uniform
from fl_client.round_config import RoundConfig
from fl_client.site import load_site_data
from fl_client.train import TrainConfig, train
from fl_client.training_round import train_round
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel
from simulations.config import DataConfig
from simulations.prepare import prepare_data
from tests.fl_client.server_round import round_record


def test_uniforms_and_normals_have_the_right_distribution():
    u = secure_uniform(200_000)
    assert u.min() > 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.005
    z = secure_standard_normal(200_001)
    assert z.shape == (200_001,) and abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(z**4) - 3) < 0.1  # Gaussian kurtosis, not just the right variance


def test_noise_has_sigma_c_shape_dtype_device_and_ignores_torch_seeds():
    reference = torch.zeros(300, 400, dtype=torch.float32)
    torch.manual_seed(0)
    first = secure_gaussian(reference, std=2.5)
    torch.manual_seed(0)
    second = secure_gaussian(reference, std=2.5)
    assert first.shape == reference.shape and first.dtype == torch.float32 and first.device == reference.device
    assert abs(float(first.std()) - 2.5) < 0.03 and abs(float(first.mean())) < 0.04  # 6 and 5 standard errors
    assert not torch.equal(first, second)  # no torch seed reproduces it


def test_poisson_sampler_draws_each_user_with_the_sample_rate():
    sampler = SecurePoissonSampler(num_samples=1000, sample_rate=0.1, steps=50)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    sizes = [len(b) for b in batches]
    assert abs(np.mean(sizes) - 100) < 7 and len({tuple(b) for b in batches}) == 50
    assert all(0 <= i < 1000 for b in batches for i in b)


@pytest.fixture(scope="module")
def data():
    return prepare_data(DataConfig(name="synthetic", synthetic={"num_users": 120, "num_items": 40, "seed": 5}))


def dp_train(data, secure: bool):
    torch.manual_seed(0)
    model = FedRecModel(FedRecConfig(num_items=len(data.catalog.item_ids), hidden_size=16, max_len=10))
    privacy = PrivacyConfig(enabled=True, epsilon=3.0, secure_mode=secure)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(model, data.sequences, TrainConfig(epochs=2, batch_size=30, device="cpu", eval_every=0), privacy)
    return model, result, [str(w.message) for w in caught]


def test_secure_mode_trains_without_torchcsprng_and_spends_the_same_epsilon(data):
    plain_model, plain, _ = dp_train(data, secure=False)
    secure_model, secure, messages = dp_train(data, secure=True)
    again_model, _, _ = dp_train(data, secure=True)
    assert secure.privacy is not None and plain.privacy is not None
    assert secure.privacy.epsilon == pytest.approx(plain.privacy.epsilon) == pytest.approx(3.0, rel=0.01)
    assert secure.privacy.history == plain.privacy.history  # same σ, sample rate and steps: same accounting
    assert not any("Secure RNG turned off" in m for m in messages)  # no false warning: it is on
    weights = [m.item_embeddings.weight for m in (plain_model, secure_model, again_model)]
    assert all(torch.isfinite(w).all() for w in weights)
    assert not torch.equal(weights[1], weights[2])  # the same seeds cannot reproduce the secure noise


def test_a_site_in_secure_mode_trains_a_federated_round(site):
    secure_site = replace(site, privacy=replace(site.privacy, secure_mode=True))
    site_data = load_site_data(secure_site)
    record, state = round_record(site_data.catalog, 1, num_rounds=2)
    reply = train_round(secure_site, site_data, RoundConfig.from_record(record), state)
    assert not reply.declined and reply.dp and 0 < reply.epsilon < secure_site.privacy.epsilon

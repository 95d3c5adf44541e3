"""The data-site client on a CUDA GPU: the same numbers as on CPU, DP-SGD on the GPU, and whole federated rounds.

These need a CUDA device and are skipped without one (CI has none). On a GPU machine: `pytest -m gpu`.
"""

from dataclasses import replace

import pytest
import torch

from fl_client.dp.engine import PrivacyConfig
from fl_client.dp.ledger import PrivacyLedger
from fl_client.evaluation import evaluate_round
from fl_client.round_config import RoundConfig
from fl_client.site import load_site_data
from fl_client.train import TrainConfig, train
from fl_client.training_round import optimizer_state_path, train_round
from shared_model import wire
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.metrics import evaluate_model
from shared_model.modeling_fedrec import FedRecModel
from shared_model.sequences import make_batch
from simulations.config import DataConfig
from simulations.prepare import prepare_data
from tests.fl_client.server_round import round_record

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


@pytest.fixture(scope="module")
def data():
    return prepare_data(DataConfig(name="synthetic", synthetic={"num_users": 160, "num_items": 60, "seed": 11}))


def fresh_model(data, **overrides) -> FedRecModel:
    """The same initial weights every call; dropout off so CPU and GPU compute the same function."""
    torch.manual_seed(0)
    settings = {"num_items": len(data.catalog.item_ids), "hidden_size": 32, "max_len": 20,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **overrides}
    return FedRecModel(FedRecConfig(**settings))


def assert_weights_close(cpu: FedRecModel, gpu: FedRecModel, atol: float) -> None:
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items(), strict=True):
        assert b.device.type == "cuda", name
        torch.testing.assert_close(b.cpu(), a, atol=atol, rtol=1e-4, msg=name)


def test_gpu_scores_and_metrics_match_cpu(data):
    cpu, gpu = fresh_model(data).eval(), fresh_model(data).cuda().eval()
    users = data.sequences.trainable_users()[:64]
    batch = make_batch(data.sequences, users, "test", cpu.config.max_len)
    with torch.no_grad():
        on_cpu = cpu.score_next(batch["item_ids"], batch["event_types"], batch["time_buckets"])
        on_gpu = gpu.score_next(*(batch[k].cuda() for k in ("item_ids", "event_types", "time_buckets")))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-5, rtol=1e-4)
    metrics_cpu = evaluate_model(cpu, data.sequences, "test")
    metrics_gpu = evaluate_model(gpu, data.sequences, "test", device="cuda")
    assert metrics_gpu["users"] == metrics_cpu["users"]
    for key in ("hr@10", "ndcg@10", "mrr"):  # a near-tie may rank one user's item one place apart
        assert metrics_gpu[key] == pytest.approx(metrics_cpu[key], abs=1.0 / metrics_cpu["users"])


def test_an_epoch_of_training_on_gpu_matches_cpu(data):
    config = TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="sgd", seed=4, eval_every=0)
    cpu, gpu = fresh_model(data), fresh_model(data)
    on_cpu = train(cpu, data.sequences, replace(config, device="cpu"), PrivacyConfig())
    on_gpu = train(gpu, data.sequences, replace(config, device="cuda"), PrivacyConfig())
    assert on_gpu.epoch_losses[0] == pytest.approx(on_cpu.epoch_losses[0], rel=1e-4)
    assert_weights_close(cpu, gpu, atol=1e-5)
    assert 0 < on_gpu.peak_memory_mb < 1024  # the CUDA allocator's peak, not the process' resident set


def test_a_dp_sgd_step_on_gpu_clips_and_sums_per_user_gradients_as_on_cpu(data):
    # One step over every user (sample rate 1) with negligible noise: what is left is Opacus' per-user
    # gradients, their clipping and their sum, computed in length-sorted micro-batches on each device.
    users = len(data.sequences.trainable_users())
    config = TrainConfig(epochs=1, batch_size=users, lr=0.5, optimizer="sgd", seed=4, eval_every=0,
                         micro_batch_users=48)
    privacy = PrivacyConfig(enabled=True, noise_multiplier=1e-7, max_grad_norm=0.05, accountant="rdp")
    cpu, gpu = fresh_model(data), fresh_model(data)
    on_cpu = train(cpu, data.sequences, replace(config, device="cpu"), privacy)
    on_gpu = train(gpu, data.sequences, replace(config, device="cuda"), privacy)
    assert on_gpu.epoch_losses[0] == pytest.approx(on_cpu.epoch_losses[0], rel=1e-4)
    assert_weights_close(cpu, gpu, atol=1e-5)
    assert on_gpu.privacy is not None and on_gpu.privacy.history == on_cpu.privacy.history


def test_dp_training_on_gpu_spends_exactly_its_budget(data):
    config = TrainConfig(epochs=3, batch_size=40, lr=0.003, device="cuda", eval_every=0)
    model = fresh_model(data, hidden_dropout_prob=0.2)
    result = train(model, data.sequences, config, PrivacyConfig(enabled=True, epsilon=2.0))
    assert result.privacy is not None and result.privacy.epsilon == pytest.approx(2.0, rel=0.01)
    assert all(torch.isfinite(p).all() and p.device.type == "cuda" for p in model.parameters())
    assert result.optimizer_state is not None


def test_federated_rounds_on_a_gpu_site(site):
    gpu_site = replace(site, device="cuda")
    site_data = load_site_data(gpu_site)
    replies = []
    state = None
    for server_round in (1, 2):
        record, initial = round_record(site_data.catalog, server_round, num_rounds=2)
        record[wire.KEEP_OPTIMIZER_STATE] = True
        cfg = RoundConfig.from_record(record)
        reply = train_round(gpu_site, site_data, cfg, state or initial)
        assert not reply.declined and reply.dp
        assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in reply.state.values())  # wire-ready
        assert optimizer_state_path(gpu_site, cfg.training_id).exists()  # Adam moments kept for the next round
        replies.append(reply)
        state = reply.state
    assert 0 < replies[0].epsilon < replies[1].epsilon <= gpu_site.privacy.epsilon * 1.01
    assert PrivacyLedger(gpu_site.ledger_path, replies[1].delta).spent() == pytest.approx(replies[1].epsilon)
    metrics = evaluate_round(gpu_site, site_data, cfg, state)
    assert 0 <= metrics["hr@10"] <= 1 and metrics[wire.NUM_EXAMPLES] > 0 and metrics[wire.TRAIN_CE] > 0

"""The server's own evaluation on the events it holds: on CPU, and on a GPU when there is one."""

import pytest
import torch

from fl_server.config import ServerConfig
from fl_server.server_app import central_evaluator
from shared_model import wire
from shared_model.catalog import ItemCatalog
from shared_model.configuration_fedrec import FedRecConfig
from shared_model.modeling_fedrec import FedRecModel
from simulations.synthetic import generate_events, write_events

ON_GPU = pytest.param("cuda", marks=pytest.mark.gpu)  # skipped without CUDA (tests/conftest.py)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_central_evaluation_scores_a_copy_where_asked_and_matches_cpu(tmp_path, device):
    log = generate_events(num_users=150, num_items=40, seed=8)
    events = write_events(log, tmp_path / "held_out.csv")
    catalog = ItemCatalog.from_events(log.frame)
    cfg = ServerConfig(out_dir=str(tmp_path / "out"), catalog_path="", central_eval_path=str(events))
    torch.manual_seed(0)
    model = FedRecModel(FedRecConfig(num_items=len(catalog.item_ids), hidden_size=16, max_len=10)).eval()
    on_device = central_evaluator(cfg, catalog, torch.device(device))
    on_cpu = central_evaluator(cfg, catalog, torch.device("cpu"))
    assert on_device is not None and on_cpu is not None
    scored, reference = on_device(model), on_cpu(model)
    assert next(model.parameters()).device.type == "cpu"  # the global model itself never moves
    assert scored["users"] == reference["users"] > 0
    for key in ("hr@10", "ndcg@10", wire.VALID_NDCG10):
        assert scored[key] == pytest.approx(reference[key], abs=1.0 / reference["users"])

"""Training that starts from an exported model: same catalog, same tensors, the frozen public ones equal up to
rounding; the ServerApp hands those weights to round 1, records where they came from, and a resume ignores
them."""

import json
import re

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

import fl_server.server_app as server_app
from fl_server.config import ServerConfig
from fl_server.initial_model import InitialModelError, load_initial_model, recorded
from shared_model import wire
from shared_model.catalog import CatalogMismatchError, ItemCatalog
from shared_model.factory import ModelConfig, create_model
from shared_model.serialization import load_model_dir, save_model_dir

# Public catalog attributes give the model a frozen tensor (item_features) that the run builds itself.
CONFIG = ModelConfig(hidden_size=16, max_len=10, item_features=["attributes"], feature_dim=4,
                     hidden_dropout_prob=0.5)


def attributed(prefix: str) -> ItemCatalog:
    ids = [f"{prefix}{k}" for k in range(30)]
    return ItemCatalog.from_items(ids, attributes={i: [f"brand{k % 3}", f"kind{k % 5}"] for k, i in enumerate(ids)})


@pytest.fixture
def catalog():
    return attributed("i")


def exported(tmp_path, catalog, config=CONFIG, name="exported"):
    """A model directory whose weights differ from any fresh model's."""
    torch.manual_seed(7)
    model = create_model(config, catalog)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    return model, save_model_dir(model, catalog, tmp_path / name)


def test_the_trainable_weights_come_from_the_exported_model_and_other_settings_are_named(tmp_path, catalog):
    source, directory = exported(tmp_path, catalog)
    model = create_model(ModelConfig(**{**CONFIG.__dict__, "hidden_dropout_prob": 0.0}), catalog)
    info = load_initial_model(model, catalog, directory)
    theirs = wire.trainable_state(source)
    assert set(wire.trainable_state(model)) == set(theirs)
    assert all(torch.equal(t, theirs[k]) for k, t in wire.trainable_state(model).items())
    assert info["path"] == str(directory) and info["tensors"] == len(theirs)
    assert info["settings_differing"] == {"hidden_dropout_prob": [0.0, 0.5]}  # (this run's, the exported one's)


def test_a_model_of_another_catalog_shape_or_frozen_tensors_is_refused_naming_the_file(tmp_path, catalog):
    _, directory = exported(tmp_path, catalog)
    other = attributed("j")  # as many items, other ids
    with pytest.raises(CatalogMismatchError, match=re.escape(f"initial model {directory}: its catalog.json")):
        load_initial_model(create_model(CONFIG, other), other, directory)
    wider = create_model(ModelConfig(**{**CONFIG.__dict__, "hidden_size": 32}), catalog)
    with pytest.raises(InitialModelError, match=r"model.safetensors does not fit this run's model .*other shapes"):
        load_initial_model(wider, catalog, directory)
    biased = create_model(ModelConfig(**{**CONFIG.__dict__, "item_bias": True}), catalog)
    with pytest.raises(InitialModelError, match=r"missing \['output.bias'\]"):
        load_initial_model(biased, catalog, directory)
    source, _ = exported(tmp_path, catalog)
    source.item_features.mul_(2.0)  # a frozen public tensor this run would build otherwise
    changed = save_model_dir(source, catalog, tmp_path / "changed")
    fresh = create_model(CONFIG, catalog)
    before = {k: t.clone() for k, t in wire.full_state(fresh).items()}
    with pytest.raises(InitialModelError, match=re.escape("frozen public tensors ['item_features (max |differen")):
        load_initial_model(fresh, catalog, changed)
    assert all(torch.equal(t, before[k]) for k, t in wire.full_state(fresh).items())  # refused: nothing loaded
    # Rounding (a feature SVD on another number of threads) is no difference: the run keeps its own tensor.
    source.item_features.div_(2.0).add_(1e-8)
    rounded = save_model_dir(source, catalog, tmp_path / "rounded")
    load_initial_model(fresh, catalog, rounded)
    assert torch.equal(fresh.item_features, before["item_features"])
    assert all(torch.equal(t, wire.trainable_state(source)[k]) for k, t in wire.trainable_state(fresh).items())
    with pytest.raises(InitialModelError, match="absolute path"):
        load_initial_model(fresh, catalog, "exported")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_initial_model(fresh, catalog, tmp_path / "missing")


def no_rounds_strategy(real, sent=None):
    """build_strategy whose strategies run no round; they record the weights round 1 would start from."""
    def build(config, setup=None):
        strategy = real(config, setup)
        strategy.start = lambda **kw: (sent if sent is not None else []).append(
            kw["initial_arrays"].to_torch_state_dict())
        return strategy
    return build


def test_the_server_sends_the_exported_weights_in_round_one_and_a_resume_keeps_its_checkpoint(tmp_path, catalog,
                                                                                              monkeypatch):
    source, directory = exported(tmp_path, catalog)
    catalog.save(tmp_path)
    sent: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(server_app, "build_strategy", no_rounds_strategy(server_app.build_strategy, sent))
    monkeypatch.setattr(server_app, "score_starting_model", lambda *args: None)  # (the test below)
    cfg = ServerConfig(out_dir=str(tmp_path / "run"), catalog_path=str(tmp_path / "catalog.json"), num_rounds=2,
                       model=CONFIG, initial_model=str(directory))
    summary = server_app.run_server(grid=None, cfg=cfg)  # type: ignore[arg-type]  # no site is asked anything
    theirs = wire.trainable_state(source)
    assert set(sent[0]) == set(theirs) and all(torch.equal(t, theirs[k]) for k, t in sent[0].items())
    assert recorded(tmp_path / "run")["path"] == str(directory) == summary["initial_model"]["path"]
    assert f"Round 1 started from the exported model `{directory}`" in (tmp_path / "run" / "report.md").read_text()
    # After a completed round the checkpoint wins: a restart resumes from it, not from the exported model.
    store = server_app.RunStore(cfg.out_dir)
    checkpointed = create_model(CONFIG, catalog)
    store.save(1, checkpointed.state_dict(), {}, {"round": 1}, 0.1)
    server_app.run_server(grid=None, cfg=cfg)  # type: ignore[arg-type]
    assert all(torch.equal(t, wire.trainable_state(checkpointed)[k]) for k, t in sent[1].items())
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["initial_model"]["path"] == str(directory)


SCORES = {1: (10, 0.2, 0.3), 2: (30, 0.1, 0.1)}  # node: (users, HR@10, validation NDCG@10)


class EvaluatingGrid:
    """Two sites that answer evaluate messages with fixed scores; keeps every message sent."""

    def __init__(self):
        self.sent = []

    def get_node_ids(self):
        return list(SCORES)

    def send_and_receive(self, messages, timeout=None):
        self.sent += list(messages)
        replies = []
        for msg in messages:
            users, hr, valid = SCORES[msg.metadata.dst_node_id]
            metrics = MetricRecord({wire.NUM_EXAMPLES: users, "hr@10": hr, wire.VALID_NDCG10: valid})
            notes = ConfigRecord({wire.WIRE_VERSION: wire.VERSION})
            replies.append(Message(content=RecordDict({wire.METRICS: metrics, wire.NOTES: notes}), reply_to=msg))
        return replies


def test_the_starting_model_is_scored_as_round_zero_and_is_best_until_a_round_beats_it(tmp_path, catalog,
                                                                                       monkeypatch,
                                                                                       serverapp_identity):
    source, directory = exported(tmp_path, catalog)
    catalog.save(tmp_path)
    monkeypatch.setattr(server_app, "build_strategy", no_rounds_strategy(server_app.build_strategy))
    cfg = ServerConfig(out_dir=str(tmp_path / "run"), catalog_path=str(tmp_path / "catalog.json"), num_rounds=2,
                       model=CONFIG, initial_model=str(directory))
    grid = EvaluatingGrid()
    summary = server_app.run_server(grid=grid, cfg=cfg)  # type: ignore[arg-type]
    theirs = wire.trainable_state(source)
    assert [m.metadata.message_type for m in grid.sent] == ["evaluate", "evaluate"]  # round 0 trains nothing
    for msg in grid.sent:
        assert msg.content.config_records["config"]["server-round"] == 0
        scored = msg.content.array_records["arrays"].to_torch_state_dict()
        assert set(scored) == set(theirs) and all(torch.equal(t, theirs[k]) for k, t in scored.items())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["round"] == 0 and rows[0]["starting_model"]
    assert rows[0]["federated_eval"]["hr@10"] == pytest.approx((10 * 0.2 + 30 * 0.1) / 40)  # user-weighted
    assert summary["best_round"] == 0 and summary["rounds"] == 0
    best, _ = load_model_dir(tmp_path / "run" / "best_model")
    assert all(torch.equal(t, theirs[k]) for k, t in wire.trainable_state(best).items())
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| 0 (start) | 0 |" in report and "best round (0: the starting model, not improved on), sites" in report
    assert "No round completed; nothing was trained." in report  # no privacy claim from scoring alone
    # A round that scores lower on validation leaves the starting model best; a resume does not score it again.
    store = server_app.RunStore(cfg.out_dir)
    store.save(1, create_model(CONFIG, catalog).state_dict(), {}, {"round": 1}, 0.05)
    assert server_app.run_server(grid=grid, cfg=cfg)["best_round"] == 0  # type: ignore[arg-type]
    store.save(2, create_model(CONFIG, catalog).state_dict(), {}, {"round": 2}, 0.5)
    summary = server_app.run_server(grid=grid, cfg=cfg)  # type: ignore[arg-type]
    assert len(grid.sent) == 2 and summary["best_round"] == 2 and summary["rounds"] == 2


def test_fresh_initial_weights_follow_the_run_seed(tmp_path, catalog, monkeypatch):
    catalog.save(tmp_path)
    sent: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(server_app, "build_strategy", no_rounds_strategy(server_app.build_strategy, sent))
    for n, seed in enumerate((0, 0, 1)):
        server_app.run_server(grid=None, cfg=ServerConfig(  # type: ignore[arg-type]  # no site is asked anything
            out_dir=str(tmp_path / f"run{n}"), catalog_path=str(tmp_path / "catalog.json"), num_rounds=1,
            model=CONFIG, seed=seed))
    same = [all(torch.equal(t, sent[0][k]) for k, t in run.items()) for run in sent[1:]]
    assert same == [True, False]  # seed 0 twice: the same model; seed 1: another one

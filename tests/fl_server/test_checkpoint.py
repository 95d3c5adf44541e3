"""Server run directory: atomic per-round checkpoints, best model, one metrics line per completed round."""

import json

import pytest
import torch

from fl_server.checkpoint import RunStore


def state(value: float) -> dict[str, torch.Tensor]:
    weight = torch.full((3, 2), value)
    return {"item_embeddings.weight": weight, "output.weight": weight}  # tied: one tensor under two names


def test_rounds_are_checkpointed_and_the_latest_is_restored(tmp_path):
    store = RunStore(tmp_path)
    assert store.latest() is None
    store.save(1, state(1.0), {"m_t": {"a": 1}}, {"round": 1, "loss": 3.0}, score=0.1)
    store.save(2, state(2.0), {"m_t": {"a": 2}}, {"round": 2, "loss": 2.0}, score=0.3)
    latest = store.latest()
    assert latest is not None and latest.round == 2 and latest.optimiser_state == {"m_t": {"a": 2}}
    assert torch.equal(latest.state["output.weight"], torch.full((3, 2), 2.0))
    assert not (tmp_path / "rounds" / "round-0001" / "weights.safetensors").exists()  # only the latest weights
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]


def test_best_model_follows_the_score(tmp_path):
    store = RunStore(tmp_path)
    store.save(1, state(1.0), {}, {"round": 1}, score=0.5)
    store.save(2, state(2.0), {}, {"round": 2}, score=0.2)
    latest = store.latest()
    assert latest is not None and (latest.best_round, latest.best_score) == (1, 0.5)
    best = json.loads((tmp_path / "best" / "metrics.json").read_text())
    assert best["round"] == 1


def test_a_round_not_evaluated_is_checkpointed_but_never_the_best(tmp_path):
    store = RunStore(tmp_path)
    store.save(1, state(1.0), {}, {"round": 1}, score=None)
    assert store.best_state() is None and store.latest().round == 1
    store.save(2, state(2.0), {}, {"round": 2}, score=0.0)
    store.save(3, state(3.0), {}, {"round": 3}, score=None)
    latest = store.latest()
    assert latest is not None and (latest.round, latest.best_round) == (3, 2)


def test_resaving_a_round_after_a_crash_leaves_one_line_per_round(tmp_path):
    store = RunStore(tmp_path)
    store.save(1, state(1.0), {}, {"round": 1}, score=0.1)
    store.save(2, state(2.0), {}, {"round": 2}, score=0.2)
    restarted = RunStore(tmp_path)
    restarted.save(2, state(2.5), {}, {"round": 2, "again": True}, score=0.2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["again"] is True


def test_training_id_is_stable_and_paths_must_be_absolute(tmp_path):
    assert RunStore(tmp_path).training_id() == RunStore(tmp_path).training_id()
    with pytest.raises(ValueError, match="absolute"):
        RunStore("relative/out")


def test_best_state_is_none_before_the_first_round(tmp_path):
    store = RunStore(tmp_path)
    assert store.best_state() is None
    store.save(1, state(1.0), {}, {"round": 1}, score=0.5)
    best = store.best_state()
    assert best is not None and torch.equal(best["output.weight"], torch.full((3, 2), 1.0))

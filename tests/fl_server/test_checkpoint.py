"""Server run directory: atomic per-round checkpoints, best model, one metrics line per completed round."""

import json

import numpy as np
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


def test_a_non_finite_model_is_never_checkpointed_over_the_last_good_one(tmp_path):
    store = RunStore(tmp_path)
    good = {"w": torch.ones(3), "steps": torch.tensor([3])}
    store.save(1, good, {"m_t": {"w": np.zeros(3, dtype=np.float32)}}, {"round": 1}, 0.5)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match=r"round 2: .*NaN or infinite values in \['w'\]; not checkpointed"):
            store.save(2, {"w": torch.tensor([1.0, bad, 0.0]), "steps": torch.tensor([4])}, {}, {"round": 2}, 0.9)
    latest = store.latest()
    assert latest.round == 1 and torch.equal(latest.state["w"], good["w"]) and latest.best_round == 1
    assert [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not list((tmp_path / "rounds").glob("*round-0002*"))


def test_the_optimiser_state_is_saved_as_tensors_and_read_back_as_numpy_with_weights_only(tmp_path):
    store = RunStore(tmp_path)
    state = {"m_t": {"w": np.arange(3, dtype=np.float32)}, "momentum_vector": [np.ones((2, 2))],
             "declared_users": {7: 10, 2**63 + 5: 20}, "accepted_norms": [0.5, np.float64(0.7)]}
    store.save(1, {"w": torch.ones(3)}, state, {"round": 1}, 0.5)
    saved = torch.load(tmp_path / "rounds" / "round-0001" / "optimiser.pt", weights_only=True)  # no allow-list
    assert isinstance(saved["m_t"]["w"], torch.Tensor)
    restored = store.latest().optimiser_state
    assert restored["m_t"]["w"].dtype == np.float32 and np.array_equal(restored["m_t"]["w"], np.arange(3))
    assert restored["momentum_vector"][0].shape == (2, 2) and restored["declared_users"] == {7: 10, 2**63 + 5: 20}
    assert restored["accepted_norms"] == [0.5, 0.7]


def test_an_older_checkpoints_numpy_state_still_loads_but_a_pickle_that_runs_code_is_refused(tmp_path):
    store = RunStore(tmp_path)
    store.save(1, {"w": torch.ones(3)}, {}, {"round": 1}, 0.5)
    path = tmp_path / "rounds" / "round-0001" / "optimiser.pt"
    torch.save({"m_t": {"w": np.ones(3, dtype=np.float32)}, "v_t": {"w": np.zeros(3)}}, path)  # the old format
    assert np.array_equal(store.latest().optimiser_state["m_t"]["w"], np.ones(3, dtype=np.float32))
    torch.save({"m_t": RunsCode(tmp_path / "ran")}, path)
    with pytest.raises(ValueError, match=r"optimiser.pt: the server optimiser state cannot be read safely"):
        store.latest()
    assert not (tmp_path / "ran").exists()
    torch.save({"m_t": np.array([RunsCode(tmp_path / "ran")], dtype=object)}, path)  # hidden in an object array
    with pytest.raises(ValueError, match="cannot be read safely"):
        store.latest()
    assert not (tmp_path / "ran").exists()


class RunsCode:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))

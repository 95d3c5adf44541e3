"""A deployed ServerApp collects each stage's replies within 0.25 s of the last one, not Flower's 3 s."""

from types import SimpleNamespace

import pytest
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fl_server import prompt_grid as module
from fl_server.prompt_grid import PULL_INTERVAL_S, PromptGrid, prompt_grid


class ScriptedGrid:
    """Answers message i at its `ready[i]`-th pull (None: never), and records the pulls."""

    def __init__(self, ready: list[int | None]) -> None:
        self.ready, self.pulls, self.pushed = ready, 0, []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, at in enumerate(self.ready) if at == self.pulls and f"m{i}" in wanted]


@pytest.fixture
def clock(monkeypatch):
    """time.monotonic advanced by each time.sleep (no real waiting)."""
    now = [0.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(module.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    return now


def test_replies_are_pulled_every_quarter_second_until_all_are_in(clock):
    inner = ScriptedGrid([1, 3, 2])
    replies = PromptGrid(inner).send_and_receive(["a", "b", "c"], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert inner.pushed == ["a", "b", "c"] and inner.pulls == 3
    assert clock[0] == pytest.approx(2 * PULL_INTERVAL_S)  # the last reply was in at the third pull: no more sleep


def test_a_silent_node_is_given_up_at_the_timeout_with_the_others_replies(clock):
    inner = ScriptedGrid([2, None])
    replies = PromptGrid(inner).send_and_receive(["a", "b"], timeout=10)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert clock[0] == pytest.approx(10.0) and inner.pulls == 10 / PULL_INTERVAL_S


def test_only_the_deployed_grid_is_wrapped():
    deployed = HttpGrid.__new__(HttpGrid)  # no SuperLink needed: only its type matters here
    assert isinstance(prompt_grid(deployed), PromptGrid) and prompt_grid(deployed).grid is deployed
    simulated = InMemoryGrid.__new__(InMemoryGrid)  # it pulls every 0.1 s already
    assert prompt_grid(simulated) is simulated

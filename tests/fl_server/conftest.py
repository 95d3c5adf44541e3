"""Fixtures of the server tests."""

import pytest


@pytest.fixture
def serverapp_identity(monkeypatch):
    """The run/node/task ids a running ServerApp has, so Messages can be built outside one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attribute in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)

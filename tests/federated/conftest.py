"""Fixtures for the federated tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; outside a run, give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)

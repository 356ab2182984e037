"""Fixtures of the attack tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))  # the CLI swarm helpers

from swarm_cli import SwarmProcesses  # noqa: E402


@pytest.fixture
def processes(tmp_path):
    """Real processes of one test, every one of them reaped at its end."""
    swarm = SwarmProcesses(tmp_path)
    yield swarm
    swarm.reap()

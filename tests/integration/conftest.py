import pytest

from swarm_cli import SwarmProcesses


@pytest.fixture
def swarm(tmp_path):
    """Real p2pcold processes on 127.0.0.1; every process group they started is killed afterwards."""
    processes = SwarmProcesses(tmp_path)
    yield processes
    processes.reap()

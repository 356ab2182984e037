"""The operator files in bootstrap/ stay in step with the code: the example run config loads and
validates, and the systemd unit runs the bootstrap with the settings bootstrap/README.md promises."""

from __future__ import annotations

import configparser
from pathlib import Path

from p2pcold.cli import build_parser
from p2pcold.config import load_run_config, validate_swarm_config

BOOTSTRAP = Path(__file__).resolve().parent.parent / "bootstrap"


def test_example_run_config_loads_for_every_role():
    config = load_run_config(BOOTSTRAP / "bootstrap.example.yaml")  # the Repository needs the datasets
    validate_swarm_config(config.swarm)
    assert config.datasets and config.swarm.min_group_size == 2
    assert config.swarm.target_group_size == len(config.datasets)
    # node-specific addresses stay out of the shared file (peers would copy the bootstrap's)
    assert (config.swarm.host, config.swarm.port, config.swarm.announce_maddrs, config.swarm.identity_path) == ("127.0.0.1", 0, [], None)
    text = (BOOTSTRAP / "bootstrap.example.yaml").read_text()
    for field in ("host", "port", "announce_maddrs", "identity_path", "matchmaking_time", "boundary_deadline", "progress_ttl"):
        assert f"{field}:" in text, field


def test_systemd_unit_runs_a_persistent_bootstrap_and_stops_it_with_sigterm():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(BOOTSTRAP / "p2pcold-bootstrap.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert service["User"] == "p2pcold" and service["WorkingDirectory"]
    executable, *argv = service["ExecStart"].split()
    assert executable.endswith("/.venv/bin/p2pcold")
    args = build_parser().parse_args(argv)  # every flag in the unit exists
    assert args.command == "bootstrap" and args.host == "0.0.0.0" and args.port and args.identity and args.announce

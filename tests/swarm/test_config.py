"""SwarmConfig: defaults are valid, YAML-style dicts load, bad settings are refused with one line."""

from __future__ import annotations

import pytest

from p2pcold.config import SwarmConfig, from_dict, validate_swarm_config
from p2pcold.utils import P2PColdError


def test_defaults_are_valid_and_dicts_load():
    validate_swarm_config(SwarmConfig())
    config = from_dict(SwarmConfig, {"compression": "fp16", "announce_maddrs": ["/ip4/203.0.113.7/tcp/31337"]})
    assert config.compression == "fp16" and config.announce_maddrs == ["/ip4/203.0.113.7/tcp/31337"]
    assert SwarmConfig().dht_startup_timeout > 15  # hivemind's default is too short on a loaded machine


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"request_timeout": 5.0, "matchmaking_time": 5.0}, "request_timeout=5.0 must be below matchmaking_time=5.0"),
        ({"min_group_size": 1}, "min_group_size=1: must be at least 2"),
        ({"target_group_size": 2, "min_group_size": 3}, "target_group_size=2 must be at least min_group_size=3"),
        ({"allreduce_timeout": 0}, "allreduce_timeout=0: must be greater than 0"),
        ({"boundary_deadline": 4.0}, "boundary_deadline=4.0 must exceed matchmaking_time"),
        ({"port": 70000}, "port=70000: must be at most 65535"),
    ],
)
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(P2PColdError, match=message):
        validate_swarm_config(SwarmConfig(**fields))


def test_unknown_compression_is_refused():
    with pytest.raises(P2PColdError, match="compression='4bit': must be 'none', 'fp16', '8bit', 'block8' or 'block4'"):
        from_dict(SwarmConfig, {"compression": "4bit"})


def test_settings_set_after_construction_are_checked_too():
    config = SwarmConfig()
    with pytest.raises(P2PColdError, match="request_timeout=9.0 must be below"):
        config.request_timeout = 9.0

"""The run config a swarm publishes (issue 23) and the invite that carries its address and secret,
checked without a network; tests/attacks/test_run_config_attacks.py runs the records on a real DHT."""

from __future__ import annotations

import copy

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from p2pcold.config import ConfigError, load_config, load_published_config, published_config, run_contract
from p2pcold.swarm.auth import RunSecret
from p2pcold.swarm.invite import INVITE_PREFIX, Invite, read_invite, write_invite
from p2pcold.swarm.records import MAX_RUN_CONFIG_CHARS, owner_subkey, run_config_record_problem
from p2pcold.swarm.run_config import checked_run_config, run_config_record
from p2pcold.utils import P2PColdError

PEER = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooWDGvnkXwo7pBLZMwJY5biGVyeZMfQJnjrLWT4wWws1VmW"


def config(**overrides):
    return load_config(None, {"run_id": "r", "finetune.budget.steps": 3, **overrides}, needs_datasets=False)


def test_a_published_config_leaves_out_what_belongs_to_one_node():
    owner = config(**{"swarm.host": "0.0.0.0", "swarm.port": 31337, "output_dir": "/srv/run", "finetune.num_threads": 8})
    data = published_config(owner)
    assert "host" not in data["swarm"] and "port" not in data["swarm"] and "output_dir" not in data
    assert "num_threads" not in data["finetune"] and data["finetune"]["budget"]["steps"] == 3
    volunteer = load_published_config(data, {"swarm.port": 31338}, "the swarm's run config")
    assert run_contract(volunteer) == run_contract(owner)
    assert (volunteer.swarm.port, volunteer.output_dir) == (31338, "runs/local")
    assert "host" not in volunteer.swarm.model_fields_set  # a volunteer's own default applies


def test_a_volunteer_may_change_their_budget_but_not_the_contract():
    data = published_config(config())
    assert load_published_config(data, {"finetune.budget.steps": 7}, "swarm").finetune.budget.steps == 7
    with pytest.raises(ConfigError, match=r"--set finetune.learning_rate=0.1: finetune.learning_rate is part of the run contract"):
        load_published_config(data, {"finetune.learning_rate": 0.1}, "swarm")


def test_a_record_is_owned_bounded_and_hashed():
    record, owner = run_config_record(config()), owner_subkey(RSAPrivateKey())
    assert run_config_record_problem(owner, record) is None
    assert run_config_record_problem("plain", record) == "no owner mark in its subkey (an unsigned record)"
    padded = {**record, "config": {**record["config"], "x": "y" * MAX_RUN_CONFIG_CHARS}}
    assert f"over {MAX_RUN_CONFIG_CHARS} characters" in run_config_record_problem(owner, padded)
    assert "contract hash is not a sha256" in run_config_record_problem(owner, {**record, "contract_hash": "beef"})
    assert "not a run config record" in run_config_record_problem(owner, {**record, "extra": 1})
    assert "not a run config record" in run_config_record_problem(owner, "config")


def test_a_tampered_config_is_refused_with_one_line():
    record = run_config_record(config())
    assert checked_run_config(record, "r", "owner's") == record["config"]
    tampered = copy.deepcopy(record)
    tampered["config"]["finetune"]["learning_rate"] = 1.0
    with pytest.raises(P2PColdError, match="refusing a tampered config"):
        checked_run_config(tampered, "r", "owner's")
    with pytest.raises(P2PColdError, match="is for run 'r', not 'other'"):
        checked_run_config(record, "other", "owner's")
    broken = copy.deepcopy(record)
    broken["config"]["iterations"] = -1
    with pytest.raises(ConfigError, match="iterations"):
        checked_run_config(broken, "r", "owner's")


def test_an_invite_is_one_private_line_that_never_shows_its_secret(tmp_path):
    path = tmp_path / "invite.txt"
    write_invite(path, Invite("r", (PEER,), RunSecret(b"0123456789abcdef0123")))
    text = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600 and text.startswith(INVITE_PREFIX) and text.count("\n") == 1
    assert "0123456789abcdef0123" not in text  # not readable over a shoulder, though not encrypted
    invite = read_invite(path)
    assert (invite.run_id, invite.peers, invite.secret.reveal()) == ("r", (PEER,), b"0123456789abcdef0123")
    assert "0123456789" not in repr(invite)


@pytest.mark.parametrize(
    "payload, message",
    [
        ('{"run_id": "r", "peers": ["/ip4/1.2.3.4/tcp/1"], "secret": "0123456789abcdef"}', "ending in /p2p/"),
        ('{"run_id": "r", "peers": [], "secret": "0123456789abcdef"}', "1 to 32 swarm addresses"),
        (f'{{"run_id": "r", "peers": ["{PEER}"], "secret": "short"}}', "shorter than 16 bytes"),
        ('{"run_id": "r"}', "expected run_id, peers and secret"),
        ("[1, 2]", "expected run_id, peers and secret"),
    ],
)
def test_a_bad_invite_is_one_line(tmp_path, payload, message):
    import base64

    path = tmp_path / "invite.txt"
    path.write_text(INVITE_PREFIX + base64.urlsafe_b64encode(payload.encode()).decode() + "\n")
    path.chmod(0o600)
    with pytest.raises(P2PColdError, match=message):
        read_invite(path)

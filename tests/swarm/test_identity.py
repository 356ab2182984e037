"""join_run: founders publish, joiners compare, mismatches are refused with a clear message."""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch

from p2pcold.swarm import RunIdentity, join_run, peer_id
from p2pcold.utils import P2PColdError

from helpers import fast_config, make_body, unconfirmed

pytestmark = [pytest.mark.network]


@pytest.mark.timeout(90)
def test_join_accepts_the_same_identity_and_refuses_another_one(swarm):
    config = fast_config()
    founder, joiner, stranger = swarm.start(3, config)
    theta0 = make_body(0)
    identity = RunIdentity.for_body("id-run", "minilm", theta0)

    canonical = join_run(founder, "id-run", identity, config)
    assert canonical.founder == peer_id(founder) and canonical.created_at > 0
    assert join_run(joiner, "id-run", identity, config) == canonical
    assert join_run(founder, "id-run", identity, config) == canonical  # re-joining refreshes, changes nothing
    # the same weights loaded from a folder spelled differently (another machine): the same run
    assert join_run(joiner, "id-run", RunIdentity.for_body("id-run", "/home/bob/minilm", theta0), config) == canonical

    other_theta0 = RunIdentity.for_body("id-run", "minilm", make_body(1))
    started = time.monotonic()
    with pytest.raises(P2PColdError) as refused:
        join_run(stranger, "id-run", other_theta0, config)
    assert time.monotonic() - started < config.join_timeout
    message = str(refused.value)
    assert re.search(r"base model hash \(θ0\) differs: swarm has [0-9a-f]{12}…, you have [0-9a-f]{12}…", message)
    assert identity.body_hash[:12] in message and other_theta0.body_hash[:12] in message
    assert "base model differs" not in message and "schema" not in message

    other_model = RunIdentity.for_body("id-run", "bert-base", {**theta0, "extra.bias": torch.zeros(2)})
    with pytest.raises(P2PColdError) as refused:
        join_run(stranger, "id-run", other_model, config)
    message = str(refused.value)
    assert "base model differs: swarm has 'minilm', you have 'bert-base'" in message
    assert "fused parameter schema (names/shapes/dtypes) differs" in message


@pytest.mark.timeout(90)
def test_an_unconfirmed_store_is_tried_again_within_join_timeout(swarm, monkeypatch):
    """A founder's store that the DHT does not confirm (a run of the suite saw one beside a rogue's DHT nodes)
    is tried again, not a refused join; one that never lands is one error line, within join_timeout."""
    config = fast_config(join_timeout=4.0, dht_request_timeout=1.0)
    founder, joiner = swarm.start(2, config)
    identity = RunIdentity.for_body("retry", "minilm", make_body(0))
    store, tries = founder.store, []

    def unconfirmed_once(*args, **kwargs):
        tries.append(args[0])
        return unconfirmed() if len(tries) == 1 else store(*args, **kwargs)

    monkeypatch.setattr(founder, "store", unconfirmed_once)
    canonical = join_run(founder, "retry", identity, config)
    assert canonical.founder == peer_id(founder) and len(tries) >= 3  # the lost try, its retry, the refresh
    assert join_run(joiner, "retry", identity, config) == canonical

    monkeypatch.setattr(joiner, "store", lambda *args, **kwargs: unconfirmed())
    started = time.monotonic()
    with pytest.raises(P2PColdError, match=r"could not publish the run identity in the DHT within join_timeout=4 s"):
        join_run(joiner, "retry", identity, config)
    assert time.monotonic() - started <= config.join_timeout + 1.0


@pytest.mark.timeout(90)
def test_two_simultaneous_founders_agree_on_one(swarm):
    config = fast_config()
    a, b, late = swarm.start(3, config)
    identities = {
        "a": RunIdentity.for_body("race", "minilm", make_body(10)),
        "b": RunIdentity.for_body("race", "minilm", make_body(11)),
    }
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def found(name, dht):
        barrier.wait(timeout=10)
        try:
            outcomes[name] = join_run(dht, "race", identities[name], config)
        except P2PColdError as e:
            outcomes[name] = e

    threads = [threading.Thread(target=found, args=(n, d)) for n, d in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [n for n, o in outcomes.items() if isinstance(o, RunIdentity)]
    losers = [n for n, o in outcomes.items() if isinstance(o, P2PColdError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    canonical = outcomes[winners[0]]
    assert "base model hash (θ0) differs" in str(outcomes[losers[0]])
    # every later peer sees the same founder: the winner's identity joins, the loser's is refused
    assert join_run(late, "race", identities[winners[0]], config) == canonical
    with pytest.raises(P2PColdError, match="differs"):
        join_run(late, "race", identities[losers[0]], config)


def test_a_different_run_contract_names_each_field_and_both_values():
    from p2pcold.config import RunConfig, run_contract

    mine, theirs = RunConfig(), RunConfig(iterations=7)
    theirs.finetune.learning_rate = 1e-4
    body = make_body(0)
    swarm = RunIdentity.for_body("r", "m", body, run_contract(mine))
    joiner = RunIdentity.for_body("r", "m", body, run_contract(theirs))
    assert swarm.differences(RunIdentity.for_body("r", "m", body, run_contract(RunConfig()))) == []
    assert swarm.differences(joiner) == [
        "finetune.learning_rate differs: swarm has 5e-05, you have 0.0001",
        "iterations differs: swarm has 3, you have 7",
    ]
    assert run_contract(mine)["finetune.batch_size"] == mine.finetune.batch_size and "finetune.budget" not in run_contract(mine)
    assert run_contract(mine)["aggregation.rule"] == "auto"  # every reducer must fuse with the same rule
    assert run_contract(mine)["swarm.compression"] == "none"  # the codec, and the reference of the deltas


@pytest.mark.timeout(90)
def test_a_forged_identity_fails_loudly_and_a_pinned_theta0_lets_joiners_in(swarm, caplog):
    """Issue 8: a rogue publishes an identity with created_at = 0 and another θ0 before anyone joins.
    Without a pin, a joiner is refused in one line that names the forger and says how to pin θ0; with
    swarm.theta0_hash, the forged entry is ignored (one warning line naming it) and joiners get in."""
    from p2pcold.swarm.identity import identity_key
    from p2pcold.swarm.records import put_record, record_owner

    config = fast_config()
    rogue, founder, joiner = swarm.start(3, config)
    identity = RunIdentity.for_body("pin-run", "minilm", make_body(0))
    forged = RunIdentity.for_body("pin-run", "minilm", make_body(7))
    forged = RunIdentity(**{**forged.to_record(), "founder": peer_id(rogue), "created_at": 0.0})
    assert put_record(rogue, identity_key("pin-run"), record_owner(rogue), forged.to_record(), ttl=600, timeout=5)

    with pytest.raises(P2PColdError) as refused:
        join_run(founder, "pin-run", identity, config)
    message = str(refused.value)
    assert f"founded by {peer_id(rogue)}" in message and f"swarm.theta0_hash: {identity.body_hash}" in message

    pinned = config.model_copy(update={"theta0_hash": identity.body_hash})
    with caplog.at_level("WARNING", logger="p2pcold"):
        canonical = join_run(founder, "pin-run", identity, pinned)
    assert canonical.founder == peer_id(founder) and canonical.body_hash == identity.body_hash
    assert f"ignoring 1 identity record(s) that differ from the run config pinned by swarm.theta0_hash (written by {peer_id(rogue)})" in caplog.text
    assert join_run(joiner, "pin-run", identity, pinned) == canonical
    with pytest.raises(P2PColdError, match="is not the one the run config pins"):
        join_run(joiner, "pin-run", forged, pinned.model_copy(update={"theta0_hash": identity.body_hash}))

"""A group's verdicts, with a scripted DHT: only owned verdicts count, by their owner's peer id; a member
returns only once every member published a clean one, and fails on a failed, malformed or missing one."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from hivemind.averaging.partition import AllreduceException

from p2pcold.config import SwarmConfig
from p2pcold.swarm.verdicts import GroupVerdicts, verdict_key

CONFIG = SwarmConfig(poll_interval=0.05, dht_request_timeout=1.0)
KEY = verdict_key("p2pcold-run", b"\x01\xab")


@pytest.fixture(scope="module")
def owners(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Two owner marks and their peer ids, from p2pd identity keys like start_dht's."""
    from hivemind.p2p import P2P, PeerID

    from p2pcold.swarm.records import load_signing_key, owner_subkey

    marks = {}
    for name in ("a", "b"):
        path = tmp_path_factory.mktemp("key") / "identity.key"
        P2P.generate_identity(str(path))
        marks[name] = (owner_subkey(load_signing_key(path)), str(PeerID.from_identity(path.read_bytes())))
    return marks


class ScriptedDHT:
    """Holds the verdicts stored so far under their subkeys; `fail` makes every call raise."""

    def __init__(self, record_owner: str = "", fail: bool = False):
        self.stored: dict[str, dict[object, object]] = {}
        self.record_owner, self.fail = record_owner, fail

    def _done(self, value):
        future = asyncio.get_running_loop().create_future()
        if self.fail:
            future.set_exception(OSError("the DHT is down"))
        else:
            future.set_result(value)
        return future

    def store(self, key, value, expiration_time, subkey, return_future):
        self.stored.setdefault(key, {})[subkey] = value
        return self._done(True)

    def get(self, key, latest, return_future):
        values = self.stored.get(key)
        if values is None:
            return self._done(None)
        return self._done(SimpleNamespace(value={k: SimpleNamespace(value=v) for k, v in values.items()}))


def test_the_verdict_key_names_the_group():
    assert KEY == "p2pcold-run.verdict.01ab"


def test_only_owned_verdicts_count_and_by_their_owners_peer_id(owners):
    (mark_a, peer_a), (mark_b, peer_b) = owners["a"], owners["b"]
    dht = ScriptedDHT(record_owner=mark_a)
    verdicts = GroupVerdicts(dht, CONFIG)

    async def scenario():
        await verdicts.publish(KEY, "")
        dht.stored[KEY][mark_b] = {"clean": False, "reason": "a reducer timed out"}
        dht.stored[KEY][peer_b] = {"clean": True}  # a bare peer id is no owner mark: nobody's verdict
        return await verdicts.read(KEY)

    assert asyncio.run(scenario()) == {
        peer_a: {"clean": True, "reason": ""},
        peer_b: {"clean": False, "reason": "a reducer timed out"},
    }


def test_a_member_waits_for_every_clean_verdict_and_fails_on_a_failed_or_malformed_one(owners):
    (mark_a, peer_a), (mark_b, peer_b) = owners["a"], owners["b"]
    dht = ScriptedDHT()
    verdicts = GroupVerdicts(dht, CONFIG)

    async def scenario(b_verdict, publish_after_s=0.0):
        dht.stored[KEY] = {mark_a: {"clean": True, "reason": ""}}

        async def publish_b():
            await asyncio.sleep(publish_after_s)
            dht.stored[KEY][mark_b] = b_verdict

        publishing = asyncio.create_task(publish_b())
        try:
            await verdicts.await_clean(KEY, [peer_a, peer_b], until=time.monotonic() + 5.0)
        finally:
            await publishing

    asyncio.run(scenario({"clean": True, "reason": ""}, publish_after_s=0.2))  # returns once b's lands
    with pytest.raises(AllreduceException, match=f"group member {peer_b} saw the all-reduce fail: .partial"):
        asyncio.run(scenario({"clean": False, "reason": "partial all-reduce"}))
    with pytest.raises(AllreduceException, match="saw the all-reduce fail"):
        asyncio.run(scenario({"clean": "yes"}))  # malformed: a failure


def test_a_missing_verdict_fails_once_the_wait_is_over_and_a_dht_error_never_raises(owners):
    (mark_a, peer_a), (_, peer_b) = owners["a"], owners["b"]
    dht = ScriptedDHT()
    dht.stored[KEY] = {mark_a: {"clean": True, "reason": ""}}
    verdicts = GroupVerdicts(dht, CONFIG)
    started = time.monotonic()
    with pytest.raises(AllreduceException, match=f"no verdict from {peer_b} within"):
        asyncio.run(verdicts.await_clean(KEY, [peer_a, peer_b], until=started + 0.3))
    assert 0.3 <= time.monotonic() - started < 2.0

    broken = GroupVerdicts(ScriptedDHT(record_owner=mark_a, fail=True), CONFIG)
    asyncio.run(broken.publish(KEY, "a problem"))  # a warning line, no exception
    assert asyncio.run(broken.read(KEY)) == {}

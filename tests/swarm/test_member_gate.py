"""The private swarm's gate on averaging RPCs, with a scripted DHT: a member whose tag was published just
after the gate last read the tags is admitted at its first request (refused, its group would assemble
without it), while unknown callers cannot make the gate read the DHT more than its limits allow."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from p2pcold.swarm.auth import TAG_REREAD_INTERVAL_S, MemberGate, RunSecret, member_tag

SECRET = RunSecret(b"a secret long enough for the gate test")
PREFIX = "p2pcold-gate"


class ScriptedDHT:
    """Serves the member tags published so far; counts the reads."""

    def __init__(self):
        self.tags: dict[str, bytes] = {}
        self.reads = 0

    def get(self, key, latest, return_future):
        self.reads += 1
        found = SimpleNamespace(value={peer: SimpleNamespace(value=tag) for peer, tag in self.tags.items()})
        future = asyncio.get_running_loop().create_future()
        future.set_result(found)
        return future

    def publish(self, peer: str) -> None:
        self.tags[peer] = member_tag(SECRET, PREFIX, peer)


def test_a_member_published_just_after_a_read_is_admitted_and_unknown_callers_are_rate_limited():
    async def scenario():
        dht, gate = ScriptedDHT(), MemberGate(SECRET, PREFIX, lookup_timeout=1.0)
        dht.publish("A")
        await gate.read_tags(dht)  # as a boundary begins
        dht.publish("B")  # a late member, a moment later
        assert await gate.admits(dht, "B", "a request to join a group")
        assert await gate.admits(dht, "A", "a part") and dht.reads == 2  # members are cached

        dht.tags["R"] = member_tag(SECRET, PREFIX, "someone else")  # a tag not made for R's peer id
        assert not await gate.admits(dht, "R", "a state download")
        reads = dht.reads
        for _ in range(20):  # R again, at once: no new read until TAG_REREAD_INTERVAL_S has passed
            assert not await gate.admits(dht, "R", "a state download")
        assert dht.reads == reads
        await asyncio.sleep(TAG_REREAD_INTERVAL_S)
        assert not await gate.admits(dht, "R", "a state download") and dht.reads == reads + 1

    asyncio.run(scenario())

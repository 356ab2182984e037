"""A rogue against a private swarm: it knows a member's multiaddr, the run id and p2pcold's code, but
not the run secret (or a wrong one), and never calls `join_run`.

- `start_rogue_dht`: a DHT node with no authorizer or a wrong secret's, joined to a member without
  insisting on a successful bootstrap (so that it starts at all and can try to write records).
- `call_averaging_rpcs`: the three averaging RPCs called straight on a member with a plain `hivemind.P2P`.
"""

from __future__ import annotations

import asyncio

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.swarm.auth import RunSecret, SecretAuthorizer
from p2pcold.swarm.group_key import iteration_group_bits
from p2pcold.swarm.swarm_averager import _SwarmAverager


def start_rogue_dht(member_maddr: str, secret: RunSecret | None) -> hivemind.DHT:
    return hivemind.DHT(
        initial_peers=[member_maddr],
        start=True,
        ensure_bootstrap_success=False,
        authorizer=None if secret is None else SecretAuthorizer(secret),
        startup_timeout=60,
    )


async def call_averaging_rpcs(member_maddr: str, prefix: str, schema_hash: bytes, timeout: float, before_calls=None) -> dict[str, list]:
    """What a member answers to rpc_join_group, rpc_aggregate_part and rpc_download_state: the messages
    of each stream, then the exception that ended it, if any. A member that answers and closes at once
    can break the caller's end-of-requests write after its answer arrived (seen under load), so an
    exception never hides the messages before it. `before_calls(rogue_peer_id)` runs first."""
    p2p = await P2P.create(initial_peers=[member_maddr], startup_timeout=60)
    try:
        if before_calls is not None:
            before_calls(str(p2p.peer_id))
        member = PeerID.from_base58(member_maddr.rsplit("/p2p/", 1)[1])
        stub = _SwarmAverager.get_stub(p2p, member, namespace=prefix)
        join = averaging_pb2.JoinRequest(
            schema_hash=schema_hash, expiration=get_dht_time() + timeout, group_key=f"{prefix}.0b{iteration_group_bits(0)}"
        )
        part = averaging_pb2.AveragingData(group_id=b"rogue-group", peer_id=p2p.peer_id.to_bytes(), weight=1e6)
        calls = {
            "rpc_join_group": lambda: stub.rpc_join_group(join),
            "rpc_aggregate_part": lambda: stub.rpc_aggregate_part(as_aiter(part)),
            "rpc_download_state": lambda: stub.rpc_download_state(averaging_pb2.DownloadRequest()),
        }
        answers = {}
        for name, call in calls.items():
            answers[name] = messages = []
            try:
                stream = await asyncio.wait_for(call(), timeout)
                async for message in aiter_with_timeout(stream, timeout):
                    messages.append(message)
            except Exception as e:  # a refused or broken stream; kept after what it did deliver
                messages.append(e)
        return answers
    finally:
        await p2p.shutdown()

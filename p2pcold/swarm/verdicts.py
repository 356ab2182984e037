"""One outcome per group: each member's verdict on an all-reduce, published in the DHT.

hivemind lets each member decide on its own whether an all-reduce succeeded, so under load one member
can fail while the others succeed and leave. Each member publishes its verdict on the group (clean, or
the failure it saw) under `verdict_key`, owned by its peer id, and succeeds only when every member's
verdict is clean (`GroupVerdicts.await_clean`): a failure seen by one member is seen by all of them,
and they retry together. Runs in the averager process (`swarm_averager._SwarmAverager`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import hivemind
from hivemind.averaging.partition import AllreduceException
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.config import SwarmConfig
from p2pcold.swarm.records import owner_peer_id, record_owner
from p2pcold.utils import get_logger

logger = get_logger(__name__)

# A member re-reads its group's verdicts this often (at most poll_interval): they land within about a
# second of each other, and each read sooner ends the boundary sooner on every member.
VERDICT_READ_INTERVAL_S = 0.1


def verdict_key(prefix: str, group_id: bytes) -> str:
    """The DHT key under which the members of one all-reduce group publish their verdicts."""
    return f"{prefix}.verdict.{group_id.hex()}"


def verdict_failed(verdict: Any) -> bool:
    """A published verdict that is not a clean one (a malformed verdict counts as a failure)."""
    return verdict is not None and not (isinstance(verdict, dict) and verdict.get("clean") is True)


def verdict_wait_s(config: SwarmConfig) -> float:
    """How long after its own all-reduce began a member waits for every member's verdict on it.

    A member's reduce is cut off `allreduce_timeout` after it began; members begin at most one sender
    timeout (`next_chunk_timeout`) apart, since a later one is excluded by the reducers, who then report
    the failure themselves; publishing a verdict takes at most `dht_request_timeout`.
    """
    return config.allreduce_timeout + config.next_chunk_timeout + config.dht_request_timeout


def group_step_timeout_s(config: SwarmConfig) -> float:
    """hivemind's bound on one group's work (its `allreduce_timeout`), so that it never cuts the verdicts
    short: its set-up before the reduce (the tensor lock: `local_rpc_timeout`), the verdict wait, and
    the last read of the verdicts (`dht_request_timeout`)."""
    return config.local_rpc_timeout + verdict_wait_s(config) + config.dht_request_timeout


class GroupVerdicts:
    """Publishes this member's verdicts and reads its groups' ones, in one DHT."""

    def __init__(self, dht: hivemind.DHT, config: SwarmConfig):
        self.dht, self.config = dht, config

    async def publish(self, key: str, problem: str) -> None:
        """This member's verdict under `key`: clean when `problem` is empty. Never raises."""
        timeout = self.config.dht_request_timeout
        verdict = {"clean": not problem, "reason": problem[:300]}
        try:
            await asyncio.wait_for(
                self.dht.store(
                    key,
                    verdict,
                    expiration_time=get_dht_time() + verdict_wait_s(self.config) + timeout,
                    subkey=record_owner(self.dht),  # owned: no other member can write this member's verdict
                    return_future=True,
                ),
                timeout,
            )
        except Exception as e:  # a timeout or a DHT error: the others then miss this verdict and fail
            logger.warning("the verdict on an all-reduce was not stored within %.1f s (%r)", timeout, e)

    async def await_clean(self, key: str, members: list[str], until: float) -> None:
        """Return once every member published a clean verdict; raise on a failed or a missing one."""
        config = self.config
        while True:
            verdicts = await self.read(key)
            failed = {peer: verdicts[peer] for peer in members if verdict_failed(verdicts.get(peer))}
            if failed:
                peer, verdict = next(iter(failed.items()))
                reason = verdict.get("reason") if isinstance(verdict, dict) else None
                why = reason or verdict
                raise AllreduceException(f"group member {peer} saw the all-reduce fail: {why!r}")
            missing = [peer for peer in members if peer not in verdicts]
            if not missing:
                return
            if time.monotonic() >= until:
                late, waited = ", ".join(missing), verdict_wait_s(config)
                raise AllreduceException(f"no verdict from {late} within {waited:.0f} s of the all-reduce")
            pause = min(config.poll_interval, VERDICT_READ_INTERVAL_S, max(0.0, until - time.monotonic()))
            await asyncio.sleep(pause)

    async def read(self, key: str) -> dict[str, Any]:
        """The verdicts under `key` by their owner's peer id; {} when the read fails."""
        try:
            found = await asyncio.wait_for(
                self.dht.get(key, latest=True, return_future=True), self.config.dht_request_timeout
            )
        except Exception as e:  # a timeout or a DHT error: read again until the wait is over
            logger.debug("reading the verdicts under %s: %r", key, e)
            return {}
        if found is None or not isinstance(found.value, dict):
            return {}
        # by the peer id of each verdict's owner; an unowned verdict is nobody's
        verdicts = {owner_peer_id(subkey): item.value for subkey, item in found.value.items()}
        verdicts.pop(None, None)
        return verdicts

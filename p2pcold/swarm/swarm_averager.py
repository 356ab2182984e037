"""The hivemind averager process under `BodyAverager`: `_SwarmAverager`, and starting and stopping it.

`_SwarmAverager` is a `hivemind.averaging.DecentralizedAverager` (a forked background process that
owns shared-memory float32 copies of the body tensors) that serves p2pcold's shared state, refuses
partial all-reduces, fuses with robust reducers, makes every member of a group agree on the outcome
(`verdicts.GroupVerdicts`) and, in a private swarm, serves its averaging RPCs to members only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import AsyncIterator, Callable

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter, azip
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.config import AggregationConfig, SwarmConfig
from p2pcold.swarm import _procs
from p2pcold.swarm.auth import MemberGate
from p2pcold.swarm.compression import install_codec
from p2pcold.swarm.robust_reduce import RobustAllReduceRunner
from p2pcold.swarm.verdicts import GroupVerdicts, verdict_key, verdict_wait_s
from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)


# The class name is part of the wire protocol: hivemind names each RPC handler
# `<prefix>::_SwarmAverager.rpc_...`, so renaming the class would split the swarm between versions.
class _SwarmAverager(DecentralizedAverager):
    """DecentralizedAverager that serves p2pcold's shared state, refuses partial all-reduces, and makes
    every member of a group agree on the outcome.

    hivemind's all-reduce has no agreement step: whether it "succeeded" is decided by each member on its
    own, from the timeouts it saw. Under CPU starvation the members' views differ: a reducer excludes a
    sender that started late while the other reducers did not, a sender gives up on a reducer whose
    results were on their way, a leader counts a follower that already left. A member that sees a partial
    result then fails while the others return success and leave, so it has nobody to retry with (and a
    member can even hold a body that mixes slices averaged with and without the excluded sender).

    Here each member publishes its own verdict on the group (clean, or the failure it saw) in the DHT and
    reports success only once every member of the group published a clean one: a failure seen by one
    member is seen by all of them, and they retry together.
    """

    def __init__(
        self,
        *args,
        state_provider: Callable[[], tuple],
        swarm_config: SwarmConfig,
        member_gate: MemberGate | None,
        aggregation: AggregationConfig,
        verdicts: GroupVerdicts,
        **kwargs,
    ):
        self._state_provider = state_provider
        self._swarm_config = swarm_config
        self._member_gate = member_gate
        self._aggregation = aggregation
        self._verdicts = verdicts
        self._p2pcold_parent = os.getpid()
        super().__init__(*args, **kwargs)

    def run(self):  # in the forked averager process
        _procs.setup_forked_child(self._p2pcold_parent)
        install_codec(self.allreduce_kwargs["compression"])  # this process (de)serializes the parts
        super().run()

    # The averaging RPCs of a private swarm serve members only (see p2pcold.swarm.auth): a caller whose
    # proven peer id has no valid member tag gets an empty stream, and nothing of this peer is touched.

    async def _admits(self, context: P2PContext, what: str) -> bool:
        return self._member_gate is None or await self._member_gate.admits(self.dht, context.remote_id, what)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if await self._admits(context, "a request to join a group"):
            async for response in super().rpc_join_group(request, context):
                yield response

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if await self._admits(context, "a part to aggregate"):
            async for response in super().rpc_aggregate_part(stream, context):
                yield response

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if await self._admits(context, "a state download"):
            async for response in super().rpc_download_state(request, context):
                yield response

    def set_group(self, group_bits: str, target_size: int | None, min_size: int, settle_s: float) -> MPFuture:
        """For the next step: the group key bits, the group size at which a leader assembles at once, and
        the smallest group it assembles when its wait is over. Resolves to False if a cancelled step's
        matchmaking was still winding down after `settle_s` (nothing is changed then)."""
        future = MPFuture()
        kwargs = dict(group_bits=group_bits, target_size=target_size, min_size=min_size, settle_s=settle_s)
        self._outer_pipe.send(("_set_group", [], dict(kwargs, future=future)))
        return future

    async def _set_group(
        self, group_bits: str, target_size: int | None, min_size: int, settle_s: float, future: MPFuture
    ) -> None:
        try:
            matchmaking = self._matchmaking
            # A cancelled step's matchmaking winds down in the background and re-declares itself under
            # the *current* key: switching the key before it ends would offer the old step's gather
            # (another iteration) to the new group.
            lock = matchmaking.lock_looking_for_group
            try:
                await asyncio.wait_for(lock.acquire(), timeout=settle_s)
            except asyncio.TimeoutError:
                future.set_result(False)
                return
            try:
                matchmaking.group_key_manager.group_bits = group_bits
                matchmaking.target_group_size = matchmaking.potential_leaders.target_group_size = target_size
                matchmaking.min_group_size = min_size
            finally:
                lock.release()
            future.set_result(True)
        except Exception as e:
            if not future.done():
                future.set_exception(e)

    def read_member_tags(self) -> None:
        """Have the averager process read the member tags now, without waiting: called as a boundary
        begins, so that the group's members are admitted from the cache, not after a DHT read each."""
        self._outer_pipe.send(("_read_member_tags", [], {}))

    async def _read_member_tags(self) -> None:
        if self._member_gate is not None:
            await self._member_gate.read_tags(self.dht)

    def download_state_from(self, donor: str, chunk_timeout: float, max_bytes: int) -> MPFuture:
        """(metadata, tensors) served by `donor`, or why not (a str); in the averager process."""
        future = MPFuture()
        kwargs = dict(donor=donor, chunk_timeout=chunk_timeout, max_bytes=max_bytes, future=future)
        self._outer_pipe.send(("_download_state_from", [], kwargs))
        return future

    async def _download_state_from(
        self, donor: str, chunk_timeout: float, max_bytes: int, future: MPFuture
    ) -> None:
        """hivemind's load_state_from_peers for one donor chosen by the caller, which checks what arrives
        before it adopts it; a donor that streams more than `max_bytes` (more than the body) is cut off."""
        try:
            stub = self.get_stub(self._p2p, PeerID.from_base58(donor), namespace=self.prefix)
            stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
            metadata, parts, tensors, received = None, [], [], 0
            async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
                received += len(message.tensor_part.buffer) + len(message.metadata)
                if received > max_bytes:
                    raise ValueError(f"the donor sent more than the body's {max_bytes} bytes")
                if message.metadata:
                    metadata = self.serializer.loads(message.metadata)
                if message.tensor_part.dtype and parts:  # the first part of the next tensor
                    tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                    parts = []
                parts.append(message.tensor_part)
            if parts:
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
            future.set_result("it sent no state" if metadata is None else (metadata, tensors))
        except Exception as e:  # a donor that left, a broken stream, a malformed message: the caller logs it
            future.set_result(f"{type(e).__name__}: {e}"[:300])

    def get_current_state(self):  # runs in the host process, in hivemind's background thread
        metadata, tensors = self._state_provider()
        return metadata, tensors, None

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        config, began = self._swarm_config, time.monotonic()
        try:
            await asyncio.wait_for(
                self._reduce(tensors, group_info, group_id, **kwargs), config.allreduce_timeout
            )
            problem = ""
        except asyncio.TimeoutError:
            limit = config.allreduce_timeout
            problem = f"the all-reduce did not finish within allreduce_timeout ({limit:.0f} s)"
        except AllreduceException as e:
            problem = str(e) or "the all-reduce failed"
        except Exception as e:  # the P2P errors of a broken stream
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        key = verdict_key(self.prefix, group_id)
        await self._verdicts.publish(key, problem)
        if problem:
            raise AllreduceException(problem)
        members = [str(peer) for peer in group_info.peer_ids]
        await self._verdicts.await_clean(key, members, until=began + verdict_wait_s(config))

    async def _reduce(self, tensors, group_info, group_id, **kwargs) -> None:
        """hivemind's all-reduce with p2pcold's reducers, failed when it was partial on this member's side."""
        await self._robust_allreduce(tensors, group_info, group_id, **kwargs)
        running = self._running_groups.get(group_id)
        if running is None or not running.done() or running.cancelled():
            return
        runner = running.result()
        failed = runner.tensor_part_container.failed_size
        banned = sorted(str(peer) for peer in runner.banned_senders)
        if failed or banned:
            total = runner.tensor_part_container.total_size
            raise AllreduceException(
                f"partial all-reduce: {failed} of {total} values kept local (a reducer failed), "
                f"senders excluded: {', '.join(banned) or 'none'}"
            )

    async def _robust_allreduce(self, tensors, group_info, group_id, **kwargs) -> None:
        """hivemind's `_run_allreduce_inplace_` (1.1.12) with a RobustAllReduceRunner: the reducers fuse
        with the run's AggregationConfig (`p2pcold.fusion.aggregate_block`)."""
        runner = RobustAllReduceRunner(
            rule=self._aggregation,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        async for tensor, update in azip(as_aiter(*tensors), runner):
            tensor.add_(update)  # BodyAverager never runs as an auxiliary peer, and averaging_alpha is 1
            self.last_updated = get_dht_time()
            self._state_updated.set()


def start_averager(averager: _SwarmAverager, timeout: float) -> None:
    """Fork the averager process and wait (at most `timeout`) until it is ready; raise P2PColdError
    (after killing it) when it does not start."""
    # hivemind's run_in_background() sets SIGINT to SIG_IGN in the *calling* process for good (so that
    # the forked child ignores Ctrl-C) and only works from the main thread. Do the same for the child
    # only: ignore SIGINT around the fork, then restore the caller's handler.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        averager.start()
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    try:
        averager.wait_until_ready(timeout=timeout)
    except BaseException as e:
        stop_averager(averager)
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt, the CLI's SIGTERM: not a start-up failure
        why = str(e) or type(e).__name__
        raise P2PColdError(f"swarm: the averager process did not start: {why}") from None


def ensure_running(averager: _SwarmAverager) -> None:
    if not averager.is_alive():
        raise P2PColdError("swarm: the averager process is not running (shut down or crashed)")


def stop_averager(averager: _SwarmAverager) -> None:
    """Stop the averager process: gracefully, then killed."""
    if averager.is_alive():
        try:
            averager.shutdown()  # graceful; hivemind joins shutdown_timeout, then SIGTERMs
        except (OSError, ValueError) as e:
            logger.debug("averager shutdown: %s", e)
        averager.join(1.0)
        if averager.is_alive():
            averager.kill()
            averager.join(1.0)

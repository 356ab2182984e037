"""Fusing the shared body with whoever else is at the same iteration boundary, over hivemind.

`BodyAverager` wraps one `hivemind.averaging.DecentralizedAverager` (a background process that owns
shared-memory float32 copies of the body tensors, in sorted name order) and adds what CoLD Fusion
needs on top of it:

* **The iteration is part of the group key.** hivemind matchmaking only pairs peers that declare the
  same key `<prefix>.0b<group bits>` in the DHT, and a leader rejects a join request whose key
  differs from its own (BAD_GROUP_KEY). Before every step the group bits are set to the 32-bit binary
  iteration number, so peers at different iterations can never average together. (hivemind rotates
  the bits after each assembled group; resetting them before each step undoes that.)
* **A typed outcome instead of exceptions.** `fuse` returns a `FusionResult` whose status is OK,
  NO_GROUP (nobody else at this iteration before the deadline) or FAILED (groups formed, but every
  all-reduce failed or was partial); the caller falls back to `download_state` or its local body.
* **No silent partial averages.** When a group member dies or stalls mid-way, hivemind's all-reduce
  still "succeeds": the missing member's slice of the vector keeps each survivor's *local* values,
  and senders that stopped are dropped from the remaining parts. Members would then hold different
  bodies. The averager detects both cases on its own side and fails the attempt.
* **One outcome per group.** hivemind lets each member decide on its own whether an all-reduce
  succeeded, so under load one member can fail while the others succeed and leave. Each member
  publishes its verdict on the group in the DHT, and succeeds only when every member's verdict is
  clean (`_SwarmAverager`). A failure is thus seen by the whole group, which retries together with the
  same bodies (`fuse` re-copies the untouched body) until the deadline.
* **Robust reducers** (`robust_reduce`): each reducer fuses its parts with the run's AggregationConfig
  rather than hivemind's mean of declared weights; a contribution holding NaN is left out (the same on
  every reducer, so not a partial result), not a reason for the all-reduce to fail.
* **Moshpit rounds** (`fuse(..., plan=)`, `moshpit.py`): a boundary with more peers than one group
  fuses in d rounds of small groups, each cell of the grid under its own group bits; every round is
  weighted by what the previous one fused, so a full grid ends with the weighted global mean.
* **State sharing for late joiners** (`set_shared_state` / `download_state`), with the iteration as
  hivemind's `state_sharing_priority`, so the newest donor is asked first.
* **Members only, in a private swarm** (`secret`): the averager publishes this peer's member tag and
  serves its averaging RPCs only to callers with a valid one (`p2pcold.swarm.auth`).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import math
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.averaging.partition import AllreduceException
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.streaming import combine_from_streaming
from hivemind.compression import NoCompression
from hivemind.p2p import P2PContext
from hivemind.utils.asyncio import as_aiter, azip
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.config import AggregationConfig, SwarmConfig, validate_swarm_config
from p2pcold.swarm import _procs
from p2pcold.swarm import dht as swarm_dht
from p2pcold.swarm.auth import MemberGate, MemberTag, RunSecret
from p2pcold.swarm.compression import install_codec, make_compression
from p2pcold.swarm.identity import body_schema_hash
from p2pcold.swarm.moshpit import MoshpitPlan, round_group_bits
from p2pcold.swarm.robust_reduce import RobustAllReduceRunner, part_size_bytes
from p2pcold.swarm.records import owner_peer_id, record_owner
from p2pcold.swarm.state_check import StateCheck
from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)

ITERATION_BITS = 32  # group bits per key: iterations 0 .. 2**32-1
MAX_DONORS_ASKED = 8  # a state download asks at most this many donors in turn
# A member re-reads its group's verdicts this often (at most poll_interval): they land within about a
# second of each other, and each read sooner ends the boundary sooner on every member.
VERDICT_READ_INTERVAL_S = 0.1
_ABORTED = "stopped looking for a group: the caller's abort check fired"
_GATHER_VERSION = 1


def averaging_prefix(run_id: str) -> str:
    """hivemind's averaging prefix for a run: no dots allowed, unique per run id."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", run_id)[:40]
    return f"p2pcold-{readable}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def iteration_group_bits(iteration: int) -> str:
    if not 0 <= iteration < 2**ITERATION_BITS:
        raise P2PColdError(f"swarm: iteration {iteration} is outside 0..2**{ITERATION_BITS}-1")
    return format(iteration, f"0{ITERATION_BITS}b")


class FusionStatus(str, enum.Enum):
    OK = "ok"  # fused with a group; `averaged` holds the group's body under the run's aggregation rule
    NO_GROUP = "no_group"  # no other peer at this iteration before the deadline
    FAILED = "failed"  # a group formed, but no all-reduce attempt completed cleanly before the deadline
    ABORTED = "aborted"  # the caller's `abort` check said to stop looking (e.g. the swarm moved on)


@dataclass
class GroupMember:
    peer_id: str
    weight: float
    metadata: dict


@dataclass
class FusionResult:
    """Outcome of one `BodyAverager.fuse` call."""

    status: FusionStatus
    iteration: int
    averaged: dict[str, torch.Tensor] | None  # the fused body (new tensors; fusion.aggregate's rule); None unless OK
    group_size: int = 0  # peers in the group that produced `averaged` (0 unless OK)
    members: dict[str, GroupMember] = field(default_factory=dict)  # by peer id, this peer included
    total_weight: float = 0.0
    attempts: int = 0  # all-reduce attempts (matchmaking rounds) made
    elapsed_s: float = 0.0
    reason: str = ""  # why it is not OK (last failure), for logs
    rounds: list[str] = field(default_factory=list)  # Moshpit rounds: each round's status, or "alone" (a cell of one)

    @property
    def ok(self) -> bool:
        return self.status is FusionStatus.OK


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


def cancel_step(control: StepControl) -> None:
    """Cancel a step so that its matchmaking stops. hivemind's `StepControl.cancel()` wakes the averager
    (its cancel future) before it marks the step cancelled; a step woken in between finds it not
    cancelled and looks on, under whatever key is current, until its deadline."""
    MPFuture.cancel(control)  # the shared state first: hivemind's check reads it
    control.cancel()


def verdict_key(prefix: str, group_id: bytes) -> str:
    """The DHT key under which the members of one all-reduce group publish their verdicts."""
    return f"{prefix}.verdict.{group_id.hex()}"


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

    def __init__(self, *args, state_provider, swarm_config: SwarmConfig, member_gate: MemberGate | None, aggregation: AggregationConfig, **kwargs):
        self._state_provider = state_provider
        self._swarm_config = swarm_config
        self._member_gate = member_gate
        self._aggregation = aggregation
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
        kwargs = dict(group_bits=group_bits, target_size=target_size, min_size=min_size, settle_s=settle_s, future=future)
        self._outer_pipe.send(("_set_group", [], kwargs))
        return future

    async def _set_group(self, group_bits: str, target_size: int | None, min_size: int, settle_s: float, future: MPFuture) -> None:
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
        self._outer_pipe.send(("_download_state_from", [], dict(donor=donor, chunk_timeout=chunk_timeout, max_bytes=max_bytes, future=future)))
        return future

    async def _download_state_from(self, donor: str, chunk_timeout: float, max_bytes: int, future: MPFuture) -> None:
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
            problem = f"the all-reduce did not finish within allreduce_timeout ({config.allreduce_timeout:.0f} s)"
        except AllreduceException as e:
            problem = str(e) or "the all-reduce failed"
        except Exception as e:  # the P2P errors of a broken stream
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        key = verdict_key(self.prefix, group_id)
        await self._publish_verdict(key, problem)
        if problem:
            raise AllreduceException(problem)
        members = [str(peer) for peer in group_info.peer_ids]
        await self._await_clean_verdicts(key, members, until=began + verdict_wait_s(config))

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

    async def _publish_verdict(self, key: str, problem: str) -> None:
        timeout = self._swarm_config.dht_request_timeout
        verdict = {"clean": not problem, "reason": problem[:300]}
        try:
            await asyncio.wait_for(
                self.dht.store(
                    key,
                    verdict,
                    expiration_time=get_dht_time() + verdict_wait_s(self._swarm_config) + timeout,
                    subkey=record_owner(self.dht),  # owned: no other member can write this member's verdict
                    return_future=True,
                ),
                timeout,
            )
        except Exception as e:  # a timeout or a DHT error: the others then miss this verdict and fail
            logger.warning("the verdict on an all-reduce was not stored within %.1f s (%r)", timeout, e)

    async def _await_clean_verdicts(self, key: str, members: list[str], until: float) -> None:
        """Return once every member published a clean verdict; raise on a failed or a missing one."""
        config = self._swarm_config
        while True:
            verdicts = await self._read_verdicts(key)
            failed = {peer: verdicts[peer] for peer in members if verdict_failed(verdicts.get(peer))}
            if failed:
                peer, verdict = next(iter(failed.items()))
                reason = verdict.get("reason") if isinstance(verdict, dict) else None
                raise AllreduceException(f"group member {peer} saw the all-reduce fail: {reason or verdict!r}")
            missing = [peer for peer in members if peer not in verdicts]
            if not missing:
                return
            if time.monotonic() >= until:
                raise AllreduceException(
                    f"no verdict from {', '.join(missing)} within {verdict_wait_s(config):.0f} s of the all-reduce"
                )
            await asyncio.sleep(min(config.poll_interval, VERDICT_READ_INTERVAL_S, max(0.0, until - time.monotonic())))

    async def _read_verdicts(self, key: str) -> dict[str, Any]:
        try:
            found = await asyncio.wait_for(
                self.dht.get(key, latest=True, return_future=True), self._swarm_config.dht_request_timeout
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


def _contributors(gathered: Mapping, direct: dict[str, GroupMember]) -> dict[str, GroupMember]:
    """Everyone whose body a group's result holds: its members, and in Moshpit rounds whoever each
    member had folded in before (the "folded" list it gathered: peer id, its own weight, metadata)."""
    everyone: dict[str, GroupMember] = {}
    for info in gathered.values():
        for entry in info.get("folded") or ():
            if isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[2], dict):
                peer, weight, metadata = entry
                if isinstance(weight, (int, float)):
                    everyone.setdefault(peer, GroupMember(peer, float(weight), dict(metadata)))
    for peer, member in direct.items():
        everyone.setdefault(peer, member)
    return everyone


def verdict_failed(verdict: Any) -> bool:
    """A published verdict that is not a clean one (a malformed verdict counts as a failure)."""
    return verdict is not None and not (isinstance(verdict, dict) and verdict.get("clean") is True)


class BodyAverager:
    """All-reduce averaging of one fused body (a dict of float tensors) with peers at the same iteration.

    `template` fixes the fused parameters (names, shapes); any values. `reference` (optional, same
    schema; typically θ0, which every peer of a run shares by its identity): the all-reduce then
    averages `body - reference` and adds it back. That is the same weighted mean, but lossy
    compression errors become proportional to how far finetuning moved the weights instead of to the
    weights themselves (8-bit quantization of raw weights is not usable; see docs).

    `secret`: the run secret of a private swarm (the same one `start_dht` got): this peer's member tag
    is published, and only members may join its groups, send it parts or download its state.
    `aggregation` (default AggregationConfig()): how the reducers fuse the group's contributions
    (`p2pcold.fusion.aggregate_block`: capped weights, NaN left out, trimmed mean from 4 contributors);
    every member of a run must pass the same one (it is in the run contract).

    The averager's background process is started in the constructor (bounded by
    `config.local_rpc_timeout`). Call `shutdown()` when done (also a context manager).
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        template: Mapping[str, torch.Tensor],
        config: SwarmConfig,
        *,
        reference: Mapping[str, torch.Tensor] | None = None,
        client_mode: bool | None = None,
        secret: RunSecret | None = None,
        aggregation: AggregationConfig | None = None,
    ):
        validate_swarm_config(config)
        if not template:
            raise P2PColdError("swarm: the body to fuse has no tensors")
        for name, tensor in template.items():
            if not torch.is_floating_point(tensor):
                raise P2PColdError(f"swarm: body tensor {name!r} is {tensor.dtype}; only float tensors can be fused")
        self.config, self.run_id, self._dht = config, run_id, dht
        self._names = sorted(template)  # the averaged tensors' order, identical on every peer
        self._order = list(template)  # the caller's order, used for returned bodies
        self._shapes = {name: tuple(template[name].shape) for name in self._names}
        self._dtypes = {name: template[name].dtype for name in self._names}
        self.schema_hash = body_schema_hash(template)
        self._reference: dict[str, torch.Tensor] | None = None
        if reference is not None:
            self._check_schema(reference, "reference")
            self._reference = {n: reference[n].detach().to("cpu", torch.float32).clone() for n in self._names}
        if config.compression != "none" and reference is None:
            logger.warning(
                "swarm: %s compression of raw weights loses more than finetuning changes them; pass reference=θ0",
                config.compression,
            )
        self.prefix = averaging_prefix(run_id)
        self._tensors = [torch.zeros(self._shapes[name], dtype=torch.float32) for name in self._names]

        # what an honest donor streams for this body (float32, uncompressed), with room for the framing
        self._state_bytes = 2 * sum(4 * math.prod(shape) for shape in self._shapes.values()) + 2**20
        self._state_lock = threading.Lock()
        self._shared: tuple[int, tuple[torch.Tensor, ...]] | None = None
        if client_mode is None:
            client_mode = swarm_dht.is_client_mode(dht, config.local_rpc_timeout)
        self.client_mode = client_mode
        self.peer_id = str(dht.peer_id)
        # a private swarm: this peer's tag proves its membership to the others' averagers, and its own
        # averager checks theirs (the tag is stored before the first RPC this peer makes)
        self._member_tag = None if secret is None else MemberTag(secret, self.prefix, self.peer_id)
        compression = make_compression(config.compression)
        self._averager = _SwarmAverager(
            self._tensors,
            dht,
            start=False,
            state_provider=self._current_state,
            swarm_config=config,
            member_gate=None if secret is None else MemberGate(secret, self.prefix, config.dht_request_timeout),
            aggregation=aggregation or AggregationConfig(),
            prefix=self.prefix,
            target_group_size=config.target_group_size,
            min_group_size=config.min_group_size,
            initial_group_bits=iteration_group_bits(0),
            min_matchmaking_time=config.matchmaking_time,
            request_timeout=config.request_timeout,
            allreduce_timeout=group_step_timeout_s(config),
            next_chunk_timeout=config.next_chunk_timeout,
            sender_timeout=config.next_chunk_timeout,
            reducer_timeout=2 * config.next_chunk_timeout,
            compression=compression,
            part_size_bytes=part_size_bytes(compression),  # parts = fusion.BLOCK_VALUES values each
            state_compression=NoCompression(),  # late joiners get the exact fused body
            allow_state_sharing=False,  # switched on by the first set_shared_state
            declare_state_period=config.state_declare_period,
            client_mode=client_mode,
            shutdown_timeout=config.shutdown_timeout,
        )
        self._start_averager()
        self._publish_member_tag()

    def _start_averager(self) -> None:
        # hivemind's run_in_background() sets SIGINT to SIG_IGN in the *calling* process for good (so that
        # the forked child ignores Ctrl-C) and only works from the main thread. Do the same for the child
        # only: ignore SIGINT around the fork, then restore the caller's handler.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            self._averager.start()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
        try:
            self._averager.wait_until_ready(timeout=self.config.local_rpc_timeout)
        except BaseException as e:
            self.shutdown(stop_dht=False)
            if not isinstance(e, Exception):
                raise  # KeyboardInterrupt, the CLI's SIGTERM: not a start-up failure
            raise P2PColdError(f"swarm: the averager process did not start: {str(e) or type(e).__name__}") from None

    def _publish_member_tag(self) -> None:
        if self._member_tag is not None:
            self._member_tag.publish_if_due(self._dht, self.config.dht_request_timeout)
            self._averager.read_member_tags()

    # ------------------------------------------------------------------ fusion

    def group_key(self, iteration: int) -> str:
        """The DHT key peers at `iteration` meet under (hivemind's `<prefix>.0b<bits>`)."""
        return f"{self.prefix}.0b{iteration_group_bits(iteration)}"

    def fuse(
        self,
        body: Mapping[str, torch.Tensor],
        iteration: int,
        weight: float,
        deadline_s: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        share_result: bool = True,
        abort: Callable[[], bool] | None = None,
        plan: MoshpitPlan | None = None,
        expected_size: int | None = None,
        reference: Mapping[str, torch.Tensor] | None = None,
    ) -> FusionResult:
        """Average `body` with the peers at the same `iteration`; blocks at most about
        `deadline_s + group_step_timeout_s(config) + local_rpc_timeout` seconds (per round, with `plan`).

        `deadline_s` (default `config.boundary_deadline`) is how long to keep looking for a group;
        it must exceed `config.matchmaking_time`. `weight` >= 0 is this peer's share in the weighted
        mean; 0 receives the average without contributing to it. `metadata` (small, msgpack-able:
        dataset name, example count...) is gathered from every member into `FusionResult.members`.
        On OK the result is also served to late joiners (`set_shared_state`) unless `share_result`
        is False. `body` itself is never modified.

        `abort` (optional) is called about every `config.poll_interval` s while this peer is still
        looking for a group (never once an all-reduce began); when it returns True the search is
        cancelled and the result is ABORTED. A peer uses it to stop waiting at a boundary that the
        rest of the swarm has already left.

        `plan` (optional, `moshpit.plan_rounds`): a boundary larger than one group fuses in Moshpit
        rounds (`_fuse_rounds`); without one, or with a single round, everyone at `iteration` meets
        under one key.

        `expected_size` (optional): the members one group is expected to have, this peer included (the
        peers a boundary's records show there, the Repository's ready contributors). The group then
        assembles as soon as they are all in instead of when `matchmaking_time` runs out; with fewer,
        it still assembles then. Without it (or with a `plan`), config.target_group_size caps a group.

        `reference` (optional, the fused schema): this call's reference instead of the constructor's. A
        lossy compression's peers pass the base of the iteration being fused (θ_i, which the members share
        up to the compression's own error), so that only this iteration's update is quantized
        (`compression.fuse_reference`).
        """
        deadline_s = self.config.boundary_deadline if deadline_s is None else float(deadline_s)
        if deadline_s <= self.config.matchmaking_time:
            raise P2PColdError(
                f"swarm: fuse deadline {deadline_s:.1f} s must exceed matchmaking_time={self.config.matchmaking_time} s"
            )
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise P2PColdError(f"swarm: fusion weight must be a finite number >= 0, got {weight!r}")
        self._check_schema(body, "body")
        bits = iteration_group_bits(iteration)
        gather = {"v": _GATHER_VERSION, "iteration": iteration, "weight": float(weight), "metadata": dict(metadata or {})}
        try:
            MSGPackSerializer.dumps(gather)
        except Exception as e:
            raise P2PColdError(f"swarm: fusion metadata is not serializable with msgpack ({e})") from None

        started = time.monotonic()
        end = started + deadline_s
        self._publish_member_tag()
        kept_reference = self._reference
        if reference is not None:
            self._check_schema(reference, "reference")
            self._reference = {n: reference[n].detach().to("cpu", torch.float32) for n in self._names}
        try:
            if plan is None or plan.single_group:
                result = self._fuse_group(body, iteration, bits, float(weight), gather, end, abort, expected_size=expected_size)
            else:
                result = self._fuse_rounds(body, iteration, float(weight), gather, end, abort, plan)
        finally:
            self._reference = kept_reference
        result.elapsed_s = time.monotonic() - started
        if share_result and result.averaged is not None:
            self.set_shared_state(iteration, result.averaged)
        return result

    def _fuse_rounds(self, body, iteration, weight, gather, end, abort, plan: MoshpitPlan) -> FusionResult:
        """Moshpit rounds: round r fuses the body of round r-1 in this peer's cell of round r, weighted by
        the total weight its previous group fused, so that a full grid ends with the weighted global mean.
        Each round has an equal share of the time left. A round that finds no group or fails keeps the
        current body and weight for the next one: a lost member costs its group's round only."""
        current, current_weight = body, weight
        members = {self.peer_id: GroupMember(self.peer_id, weight, gather["metadata"])}  # whose bodies `current` holds
        attempts, outcomes, fused, status, reason = 0, [], False, FusionStatus.NO_GROUP, ""
        for group in plan.rounds:
            if len(group.members) < 2:
                outcomes.append("alone")
                continue
            now = time.monotonic()
            round_end = now + (end - now) / (len(plan.rounds) - group.index)
            if round_end - now <= self.config.matchmaking_time + 0.1:
                outcomes.append(FusionStatus.NO_GROUP.value)
                reason = f"no time left for round {group.index}"
                continue
            # "folded": who this member's body already holds, so that the last round knows everyone who fused
            folded = [[m.peer_id, m.weight, m.metadata] for m in members.values()]
            round_gather = {**gather, "weight": current_weight, "round": group.index, "folded": folded}
            bits = round_group_bits(iteration_group_bits(iteration), plan, group.index)
            # once this peer fused in a round, others that finish their last round before it are the rounds'
            # normal course, not a swarm that left the boundary: `abort` is for a peer that fused nowhere yet
            round_abort = None if fused else abort
            result = self._fuse_group(current, iteration, bits, current_weight, round_gather, round_end, round_abort, cell_size=len(group.members))
            attempts += result.attempts
            outcomes.append(result.status.value)
            if result.ok:
                current, current_weight, fused = result.averaged, result.total_weight, True
                members.update(result.members)
                continue
            reason = f"round {group.index}: {result.reason}"
            if result.status is FusionStatus.ABORTED:
                status = FusionStatus.ABORTED
                break
            if result.status is FusionStatus.FAILED:
                status = FusionStatus.FAILED
            logger.warning("fusion at iteration %d: %s; the next round goes on with this peer's current body", iteration, reason)
        if not fused:
            return FusionResult(status=status, iteration=iteration, averaged=None, attempts=attempts, reason=reason, rounds=outcomes)
        return FusionResult(
            status=FusionStatus.OK,
            iteration=iteration,
            averaged=dict(current),
            group_size=len(members),
            members=members,
            total_weight=current_weight,
            attempts=attempts,
            reason=reason,
            rounds=outcomes,
        )

    def _fuse_group(self, body, iteration, bits, weight, gather, end, abort, cell_size: int | None = None, expected_size: int | None = None) -> FusionResult:
        """Fuse with the group under `bits` until `end`, retrying a failed group with the same body.

        `cell_size`: a Moshpit cell's members. For the first half of the time left only the whole cell
        assembles: a smaller group would be a split cell (two leaders, each with part of the members,
        both fusing a partial mean) as often as a cell with a lost member. After that, whoever of the
        cell is there (at least min_group_size) fuses. `expected_size`: see `fuse`."""
        attempts, status, reason = 0, FusionStatus.NO_GROUP, "no other peer at this iteration before the deadline"
        whole_cell_until = None if cell_size is None else time.monotonic() + (end - time.monotonic()) / 2
        # an attempt needs at least one matchmaking window (hivemind asserts scheduled time < deadline)
        while end - time.monotonic() > self.config.matchmaking_time + 0.1:
            attempts += 1
            whole_cell = whole_cell_until is not None and whole_cell_until - time.monotonic() > self.config.matchmaking_time + 0.1
            if cell_size is not None:
                group = (cell_size, cell_size if whole_cell else min(self.config.min_group_size, cell_size))
            elif expected_size is not None:
                group = (max(expected_size, self.config.min_group_size), self.config.min_group_size)
            else:
                group = None
            outcome = self._attempt(body, iteration, bits, weight, gather, whole_cell_until if whole_cell else end, abort, group)
            if isinstance(outcome, FusionResult):
                outcome.attempts = attempts
                return outcome
            began_allreduce, message = outcome
            reason = message
            if message is _ABORTED:
                status = FusionStatus.ABORTED
                break
            if not began_allreduce and "could not find a group" in message:
                if whole_cell:
                    continue  # not all of the cell came: from now on the members that did will do
                break  # the step already waited for a group until the (retry) deadline
            if began_allreduce:
                # Every member of the group saw this failure too (the verdicts): they all retry with
                # their same bodies until the deadline, so the retry keeps the whole remaining window.
                status = FusionStatus.FAILED
            logger.warning("fusion at iteration %d, attempt %d failed: %s; retrying", iteration, attempts, message)
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
        return FusionResult(status=status, iteration=iteration, averaged=None, attempts=attempts, reason=reason)

    def _attempt(self, body, iteration, bits, weight, gather, end, abort=None, group=None) -> FusionResult | tuple[bool, str]:
        """One matchmaking + all-reduce round: a FusionResult on success, else (began_allreduce, reason).
        `group`: (target, minimum) group size of a Moshpit cell; None: the config's."""
        if not self._averager.is_alive():
            raise P2PColdError("swarm: the averager process is not running (shut down or crashed)")
        if not self._write_tensors(body, end - time.monotonic()):
            return False, "the averaged tensors stayed locked by a previous all-reduce"
        target_size, min_size = (self.config.target_group_size, self.config.min_group_size) if group is None else group
        settle_s = max(0.0, min(self.config.local_rpc_timeout / 2, end - time.monotonic()))
        try:
            settled = self._averager.set_group(bits, target_size, min_size, settle_s).result(timeout=self.config.local_rpc_timeout)
        except TimeoutError:
            return False, f"the averager process did not answer within {self.config.local_rpc_timeout:.0f} s"
        if not settled:
            return False, f"a cancelled step's matchmaking was still running after {settle_s:.1f} s"
        remaining = end - time.monotonic()
        if remaining <= self.config.matchmaking_time + 0.05:  # hivemind asserts scheduled time < deadline
            return False, "could not find a group before the deadline"
        control = self._averager.step(gather=gather, weight=weight, timeout=remaining, allow_retries=False, wait=False)
        bound = remaining + group_step_timeout_s(self.config) + self.config.local_rpc_timeout
        give_up = time.monotonic() + bound
        try:
            while True:
                wait_s = max(0.0, give_up - time.monotonic())
                if abort is not None:
                    wait_s = min(wait_s, self.config.poll_interval)
                try:
                    gathered = control.result(timeout=wait_s)
                    break
                except TimeoutError:
                    if control.done():
                        raise  # the step itself failed with a TimeoutError
                    if time.monotonic() >= give_up:
                        cancel_step(control)
                        return control.began_allreduce, f"the averaging step did not finish within {bound:.0f} s"
                    if abort is not None and not control.began_allreduce and abort() and not control.began_allreduce:
                        cancel_step(control)
                        return False, _ABORTED
        except (Exception, asyncio.CancelledError) as e:
            # hivemind raises AllreduceException / MatchmakingException / TimeoutError, and CancelledError
            # (a BaseException) when the matchmaking of a step cancelled just before (an abort) is still
            # winding down as this one starts; each is one failed attempt, retried within the deadline.
            return control.began_allreduce, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

        members: dict[str, GroupMember] = {}
        for peer, info in (gathered or {}).items():
            if not isinstance(info, dict) or info.get("iteration") != iteration:
                return True, f"group member {peer} sent malformed metadata or another iteration: {info!r}"
            members[str(peer)] = GroupMember(str(peer), float(info.get("weight", 0.0)), dict(info.get("metadata") or {}))
        total_weight = sum(member.weight for member in members.values())
        members = _contributors(gathered, members)
        if total_weight <= 0:
            return True, "no member of the group contributed (all weights are 0)"
        averaged = self._read_tensors()
        if averaged is None:
            return True, "the averaged tensors stayed locked"
        if not all(bool(torch.isfinite(t).all()) for t in averaged.values()):
            return True, "the all-reduce produced non-finite values"
        return FusionResult(
            status=FusionStatus.OK,
            iteration=iteration,
            averaged={name: averaged[name] for name in body},  # the caller's name order
            group_size=len(members),
            members=members,
            total_weight=total_weight,
        )

    def _write_tensors(self, body, timeout: float) -> bool:
        lock = self._averager.lock_averaged_tensors
        if not lock.acquire(timeout=max(0.0, min(timeout, self.config.allreduce_timeout))):
            return False
        try:
            # One pass per tensor, straight into the shared buffer (benchmarks: the copies around the
            # all-reduce are the part of a fusion round that bare hivemind does not have).
            for name, tensor in zip(self._names, self._tensors):
                value = body[name].detach().to("cpu", torch.float32)
                if self._reference is not None:
                    torch.sub(value, self._reference[name], out=tensor)
                else:
                    tensor.copy_(value)
        finally:
            lock.release()
        return True

    def _read_tensors(self) -> dict[str, torch.Tensor] | None:
        lock = self._averager.lock_averaged_tensors
        if not lock.acquire(timeout=self.config.local_rpc_timeout):
            return None
        try:
            out = {}
            for name, tensor in zip(self._names, self._tensors):
                value = torch.add(tensor, self._reference[name]) if self._reference is not None else tensor.clone()
                out[name] = value.to(self._dtypes[name])
            return out
        finally:
            lock.release()

    def _check_schema(self, body: Mapping[str, torch.Tensor], what: str) -> None:
        names = sorted(body)
        if names != self._names:
            missing, extra = sorted(set(self._names) - set(names)), sorted(set(names) - set(self._names))
            raise P2PColdError(f"swarm: {what} does not match the fused schema (missing {missing[:5]}, extra {extra[:5]})")
        for name in names:
            if tuple(body[name].shape) != self._shapes[name]:
                raise P2PColdError(
                    f"swarm: {what} tensor {name!r} has shape {tuple(body[name].shape)}, expected {self._shapes[name]}"
                )

    # ------------------------------------------------------------------ state sharing

    def set_shared_state(self, iteration: int, body: Mapping[str, torch.Tensor]) -> None:
        """Serve `body` (the fused body of boundary `iteration`) to peers calling `download_state`.

        The newest iteration is announced as this donor's priority, so downloaders ask it first.
        A client-mode peer keeps the state but cannot serve it (nobody can dial it).
        """
        iteration_group_bits(iteration)  # range check
        self._check_schema(body, "shared body")
        tensors = tuple(body[name].detach().to("cpu", torch.float32).clone().contiguous() for name in self._names)
        with self._state_lock:
            self._shared = (iteration, tensors)
        if not self.client_mode:
            self._averager.state_sharing_priority = float(iteration)
            self._averager.allow_state_sharing = True

    @property
    def shared_iteration(self) -> int | None:
        with self._state_lock:
            return None if self._shared is None else self._shared[0]

    def _current_state(self):
        with self._state_lock:
            if self._shared is None:
                # hivemind only asks when sharing is on; answer with nothing usable just in case
                return {"v": _GATHER_VERSION, "iteration": -1, "schema": self.schema_hash}, ()
            iteration, tensors = self._shared
        return {"v": _GATHER_VERSION, "iteration": iteration, "schema": self.schema_hash}, tensors

    def download_state(self, timeout: float | None = None, check: StateCheck | None = None) -> tuple[int, dict[str, torch.Tensor]] | None:
        """Download a fused body from a donor: (iteration, body), or None.

        Donors are asked one at a time in order of the iteration they announce (highest first), at most
        MAX_DONORS_ASKED of them, until one serves a state that matches this run's schema and passes
        `check` (state_check.StateCheck: iteration bounds, finite values, a trusted hash); each refused
        donor is one warning line naming it. Returns None when no donor is known, none served an
        acceptable state, or `timeout` (default `config.state_download_timeout`) passed; each chunk
        must arrive within `config.next_chunk_timeout`.
        """
        timeout = self.config.state_download_timeout if timeout is None else float(timeout)
        if not self._averager.is_alive():
            raise P2PColdError("swarm: the averager process is not running (shut down or crashed)")
        if check is not None and not check.worth_asking():
            return None
        end = time.monotonic() + timeout
        donors = [d for d in self._donors(min(timeout, self.config.dht_request_timeout)) if check is None or check.may_ask(d)]
        for donor in donors[:MAX_DONORS_ASKED]:
            remaining = end - time.monotonic()
            if remaining <= 0:
                logger.warning("no acceptable state downloaded within %.0f s", timeout)
                return None
            future = self._averager.download_state_from(donor, self.config.next_chunk_timeout, self._state_bytes)
            try:
                loaded = future.result(timeout=remaining + self.config.local_rpc_timeout)
            except TimeoutError:
                future.cancel()
                logger.warning("state download from %s did not finish within %.0f s", donor, remaining)
                continue
            if isinstance(loaded, str):
                logger.warning("state download from %s failed: %s", donor, loaded)
                continue
            state, problem = self._parse_state(*loaded)
            if state is not None and check is not None:
                problem = check.problem(*state)
            if problem:
                logger.warning("refusing the state served by %s: %s", donor, problem)
                continue
            return state
        return None

    def _donors(self, timeout: float) -> list[str]:
        """Peer ids of the state donors announced in the DHT, newest announced iteration first (self excluded)."""
        future = self._dht.get(f"{self.prefix}.all_averagers", latest=True, return_future=True)
        try:
            found = future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            return []
        if found is None or not isinstance(found.value, dict):
            return []
        priority = {}
        for subkey, item in found.value.items():
            try:
                peer = str(PeerID(subkey)) if isinstance(subkey, bytes) else None
            except Exception:  # not a peer id (a record someone made up)
                peer = None
            if peer is not None and peer != self.peer_id and isinstance(item.value, (int, float)) and math.isfinite(item.value):
                priority[peer] = float(item.value)
        return sorted(priority, key=lambda peer: (-priority[peer], random.random()))

    def _parse_state(self, metadata, tensors) -> tuple[tuple[int, dict[str, torch.Tensor]] | None, str]:
        """(iteration, body) from what a donor served, or (None, why not)."""
        if not (
            isinstance(metadata, dict)
            and isinstance(metadata.get("iteration"), int)
            and 0 <= metadata["iteration"] < 2**ITERATION_BITS
            and metadata.get("schema") == self.schema_hash
            and len(tensors) == len(self._names)
            and all(tuple(t.shape) == self._shapes[n] for n, t in zip(self._names, tensors))
        ):
            return None, f"it does not match this run's schema (metadata {str(metadata)[:200]})"
        by_name = dict(zip(self._names, tensors))
        return (metadata["iteration"], {name: by_name[name].to(self._dtypes[name]) for name in self._order}), ""

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self, stop_dht: bool = True) -> None:
        """Stop the averager process and (by default) the DHT process and its p2pd daemon.

        Bounded: each is given `config.shutdown_timeout` s to stop gracefully, then killed.
        """
        averager = self._averager
        if averager.is_alive():
            try:
                averager.shutdown()  # graceful; hivemind joins shutdown_timeout, then SIGTERMs
            except (OSError, ValueError) as e:
                logger.debug("averager shutdown: %s", e)
            averager.join(1.0)
            if averager.is_alive():
                averager.kill()
                averager.join(1.0)
        if stop_dht:
            swarm_dht.stop_dht(self._dht, grace_s=self.config.shutdown_timeout)

    def __enter__(self) -> "BodyAverager":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

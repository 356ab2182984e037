"""Fusing the shared body with whoever else is at the same iteration boundary, over hivemind.

`BodyAverager` wraps one `hivemind.averaging.DecentralizedAverager` (a background process that owns
shared-memory float32 copies of the body tensors, in sorted name order) and adds what CoLD Fusion
needs on top of it. It composes one component per job:

* **The iteration is part of the group key** (`group_key.py`). hivemind matchmaking only pairs peers
  that declare the same key `<prefix>.0b<group bits>` in the DHT, and a leader rejects a join request
  whose key differs from its own (BAD_GROUP_KEY). Before every step the group bits are set to the
  32-bit binary iteration number, so peers at different iterations can never average together.
  (hivemind rotates the bits after each assembled group; resetting them before each step undoes that.)
* **A typed outcome instead of exceptions** (`fusion_result.py`). `fuse` returns a `FusionResult` whose
  status is OK, NO_GROUP (nobody else at this iteration before the deadline) or FAILED (groups formed,
  but every all-reduce failed or was partial); the caller falls back to `download_state` or its local body.
* **No silent partial averages** (`swarm_averager.py`). When a group member dies or stalls mid-way,
  hivemind's all-reduce still "succeeds": the missing member's slice of the vector keeps each survivor's
  *local* values, and senders that stopped are dropped from the remaining parts. Members would then hold
  different bodies. The averager detects both cases on its own side and fails the attempt.
* **One outcome per group** (`verdicts.py`). hivemind lets each member decide on its own whether an
  all-reduce succeeded, so under load one member can fail while the others succeed and leave. Each
  member publishes its verdict on the group in the DHT, and succeeds only when every member's verdict is
  clean. A failure is thus seen by the whole group, which retries together with the same bodies
  (`group_fusion.py` re-copies the untouched body) until the deadline.
* **Robust reducers** (`robust_reduce.py`): each reducer fuses its parts with the run's AggregationConfig
  rather than hivemind's mean of declared weights; a contribution holding NaN is left out (the same on
  every reducer, so not a partial result), not a reason for the all-reduce to fail.
* **Moshpit rounds** (`fuse(..., plan=)`, `group_fusion.py`, `moshpit.py`): a boundary with more peers
  than one group fuses in d rounds of small groups, each cell of the grid under its own group bits; every
  round is weighted by what the previous one fused, so a full grid ends with the weighted global mean.
* **The copies in and out of shared memory** (`body_tensors.py`), with the body's schema.
* **State sharing for late joiners** (`set_shared_state` / `download_state`, `state_sharing.py`), with
  the iteration as hivemind's `state_sharing_priority`, so the newest donor is asked first.
* **Members only, in a private swarm** (`secret`): the averager publishes this peer's member tag and
  serves its averaging RPCs only to callers with a valid one (`p2pcold.swarm.auth`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

import hivemind
import torch
from hivemind.compression import NoCompression

from p2pcold.config import AggregationConfig, SwarmConfig, validate_swarm_config
from p2pcold.swarm import dht as swarm_dht
from p2pcold.swarm.auth import MemberGate, MemberTag, RunSecret
from p2pcold.swarm.body_tensors import BodySchema, SharedTensors
from p2pcold.swarm.compression import make_compression
from p2pcold.swarm.fusion_result import FusionResult
from p2pcold.swarm.group_fusion import GroupFusion, gather_metadata
from p2pcold.swarm.group_key import averaging_prefix, group_key, iteration_group_bits
from p2pcold.swarm.moshpit import MoshpitPlan
from p2pcold.swarm.robust_reduce import part_size_bytes
from p2pcold.swarm.state_check import StateCheck
from p2pcold.swarm.state_sharing import ServedState, State, StateDownloader
from p2pcold.swarm.swarm_averager import _SwarmAverager, start_averager, stop_averager
from p2pcold.swarm.verdicts import GroupVerdicts, group_step_timeout_s
from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)


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
        self.config, self.run_id, self._dht = config, run_id, dht
        self._schema = BodySchema(template)
        self.schema_hash = self._schema.hash
        self._tensors = SharedTensors(self._schema, config, reference)
        if config.compression != "none" and reference is None:
            logger.warning(
                "swarm: %s compression of raw weights loses more than finetuning changes them; "
                "pass reference=θ0",
                config.compression,
            )
        self.prefix = averaging_prefix(run_id)
        self._served = ServedState(self._schema)
        if client_mode is None:
            client_mode = swarm_dht.is_client_mode(dht, config.local_rpc_timeout)
        self.client_mode = client_mode
        self.peer_id = str(dht.peer_id)
        # a private swarm: this peer's tag proves its membership to the others' averagers, and its own
        # averager checks theirs (the tag is stored before the first RPC this peer makes)
        self._member_tag = None if secret is None else MemberTag(secret, self.prefix, self.peer_id)
        self._averager = self._make_averager(secret, aggregation or AggregationConfig())
        self._fusion = GroupFusion(config, self._averager, self._tensors, self.peer_id)
        self._downloader = StateDownloader(
            self._averager, dht, self._schema, config, self.prefix, self.peer_id
        )
        start_averager(self._averager, config.local_rpc_timeout)
        self._publish_member_tag()

    def _make_averager(self, secret: RunSecret | None, aggregation: AggregationConfig) -> _SwarmAverager:
        """The averager process over this peer's shared tensors (not started yet)."""
        config, dht = self.config, self._dht
        gate = None if secret is None else MemberGate(secret, self.prefix, config.dht_request_timeout)
        compression = make_compression(config.compression)
        return _SwarmAverager(
            self._tensors.tensors,
            dht,
            start=False,
            state_provider=self._served.current,
            swarm_config=config,
            member_gate=gate,
            aggregation=aggregation,
            verdicts=GroupVerdicts(dht, config),
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
            client_mode=self.client_mode,
            shutdown_timeout=config.shutdown_timeout,
        )

    def _publish_member_tag(self) -> None:
        if self._member_tag is not None:
            self._member_tag.publish_if_due(self._dht, self.config.dht_request_timeout)
            self._averager.read_member_tags()

    # ------------------------------------------------------------------ fusion

    def group_key(self, iteration: int) -> str:
        """The DHT key peers at `iteration` meet under (hivemind's `<prefix>.0b<bits>`)."""
        return group_key(self.prefix, iteration)

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
        rounds (`GroupFusion.rounds`); without one, or with a single round, everyone at `iteration` meets
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
            window = f"matchmaking_time={self.config.matchmaking_time} s"
            raise P2PColdError(f"swarm: fuse deadline {deadline_s:.1f} s must exceed {window}")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise P2PColdError(f"swarm: fusion weight must be a finite number >= 0, got {weight!r}")
        self._schema.check(body, "body")
        iteration_group_bits(iteration)  # range check
        gather = gather_metadata(iteration, weight, metadata)

        started = time.monotonic()
        end = started + deadline_s
        self._publish_member_tag()
        with self._tensors.referenced_to(reference):
            result = self._fusion.fuse(body, iteration, float(weight), gather, end, abort, plan, expected_size)
        result.elapsed_s = time.monotonic() - started
        if share_result and result.averaged is not None:
            self.set_shared_state(iteration, result.averaged)
        return result

    # ------------------------------------------------------------------ state sharing

    def set_shared_state(self, iteration: int, body: Mapping[str, torch.Tensor]) -> None:
        """Serve `body` (the fused body of boundary `iteration`) to peers calling `download_state`.

        The newest iteration is announced as this donor's priority, so downloaders ask it first.
        A client-mode peer keeps the state but cannot serve it (nobody can dial it).
        """
        iteration_group_bits(iteration)  # range check
        self._schema.check(body, "shared body")
        self._served.set(iteration, body)
        if not self.client_mode:
            self._averager.state_sharing_priority = float(iteration)
            self._averager.allow_state_sharing = True

    @property
    def shared_iteration(self) -> int | None:
        return self._served.iteration

    def download_state(self, timeout: float | None = None, check: StateCheck | None = None) -> State | None:
        """Download a fused body from a donor: (iteration, body), or None.

        Donors are asked one at a time in order of the iteration they announce (highest first), at most
        MAX_DONORS_ASKED of them, until one serves a state that matches this run's schema and passes
        `check` (state_check.StateCheck: iteration bounds, finite values, a trusted hash); each refused
        donor is one warning line naming it. Returns None when no donor is known, none served an
        acceptable state, or `timeout` (default `config.state_download_timeout`) passed; each chunk
        must arrive within `config.next_chunk_timeout`.
        """
        return self._downloader.download(timeout, check)

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self, stop_dht: bool = True) -> None:
        """Stop the averager process and (by default) the DHT process and its p2pd daemon.

        Bounded: each is given `config.shutdown_timeout` s to stop gracefully, then killed.
        """
        stop_averager(self._averager)
        if stop_dht:
            swarm_dht.stop_dht(self._dht, grace_s=self.config.shutdown_timeout)

    def __enter__(self) -> "BodyAverager":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

"""State sharing for late joiners: the fused body this peer serves, and a download from other donors.

Donors announce the iteration they serve as hivemind's `state_sharing_priority` (under
`<prefix>.all_averagers`), so a downloader asks the newest donor first. Whatever a donor serves is
untrusted: it is bounded in bytes, checked against this run's schema (`parse_state`) and the caller's
`StateCheck`, and a refused donor is one warning line naming it.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Mapping

import hivemind
import torch
from hivemind.p2p import PeerID

from p2pcold.config import SwarmConfig
from p2pcold.swarm.body_tensors import BodySchema
from p2pcold.swarm.group_key import ITERATION_BITS
from p2pcold.swarm.state_check import StateCheck
from p2pcold.swarm.swarm_averager import _SwarmAverager, ensure_running
from p2pcold.utils import get_logger

logger = get_logger(__name__)

MAX_DONORS_ASKED = 8  # a state download asks at most this many donors in turn
STATE_VERSION = 1  # the "v" of the metadata a donor serves

State = tuple[int, dict[str, torch.Tensor]]  # (iteration, body)


def max_state_bytes(schema: BodySchema) -> int:
    """What an honest donor streams for this body (float32, uncompressed), with room for the framing."""
    return 2 * schema.float32_bytes + 2**20


def parse_state(schema: BodySchema, metadata, tensors) -> tuple[State | None, str]:
    """(iteration, body) from what a donor served, or (None, why not)."""
    if not (
        isinstance(metadata, dict)
        and isinstance(metadata.get("iteration"), int)
        and 0 <= metadata["iteration"] < 2**ITERATION_BITS
        and metadata.get("schema") == schema.hash
        and len(tensors) == len(schema.names)
        and all(tuple(t.shape) == schema.shapes[n] for n, t in zip(schema.names, tensors))
    ):
        return None, f"it does not match this run's schema (metadata {str(metadata)[:200]})"
    by_name = dict(zip(schema.names, tensors))
    return (metadata["iteration"], {name: by_name[name].to(schema.dtypes[name]) for name in schema.order}), ""


def donor_priorities(announced: Mapping, own_peer_id: str) -> list[str]:
    """Peer ids of the donors in a `<prefix>.all_averagers` record, newest announced iteration first
    (ties in random order); this peer, subkeys that are no peer id and non-finite priorities left out."""
    priority = {}
    for subkey, item in announced.items():
        try:
            peer = str(PeerID(subkey)) if isinstance(subkey, bytes) else None
        except Exception:  # not a peer id (a record someone made up)
            peer = None
        value = item.value
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if peer is not None and peer != own_peer_id and finite:
            priority[peer] = float(value)
    return sorted(priority, key=lambda peer: (-priority[peer], random.random()))


class ServedState:
    """The fused body this peer serves to late joiners, read by the averager's state requests (in
    hivemind's background thread, hence the lock)."""

    def __init__(self, schema: BodySchema):
        self.schema = schema
        self._lock = threading.Lock()
        self._shared: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def set(self, iteration: int, body: Mapping[str, torch.Tensor]) -> None:
        """Serve a float32 copy of `body` as the state of `iteration` (unchecked: the caller checks)."""
        names = self.schema.names
        tensors = tuple(body[name].detach().to("cpu", torch.float32).clone().contiguous() for name in names)
        with self._lock:
            self._shared = (iteration, tensors)

    @property
    def iteration(self) -> int | None:
        with self._lock:
            return None if self._shared is None else self._shared[0]

    def current(self) -> tuple[dict, tuple[torch.Tensor, ...]]:
        """(metadata, tensors) as hivemind's state provider serves them."""
        with self._lock:
            if self._shared is None:
                # hivemind only asks when sharing is on; answer with nothing usable just in case
                return {"v": STATE_VERSION, "iteration": -1, "schema": self.schema.hash}, ()
            iteration, tensors = self._shared
        return {"v": STATE_VERSION, "iteration": iteration, "schema": self.schema.hash}, tensors


class StateDownloader:
    """Downloads a fused body from the donors announced under `<prefix>.all_averagers`, one at a time."""

    def __init__(
        self,
        averager: _SwarmAverager,
        dht: hivemind.DHT,
        schema: BodySchema,
        config: SwarmConfig,
        prefix: str,
        peer_id: str,
    ):
        self.averager, self.dht, self.schema, self.config = averager, dht, schema, config
        self.prefix, self.peer_id = prefix, peer_id
        self.max_bytes = max_state_bytes(schema)

    def download(self, timeout: float | None = None, check: StateCheck | None = None) -> State | None:
        """See `BodyAverager.download_state`."""
        timeout = self.config.state_download_timeout if timeout is None else float(timeout)
        ensure_running(self.averager)
        if check is not None and not check.worth_asking():
            return None
        end = time.monotonic() + timeout
        donors = self.donors(min(timeout, self.config.dht_request_timeout))
        donors = [d for d in donors if check is None or check.may_ask(d)]
        for donor in donors[:MAX_DONORS_ASKED]:
            remaining = end - time.monotonic()
            if remaining <= 0:
                logger.warning("no acceptable state downloaded within %.0f s", timeout)
                return None
            future = self.averager.download_state_from(donor, self.config.next_chunk_timeout, self.max_bytes)
            try:
                loaded = future.result(timeout=remaining + self.config.local_rpc_timeout)
            except TimeoutError:
                future.cancel()
                logger.warning("state download from %s did not finish within %.0f s", donor, remaining)
                continue
            if isinstance(loaded, str):
                logger.warning("state download from %s failed: %s", donor, loaded)
                continue
            state, problem = parse_state(self.schema, *loaded)
            if state is not None and check is not None:
                problem = check.problem(*state)
            if problem:
                logger.warning("refusing the state served by %s: %s", donor, problem)
                continue
            return state
        return None

    def donors(self, timeout: float) -> list[str]:
        """Peer ids of the state donors announced in the DHT, newest announced iteration first (self
        excluded); [] when the DHT read takes longer than `timeout`."""
        future = self.dht.get(f"{self.prefix}.all_averagers", latest=True, return_future=True)
        try:
            found = future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            return []
        if found is None or not isinstance(found.value, dict):
            return []
        return donor_priorities(found.value, self.peer_id)

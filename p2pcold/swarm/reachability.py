"""Volunteers behind NAT: a dial-back check at start decides whether a peer joins as a public member or
as a client through a relay.

A public member (DHT server, averaging reducer, state donor) must accept connections; a peer behind a
home router or a firewall cannot. At start (`reachability: auto`) the peer asks swarm members, the
bootstrap first, to open a TCP connection back to its port (`dial-back`). When at least half of
the members that answered reached it, it is public; otherwise it joins as a client: it dials out only,
contributes its body to every fusion and downloads state, but never reduces or serves state, and it
keeps libp2p's auto-relay on (a relaying member makes it reachable for libp2p). A swarm where no
answering member relays is refused with a line that says what to do.

A member dials only the IP the request came from (at the ports the peer names), so the service cannot
be used to make members connect to third parties.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import itertools
import socket
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import hivemind
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.serializer import MSGPackSerializer

from p2pcold.config import SwarmConfig
from p2pcold.swarm.auth import RunSecret
from p2pcold.swarm.dht import _call, listen_maddr, start_dht, stop_dht
from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)

DIAL_BACK_PROTOCOL = "p2pcold.reachability.DialBack"
MAX_PORTS = 8  # ports a member dials per request
MAX_MEMBERS = 5  # members asked per check (the initial peers first)
DIAL_BACK_RETRY_S = 0.5  # the first pause before an initial peer is asked again; it doubles, up to 4x


class Mode(str, enum.Enum):
    """How a peer takes part (`PeerProgress.mode`)."""

    PUBLIC = "public"  # reachable: DHT server, may reduce and serve state
    CLIENT = "client"  # behind NAT: dials out only, through a relay for libp2p


@dataclass(frozen=True)
class DialBack:
    """What the members asked said: who answered, who reached one of our ports, who relays."""

    ports: tuple[int, ...]  # TCP ports asked for (the announced ones, else the one p2pd listens on)
    answered: tuple[str, ...]
    dialed_by: tuple[str, ...]
    relays: tuple[str, ...]
    dialed: tuple[int, ...]  # ports some member reached


def is_reachable(check: DialBack) -> bool | None:
    """True/False when half or more / fewer than half of the answering members reached us; None: nobody answered."""
    if not check.answered:
        return None
    return 2 * len(check.dialed_by) >= len(check.answered)


def is_loopback_swarm(host: str) -> bool:
    """A peer listening on 127.0.0.1 (simulate, tests) only meets peers on this machine: no NAT between them."""
    return ipaddress.ip_address(host).is_loopback


def ports_to_check(config: SwarmConfig) -> list[int]:
    """The ports members dial: those of the announced addresses (a router may forward another port than
    the one p2pd listens on), else the listening port."""
    if config.announce_maddrs:
        return list(dict.fromkeys(int(Multiaddr(m)["tcp"]) for m in config.announce_maddrs if "/tcp/" in m))
    return [config.port] if config.port else []


def undialable_announced(announced: Sequence[str], check: DialBack) -> list[str]:
    """Announced addresses no answering member could dial (only meaningful when someone answered)."""
    return [m for m in announced if check.answered and "/tcp/" in m and int(Multiaddr(m)["tcp"]) not in check.dialed]


def no_relay_message(config: SwarmConfig) -> str:
    port = config.port or "PORT"
    return (
        "not reachable from outside, and no swarm member offers a relay: forward TCP port "
        f"{port} on your router to this machine and pass --port {port} --announce /ip4/<your public IP>/tcp/{port}, "
        "or ask the bootstrap operator to run it with --relay on"
    )


# ---------------------------------------------------------------------------- joining


def join_swarm(
    config: SwarmConfig, initial_peers: Sequence[str], *, secret: RunSecret | None = None, record_validators: Sequence[RecordValidatorBase] = ()
) -> tuple[hivemind.DHT, Mode]:
    """Start this peer's DHT node as a public member or as a client, following `config.reachability`.

    Bounded: the DHT start(s) (`dht_startup_timeout + bootstrap_timeout` each) and one dial-back check
    (`reachability_timeout`). Raises P2PColdError (nothing left running) when the peer is not reachable
    and no member relays. `secret`, `record_validators`: as for `start_dht`."""
    listen_maddr(config.host, config.port)  # a host that is not an IP address: one line, before anything starts
    if config.reachability == "public" or not initial_peers or is_loopback_swarm(config.host):
        return _start_public(config, initial_peers, config.reachability == "public" and bool(initial_peers), secret, record_validators), Mode.PUBLIC
    config = _with_fixed_port(config)  # a restart as a public member must keep the port members dialed
    dht = start_dht(config, initial_peers, client_mode=True, secret=secret, record_validators=record_validators)
    try:
        check = dial_back(dht, config, initial_peers)
        _report_announced(config, check)
        reachable = is_reachable(check)
        if config.reachability == "auto" and reachable:
            stop_dht(dht, grace_s=config.shutdown_timeout)
            dht = None
            logger.info("reachable from outside (%d of %d members dialed back): joining as a public member", len(check.dialed_by), len(check.answered))
            return _start_public(config, initial_peers, False, secret, record_validators), Mode.PUBLIC
        if check.answered and not check.relays:
            raise P2PColdError(no_relay_message(config))
        if reachable is None:
            logger.warning("no swarm member answered the reachability check within %.0f s; joining as a client to be safe", config.reachability_timeout)
        logger.warning("not reachable from outside: joining through a relay as a client")
        return dht, Mode.CLIENT
    except BaseException:
        if dht is not None:
            stop_dht(dht, grace_s=config.shutdown_timeout)
        raise


def _start_public(config: SwarmConfig, initial_peers: Sequence[str], report: bool, secret: RunSecret | None, record_validators) -> hivemind.DHT:
    dht = start_dht(config, initial_peers, secret=secret, record_validators=record_validators)
    try:
        serve_dial_back(dht, config)
        if report and config.announce_maddrs:
            _report_announced(config, dial_back(dht, config, initial_peers))
    except BaseException:
        stop_dht(dht, grace_s=config.shutdown_timeout)
        raise
    return dht


def _report_announced(config: SwarmConfig, check: DialBack) -> None:
    for maddr in undialable_announced(config.announce_maddrs, check):
        logger.warning("announce address %s: no swarm member could dial it (is the port forwarded to this machine and open?)", maddr)


def _with_fixed_port(config: SwarmConfig) -> SwarmConfig:
    if config.port:
        return config
    family = socket.AF_INET6 if ipaddress.ip_address(config.host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((config.host, 0))
        except OSError as e:
            raise P2PColdError(f"swarm: cannot listen on {config.host}: {e.strerror}") from None
        port = probe.getsockname()[1]
    return config.model_copy(update={"port": port})


# ---------------------------------------------------------------------------- the dial-back protocol


def serve_dial_back(dht: hivemind.DHT, config: SwarmConfig) -> None:
    """Answer other peers' dial-back requests from this node (a public member or the bootstrap)."""
    _call(dht, partial(_serve, config.dial_back_timeout, config.relay), config.local_rpc_timeout)


def dial_back(dht: hivemind.DHT, config: SwarmConfig, initial_peers: Sequence[str]) -> DialBack:
    """Ask up to MAX_MEMBERS members (the initial peers first) to dial `ports_to_check` back.

    A member dials the IP this node's connection came from: behind NAT that is the router, which
    forwards nothing unless the volunteer set it up."""
    ports = ports_to_check(config)
    initial_ids = list(dict.fromkeys(str(Multiaddr(m)["p2p"]) for m in initial_peers))
    replies = _call(dht, partial(_ask_members, initial_ids, ports, config.reachability_timeout), config.reachability_timeout + config.local_rpc_timeout)
    answered = {member: reply for member, reply in replies.items() if reply is not None}
    return DialBack(
        ports=tuple(ports),
        answered=tuple(answered),
        dialed_by=tuple(member for member, reply in answered.items() if reply["dialed"]),
        relays=tuple(member for member, reply in answered.items() if reply["relay"]),
        dialed=tuple(sorted({port for reply in answered.values() for port in reply["dialed"]})),
    )


# --- coroutines run inside the DHT process (module-level so that they pickle by reference)


async def _serve(dial_timeout: float, relay: bool, _dht, node) -> None:
    async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = MSGPackSerializer.loads(await asyncio.wait_for(P2P.receive_raw_data(reader), dial_timeout))
            ports = [p for p in request.get("ports", [])[:MAX_PORTS] if isinstance(p, int) and 0 < p < 65536]
            observed = _ip_of(str(stream_info.addr))
            reached = await asyncio.gather(*(_dial(observed, port, dial_timeout) for port in ports))
            reply = {"dialed": [port for port, ok in zip(ports, reached) if ok], "relay": relay}
            await P2P.send_raw_data(MSGPackSerializer.dumps(reply), writer)
        except Exception as e:  # a malformed or abandoned request concerns only its sender
            logger.debug("dial-back request from %s failed: %r", stream_info.peer_id, e)
        finally:
            writer.close()

    await node.p2p.add_binary_stream_handler(DIAL_BACK_PROTOCOL, handle)


async def _ask_members(initial_ids: list[str], ports: list[int], timeout: float, _dht, node) -> dict:
    members = [*initial_ids, *(str(p) for p in node.protocol.routing_table.peer_id_to_uid if str(p) not in initial_ids)]
    members = [m for m in members if m != str(node.peer_id)][:MAX_MEMBERS]
    deadline = asyncio.get_running_loop().time() + timeout

    async def ask_once(member: str):
        _info, reader, writer = await node.p2p.call_binary_stream_handler(PeerID.from_base58(member), DIAL_BACK_PROTOCOL)
        try:
            await P2P.send_raw_data(MSGPackSerializer.dumps({"ports": ports}), writer)
            reply = MSGPackSerializer.loads(await P2P.receive_raw_data(reader))
        finally:
            writer.close()
        if not (isinstance(reply, dict) and isinstance(reply.get("dialed"), list) and isinstance(reply.get("relay"), bool)):
            return None
        return {"dialed": [p for p in reply["dialed"] if p in ports], "relay": reply["relay"]}

    async def ask(member: str):
        """An initial peer is asked again after a failed try (a stream refused while its node is busy, a
        dial in libp2p's backoff), until the deadline: the peer's mode depends on its answer. Any other
        member is asked once: the routing table also lists members that have left."""
        for attempt in itertools.count():
            try:
                return await ask_once(member)
            except Exception as e:  # an old member without the service, one that went away, a busy one
                logger.debug("member %s did not answer the dial-back request: %r", member, e)
            pause = min(DIAL_BACK_RETRY_S * 2**attempt, 4 * DIAL_BACK_RETRY_S)
            if member not in initial_ids or asyncio.get_running_loop().time() + pause >= deadline:
                return None
            await asyncio.sleep(pause)

    async def ask_bounded(member: str):
        try:
            return await asyncio.wait_for(ask(member), timeout)
        except asyncio.TimeoutError:
            return None

    return dict(zip(members, await asyncio.gather(*(ask_bounded(m) for m in members))))


async def _dial(ip: str | None, port: int, timeout: float) -> bool:
    """Open (and close) a TCP connection to ip:port."""
    if ip is None:  # the request came through a relay: there is no address to dial
        return False
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _ip_of(maddr: str) -> str | None:
    parts = maddr.split("/")
    for protocol in ("ip4", "ip6"):
        if protocol in parts and parts.index(protocol) + 1 < len(parts):
            return str(ipaddress.ip_address(parts[parts.index(protocol) + 1]))
    return None

"""Starting and stopping a peer's DHT node (and with it, its p2pd daemon), with bounded waits.

A `hivemind.DHT` is a background process that owns one `p2pd` daemon; the averager and every DHT
read/write in p2pcold go through it. hivemind's own constructor waits for readiness without a
bound, its default 15 s daemon start-up limit is too short on a loaded machine, and its shutdown can
orphan the daemon; `start_dht` / `stop_dht` fix those three things.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
import tempfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from p2pcold.config import SwarmConfig, validate_swarm_config
from p2pcold.swarm import _compat, _procs
from p2pcold.swarm.auth import RunSecret, SecretAuthorizer, open_swarm_notice
from p2pcold.swarm.records import load_signing_key, owner_subkey
from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)

# pids (with start times) of the p2pd daemons each DHT process started, keyed by the DHT's pid
_DAEMONS: dict[int, set[tuple[int, int]]] = {}


class _RequestPipe:
    """The DHT process's end of its request pipe, dropping requests whose sender has exited.

    A request carries its reply pipe as a file descriptor, which the DHT process fetches from the
    sending process over a Unix socket while unpickling. When the sender has exited meanwhile (e.g. the
    averager process stopping at shutdown with a periodic DHT store in flight), that fetch fails: hivemind
    logs the ConnectionResetError or FileNotFoundError with a traceback and pauses 3 s, and an EOFError
    (sender gone mid-handshake) escapes its handler and kills the DHT process. Nobody waits for such a
    reply, so the request becomes a no-op and one warning line.
    """

    NO_OP = ("_dropped_request", [], {})

    def __init__(self, pipe):
        self._pipe = pipe

    def fileno(self) -> int:
        return self._pipe.fileno()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._pipe.poll(timeout)

    def recv(self):
        message = self._pipe.recv_bytes()  # errors here concern the pipe itself: hivemind handles those
        try:
            return ForkingPickler.loads(message)
        except (OSError, EOFError) as e:
            logger.warning("DHT: dropped a request from a process that exited while sending it (%r)", e)
            return self.NO_OP


class _SwarmDHT(hivemind.DHT):
    """hivemind.DHT whose process (and p2pd) exits within ~1 s when the peer's main process dies, and
    which survives requests from processes that exit while sending them (see `_RequestPipe`)."""

    def __init__(self, *args, **kwargs):
        self._p2pcold_parent = os.getpid()
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        _procs.setup_forked_child(self._p2pcold_parent)
        self._inner_pipe = _RequestPipe(self._inner_pipe)
        super().run()

    async def _dropped_request(self) -> None:
        pass


def listen_maddr(host: str, port: int) -> str:
    """The multiaddr p2pd listens on for `host`:`port` (`0.0.0.0`, `::`, `127.0.0.1`, ...)."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise P2PColdError(f"swarm: host {host!r} is not an IP address (use e.g. 0.0.0.0 or 127.0.0.1)") from None
    return f"/ip{version}/{host}/tcp/{port}"


def check_port_free(host: str, port: int) -> None:
    """Refuse a fixed `port` that something already listens on at `host` (port 0, any free one, passes).

    p2pd listens with SO_REUSEPORT, so a second daemon on a taken port starts without an error and the
    kernel splits incoming connections between the two: the first node's address then reaches the wrong
    node half of the time. A plain bind, which SO_REUSEPORT listeners refuse, detects that beforehand.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT connections do not count
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise P2PColdError(
                    f"swarm: port {port} is in use on {host} (another node or program listens there); choose another port or stop it"
                ) from None
            raise P2PColdError(f"swarm: cannot listen on {host} port {port}: {e.strerror}") from None


def _check_maddrs(maddrs: Sequence[str], what: str) -> list[str]:
    checked = []
    for maddr in maddrs:
        try:
            parsed = Multiaddr(str(maddr))
        except Exception as e:  # multiaddr raises several types
            raise P2PColdError(f"swarm: {what} entry {maddr!r} is not a multiaddr ({e})") from None
        if what == "initial_peers" and "/p2p/" not in str(parsed):
            raise P2PColdError(f"swarm: initial peer {maddr!r} lacks the /p2p/<peer id> part")
        checked.append(str(maddr))
    return checked


def check_identity_file(path: Path) -> None:
    """An identity key that exists must be a private key; a new one needs a folder to be created in."""
    if path.is_dir():
        raise P2PColdError(f"{path}: identity key path is a folder; give a file path (created on first use)")
    if not path.exists():
        if not path.parent.is_dir():
            raise P2PColdError(f"{path}: cannot create the identity key there, {path.parent} is not a folder")
        return
    try:
        PeerID.from_identity(path.read_bytes())
    except Exception:  # protobuf and the key parsers raise several types; all mean "not a key"
        raise P2PColdError(
            f"{path}: damaged identity key; restore it from a backup, or delete it to create a new one "
            "(the peer id, and so this node's address, will change)"
        ) from None


def relay_options(config: SwarmConfig, client_mode: bool) -> dict:
    """libp2p relay settings of a node. A client looks for a relay among its initial peers (p2pd's
    default trusted relays); a reachable node serves as one when `config.relay` is on. go-libp2p starts
    its relay service only once the node's reachability is public, and its relay finder only once it
    is private: AutoNAT would need several peers to conclude, so both are stated (reachability.py
    checked them, or the operator chose)."""
    if client_mode:
        return {"use_relay": True, "use_auto_relay": True, "force_reachability": "private"}
    if config.relay:
        return {"use_relay": True, "use_auto_relay": False, "force_reachability": "public"}
    return {"use_relay": False, "use_auto_relay": False}


class SigningIdentity:
    """The RSA key a node signs its records with, which is also its p2pd identity (so a record's owner
    mark names its writer's peer id). Without `identity_path`, a fresh key in a private temporary
    folder, deleted once p2pd has read it."""

    def __init__(self, identity_path: str | None):
        self.is_user_file = identity_path is not None
        self._folder = None if self.is_user_file else tempfile.mkdtemp(prefix="p2pcold-key-")
        self.path = identity_path if self.is_user_file else os.path.join(self._folder, "identity.key")
        if not os.path.exists(self.path):
            P2P.generate_identity(self.path)
        self.key = load_signing_key(self.path)

    def forget_fresh_key(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def start_dht(
    config: SwarmConfig,
    initial_peers: Sequence[str],
    client_mode: bool = False,
    *,
    secret: RunSecret | None = None,
    record_validators: Sequence[RecordValidatorBase] = (),
) -> hivemind.DHT:
    """Start this peer's DHT node and p2pd daemon, joined to `initial_peers` (empty: a new swarm).

    Waits at most `dht_startup_timeout + bootstrap_timeout` seconds. Raises P2PColdError when the
    fixed port is taken (before anything starts), the daemon does not start or none of the initial
    peers answers within that bound; nothing is left running in that case. `client_mode`: the peer only
    dials out (behind NAT); it can average but cannot lead groups or serve its state. Relays: `relay_options`. `secret`: the run secret of a private swarm (None: an open
    swarm, which anyone can join); only nodes holding the same secret can talk to this one.

    The node signs the records it owns with its p2pd identity key (an RSA key: `identity_path`, or a
    fresh one), and refuses stores of owned records that their owner did not sign; `record_validators`
    (e.g. `validation.run_record_validators`) check the run's records on top of that.
    """
    validate_swarm_config(config)
    _compat.apply()
    if config.identity_path is not None:
        check_identity_file(Path(config.identity_path))
    initial = _check_maddrs(list(initial_peers), "initial_peers")
    announce = _check_maddrs(config.announce_maddrs, "announce_maddrs")
    listen = listen_maddr(config.host, config.port)
    check_port_free(config.host, config.port)
    if secret is None:
        open_swarm_notice()
    bound = config.dht_startup_timeout + config.bootstrap_timeout
    started = time.monotonic()
    identity = SigningIdentity(config.identity_path)
    dht = _SwarmDHT(
        initial_peers=initial or None,
        start=True,
        await_ready=False,  # hivemind would wait without a bound
        host_maddrs=[listen],
        announce_maddrs=announce or None,
        identity_path=identity.path,
        check_if_identity_free=identity.is_user_file,  # a fresh random key is never taken
        record_validators=[RSASignatureValidator(identity.key), *record_validators],
        startup_timeout=config.dht_startup_timeout,
        client_mode=client_mode,
        shutdown_timeout=config.shutdown_timeout,
        authorizer=None if secret is None else SecretAuthorizer(secret),
        **relay_options(config, client_mode),
    )
    daemons: set[tuple[int, int]] = set()
    _DAEMONS[dht.pid] = daemons
    error: BaseException | None = None
    ready = False
    while not ready and error is None and time.monotonic() - started <= bound:
        daemons.update(_procs.children(dht.pid, "p2pd"))  # recorded before the DHT process could orphan it
        try:
            dht.wait_until_ready(timeout=0.2)
            ready = True
        except TimeoutError:
            pass
        except BaseException as e:  # the DHT process reports its start-up failure here
            error = e
    identity.forget_fresh_key()  # p2pd has read it; the key lives on in this process only
    if ready:
        try:
            _call(dht, _get_peer_id, config.local_rpc_timeout)  # proves the node answers
            dht.peer_id  # noqa: B018 (now cached; averager processes forked later inherit it)
        except BaseException as e:
            error, ready = e, False
    if not ready:
        stop_dht(dht, grace_s=1.0)
        if error is not None and not isinstance(error, Exception):
            raise error  # KeyboardInterrupt, the CLI's SIGTERM: not a start-up failure
        where = f"initial peers {', '.join(initial)}" if initial else "a new swarm"
        if error is None:
            raise P2PColdError(f"swarm: could not start a DHT node for {where} within {bound:.0f} s")
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if initial and "bootstrap" in reason.lower():
            hint = "a private swarm answers only holders of its secret: check --secret-file or the invite" if secret else "if the swarm is private, pass its --secret-file"
            raise P2PColdError(f"swarm: none of the initial peers answered ({', '.join(initial)}; {hint}): {reason}")
        raise P2PColdError(f"swarm: could not start a DHT node for {where}: {reason}")
    daemons.update(_procs.children(dht.pid, "p2pd"))
    dht.record_owner = owner_subkey(identity.key)
    logger.info("DHT node %s up in %.1f s", dht.peer_id, time.monotonic() - started)
    return dht


def visible_maddrs(dht: hivemind.DHT, timeout: float = 15.0) -> list[str]:
    """The multiaddrs other peers pass as `initial_peers` to join through this node."""
    return [str(m) for m in _call(dht, _get_visible_maddrs, timeout)]


def peer_id(dht: hivemind.DHT) -> str:
    """This node's peer id as a base58 string (cached by start_dht)."""
    return str(dht.peer_id)


def stop_dht(dht: hivemind.DHT, grace_s: float | None = None) -> None:
    """Stop the DHT process and its p2pd daemon; bounded by `grace_s` (default: its shutdown_timeout) + ~2 s."""
    grace = dht.shutdown_timeout if grace_s is None else grace_s
    pid = dht.pid
    daemons = _DAEMONS.pop(pid, set()) if pid is not None else set()
    if pid is not None:
        daemons.update(_procs.children(pid, "p2pd"))
    if dht.is_alive():
        dht.shutdown_timeout = grace
        try:
            dht.shutdown()  # graceful: asks the node to stop its daemon; joins `grace`, then SIGTERM
        except (OSError, ValueError) as e:  # pipe already closed
            logger.debug("DHT shutdown: %s", e)
        dht.join(1.0)
        if dht.is_alive():
            dht.kill()
            dht.join(1.0)
    for daemon_pid, starttime in daemons:
        _procs.kill(daemon_pid, starttime, grace_s=1.0)


# --- coroutines run inside the DHT process (module-level so that they pickle by reference)


async def _get_visible_maddrs(_dht, node):
    return await node.get_visible_maddrs()


async def _get_peer_id(_dht, node):
    return node.peer_id


def _call(dht: hivemind.DHT, coroutine, timeout: float):
    """Run `coroutine(dht, node)` in the DHT process and wait at most `timeout` seconds."""
    future = dht.run_coroutine(coroutine, return_future=True)
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        raise P2PColdError(f"swarm: the DHT node did not answer within {timeout:.0f} s") from None


async def _get_client_mode(_dht, node):
    return node.protocol.client_mode


def is_client_mode(dht: hivemind.DHT, timeout: float = 15.0) -> bool:
    """Whether this DHT node was started in client mode (dials out only)."""
    return bool(_call(dht, _get_client_mode, timeout))

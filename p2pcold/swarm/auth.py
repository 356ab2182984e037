"""Private swarms: a run secret that only members hold, and what it keeps outsiders out of.

* `RunSecret` holds the secret's bytes and never shows them (not in repr, logs, configs or checkpoints);
  `load_secret` reads it from `--secret-file`, `$P2PCOLD_SECRET_FILE` or `$P2PCOLD_SECRET`.
* `SecretAuthorizer` is the DHT's authorizer (hivemind's `TokenAuthorizerBase`): every DHT request
  and response carries a token, an HMAC under the secret of the node's RSA public key and an expiry,
  and is signed with that key. A node without the secret cannot bootstrap, read or write records.
* The DHT authorizer does not cover the averaging RPCs (join a group, send a part to a reducer,
  download state), which any libp2p peer can call. Each member therefore publishes a *member tag*,
  HMAC(secret, averaging prefix, its own peer id), in the authorized DHT (`MemberTag`), and
  `MemberGate` admits an averaging RPC only when the tag published under the caller's peer id, as
  proven by libp2p (`context.remote_id`), is valid. A tag names its peer id, so another peer that
  copies it gains nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import os
import stat
import time
from pathlib import Path

import hivemind
from hivemind.p2p import PeerID
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.timed_storage import get_dht_time

from p2pcold.utils import P2PColdError, get_logger

logger = get_logger(__name__)

SECRET_FILE_ENV = "P2PCOLD_SECRET_FILE"
SECRET_ENV = "P2PCOLD_SECRET"
MIN_SECRET_BYTES = 16  # below this a secret could be guessed offline from one captured token
TOKEN_LIFETIME_S = 3600.0  # a DHT access token's validity; a node renews its own well before the end
TOKEN_RENEW_BEFORE_S = 600.0
MEMBER_TAG_TTL_S = 24 * 3600.0  # a member tag's DHT lifetime; `MemberTag.publish_if_due` renews it at half
_REFUSALS_LOGGED = 100  # distinct refused callers named in the log, per process
# An unknown caller triggers a re-read of the tags at most this often: a rogue's calls cannot keep the
# averager busy with DHT reads (every member that published before the last read is already cached).
TAG_REREAD_INTERVAL_S = 1.0
TAG_READ_FLOOR_S = 0.1  # the fastest the tags are re-read for unknown callers, all of them together
_CALLERS_REMEMBERED = 10_000  # unknown callers whose last lookup is remembered (then forgotten at once)


class RunSecret:
    """The run secret. Its value never appears in repr() or str(): it only keys HMACs."""

    def __init__(self, value: bytes):
        if len(value) < MIN_SECRET_BYTES:
            raise P2PColdError(f"the run secret is {len(value)} bytes; it needs at least {MIN_SECRET_BYTES}")
        self._value = value

    def mac(self, purpose: str, *parts: bytes) -> bytes:
        """HMAC-SHA256 of `parts` under the secret, separated by `purpose` so that one use's MAC is never another's."""
        digest = hmac.new(self._value, purpose.encode(), hashlib.sha256)
        for part in parts:
            digest.update(len(part).to_bytes(4, "big"))
            digest.update(part)
        return digest.digest()

    def reveal(self) -> bytes:
        """The secret itself: only for writing it into an invite file that its owner alone can read."""
        return self._value

    def __repr__(self) -> str:
        return "RunSecret(<hidden>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a RunSecret is not pickled: pass it to forked processes only")


def new_secret_text() -> str:
    """A fresh random secret, as $P2PCOLD_SECRET holds it (what `p2pcold simulate` makes for each run)."""
    return os.urandom(32).hex()


def read_private_file(path: str | Path, what: str) -> bytes:
    """The bytes of `path` (surrounding whitespace stripped), which must be readable by its owner only:
    a secret, or an invite that holds one."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise P2PColdError(f"{path}: the {what} is not a regular file")
        if mode & 0o077:
            raise P2PColdError(f"{path}: the {what} is readable by others (mode {mode & 0o777:o}); run: chmod 600 {path}")
        value = path.read_bytes().strip()
    except FileNotFoundError:
        raise P2PColdError(f"{path}: no such {what}") from None
    except OSError as e:
        raise P2PColdError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if not value:
        raise P2PColdError(f"{path}: the {what} is empty")
    return value


def read_secret_file(path: str | Path) -> RunSecret:
    """The secret in `path` (surrounding whitespace ignored). The file must be readable by its owner only."""
    value = read_private_file(path, "secret file")
    if len(value) < MIN_SECRET_BYTES:
        raise P2PColdError(f"{path}: the secret is {len(value)} bytes; it needs at least {MIN_SECRET_BYTES} (e.g. openssl rand -hex 32)")
    return RunSecret(value)


def load_secret(secret_file: str | None = None, environ=os.environ) -> RunSecret | None:
    """The run secret of a command: `secret_file` (its --secret-file), else the file named by
    $P2PCOLD_SECRET_FILE, else the value of $P2PCOLD_SECRET; None (an open swarm) when none is given."""
    path = secret_file or environ.get(SECRET_FILE_ENV)
    if path:
        return read_secret_file(path)
    value = environ.get(SECRET_ENV, "").strip()
    if not value:
        return None
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise P2PColdError(f"${SECRET_ENV} holds {len(value.encode())} bytes; a secret needs at least {MIN_SECRET_BYTES}")
    return RunSecret(value.encode())


# --------------------------------------------------------------------------- the DHT


class SecretAuthorizer(TokenAuthorizerBase):
    """DHT access for holders of the run secret: token = HMAC(secret, RSA public key, expiry).

    hivemind signs each request and response with the node's RSA key and checks the peer's token,
    signature, clock and nonce (replays); a request that fails is dropped without an answer."""

    def __init__(self, secret: RunSecret):
        super().__init__()
        self._secret = secret

    def _token_mac(self, public_key: bytes, expiration: str) -> bytes:
        return self._secret.mac("dht-token", public_key, expiration.encode())

    async def get_token(self) -> AccessToken:
        public_key = self.local_public_key.to_bytes()
        expiration = f"{get_dht_time() + TOKEN_LIFETIME_S:.0f}"
        return AccessToken(
            username="p2pcold-member", public_key=public_key, expiration_time=expiration, signature=self._token_mac(public_key, expiration)
        )

    def is_token_valid(self, access_token: AccessToken) -> bool:
        try:
            expires = float(access_token.expiration_time)
        except ValueError:
            return False
        if not expires > get_dht_time():  # also refuses NaN
            return False
        expected = self._token_mac(access_token.public_key, access_token.expiration_time)
        return hmac.compare_digest(expected, access_token.signature)

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return float(access_token.expiration_time) - get_dht_time() < TOKEN_RENEW_BEFORE_S


def open_swarm_notice() -> None:
    logger.warning("open swarm: anyone who reaches a peer can join, write records and fuse; pass --secret-file for a private swarm")


# --------------------------------------------------------------------------- the averaging RPCs


def members_key(prefix: str) -> str:
    """The DHT key under which each member of a run publishes its tag (subkey: its peer id)."""
    return f"{prefix}.members"


def member_tag(secret: RunSecret, prefix: str, peer_id: str) -> bytes:
    return secret.mac("member-tag", prefix.encode(), peer_id.encode())


class MemberTag:
    """This peer's own member tag, published in the DHT and renewed at half its lifetime."""

    def __init__(self, secret: RunSecret, prefix: str, peer_id: str):
        self.key, self.subkey = members_key(prefix), peer_id
        self.value = member_tag(secret, prefix, peer_id)
        self._published_at: float | None = None

    def publish_if_due(self, dht: hivemind.DHT, timeout: float) -> None:
        """Store the tag unless a store of it is still fresh; bounded by `timeout`. A failure is one warning:
        the next call retries, and the averaging RPCs of peers that cannot see the tag are refused meanwhile."""
        now = time.monotonic()
        if self._published_at is not None and now - self._published_at < MEMBER_TAG_TTL_S / 2:
            return
        future = dht.store(self.key, self.value, get_dht_time() + MEMBER_TAG_TTL_S, subkey=self.subkey, return_future=True)
        try:
            stored = future.result(timeout=timeout)
        except Exception as e:  # a timeout or a DHT error
            future.cancel()
            stored = f"{type(e).__name__}"
        if stored is True:
            self._published_at = now
        else:
            logger.warning("this peer's member tag was not stored in the DHT within %.0f s (%s); retrying at the next boundary", timeout, stored)


class MemberGate:
    """Admits an averaging RPC's caller when a valid member tag is published under its proven peer id.

    Lives in the averager process. A DHT read (bounded by `lookup_timeout`) happens only for a caller
    that is not a known member: at most one per caller every TAG_REREAD_INTERVAL_S, and at most one per
    TAG_READ_FLOOR_S for all callers together, one at a time. The limit is per caller so
    that a member whose tag was published just after the last read is admitted at its first request:
    refusing it would let its group assemble without it. Every valid tag found is cached, so the members
    of a group cost one read."""

    def __init__(self, secret: RunSecret, prefix: str, lookup_timeout: float):
        self._secret, self._prefix, self._lookup_timeout = secret, prefix, lookup_timeout
        self._members: set[str] = set()
        self._refused: set[str] = set()
        self._lookup_lock: asyncio.Lock | None = None
        self._last_read = -math.inf
        self._looked_up: dict[str, float] = {}  # unknown caller -> when a read was last made for it

    def is_valid_tag(self, peer_id: str, tag) -> bool:
        return isinstance(tag, bytes) and hmac.compare_digest(tag, member_tag(self._secret, self._prefix, peer_id))

    async def admits(self, dht: hivemind.DHT, caller: PeerID, what: str) -> bool:
        peer = str(caller)
        if peer in self._members:
            return True
        await self._read_tags_for(dht, peer)
        if peer in self._members:
            return True
        if peer not in self._refused and len(self._refused) < _REFUSALS_LOGGED:
            self._refused.add(peer)
            logger.warning("refused %s from %s: no valid member tag (not a member of this private swarm)", what, peer)
        return False

    async def read_tags(self, dht: hivemind.DHT) -> None:
        """Read and cache the published member tags now (as a boundary begins)."""
        async with self._lock():
            await self._read_tags(dht)

    async def _read_tags_for(self, dht: hivemind.DHT, caller: str) -> None:
        """Read the tags for an unknown `caller`, unless one was read for it less than
        TAG_REREAD_INTERVAL_S ago; reads for all callers together wait for TAG_READ_FLOOR_S apart."""
        if time.monotonic() - self._looked_up.get(caller, -math.inf) < TAG_REREAD_INTERVAL_S:
            return
        if len(self._looked_up) >= _CALLERS_REMEMBERED:
            self._looked_up.clear()
        self._looked_up[caller] = time.monotonic()
        async with self._lock():
            if caller not in self._members:  # another caller's read, while this one waited, may have found it
                await asyncio.sleep(max(0.0, self._last_read + TAG_READ_FLOOR_S - time.monotonic()))
                await self._read_tags(dht)

    def _lock(self) -> asyncio.Lock:
        if self._lookup_lock is None:  # made in the averager's event loop
            self._lookup_lock = asyncio.Lock()
        return self._lookup_lock

    async def _read_tags(self, dht: hivemind.DHT) -> None:
        started = self._last_read = time.monotonic()
        try:
            found = await asyncio.wait_for(
                dht.get(members_key(self._prefix), latest=True, return_future=True), self._lookup_timeout
            )
        except Exception as e:  # a timeout or a DHT error: refused now, looked up again at the next call
            logger.warning("member tags not read within %.0f s (%r)", self._lookup_timeout, e)
            return
        if found is None or not isinstance(found.value, dict):
            return
        for subkey, item in found.value.items():
            peer = subkey if isinstance(subkey, str) else None
            if peer is not None and self.is_valid_tag(peer, getattr(item, "value", None)):
                self._members.add(peer)
        logger.debug("read %d member tags in %.3f s; %d valid", len(found.value), time.monotonic() - started, len(self._members))

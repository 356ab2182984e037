"""Invites: one line that lets a volunteer join a private run with nothing else.

`p2pcold invite`, run by the operator (who holds the run secret), writes

    p2pcold-invite-1:<base64url of {"run_id", "peers", "secret"}>

to a file that only its owner can read. `p2pcold peer --dataset X --invite-file FILE` (or
$P2PCOLD_INVITE_FILE) takes the swarm's addresses, the run id and the secret from it, and the run's
config from the DHT (`run_config.py`). Like a secret file, an invite is never on a command line, where
`ps` shows it; once read, its secret lives only in a `RunSecret`, which never shows it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path

from p2pcold.swarm.auth import MIN_SECRET_BYTES, RunSecret, read_private_file
from p2pcold.swarm.records import maddr_peer_ids
from p2pcold.utils import P2PColdError, atomic_write_bytes

INVITE_PREFIX = "p2pcold-invite-1:"
MAX_INVITE_CHARS = 16_000
MAX_INVITE_PEERS = 32
MAX_FIELD_CHARS = 1000  # a run id or one address


@dataclass(frozen=True)
class Invite:
    run_id: str
    peers: tuple[str, ...]  # the swarm's public addresses, each ending in /p2p/<peer id>
    secret: RunSecret


def write_invite(path: str | Path, invite: Invite) -> None:
    """One line, written atomically into a file readable by its owner only (mode 600)."""
    _check_fields(invite.run_id, list(invite.peers), str(path))
    payload = {"run_id": invite.run_id, "peers": list(invite.peers), "secret": invite.secret.reveal().decode()}
    line = INVITE_PREFIX + base64.urlsafe_b64encode(json.dumps(payload).encode()).decode() + "\n"
    atomic_write_bytes(path, line.encode())  # a temp file made with mode 600, renamed into place


def read_invite(path: str | Path) -> Invite:
    raw = read_private_file(path, "invite file")
    if len(raw) > MAX_INVITE_CHARS or not raw.startswith(INVITE_PREFIX.encode()):
        raise P2PColdError(f"{path}: not a p2pcold invite (it starts with {INVITE_PREFIX!r}; `p2pcold invite` writes one)")
    try:
        payload = json.loads(base64.urlsafe_b64decode(raw[len(INVITE_PREFIX) :]))
    except (binascii.Error, ValueError):
        raise P2PColdError(f"{path}: the invite is damaged (not base64 JSON after {INVITE_PREFIX!r})") from None
    if not isinstance(payload, dict) or set(payload) != {"run_id", "peers", "secret"}:
        raise P2PColdError(f"{path}: the invite is damaged (expected run_id, peers and secret)")
    secret = payload["secret"]
    if not isinstance(secret, str) or len(secret.encode()) < MIN_SECRET_BYTES:
        raise P2PColdError(f"{path}: the invite's secret is missing or shorter than {MIN_SECRET_BYTES} bytes")
    _check_fields(payload["run_id"], payload["peers"], str(path))
    return Invite(payload["run_id"], tuple(payload["peers"]), RunSecret(secret.encode()))


def _check_fields(run_id: object, peers: object, where: str) -> None:
    if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_FIELD_CHARS:
        raise P2PColdError(f"{where}: the invite's run id is missing or too long")
    if not isinstance(peers, list) or not 0 < len(peers) <= MAX_INVITE_PEERS:
        raise P2PColdError(f"{where}: an invite lists 1 to {MAX_INVITE_PEERS} swarm addresses")
    for peer in peers:
        if not isinstance(peer, str) or len(peer) > MAX_FIELD_CHARS or not _names_a_peer(peer):
            raise P2PColdError(f"{where}: {str(peer)[:80]!r} is not a swarm address ending in /p2p/<peer id>")


def _names_a_peer(maddr: str) -> bool:
    try:
        return len(maddr_peer_ids([maddr])) == 1
    except Exception:  # the multiaddr parser raises several types on text it cannot read
        return False

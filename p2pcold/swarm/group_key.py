"""Where the peers of one run and one iteration meet: hivemind's averaging prefix and group bits.

hivemind matchmaking only pairs peers that declare the same key `<prefix>.0b<group bits>` in the DHT,
and a leader rejects a join request whose key differs from its own (BAD_GROUP_KEY). The group bits are
the 32-bit binary iteration number, so peers at different iterations can never average together.
"""

from __future__ import annotations

import hashlib
import re

from p2pcold.utils import P2PColdError

ITERATION_BITS = 32  # group bits per key: iterations 0 .. 2**32-1


def averaging_prefix(run_id: str) -> str:
    """hivemind's averaging prefix for a run: no dots allowed, unique per run id."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", run_id)[:40]
    return f"p2pcold-{readable}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def iteration_group_bits(iteration: int) -> str:
    if not 0 <= iteration < 2**ITERATION_BITS:
        raise P2PColdError(f"swarm: iteration {iteration} is outside 0..2**{ITERATION_BITS}-1")
    return format(iteration, f"0{ITERATION_BITS}b")


def group_key(prefix: str, iteration: int) -> str:
    """The DHT key peers at `iteration` meet under (hivemind's `<prefix>.0b<bits>`)."""
    return f"{prefix}.0b{iteration_group_bits(iteration)}"

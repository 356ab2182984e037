"""`p2pcold ARGS` (the real CLI, e.g. `peer`), with one fault injected into this process only.

Usage: python faulty_peer.py FAULT N ARGS...

`split N`: every `BodyAverager.fuse` call at boundary N fails on this peer's side only, without joining
a group: the "group split in matchmaking" case, where the others form their group without this peer and
nothing in their all-reduce (no verdict) tells them that this member failed. Each call spends half a
matchmaking window looking and then fails. It ignores the caller's `abort` check, so that the failure
is always seen: the others' group, which waits a whole window for this peer before it assembles, could
otherwise finish first and stop the search before it fails. Every other boundary runs the real
all-reduce.

`stall-reducer N`: in the first N all-reduce groups this peer's averager process takes part in, its
reducer answers no sender until the senders' `reducer_timeout` has passed: the other members give up
on it mid-reduce, as they would on a reducer starved of CPU or cut off. Later groups run normally.
"""

from __future__ import annotations

import asyncio
import sys
import time

from hivemind.averaging.allreduce import AllReduceRunner

from p2pcold import cli
from p2pcold.swarm import BodyAverager, FusionResult, FusionStatus

INJECTED = "injected: the group split in matchmaking; this peer was left out"
STALLED = "injected: this reducer stalls past reducer_timeout in group"


def fail_fuse_at(iteration: int) -> None:
    real_fuse = BodyAverager.fuse

    def fuse(self, body, at_iteration, weight, deadline_s=None, metadata=None, **options):
        if at_iteration != iteration:
            return real_fuse(self, body, at_iteration, weight, deadline_s, metadata, **options)
        waited = self.config.matchmaking_time / 2
        time.sleep(waited)
        failed = FusionStatus.FAILED
        return FusionResult(failed, at_iteration, None, attempts=1, elapsed_s=waited, reason=INJECTED)

    BodyAverager.fuse = fuse


def stall_reducer_in_first_groups(groups: int) -> None:
    """Patched before the averager process forks, so that it runs there."""
    real_rpc_aggregate_part = AllReduceRunner.rpc_aggregate_part
    stalled: list[bytes] = []  # ids of the groups stalled so far

    async def rpc_aggregate_part(self, stream, context):
        if self.group_id in stalled or len(stalled) < groups:
            if self.group_id not in stalled:
                stalled.append(self.group_id)
                print(f"{STALLED} {len(stalled)} of {groups}", file=sys.stderr, flush=True)
            await asyncio.sleep(self.reducer_timeout + 1.0)
        async for message in real_rpc_aggregate_part(self, stream, context):
            yield message

    AllReduceRunner.rpc_aggregate_part = rpc_aggregate_part


FAULTS = {"split": fail_fuse_at, "stall-reducer": stall_reducer_in_first_groups}

if __name__ == "__main__":
    FAULTS[sys.argv[1]](int(sys.argv[2]))
    sys.exit(cli.main(sys.argv[3:]))

"""`p2pcold ARGS` (the real CLI, e.g. `peer`), with one fault injected into this process only.

Usage: python faulty_peer.py ITERATION ARGS...

Every `BodyAverager.fuse` call at boundary ITERATION fails on this peer's side only, without joining a
group: the "group split in matchmaking" case, where the others form their group without this peer and
nothing in their all-reduce (no verdict) tells them that this member failed. Each call spends one
matchmaking window looking, as a real attempt does, and honours the caller's `abort` check like the
real search for a group. Every other boundary runs the real all-reduce.
"""

from __future__ import annotations

import sys
import time

from p2pcold import cli
from p2pcold.swarm import averaging

INJECTED = "injected: the group split in matchmaking; this peer was left out"


def fail_fuse_at(iteration: int) -> None:
    real_fuse = averaging.BodyAverager.fuse

    def fuse(self, body, at_iteration, weight, deadline_s=None, metadata=None, *, share_result=True, abort=None):
        if at_iteration != iteration:
            return real_fuse(self, body, at_iteration, weight, deadline_s, metadata, share_result=share_result, abort=abort)
        started = time.monotonic()
        status, reason = averaging.FusionStatus.FAILED, INJECTED
        while time.monotonic() - started < self.config.matchmaking_time:
            if abort is not None and abort():
                status, reason = averaging.FusionStatus.ABORTED, averaging._ABORTED
                break
            time.sleep(self.config.poll_interval)
        return averaging.FusionResult(status, at_iteration, None, attempts=1, elapsed_s=time.monotonic() - started, reason=reason)

    averaging.BodyAverager.fuse = fuse


if __name__ == "__main__":
    fail_fuse_at(int(sys.argv[1]))
    sys.exit(cli.main(sys.argv[2:]))

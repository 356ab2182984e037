"""`p2pcold peer ARGS` that stops right after joining: a late joiner that loads its start state (the
swarm's current base, downloaded and checked, or θ0) and checkpoints it, then leaves without training.

Usage: python join_only.py GO_FILE ARGS...   (ARGS: the arguments of `p2pcold`)

It imports everything first, then waits (at most 10 minutes) until GO_FILE exists, so that a test can
make it join at a moment of its choosing however slow the imports are under load.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from p2pcold import cli
from p2pcold.peer import DecentralizedPeer
from p2pcold.swarm import Phase


def leave_after_joining(self):
    self.tracker.update(phase=Phase.DONE)  # gone: nobody waits for it or keeps serving it
    return self.state.base


if __name__ == "__main__":
    DecentralizedPeer.train = leave_after_joining
    go, deadline = Path(sys.argv[1]), time.monotonic() + 600
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    sys.exit(cli.main(sys.argv[2:]))

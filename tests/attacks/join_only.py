"""`p2pcold peer ARGS` that stops right after joining: a late joiner that loads its start state (the
swarm's current base, downloaded and checked, or θ0) and checkpoints it, then leaves without training.

Usage: python join_only.py ARGS...   (the arguments of `p2pcold`)
"""

from __future__ import annotations

import sys

from p2pcold import cli
from p2pcold.peer import DecentralizedPeer
from p2pcold.swarm import Phase


def leave_after_joining(self):
    self.tracker.update(phase=Phase.DONE)  # gone: nobody waits for it or keeps serving it
    return self.state.base


if __name__ == "__main__":
    DecentralizedPeer.train = leave_after_joining
    sys.exit(cli.main(sys.argv[1:]))

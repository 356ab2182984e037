"""`p2pcold peer ARGS` that waits for a go file before training and, at each boundary, sends what its play
says instead of its finetuned body: a rogue member that holds whatever a member holds (a matching
contract, a dataset, p2pcold's own peer code) and sends what it likes.

Usage: python rogue_peer.py GO_FILE PLAYS ARGS...   (PLAYS: comma-separated, one per iteration, each
`honest` or an attack of p2pcold.testing.ATTACKS; ARGS: the arguments of `p2pcold`)

Its plays change only what it sends (body and declared weight, `testing.contribution`): its own check of
the fused body, its records and its retries are an honest peer's. So a rogue refuses the body its own
attack poisoned and joins every retry of the boundary with the same attack, the most a member that
persists can do. With every play `honest` this is an honest peer that waits for the go file. The go file
lets a test start the members' boundaries together, once every one of them has joined, however slow
their imports are under load.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from p2pcold import cli, testing
from p2pcold.peer import DecentralizedPeer

GO_TIMEOUT_S = 600.0
ROGUE_SEED = 99  # seeds the noise attack


def main(go: Path, plays: list[str], argv: list[str]) -> int:
    honest_train, honest_fuse = DecentralizedPeer.train, DecentralizedPeer._fuse

    def train_after_go(self):
        deadline = time.monotonic() + GO_TIMEOUT_S
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return honest_train(self)

    def fuse_as_played(self, contribution, *args, **kwargs):
        body, weight = testing.contribution(plays[self.iteration], contribution.body, ROGUE_SEED)
        self._weight = lambda _contribution: weight  # the weight it declares (1 but for `target`)
        return honest_fuse(self, dataclasses.replace(contribution, body=body), *args, **kwargs)

    DecentralizedPeer.train = train_after_go
    if any(play != "honest" for play in plays):
        DecentralizedPeer._fuse = fuse_as_played
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]))

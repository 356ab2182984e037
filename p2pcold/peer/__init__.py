"""A swarm peer: `p2pcold peer --dataset X`, one contributor of a CoLD Fusion run over hivemind.

Two protocols, one class each: `DecentralizedPeer` (the default; peers all-reduce among themselves)
and `CentralizedPeer` (`--centralized`: a Repository samples and fuses, the paper's §2.3). Both share
`SwarmPeer` (base.py): the run state, the swarm tracker, finetuning, checkpoints and cleanup; the
decisions at a boundary are `p2pcold.swarm.boundary`'s pure functions.
"""

from p2pcold.peer.base import SwarmPeer
from p2pcold.peer.centralized import CentralizedPeer
from p2pcold.peer.decentralized import DecentralizedPeer

__all__ = ["CentralizedPeer", "DecentralizedPeer", "SwarmPeer"]

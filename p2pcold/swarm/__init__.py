"""p2pcold's peer-to-peer layer: the only package that imports hivemind.

Primitives (no model code; bodies are plain `dict[str, Tensor]`):
- `start_dht` / `stop_dht` / `visible_maddrs`: a peer's DHT node and p2pd daemon (dht.py)
- `RunIdentity`, `join_run`: agree on base model, θ0 and fused schema per run (identity.py)
- `BodyAverager`: all-reduce of the body among peers at the same iteration, state sharing (averaging.py,
  a facade over group_key.py, group_fusion.py, swarm_averager.py, verdicts.py, body_tensors.py,
  state_sharing.py, fusion_result.py)
- `PeerProgress`, `Phase`, `publish_progress`, `read_progress`: expiring per-peer status records (progress.py)
- `SwarmTracker`: the one owner of a process's view of the swarm, one thread reading the DHT (tracker.py)
- `boundary`: the pure decision at an iteration boundary, from a snapshot of that view (boundary.py)
- `auth`: private swarms: the run secret (`load_secret`), the DHT authorizer, member tags (auth.py)
- `run_record_validators`: what every node of a run checks in the DHT: owned, signed, bounded records
  (validation.py, records.py); `state_check`: which downloaded state a peer may adopt

Every network wait is bounded by a named `SwarmConfig` timeout; see docs/protocol-primitives.md.
Importing this package changes nothing in hivemind: `start_dht` applies p2pcold's fixes (`_compat.apply`).
"""

from p2pcold.swarm.averaging import BodyAverager
from p2pcold.swarm.compression import make_compression
from p2pcold.swarm.fusion_result import FusionResult, FusionStatus, GroupMember
from p2pcold.swarm.group_key import averaging_prefix, iteration_group_bits
from p2pcold.swarm.dht import is_client_mode, peer_id, start_dht, stop_dht, visible_maddrs
from p2pcold.swarm.identity import RunIdentity, body_schema_hash, join_run
from p2pcold.swarm.progress import FusionOutcome, PeerProgress, Phase, publish_progress, read_progress
from p2pcold.swarm.tracker import SwarmSnapshot, SwarmTracker
from p2pcold.swarm.validation import run_record_validators

__all__ = [
    "BodyAverager",
    "FusionResult",
    "FusionOutcome",
    "FusionStatus",
    "GroupMember",
    "PeerProgress",
    "Phase",
    "RunIdentity",
    "SwarmSnapshot",
    "SwarmTracker",
    "averaging_prefix",
    "body_schema_hash",
    "is_client_mode",
    "iteration_group_bits",
    "join_run",
    "make_compression",
    "peer_id",
    "publish_progress",
    "read_progress",
    "run_record_validators",
    "start_dht",
    "stop_dht",
    "visible_maddrs",
]

"""The DHT record validator of a run: what every p2pcold node checks before it stores or returns a
record of the run (progress, identity, the Repository's assignments, the monitors' watcher records,
the run's published config).

hivemind calls `validate` in the DHT process when another node asks this one to store a record and
when a node returns records for a read; a record that fails never enters this node's storage and never
reaches the caller. Owner marks are checked first by hivemind's RSASignatureValidator (start_dht
installs it): an owned record was signed by its owner. This validator adds that every record of the
run *is* owned, and that its value is well formed and within the run's bounds (docs/protocol.md,
"Record schemas"). hivemind drops all the records that one node returns for a key when one of them
fails, so every node of a run must use the same validator: start_dht's callers pass the same one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from p2pcold.swarm.identity import identity_record_problem, identity_key
from p2pcold.swarm.progress import progress_key, progress_record_problem
from p2pcold.swarm.records import (
    assignment_key,
    assignment_record_problem,
    run_config_key,
    run_config_record_problem,
    warn_bad_record,
    watcher_key,
    watcher_record_problem,
)

Check = Callable[[Any, Any], "str | None"]  # (subkey, value) -> why the record is bad, None when it is good


class RunRecordValidator(RecordValidatorBase):
    """Checks the records under the run's own keys with `checks` (raw key -> check); other keys pass."""

    def __init__(self, checks: Mapping[str, tuple[str, Check]]):
        self._checks = {DHTID.generate(source=key).to_bytes(): kind_and_check for key, kind_and_check in checks.items()}

    def validate(self, record: DHTRecord) -> bool:
        found = self._checks.get(record.key)
        if found is None:
            return True
        kind, check = found
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
            problem = check(subkey, value)
        except Exception as e:  # msgpack raises several types on bytes a rogue made up
            problem = f"not readable ({type(e).__name__})"
        if problem:
            warn_bad_record(kind, "%s", problem)
            return False
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, RunRecordValidator):
            return False
        self._checks.update(other._checks)
        return True


def run_record_validators(run_id: str, iterations: int | None) -> list[RecordValidatorBase]:
    """The validators every node of run `run_id` (of `iterations` iterations; None: not known yet, as
    before the run config is read) passes to start_dht."""
    return [
        RunRecordValidator(
            {
                progress_key(run_id): ("progress", functools.partial(progress_record_problem, iterations=iterations)),
                identity_key(run_id): ("identity", identity_record_problem),
                assignment_key(run_id): ("assignment", functools.partial(assignment_record_problem, iterations=iterations)),
                watcher_key(run_id): ("watcher", functools.partial(watcher_record_problem, iterations=iterations)),
                run_config_key(run_id): ("run config", run_config_record_problem),
            }
        )
    ]

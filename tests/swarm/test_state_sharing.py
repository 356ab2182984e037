"""State sharing without a network: what this peer serves, which donors it asks first, and which served
states it refuses (another schema, iteration out of range, tensors of the wrong number or shape)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hivemind.p2p import PeerID

from p2pcold.swarm.body_tensors import BodySchema
from p2pcold.swarm.state_sharing import ServedState, donor_priorities, max_state_bytes, parse_state

SCHEMA = BodySchema({"w": torch.zeros(3, 2), "b": torch.zeros(2, dtype=torch.float16)})
SERVED = [torch.full((2,), 2.0), torch.full((3, 2), 1.0)]  # float32, in sorted name order


def metadata(**changes) -> dict:
    return {"v": 1, "iteration": 4, "schema": SCHEMA.hash, **changes}


def test_a_well_formed_state_comes_back_in_the_callers_order_and_dtypes():
    (iteration, body), problem = parse_state(SCHEMA, metadata(), SERVED)
    assert (iteration, problem, list(body)) == (4, "", ["w", "b"])
    assert body["b"].dtype == torch.float16 and torch.equal(body["w"], SERVED[1])


@pytest.mark.parametrize(
    "served_metadata, tensors",
    [
        ("not a dict", SERVED),
        (metadata(schema="another run's"), SERVED),
        (metadata(iteration=-1), SERVED),
        (metadata(iteration=2**32), SERVED),
        (metadata(iteration="4"), SERVED),
        (metadata(), SERVED[:1]),
        (metadata(), [SERVED[0], torch.zeros(2, 3)]),
    ],
)
def test_a_state_that_does_not_match_the_schema_is_refused_with_a_reason(served_metadata, tensors):
    state, problem = parse_state(SCHEMA, served_metadata, tensors)
    assert state is None and "does not match this run's schema" in problem


def test_the_served_state_is_a_float32_copy_and_nothing_usable_before_the_first():
    served = ServedState(SCHEMA)
    assert served.iteration is None
    assert served.current() == ({"v": 1, "iteration": -1, "schema": SCHEMA.hash}, ())
    body = {"w": torch.ones(3, 2), "b": torch.ones(2, dtype=torch.float16)}
    served.set(7, body)
    body["w"].add_(1.0)
    meta, tensors = served.current()
    assert served.iteration == 7 and meta == {"v": 1, "iteration": 7, "schema": SCHEMA.hash}
    assert [t.dtype for t in tensors] == [torch.float32] * 2 and torch.equal(tensors[1], torch.ones(3, 2))
    assert max_state_bytes(SCHEMA) == 2 * 32 + 2**20


def test_donors_are_asked_newest_first_and_made_up_entries_are_left_out():
    me, old, new = PeerID(b"me"), PeerID(b"old"), PeerID(b"new")
    announced = {
        me.to_bytes(): SimpleNamespace(value=9.0),  # this peer
        old.to_bytes(): SimpleNamespace(value=3),
        new.to_bytes(): SimpleNamespace(value=5.0),
        "not bytes": SimpleNamespace(value=8.0),
        PeerID(b"nan").to_bytes(): SimpleNamespace(value=math.nan),
        PeerID(b"text").to_bytes(): SimpleNamespace(value="8"),
    }
    assert donor_priorities(announced, str(me)) == [str(new), str(old)]

"""The fused body's schema check and the copies in and out of the averager's shared memory, with a
plain lock in place of the averager's: deltas against the reference go in, the body comes back out."""

from __future__ import annotations

import threading

import pytest
import torch

from p2pcold.config import SwarmConfig
from p2pcold.swarm.body_tensors import BodySchema, SharedTensors
from p2pcold.utils import P2PColdError

TEMPLATE = {"w": torch.zeros(3, 2), "b": torch.zeros(2, dtype=torch.float16)}  # not in sorted order
CONFIG = SwarmConfig(local_rpc_timeout=0.1)


def test_the_schema_is_the_sorted_float_tensors_of_the_template():
    schema = BodySchema(TEMPLATE)
    assert (schema.names, schema.order) == (["b", "w"], ["w", "b"])
    assert schema.shapes == {"b": (2,), "w": (3, 2)} and schema.float32_bytes == 4 * 8
    with pytest.raises(P2PColdError, match="no tensors"):
        BodySchema({})
    with pytest.raises(P2PColdError, match="only float tensors"):
        BodySchema({"ids": torch.zeros(2, dtype=torch.long)})


@pytest.mark.parametrize(
    "body, message",
    [
        ({"w": torch.zeros(3, 2)}, r"does not match the fused schema \(missing \['b'\], extra \[\]\)"),
        ({**TEMPLATE, "x": torch.zeros(1)}, r"missing \[\], extra \['x'\]"),
        ({**TEMPLATE, "w": torch.zeros(2, 3)}, r"tensor 'w' has shape \(2, 3\), expected \(3, 2\)"),
    ],
)
def test_a_body_of_another_schema_is_one_error_line(body, message):
    with pytest.raises(P2PColdError, match=message):
        BodySchema(TEMPLATE).check(body, "body")


def test_the_shared_tensors_hold_the_delta_and_the_body_comes_back_in_the_template_dtypes():
    schema = BodySchema(TEMPLATE)
    reference = {"w": torch.full((3, 2), 1.0), "b": torch.full((2,), 2.0)}
    body = {"w": torch.full((3, 2), 1.5), "b": torch.full((2,), 2.25, dtype=torch.float16)}
    shared, lock = SharedTensors(schema, CONFIG, reference), threading.Lock()
    reference["w"].add_(100.0)  # the reference was copied
    assert shared.write(body, lock, timeout=1.0)
    assert [t.tolist() for t in shared.tensors] == [[0.25, 0.25], [[0.5, 0.5]] * 3]  # sorted names, deltas
    out = shared.read(lock)
    assert list(out) == ["b", "w"] and out["b"].dtype == torch.float16
    assert torch.equal(out["w"], body["w"]) and torch.equal(out["b"], body["b"])

    plain = SharedTensors(schema, CONFIG)
    assert plain.write(body, lock, timeout=1.0) and torch.equal(plain.read(lock)["w"], body["w"])
    with pytest.raises(P2PColdError, match="reference does not match"):
        SharedTensors(schema, CONFIG, {"w": torch.zeros(3, 2)})


def test_a_held_lock_is_a_failed_copy_not_a_wait_without_end():
    shared, lock = SharedTensors(BodySchema(TEMPLATE), CONFIG), threading.Lock()
    lock.acquire()
    assert not shared.write(TEMPLATE, lock, timeout=0.05)
    assert shared.read(lock) is None  # after local_rpc_timeout
    assert not lock.acquire(blocking=False)  # still the holder's: a failed copy releases nothing

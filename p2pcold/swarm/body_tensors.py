"""The fused body's schema, and the copies in and out of the averager process's shared memory.

hivemind's averager owns shared-memory float32 copies of the body tensors, in sorted name order (the
same on every peer). `SharedTensors` writes a body into them before an all-reduce and reads the fused
body back after it, under the averager's tensor lock; with a `reference` (θ0) the all-reduce averages
`body - reference`, and the reference is added back on the way out.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping

import torch

from p2pcold.config import SwarmConfig
from p2pcold.swarm.identity import body_schema_hash
from p2pcold.utils import P2PColdError


class BodySchema:
    """The names, shapes and dtypes of the fused tensors, fixed by a template body (any values)."""

    def __init__(self, template: Mapping[str, torch.Tensor]):
        if not template:
            raise P2PColdError("swarm: the body to fuse has no tensors")
        for name, tensor in template.items():
            if not torch.is_floating_point(tensor):
                raise P2PColdError(
                    f"swarm: body tensor {name!r} is {tensor.dtype}; only float tensors can be fused"
                )
        self.names = sorted(template)  # the averaged tensors' order, identical on every peer
        self.order = list(template)  # the caller's order, used for returned bodies
        self.shapes = {name: tuple(template[name].shape) for name in self.names}
        self.dtypes = {name: template[name].dtype for name in self.names}
        self.hash = body_schema_hash(template)

    @property
    def float32_bytes(self) -> int:
        """The body's size in float32."""
        return sum(4 * math.prod(shape) for shape in self.shapes.values())

    def check(self, body: Mapping[str, torch.Tensor], what: str) -> None:
        """Raise P2PColdError unless `body` has exactly these names and shapes."""
        names = sorted(body)
        if names != self.names:
            missing, extra = sorted(set(self.names) - set(names)), sorted(set(names) - set(self.names))
            raise P2PColdError(
                f"swarm: {what} does not match the fused schema (missing {missing[:5]}, extra {extra[:5]})"
            )
        for name in names:
            if tuple(body[name].shape) != self.shapes[name]:
                shape, expected = tuple(body[name].shape), self.shapes[name]
                raise P2PColdError(f"swarm: {what} tensor {name!r} has shape {shape}, expected {expected}")


class SharedTensors:
    """The float32 tensors the averager process averages (`tensors`, handed to it at its creation), and
    the copies of a body into and out of them. Every copy holds the averager's `lock`, passed per call."""

    def __init__(
        self, schema: BodySchema, config: SwarmConfig, reference: Mapping[str, torch.Tensor] | None = None
    ):
        self.schema, self.config = schema, config
        self.reference: dict[str, torch.Tensor] | None = None
        if reference is not None:
            schema.check(reference, "reference")
            self.reference = {n: reference[n].detach().to("cpu", torch.float32).clone() for n in schema.names}
        self.tensors = [torch.zeros(schema.shapes[name], dtype=torch.float32) for name in schema.names]

    @contextlib.contextmanager
    def referenced_to(self, reference: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
        """`reference` in place of the constructor's until the block ends (None: the constructor's)."""
        kept = self.reference
        if reference is not None:
            self.schema.check(reference, "reference")
            self.reference = {n: reference[n].detach().to("cpu", torch.float32) for n in self.schema.names}
        try:
            yield
        finally:
            self.reference = kept

    def write(self, body: Mapping[str, torch.Tensor], lock, timeout: float) -> bool:
        """Copy `body` (minus the reference) in; False if the lock stayed taken (at most
        allreduce_timeout)."""
        if not lock.acquire(timeout=max(0.0, min(timeout, self.config.allreduce_timeout))):
            return False
        try:
            # One pass per tensor, straight into the shared buffer (benchmarks: the copies around the
            # all-reduce are the part of a fusion round that bare hivemind does not have).
            for name, tensor in zip(self.schema.names, self.tensors):
                value = body[name].detach().to("cpu", torch.float32)
                if self.reference is not None:
                    torch.sub(value, self.reference[name], out=tensor)
                else:
                    tensor.copy_(value)
        finally:
            lock.release()
        return True

    def read(self, lock) -> dict[str, torch.Tensor] | None:
        """A new body (plus the reference, in the template's dtypes); None if the lock stayed taken."""
        if not lock.acquire(timeout=self.config.local_rpc_timeout):
            return None
        try:
            out = {}
            for name, tensor in zip(self.schema.names, self.tensors):
                if self.reference is not None:
                    value = torch.add(tensor, self.reference[name])
                else:
                    value = tensor.clone()
                out[name] = value.to(self.schema.dtypes[name])
            return out
        finally:
            lock.release()

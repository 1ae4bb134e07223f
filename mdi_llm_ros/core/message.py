"""One hop of one request on the ring, as the core sees it (msg/Activation.msg field by field).

The ROS nodes convert between this and the generated message and nothing else; LocalRing
passes it around in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import codec

KIND_PREFILL = 0
KIND_DECODE = 1
KIND_RELEASE = 2
KIND_NAMES = {KIND_PREFILL: "prefill", KIND_DECODE: "decode", KIND_RELEASE: "release"}


@dataclass
class HopMessage:
    """One hop of one request (see msg/Activation.msg for the meaning of each field)."""

    cluster: str
    epoch: int
    request_id: int
    step: int
    first_position: int
    kind: int
    hop: int
    dtype: str = ""
    shape: list[int] = field(default_factory=list)
    data: object = b""          # any buffer: bytes, memoryview, array.array('B')
    view: int = 0               # the ring's view it was sent in (core.view)
    priority: int = 0           # its request's priority: chunks compute higher ones first

    @classmethod
    def with_tensor(cls, tensor: torch.Tensor, **fields) -> "HopMessage":
        dtype, shape, data = codec.encode(tensor)
        return cls(dtype=dtype, shape=shape, data=data, **fields)

    def tensor(self, max_bytes: int | None = None) -> torch.Tensor:
        return codec.decode(self.dtype, self.shape, self.data, max_bytes=max_bytes)

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes

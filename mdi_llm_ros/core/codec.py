"""Tensor <-> (dtype, shape, bytes) without pickle and without Python loops.

Encoding returns a memoryview over the tensor's own storage (zero-copy for a
contiguous CPU tensor); decoding wraps any buffer (bytes, array.array('B') as
rclpy delivers uint8[] fields, memoryview) with torch.frombuffer.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .formats import DTYPE_BYTES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_BYTES}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class CodecError(ValueError):
    """The (dtype, shape, bytes) triple is inconsistent."""


def encode(tensor: torch.Tensor) -> tuple[str, list[int], memoryview]:
    """Return (dtype name, shape, raw bytes view) of a tensor."""
    if tensor.dtype not in DTYPE_NAMES:
        raise CodecError(f"unsupported dtype {tensor.dtype}; use one of {sorted(DTYPES)}")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # bfloat16 has no numpy/buffer format: view the same bytes as int16.
    raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
    return DTYPE_NAMES[t.dtype], list(t.shape), memoryview(raw.numpy()).cast("B")


def decode(dtype: str, shape: Sequence[int], data, *, max_bytes: int | None = None) -> torch.Tensor:
    """Wrap `data` as a tensor of `dtype` and `shape`; checks every field first.

    The result shares memory with `data` (read-only buffers are copied once).
    """
    if dtype not in DTYPES:
        raise CodecError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    shape = [int(s) for s in shape]
    if not shape or any(s <= 0 for s in shape):
        raise CodecError(f"invalid shape {shape}: every dimension must be positive")
    torch_dtype = DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected = math.prod(shape) * itemsize
    view = memoryview(data).cast("B")
    if max_bytes is not None and view.nbytes > max_bytes:
        raise CodecError(f"payload of {view.nbytes} bytes exceeds the limit of {max_bytes}")
    if view.nbytes != expected:
        raise CodecError(
            f"payload has {view.nbytes} bytes but dtype {dtype} and shape {shape} need {expected}")
    if view.readonly:
        view = memoryview(bytearray(view))
    flat = torch.frombuffer(view, dtype=torch.uint8)
    return flat.view(torch_dtype).view(shape)

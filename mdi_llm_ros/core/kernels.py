"""Which matrix-multiply kernels a node's linear layers use: `exact` or `packed`.

exact (default): weights stay plain tensors and every linear layer calls `F.linear`,
the kernels `transformers` itself calls, so a lone request's hidden states and logits
are bit-identical to `transformers` (tested).

packed: every weight is reordered once, at load, into oneDNN's blocked layout and
multiplied with oneDNN. The reordered copy replaces the plain one, so memory is the
same, and small batches read it faster than the plain layout (docs/performance.md).
The price is the summation order: results differ from `transformers` in the last
bits, for lone requests too, so greedy tokens match `transformers` only where the top
two logits are not within that noise of each other (`mdi-llm bench` checks and reports
it). In exchange, a row's result no longer depends on which other rows share its
matmul: oneDNN computes every row of a packed weight the same way for any batch size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .formats import KERNELS
from .errors import ModelError

# The batch size oneDNN picks the weight layout for; every batch size works with it,
# and with this hint a row's result is the same for any batch (tested).
PACK_BATCH_HINT = 8


def row_bucket(rows: int) -> int:
    """The row count a packed matmul of `rows` rows runs with: the next power of two up to 64,
    then the next multiple of 64 (a few dozen distinct counts for any batch or prompt).
    """
    if rows <= 64:
        return 1 << max(0, rows - 1).bit_length()
    return -(-rows // 64) * 64


def packed_unsupported(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why `packed` cannot run here, or None if it can."""
    if torch.device(device).type != "cpu":
        return f"packed kernels run on the CPU only, not on {device}"
    if dtype != torch.float32:
        return f"packed kernels compute float32 only, not {str(dtype).removeprefix('torch.')}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    return None


def check_kernels(kernels: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a kernels value this node cannot run, saying what to set instead."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r} is not one of {', '.join(KERNELS)}")
    if kernels == "packed" and (why := packed_unsupported(device, dtype)):
        raise ModelError(f"model.kernels is packed, but {why}; set model.kernels: exact")


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight in oneDNN's blocked layout (the plain weight is dropped)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # an opaque oneDNN tensor: not a parameter (state_dict and .to() cannot handle it)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        self.bias = None if bias is None else bias.detach().clone()   # never a view of a load buffer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        rows = x.numel() // self.in_features
        padded = row_bucket(rows)
        if padded == rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        # Each distinct row count compiles (and keeps) oneDNN kernels of its own, so rows are
        # padded to a few sizes; padding leaves the real rows' results unchanged.
        flat = x.new_zeros((padded, self.in_features))
        flat[:rows] = x.reshape(rows, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")[:rows]
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedHead(nn.Module):
    """A large output layer (vocab, hidden), packed a block of rows at a time.

    Only one block's plain rows are in memory next to the packed ones while it loads, and
    every block is read into the same buffer (no second copy of the head, no heap holes).
    The blocks' outputs are the same numbers as one packed matmul's (tested).
    """

    BLOCK_ROWS = 8192

    def __init__(self, read_rows: Callable[[int, int, torch.Tensor | None], torch.Tensor], rows: int) -> None:
        """read_rows(start, end, buffer): the plain rows [start, end), read into `buffer` if it can."""
        super().__init__()
        self.blocks = nn.ModuleList()
        buffer = None
        for start in range(0, rows, self.BLOCK_ROWS):
            plain = read_rows(start, min(start + self.BLOCK_ROWS, rows), buffer)
            buffer = plain if buffer is None else buffer
            self.blocks.append(PackedLinear(plain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., hidden) -> (..., vocab)
        return torch.cat([block(x) for block in self.blocks], dim=-1)


def pack_linears(module: nn.Module) -> int:
    """Replace every `nn.Linear` inside `module` by a PackedLinear, and give every other
    parameter (norm weights) storage of its own, so the module holds nothing of the tensors
    it was loaded from (a reused read buffer); returns how many linears were packed.
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear.from_linear(child))
            count += 1
        else:
            count += pack_linears(child)
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=False))
    return count

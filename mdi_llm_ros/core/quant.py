"""Weight-only 4-bit and 8-bit linear layers (model.quantization: int4 | int8).

A quantized weight stays in its integer form in memory and is multiplied with torch's
weight-packed kernels, chosen per device:

* x86 CPU: `_weight_int4pack_mm_for_cpu` (groups of 32 along the input) and
  `_weight_int8pack_mm` (one scale per output row), with bfloat16 activations: the same
  kernels are 10-70x slower with float32 or float16 ones.
* CUDA: `_weight_int4pack_mm` (tinygemm's tiled layout) and `_weight_int8pack_mm`, bfloat16.
* ARM CPU: `_dyn_quant_matmul_4bit` (KleidiAI) for symmetric weights (GGUF Q4_0) where torch
  has it, else the x86 path. Neither ARM nor CUDA was at hand to test here.

Only the matrix multiplies are integer: norms, the residual stream, attention and softmax
stay in the model dtype (float32), because that is where a rounding error would grow; a
linear layer casts its input to bfloat16 and its output back.

int4 is asymmetric groupwise: w = (q - 8) * scale + zero for q in 0..15, one (scale, zero)
per 32 inputs of a row. A GGUF Q4_0 block (w = (q - 8) * d) and a Q4_1 block (w = q * d + m)
map onto it exactly (scale d, zero 0 or m + 8 d), so the ring runs the file's own weights.
int8 is symmetric: w = q * scale, one scale per row, or per group of 32 for a GGUF Q8_0
tensor, whose blocks are kept as they are (computed as two 4-bit halves, see Int8Linear).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .errors import ModelError
from .formats import QUANTIZATIONS, linear_format

GROUP = 32
ACT = torch.bfloat16          # activations of the integer kernels


@dataclass
class Int4Weight:
    """w = (q - 8) * scale + zero, per group of GROUP inputs: q (out, in) uint8 in 0..15,
    scale and zero (out, in / GROUP) float32.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    exact: bool = False          # the file's own blocks, not re-quantized

    def dequantize(self) -> torch.Tensor:
        out, inp = self.q.shape
        groups = self.q.float().view(out, inp // GROUP, GROUP)
        return ((groups - 8) * self.scale[..., None] + self.zero[..., None]).view(out, inp)


@dataclass
class Int8Weight:
    """w = q * scale: q (out, in) int8, scale (out, in / group) float32 (group = in: per row)."""

    q: torch.Tensor
    scale: torch.Tensor
    group: int
    exact: bool = False

    def dequantize(self) -> torch.Tensor:
        out, inp = self.q.shape
        return (self.q.float().view(out, inp // self.group, self.group) * self.scale[..., None]).view(out, inp)


# Clipping tried at each end of a group's range when re-quantizing to int4 (fractions of the range).
CLIPS = (0.0, 0.04, 0.08, 0.12, 0.16, 0.2)


def quantize_int4(w: torch.Tensor) -> Int4Weight:
    """Groupwise asymmetric 4-bit: for each group of 32 inputs, the range [lo, hi] (its min and max,
    each end clipped by one of CLIPS) with the least squared error; plain min/max lets one
    outlier waste most of a group's 16 levels.
    """
    out, inp = w.shape
    groups = w.float().reshape(-1, GROUP)                                   # (out * in / G, G)
    lo0, hi0 = groups.amin(-1), groups.amax(-1)
    span = (hi0 - lo0).clamp(min=1e-8)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_scale = lo0.clone(), span / 15
    for a in CLIPS:
        for b in CLIPS:
            lo, scale = lo0 + a * span, (span * (1 - a - b)).clamp(min=1e-8) / 15
            q = ((groups - lo[:, None]) / scale[:, None]).round().clamp(0, 15)
            err = ((q * scale[:, None] + lo[:, None] - groups) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_scale = torch.where(better, lo, best_lo), torch.where(better, scale, best_scale)
    q = ((groups - best_lo[:, None]) / best_scale[:, None]).round().clamp(0, 15).to(torch.uint8)
    return Int4Weight(q.reshape(out, inp), best_scale.reshape(out, -1), (best_lo + 8 * best_scale).reshape(out, -1))


def quantize_int8(w: torch.Tensor, group: int | None = None) -> Int8Weight:
    """Symmetric 8-bit, one scale (absmax / 127) per `group` inputs of a row (None: the whole row)."""
    out, inp = w.shape
    group = group if group and inp % group == 0 else inp
    groups = w.float().reshape(out, inp // group, group)
    scale = (groups.abs().amax(-1) / 127).clamp(min=1e-12)                  # (out, in / group)
    q = (groups / scale[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(out, inp)
    return Int8Weight(q, scale, group)


def from_blocks(form: str, q, d, m) -> Int4Weight | Int8Weight:
    """A GGUF tensor's own blocks (numpy, see gguf.GGUFData.int_blocks): q4_sym, q4_affine or q8."""
    qt, dt = torch.from_numpy(q), torch.from_numpy(d)
    if form == "q8":
        return Int8Weight(qt.contiguous(), dt.contiguous(), GROUP, exact=True)
    zero = torch.zeros_like(dt) if form == "q4_sym" else torch.from_numpy(m) + 8 * dt
    return Int4Weight(qt.contiguous(), dt.contiguous(), zero.contiguous(), exact=True)


def to_int4(w: Int4Weight | Int8Weight | torch.Tensor) -> Int4Weight:
    """Any weight as int4: the file's own 4-bit blocks as they are, anything else re-quantized."""
    if isinstance(w, Int4Weight):
        return w
    return quantize_int4(w.dequantize() if isinstance(w, Int8Weight) else w)


def to_int8(w: Int4Weight | Int8Weight | torch.Tensor, group: int | None = None) -> Int8Weight:
    if isinstance(w, Int8Weight):
        return w
    return quantize_int8(w.dequantize() if isinstance(w, Int4Weight) else w, group)


def arm_kleidiai() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64") and hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit")


def check_quantization(quantization: str, device: torch.device) -> None:
    """Refuse a quantization this device cannot run, saying what to set instead."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none" and device.type not in ("cpu", "cuda"):
        raise ModelError(f"model.quantization {quantization} runs on the CPU and on CUDA, not on {device}; "
                         "set model.quantization: none")


ROW_SLICE = 1024          # rows of a head made at a time: it never exists whole in float or unpacked
PACK_ELEMENTS = 1 << 21   # weights packed at a time (8 MB of the int32 the CPU packing wants)


def _pack_cpu(q: torch.Tensor) -> torch.Tensor:
    """Pack q (out, in) 0..15 into the CPU int4 kernel's packed (out, in / 2) uint8, a slice of rows at a
    time (its layout is row by row, so slices concatenate; the kernel wants int32 input).
    """
    step = max(64, PACK_ELEMENTS // q.shape[1] // 64 * 64)        # the packing wants N % 16 == 0
    return torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i:i + step].to(torch.int32), 1)
                      for i in range(0, q.shape[0], step)])


def _scales_and_zeros(w: Int4Weight, device: torch.device) -> torch.Tensor:
    return torch.stack([w.scale, w.zero], dim=-1).transpose(0, 1).contiguous().to(device=device, dtype=ACT)


def _fills_in_place(device: torch.device) -> bool:
    """Whether the device's packed int4 layout is row by row (slices pack into place)."""
    return device.type == "cpu" and not arm_kleidiai()


class Int4Linear(nn.Module):
    """nn.Linear with a 4-bit groupwise weight, multiplied by the device's int4 kernel.

    `weight` may be an iterable of row slices (a large head read a slice at a time) with `rows`
    their total: on the CPU each is packed into place before the next is made, so the unpacked
    matrix never exists whole and no pieces are left to fragment the heap.
    """

    def __init__(self, weight: Int4Weight | Iterable[Int4Weight], bias: torch.Tensor | None,
                 device: torch.device, rows: int | None = None) -> None:
        super().__init__()
        self.device, self.exact, self.kleidiai = device, True, False
        self.bias = None if bias is None else bias.detach().to(device).clone()
        if isinstance(weight, Int4Weight):
            self._pack_whole(weight, device)
        elif not _fills_in_place(device):
            self._pack_whole(concat_weights(list(weight)), device)
        else:
            if rows is None:
                raise ValueError("row slices need their total `rows`")
            at = 0
            for w in weight:
                self.fill(at, w, rows)
                at += w.q.shape[0]
            if at != rows:
                raise ValueError(f"row slices hold {at} rows, not {rows}")

    def fill(self, at: int, w: Int4Weight, rows: int) -> None:
        """Pack rows [at, at + len(w)) of a `rows`-row weight into place (CPU); the first allocates."""
        if at == 0:
            self.out_features, self.in_features = rows, w.q.shape[1]
            self.packed = torch.empty((rows, self.in_features // 2), dtype=torch.uint8)
            self.scales_and_zeros = torch.empty((self.in_features // GROUP, rows, 2), dtype=ACT)
        end = at + w.q.shape[0]
        self.packed[at:end] = _pack_cpu(w.q)
        self.scales_and_zeros[:, at:end] = _scales_and_zeros(w, self.device)
        self.exact = self.exact and w.exact

    def _pack_whole(self, weight: Int4Weight, device: torch.device) -> None:
        self.out_features, self.in_features = weight.q.shape
        self.exact = weight.exact
        self.scales_and_zeros = _scales_and_zeros(weight, device)
        # KleidiAI's kernel is symmetric: only for weights without zero points (GGUF Q4_0)
        self.kleidiai = device.type == "cpu" and arm_kleidiai() and not bool(weight.zero.any())
        if device.type == "cuda":
            q = weight.q.to(device)
            packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)                 # (out, in/2)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        elif self.kleidiai:
            q = weight.q.to(torch.uint8)
            self.packed = torch.ops.aten._dyn_quant_pack_4bit_weight(
                (q[:, 1::2] << 4 | q[:, ::2]).to(torch.uint8), weight.scale.float(), None, GROUP, self.in_features,
                self.out_features)
        else:
            self.packed = _pack_cpu(weight.q)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out), in x's dtype
        flat = x.reshape(-1, self.in_features)
        if self.kleidiai:
            y = torch.ops.aten._dyn_quant_matmul_4bit(flat.float(), self.packed, GROUP, self.in_features,
                                                      self.out_features)
        elif self.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(flat.to(ACT), self.packed, GROUP, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(ACT), self.packed, GROUP, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def int8_halves(w: Int8Weight) -> tuple[Int4Weight, Int4Weight]:
    """An 8-bit weight with groups of 32 as two 4-bit ones that add up to it (see Int8Linear)."""
    u = w.q.to(torch.int16) + 128                                         # 1..255
    hi, lo = (u >> 4).to(torch.uint8), (u & 15).to(torch.uint8)
    d = w.scale
    return (Int4Weight(hi, 16 * d, torch.zeros_like(d), exact=w.exact), Int4Weight(lo, d, 8 * d, exact=w.exact))


class Int8Linear(nn.Module):
    """nn.Linear with an 8-bit weight. One scale per row: torch's int8 kernel. One scale per group
    of 32 (a GGUF Q8_0 tensor kept exactly, or a head quantized by groups): as two 4-bit halves
    multiplied by the int4 kernel, whose groups carry the scales. With u = q + 128 = 16 hi + lo,
    q d = (hi - 8) 16 d + (lo - 8) d + 8 d, so two int4 matmuls (scale 16 d; scale d, zero 8 d)
    add up to the 8-bit product, each accumulated in float32 by the kernel. `weight` may be an
    iterable of row slices with groups of 32 (a large head, one slice in memory at a time).
    """

    def __init__(self, weight: Int8Weight | Iterable[Int8Weight], bias: torch.Tensor | None,
                 device: torch.device, rows: int | None = None) -> None:
        super().__init__()
        self.halves: list[Int4Linear] = []
        if isinstance(weight, Int8Weight) and weight.group == weight.q.shape[1]:
            self.out_features, self.in_features = weight.q.shape
            self.exact, self.group = weight.exact, weight.group
            self.q = weight.q.to(device).contiguous()
            self.scale = weight.scale[:, 0].contiguous().to(device=device, dtype=ACT)
        elif isinstance(weight, Int8Weight) or not _fills_in_place(device):
            whole = weight if isinstance(weight, Int8Weight) else concat_weights(list(weight))
            _check_group(whole)
            self.halves = [Int4Linear(h, None, device) for h in int8_halves(whole)]
        else:                           # row slices, each split and packed into place as it comes
            if rows is None:
                raise ValueError("row slices need their total `rows`")
            self.halves = [Int4Linear((), None, device, rows=0) for _ in range(2)]
            at = 0
            for w in weight:
                _check_group(w)
                for half, part in zip(self.halves, int8_halves(w), strict=True):
                    half.fill(at, part, rows)
                at += w.q.shape[0]
        if self.halves:
            self.out_features, self.in_features = self.halves[0].out_features, self.halves[0].in_features
            self.exact, self.group = all(h.exact for h in self.halves), GROUP
        self.bias = None if bias is None else bias.detach().to(device).clone()

    @property
    def nbytes(self) -> int:
        if self.halves:
            return sum(h.nbytes for h in self.halves)
        return self.q.nbytes + self.scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out), in x's dtype
        if self.halves:
            hi, lo = self.halves
            y = hi(x).float() + lo(x).float()
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(ACT), self.q, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _check_group(w: Int8Weight) -> None:
    if w.group != GROUP:
        raise ValueError(f"int8 groups of {w.group} inputs: only one per row or {GROUP} are computed")


def _joined(parts: list[Int4Linear]) -> Int4Linear:
    """Row slices of one int4 matrix, packed each on its own, as one layer."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if any(p.device.type != "cpu" or p.kleidiai or p.in_features != first.in_features for p in parts):
        raise ValueError("row slices of one width are joined for the x86 CPU kernel only")
    first.packed = torch.cat([p.packed for p in parts])
    first.scales_and_zeros = torch.cat([p.scales_and_zeros for p in parts], dim=1)
    first.out_features = first.packed.shape[0]
    first.exact = all(p.exact for p in parts)
    return first


class RefinedHead(nn.Module):
    """An LM head on integer kernels whose few largest logits per position are recomputed in
    float32. The kernels round their outputs to bfloat16 (~0.4% of a logit), which decides near
    ties differently from a float32 head; the `refine` largest of each position, the ones greedy
    decoding and sampling look at, are recomputed from the stored rows, read from the file when
    needed (`rows(ids)` -> (len, in) float32), so no float copy of the head is held.
    """

    def __init__(self, linear: nn.Module, rows, refine: int) -> None:
        super().__init__()
        self.linear, self.rows, self.refine = linear, rows, refine
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.exact = linear.exact

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., vocab) logits in x's dtype
        y = self.linear(x)
        flat_x, flat_y = x.reshape(-1, self.in_features).float(), y.reshape(-1, self.out_features)
        top = flat_y.topk(self.refine, dim=-1).indices                                  # (positions, k)
        ids, where = torch.unique(top, return_inverse=True)
        w = self.rows(ids).float()                                                      # (unique, in)
        exact = (flat_x @ w.T).gather(-1, where)                                        # (positions, k)
        return flat_y.scatter(-1, top, exact.to(flat_y.dtype)).view(y.shape)


def quantized_weight(weight: torch.Tensor | Int4Weight | Int8Weight, quantization: str,
                     stored: str = "F32") -> Int4Weight | Int8Weight:
    """A matrix of a quantized node, from float or the file's own blocks (see linear_format)."""
    return to_int4(weight) if linear_format(quantization, stored) == "int4" else to_int8(weight)


def linear_of(weight: Int4Weight | Int8Weight, bias: torch.Tensor | None, device: torch.device) -> nn.Module:
    return Int4Linear(weight, bias, device) if isinstance(weight, Int4Weight) else Int8Linear(weight, bias, device)


def join_linears(parts: list[nn.Module]) -> nn.Module | None:
    """Linear layers without bias stacked by output rows (q, k and v of a layer; gate and up), for one
    kernel call instead of several, made from their packed forms (so the unpacked integers of a
    whole layer never exist at once); None where their formats differ or the device's packed
    layout does not stack by rows.
    """
    if any(p.bias is not None for p in parts):
        return None
    if all(isinstance(p, Int4Linear) for p in parts):
        if any(p.device.type != "cpu" or p.kleidiai for p in parts):
            return None
        return _joined(parts)
    if all(isinstance(p, Int8Linear) for p in parts):
        if all(p.halves for p in parts):
            joined = [_joined([p.halves[i] for p in parts]) for i in range(2)]
            first = parts[0]
            if any(j is None for j in joined):
                return None
            first.halves, first.out_features = joined, joined[0].out_features
            first.exact = all(p.exact for p in parts)
            return first
        if not any(p.halves for p in parts):
            first = parts[0]
            first.q = torch.cat([p.q for p in parts])
            first.scale = torch.cat([p.scale for p in parts])
            first.out_features, first.exact = first.q.shape[0], all(p.exact for p in parts)
            return first
    return None


def concat_weights(weights: list[Int4Weight | Int8Weight]) -> Int4Weight | Int8Weight | None:
    """Matrices stacked by rows (q, k and v of a layer; gate and up), for one kernel call instead of
    several; None where their formats differ.
    """
    first = weights[0]
    if isinstance(first, Int4Weight) and all(isinstance(w, Int4Weight) for w in weights):
        return Int4Weight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]),
                          torch.cat([w.zero for w in weights]), exact=all(w.exact for w in weights))
    if isinstance(first, Int8Weight) and all(isinstance(w, Int8Weight) and w.group == first.group for w in weights):
        return Int8Weight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]), first.group,
                          exact=all(w.exact for w in weights))
    return None

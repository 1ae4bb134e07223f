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
tensor, whose blocks are kept as they are (the kernel then runs once per group).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError
from .formats import QUANTIZATIONS, linear_format

GROUP = 32
ACT = torch.bfloat16          # activations of the integer kernels


@dataclass
class Int4Weight:
    """w = (q - 8) * scale + zero, per group of GROUP inputs: q (out, in) uint8 in 0..15,
    scale and zero (out, in / GROUP) float32."""

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
    outlier waste most of a group's 16 levels."""
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


class Int4Linear(nn.Module):
    """nn.Linear with a 4-bit groupwise weight, multiplied by the device's int4 kernel."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.exact = weight.exact
        self.device = device
        sz = torch.stack([weight.scale, weight.zero], dim=-1).transpose(0, 1).contiguous()   # (in/G, out, 2)
        self.scales_and_zeros = sz.to(device=device, dtype=ACT)
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
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)
        self.bias = None if bias is None else bias.detach().to(device).clone()

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


class Int8Linear(nn.Module):
    """nn.Linear with an 8-bit weight: one kernel call with one scale per row, or (a GGUF Q8_0
    tensor, kept exactly) one call per group of 32 inputs, summed in float32."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.exact = weight.exact
        self.group = weight.group
        q = weight.q.to(device)
        if self.group == self.in_features:
            self.parts = [q.contiguous()]
        else:
            self.parts = [q[:, g:g + self.group].contiguous() for g in range(0, self.in_features, self.group)]
        self.scales = [weight.scale[:, i].contiguous().to(device=device, dtype=ACT) for i in range(len(self.parts))]
        self.scale = weight.scale.to(device)            # float32, for exact row look-ups (embedding)
        self.bias = None if bias is None else bias.detach().to(device).clone()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) + sum(s.nbytes for s in self.scales) + self.scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(ACT)
        if len(self.parts) == 1:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.parts[0], self.scales[0]).to(x.dtype)
        else:
            y = torch.zeros((flat.shape[0], self.out_features), dtype=torch.float32, device=x.device)
            for g, (part, scale) in enumerate(zip(self.parts, self.scales, strict=True)):
                y += torch.ops.aten._weight_int8pack_mm(flat[:, g * self.group:(g + 1) * self.group], part, scale)
            y = y.to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """ids (...) -> (..., in): rows of the dequantized weight (an embedding that shares it)."""
        flat = ids.reshape(-1)
        q = torch.cat([part[flat] for part in self.parts], dim=1)                         # (rows, in)
        groups = q.float().view(len(flat), -1, self.group) * self.scale[flat][..., None]
        return groups.view(*ids.shape, self.in_features).to(dtype)


def quantized_linear(weight: torch.Tensor | Int4Weight | Int8Weight, bias: torch.Tensor | None,
                     quantization: str, device: torch.device, stored: str = "F32") -> nn.Module:
    """The linear layer of a quantized node, from float or the file's own blocks (see linear_format)."""
    if linear_format(quantization, stored) == "int4":
        return Int4Linear(to_int4(weight), bias, device)
    return Int8Linear(to_int8(weight), bias, device)

"""Llama-family decoder layers of our own, so chunk nodes need no `transformers`.

Importing transformers' config and modelling code costs every chunk process resident
memory and adds Python overhead on each layer call (attention dispatch, cache protocol,
mask helpers). The Llama, Mistral, Qwen2 and Qwen3 decoder
layers are small: this module computes them with the same torch operations in the
same order as transformers 5 does with `attn_implementation="sdpa"`, so a single
request's hidden states are bit-identical to `transformers` (tested), and uses the
same parameter names, so the same safetensors tensors load into them.

`DecoderSpec.from_config` returns None for anything it does not compute exactly
(sliding-window attention, scaled RoPE, other activations, other architectures);
the chunk then falls back to transformers' own layers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .kvcache import KVBatch

NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class DecoderSpec:
    """The shape and options of one decoder layer, read from a model's config.json."""

    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    windows: tuple[int | None, ...] = ()   # per layer: sliding-window length, None = full attention

    @classmethod
    def from_config(cls, cfg: dict) -> "DecoderSpec | None":
        """The spec of a config.json mapping, or None where our layers would not be exact."""
        return cls.support(cfg)[0]

    def window(self, layer_index: int) -> int | None:
        return self.windows[layer_index] if layer_index < len(self.windows) else None

    @classmethod
    def support(cls, cfg: dict) -> tuple["DecoderSpec | None", str]:
        """(spec, "") or (None, why the native layers do not cover this model)."""
        cfg = cfg.get("text_config", cfg)
        model_type = cfg.get("model_type", "")
        if model_type not in NATIVE_MODEL_TYPES:
            return None, f"model_type {model_type!r} is not one of {', '.join(NATIVE_MODEL_TYPES)}"
        if cfg.get("hidden_act", "silu") != "silu":
            return None, f"hidden_act {cfg.get('hidden_act')!r} (native layers compute silu)"
        layers = int(cfg["num_hidden_layers"])
        window = cfg.get("sliding_window")
        if model_type == "mistral":
            windows = (window,) * layers
        elif model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window") and window is not None:
            types = cfg.get("layer_types") or [
                "sliding_attention" if i >= cfg.get("max_window_layers", 28) else "full_attention"
                for i in range(layers)]
            windows = tuple(window if t == "sliding_attention" else None for t in types)
        else:
            windows = (None,) * layers
        if cfg.get("pretraining_tp", 1) not in (1, None):
            return None, "pretraining_tp > 1"
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            return None, f"RoPE type {rope_type!r}"
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        attention_bias = bool(cfg.get("attention_bias", False))
        spec = cls(
            model_type=model_type, hidden_size=hidden, num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            qkv_bias=True if model_type == "qwen2" else attention_bias and model_type != "mistral",
            o_bias=attention_bias and model_type in ("llama", "qwen3"),
            mlp_bias=bool(cfg.get("mlp_bias", False)) and model_type == "llama",
            qk_norm=model_type == "qwen3",
            windows=tuple(None if w is None else int(w) for w in windows))
        return spec, ""

    @classmethod
    def from_folder(cls, path: Path) -> "DecoderSpec | None":
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))


class RMSNorm(nn.Module):
    """Root-mean-square norm as Llama-family models compute it (in float32, then cast back)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """Default RoPE: cos/sin of position * inverse frequency, computed per call in float32."""

    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        dim = spec.head_dim
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, dtype: torch.dtype, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (batch, seq) -> cos, sin: (batch, seq, head_dim)
        freqs = position_ids[..., None].float() * self.inv_freq.to(dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=dtype), emb.sin().to(dtype=dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention over one request's cache, or a padded batch of caches."""

    def __init__(self, spec: DecoderSpec, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index      # global index: the key of this layer in a request's cache
        self.window = spec.window(layer_index)
        self.head_dim = spec.head_dim
        self.groups = spec.num_heads // spec.num_kv_heads
        self.scaling = spec.head_dim ** -0.5
        h, q_out, kv_out = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(h, q_out, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, kv_out, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, kv_out, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_out, h, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVBatch,
                mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape                                         # x: (batch, seq, hidden)
        shape = (batch, seq, -1, self.head_dim)
        q, k = self.q_proj(x).view(shape), self.k_proj(x).view(shape)  # (batch, seq, heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                     # (batch, heads, seq, head_dim)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                   # (batch, 1, seq, head_dim)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        keys, values = kv.update(k, v, self.layer_index)              # (batch, kv_heads, length, head_dim)
        if mask is None:
            # one request, every cached position visible: causal flash attention, as transformers
            extra = {"enable_gqa": True} if self.groups > 1 else {}
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=None, dropout_p=0.0,
                                                 scale=self.scaling, is_causal=seq > 1, **extra)
        elif seq == 1:
            # decode with a mask (padded micro-batch rows, or a sliding window): the query heads
            # that share a key/value head go where a query sequence would be, as transformers does
            packed = q.reshape(batch, keys.shape[1], self.groups, self.head_dim)  # (batch, kv_heads, groups, hd)
            out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, dropout_p=0.0,
                                                 scale=self.scaling, is_causal=False)
            out = out.reshape(batch, -1, seq, self.head_dim)
        else:
            # prefill with a mask (a sliding window, or right-padded prompts of a batched
            # prefill): keys repeated per query head
            if self.groups > 1:
                keys = keys.repeat_interleave(self.groups, dim=1)
                values = values.repeat_interleave(self.groups, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0,
                                                 scale=self.scaling, is_causal=False)
        out = out.transpose(1, 2).contiguous().reshape(batch, seq, -1).contiguous()  # (batch, seq, heads*hd)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP with residuals; parameter names as in the Hugging Face checkpoints."""

    def __init__(self, spec: DecoderSpec, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Attention(spec, layer_index)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVBatch,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Decoder layers [start, end) and the rotary table they share."""

    def __init__(self, spec: DecoderSpec, start: int, end: int) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(start, end))
        with torch.device("cpu"):
            # computed, not loaded, so never built on the meta device (whose kernels for `**`
            # import sympy and mpmath into every chunk process)
            self.rotary = Rotary(spec)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, kv: KVBatch,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, seq, hidden); position_ids: (batch, seq); `kv` holds one request per row.

        batch > 1 needs `mask` (batch, 1, seq, kv.length): each row's padding hidden, and for
        seq > 1 (a batched prefill) causal too.
        """
        cos, sin = self.rotary(x.dtype, position_ids)
        masks: dict[int | None, torch.Tensor | None] = {None: mask}
        for layer in self.layers:
            window = layer.self_attn.window
            if window not in masks:
                masks[window] = window_mask(position_ids, kv, window, mask)
            x = layer(x, cos, sin, kv, masks[window])
        return x


def window_mask(position_ids: torch.Tensor, kv: KVBatch, window: int,
                padding: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, 1, seq, length) bool: causal, within `window` of each query, inside each row's cache.

    None where the window hides nothing (no cache is longer than it) and there is no padding.
    """
    if kv.length <= window:
        return padding
    keys = torch.arange(kv.length, device=position_ids.device)[None, None, None, :]   # (1, 1, 1, length)
    q = position_ids[:, None, :, None]                                                # (batch, 1, seq, 1)
    allowed = (keys <= q) & (keys > q - window)
    return allowed if padding is None else allowed & padding

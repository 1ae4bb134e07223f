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

NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


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
    rope_thetas: tuple[float, ...] = ()      # per layer, where layer types differ (Gemma 3: local / global)
    norm_offset: float = 0.0               # Gemma: norms multiply by (offset + weight)
    activation: str = "silu"               # silu | gelu_tanh
    sandwich_norms: bool = False           # Gemma 3: a norm after attention and around the MLP
    query_scale: float | None = None       # attention scale (None: head_dim ** -0.5)
    embed_scale: float | None = None       # the coordinator multiplies embeddings by it (Gemma: sqrt(hidden))

    @classmethod
    def from_config(cls, cfg: dict) -> "DecoderSpec | None":
        """The spec of a config.json mapping, or None where our layers would not be exact."""
        return cls.support(cfg)[0]

    def window(self, layer_index: int) -> int | None:
        return self.windows[layer_index] if layer_index < len(self.windows) else None

    def theta(self, layer_index: int) -> float:
        return self.rope_thetas[layer_index] if layer_index < len(self.rope_thetas) else self.rope_theta

    @classmethod
    def support(cls, cfg: dict) -> tuple["DecoderSpec | None", str]:
        """(spec, "") or (None, why the native layers do not cover this model)."""
        cfg = cfg.get("text_config", cfg)
        model_type = cfg.get("model_type", "")
        if model_type not in NATIVE_MODEL_TYPES:
            return None, f"model_type {model_type!r} is not one of {', '.join(NATIVE_MODEL_TYPES)}"
        if model_type == "gemma3_text":
            return cls._gemma3(cfg)
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
    def _gemma3(cls, cfg: dict) -> tuple["DecoderSpec | None", str]:
        """Gemma 3's text layers: (1 + w) norms, GELU-tanh, norms around attention and the MLP,
        local (sliding) and global layers with a RoPE base each, query_pre_attn_scalar.
        """
        if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            return None, f"hidden_activation {cfg.get('hidden_activation')!r}"
        if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
            return None, "logit soft-capping"
        if cfg.get("use_bidirectional_attention"):
            return None, "bidirectional attention"
        layers = int(cfg["num_hidden_layers"])
        types = cfg.get("layer_types") or ["full_attention" if (i + 1) % cfg.get("sliding_window_pattern", 6) == 0
                                           else "sliding_attention" for i in range(layers)]
        rope = cfg.get("rope_parameters") or {}
        thetas = []
        for t in types:
            params = rope.get(t, {})
            if params.get("rope_type", "default") != "default":
                return None, f"RoPE type {params.get('rope_type')!r} for {t} layers"
            thetas.append(float(params.get("rope_theta", 10000.0 if t == "sliding_attention" else 1e6)))
        heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        window = cfg.get("sliding_window")
        return cls(
            model_type="gemma3_text", hidden_size=hidden, num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=thetas[0],
            qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=False, qk_norm=True,
            windows=tuple(int(window) if t == "sliding_attention" and window else None for t in types),
            rope_thetas=tuple(thetas), norm_offset=1.0, activation="gelu_tanh", sandwich_norms=True,
            query_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5, embed_scale=hidden ** 0.5), ""

    @classmethod
    def from_folder(cls, path: Path) -> "DecoderSpec | None":
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))


class RMSNorm(nn.Module):
    """Root-mean-square norm as Llama-family models compute it (in float32, then cast back);
    with `offset` (Gemma), scaled by (offset + weight) in float32 before the cast.
    """

    def __init__(self, size: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.variance_epsilon = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """Default RoPE: cos/sin of position * inverse frequency, computed per call in float32."""

    def __init__(self, spec: DecoderSpec, theta: float | None = None) -> None:
        super().__init__()
        dim = spec.head_dim
        base = spec.rope_theta if theta is None else theta
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
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
        self.theta = spec.theta(layer_index)
        self.head_dim = spec.head_dim
        self.groups = spec.num_heads // spec.num_kv_heads
        self.scaling = spec.query_scale if spec.query_scale is not None else spec.head_dim ** -0.5
        h, q_out, kv_out = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.q_proj = nn.Linear(h, q_out, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, kv_out, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, kv_out, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_out, h, bias=spec.o_bias)
        self.qkv_proj: nn.Module | None = None
        self.qkv_sizes = (q_out, kv_out, kv_out)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.norm_offset)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVBatch,
                mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape                                         # x: (batch, seq, hidden)
        shape = (batch, seq, -1, self.head_dim)
        if self.qkv_proj is not None:       # one integer matmul for q, k and v (a quantized chunk joins them)
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
            q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        else:
            q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        # q, k, v: (batch, seq, heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (batch, heads, seq, head_dim)
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
        self.gelu = spec.activation == "gelu_tanh"
        self.gate_up_proj: nn.Module | None = None     # a quantized chunk joins gate and up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP with residuals; parameter names as in the Hugging Face checkpoints."""

    def __init__(self, spec: DecoderSpec, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Attention(spec, layer_index)
        self.mlp = MLP(spec)
        eps, offset = spec.rms_norm_eps, spec.norm_offset
        self.input_layernorm = RMSNorm(spec.hidden_size, eps, offset)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps, offset)
        self.sandwich = spec.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, offset)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVBatch,
                mask: torch.Tensor | None) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv, mask))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Decoder layers [start, end) and the rotary tables they use (one per RoPE base)."""

    def __init__(self, spec: DecoderSpec, start: int, end: int) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(start, end))
        with torch.device("cpu"):
            # computed, not loaded, so never built on the meta device (whose kernels for `**`
            # import sympy and mpmath into every chunk process)
            self.rotaries = nn.ModuleDict({_rope_key(t): Rotary(spec, t)
                                           for t in dict.fromkeys(spec.theta(i) for i in range(start, end))})

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, kv: KVBatch,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (batch, seq, hidden); position_ids: (batch, seq); `kv` holds one request per row.

        batch > 1 needs `mask` (batch, 1, seq, kv.length): each row's padding hidden, and for
        seq > 1 (a batched prefill) causal too.
        """
        tables = {theta: rotary(x.dtype, position_ids) for theta, rotary in self.rotaries.items()}
        masks: dict[int | None, torch.Tensor | None] = {None: mask}
        for layer in self.layers:
            window = layer.self_attn.window
            if window not in masks:
                masks[window] = window_mask(position_ids, kv, window, mask)
            x = layer(x, *tables[_rope_key(layer.self_attn.theta)], kv, masks[window])
        return x


def _rope_key(theta: float) -> str:
    return f"theta_{theta:g}".replace(".", "_")


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

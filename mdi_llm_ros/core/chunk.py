"""Chunk execution: a contiguous range of decoder layers with per-request KV caches.

A chunk builds only its own decoder layers (plus the rotary embedding they
need) and reads only their tensors from the safetensors files, so its weight
memory is its share of the model. Each request gets its own KV cache on its
prefill; decode steps extend it; a release (or an idle timeout) frees it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .codec import DTYPES
from .errors import ActivationRejected
from .models import ModelInfo, TensorReader, meta_model


class RequestKVCache:
    """Per-request key/value store for a chunk's layers, used by HF attention via `update`.

    Buffers are pre-allocated and grow by doubling, so a decode step writes in
    place instead of re-allocating the whole cache (as torch.cat would).
    """

    def __init__(self, layer_start: int, num_layers: int) -> None:
        self.layer_start = layer_start
        self.keys: list[torch.Tensor | None] = [None] * num_layers    # (1, kv_heads, capacity, head_dim)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self.last_step = -1
        self.last_used = time.monotonic()

    @property
    def length(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append new keys/values of one layer; return all cached ones (HF Cache protocol)."""
        i = layer_idx - self.layer_start
        n_new = key_states.shape[-2]
        used = self.lengths[i]
        buf_k, buf_v = self.keys[i], self.values[i]
        if buf_k is None or used + n_new > buf_k.shape[-2]:
            capacity = max(64, 1 << (used + n_new - 1).bit_length())
            new_k = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
            new_v = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
            if buf_k is not None and used:
                new_k[..., :used, :] = buf_k[..., :used, :]
                new_v[..., :used, :] = buf_v[..., :used, :]
            self.keys[i], self.values[i] = buf_k, buf_v = new_k, new_v
        buf_k[..., used:used + n_new, :] = key_states
        buf_v[..., used:used + n_new, :] = value_states
        self.lengths[i] = used + n_new
        return buf_k[..., :used + n_new, :], buf_v[..., :used + n_new, :]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class BatchedCacheView:
    """Presents several requests' caches as one batch to HF attention (micro-batched decode).

    Each request appends its own new key/value to its own cache; attention sees them padded
    to the longest one, and the mask built by `mask()` hides the padding.
    """

    def __init__(self, caches: list[RequestKVCache]) -> None:
        self.caches = caches

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states: (batch, kv_heads, 1, head_dim)
        parts = [c.update(key_states[b:b + 1], value_states[b:b + 1], layer_idx) for b, c in enumerate(self.caches)]
        longest = max(k.shape[-2] for k, _ in parts)
        keys = key_states.new_zeros((len(parts), key_states.shape[1], longest, key_states.shape[-1]))
        values = torch.zeros_like(keys)
        for b, (k, v) in enumerate(parts):
            keys[b, :, :k.shape[-2]] = k[0]
            values[b, :, :v.shape[-2]] = v[0]
        return keys, values

    def mask(self, device) -> torch.Tensor:
        """(batch, 1, 1, longest) bool: True where a request has a cached (or its new) position."""
        lengths = torch.tensor([c.length + 1 for c in self.caches], device=device)   # + the new token
        return (torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None])[:, None, None, :]


@dataclass
class ChunkStats:
    tokens_processed: int = 0
    decode_forwards: int = 0          # decode forwards run; decode tokens / this = mean micro-batch
    decode_tokens: int = 0
    bytes_received: int = 0
    busy_seconds: float = 0.0
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, cause: str) -> None:
        self.drops[cause] = self.drops.get(cause, 0) + 1


class ChunkExecutor:
    """Runs decoder layers [start, end) of a model for many requests, each with its own cache."""

    def __init__(self, info: ModelInfo, start: int, end: int, *, device: str = "cpu",
                 dtype: str = "float32", max_cached_requests: int = 64,
                 cache_idle_timeout_s: float = 600.0, reader: TensorReader | None = None) -> None:
        if not 0 <= start < end <= info.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {info.num_layers} layers")
        self.start, self.end = start, end
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.max_cached_requests = max_cached_requests
        self.cache_idle_timeout_s = cache_idle_timeout_s
        self.caches: dict[int, RequestKVCache] = {}
        self.stats = ChunkStats()
        self._lock = threading.Lock()

        skeleton = meta_model(info.config)
        layers = nn.ModuleList(skeleton.model.layers[start:end])
        layers.to_empty(device=self.device)
        self.reader = reader or TensorReader(info)
        names = {f"model.layers.{start + j}.{k}": (j, k)
                 for j, layer in enumerate(layers) for k in layer.state_dict()}
        tensors = self.reader.read(names, self.dtype, str(self.device))
        state = {f"{j}.{k}": tensors[n] for n, (j, k) in names.items()}
        layers.load_state_dict(state, strict=True, assign=True)
        self.layers = layers.eval()
        # Rotary tables are computed, not stored: build them for real on the device.
        self.rotary = type(skeleton.model.rotary_emb)(config=info.config).to(self.device)
        self.parameter_bytes = sum(p.numel() * p.element_size() for p in self.layers.parameters())

    @property
    def num_cached(self) -> int:
        return len(self.caches)

    @torch.inference_mode()
    def forward(self, request_id: int, step: int, position: int, hidden: torch.Tensor,
                prefill: bool | None = None) -> torch.Tensor:
        """Run this chunk's layers on one request's hidden states.

        hidden: (1, seq, hidden_size). A prefill (default: step 0) starts a
        fresh cache at position 0, replacing any earlier one: that is also how a
        replayed history rebuilds a lost cache, at the step it replaces. A
        decode step must follow the previous step at the cache's length.
        """
        prefill = step == 0 if prefill is None else prefill
        with self._lock:
            cache = self._cache_for(request_id, step, position, hidden, prefill)
        return self._run(cache, hidden, position, step)

    @torch.inference_mode()
    def forward_decode_batch(self, items: list[tuple[int, int, int, torch.Tensor]]) -> list[torch.Tensor | Exception]:
        """Micro-batched decode: several requests' single-token steps in one forward.

        items: (request_id, step, position, hidden (1, 1, hidden_size)) of distinct requests.
        Weights are read once for the whole batch. Returns one output (1, 1, hidden) or the
        ActivationRejected of each item; a rejected item does not affect the others.
        """
        out: list[torch.Tensor | Exception] = [None] * len(items)  # type: ignore[list-item]
        good, caches = [], []
        with self._lock:
            for i, (rid, step, position, hidden) in enumerate(items):
                try:
                    caches.append(self._cache_for(rid, step, position, hidden, False))
                    good.append(i)
                except ActivationRejected as exc:
                    out[i] = exc
        if not good:
            return out
        self.stats.decode_forwards += 1
        self.stats.decode_tokens += len(good)
        if len(good) == 1:
            i = good[0]
            rid, step, position, hidden = items[i]
            out[i] = self._run(caches[0], hidden, position, step)
            return out
        x = torch.cat([items[i][3] for i in good]).to(device=self.device, dtype=self.dtype)   # (batch, 1, hidden)
        position_ids = torch.tensor([[items[i][2]] for i in good], device=self.device)        # (batch, 1)
        view = BatchedCacheView(caches)
        mask = view.mask(self.device)                                                          # (batch, 1, 1, L)
        position_embeddings = self.rotary(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=position_ids, cache=view,
                      use_cache=True, position_embeddings=position_embeddings)
        now = time.monotonic()
        for row, (i, cache) in enumerate(zip(good, caches)):
            cache.last_step = items[i][1]
            cache.last_used = now
            out[i] = x[row:row + 1]
        self.stats.tokens_processed += len(good)
        return out

    def _run(self, cache: RequestKVCache, hidden: torch.Tensor, position: int, step: int) -> torch.Tensor:
        x = hidden.to(device=self.device, dtype=self.dtype)  # (1, seq, hidden)
        seq = x.shape[1]
        position_ids = torch.arange(position, position + seq, device=self.device).unsqueeze(0)  # (1, seq)
        position_embeddings = self.rotary(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask=None, position_ids=position_ids, cache=cache,
                      use_cache=True, position_embeddings=position_embeddings)
        cache.last_step = step
        cache.last_used = time.monotonic()
        self.stats.tokens_processed += seq
        return x

    def _cache_for(self, request_id: int, step: int, position: int, hidden: torch.Tensor,
                   prefill: bool) -> RequestKVCache:
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1:
            raise ActivationRejected("bad_shape", f"expected (1, seq, hidden), got {tuple(hidden.shape)}")
        if hidden.shape[2] != self.rotary.config.hidden_size:
            raise ActivationRejected(
                "bad_shape", f"hidden size {hidden.shape[2]} != model's {self.rotary.config.hidden_size}")
        if prefill:
            if position != 0:
                raise ActivationRejected("bad_position", f"prefill must start at position 0, got {position}")
            if request_id not in self.caches and len(self.caches) >= self.max_cached_requests:
                raise ActivationRejected(
                    "cache_full", f"{len(self.caches)} requests cached (max_cached_requests); "
                    "raise chunks[].max_cached_requests or lower coordinator.max_inflight")
            cache = RequestKVCache(self.start, len(self.layers))
            cache.last_step = step - 1
            self.caches[request_id] = cache
            return cache
        cache = self.caches.get(request_id)
        if cache is None:
            raise ActivationRejected("unknown_request", f"request {request_id} has no cache on this chunk")
        if step <= cache.last_step:
            raise ActivationRejected("duplicate_step", f"request {request_id} step {step} already done")
        if step != cache.last_step + 1:
            raise ActivationRejected(
                "out_of_order", f"request {request_id} step {step} after step {cache.last_step}")
        if position != cache.length:
            raise ActivationRejected(
                "bad_position", f"request {request_id} position {position} != cache length {cache.length}")
        return cache

    def release(self, request_id: int) -> bool:
        """Free a request's cache; True if there was one."""
        with self._lock:
            return self.caches.pop(request_id, None) is not None

    def release_all(self) -> int:
        with self._lock:
            n = len(self.caches)
            self.caches.clear()
            return n

    def evict_idle(self, now: float | None = None) -> list[int]:
        """Drop caches unused for cache_idle_timeout_s (their coordinator forgot them)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [rid for rid, c in self.caches.items() if now - c.last_used > self.cache_idle_timeout_s]
            for rid in stale:
                del self.caches[rid]
        return stale


def measure_speed(info: ModelInfo, *, dtype: str = "float32", device: str = "cpu", layers: int = 2,
                  steps: int = 32) -> float:
    """This device's decode speed in layer-steps per second, for `speed:` and placement: speed.

    Runs `layers` real decoder layers of the model for a short prompt and `steps`
    single-token steps: the same work a chunk node does per generated token.
    """
    end = min(layers, info.num_layers)
    chunk = ChunkExecutor(info, 0, end, device=device, dtype=dtype)
    hidden_size = info.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randn((1, 16, hidden_size), generator=gen).to(chunk.device, chunk.dtype)  # (1, seq, hidden)
    chunk.forward(0, 0, 0, prompt)
    token = torch.randn((1, 1, hidden_size), generator=gen).to(chunk.device, chunk.dtype)   # (1, 1, hidden)
    chunk.forward(0, 1, 16, token)                                                          # warm-up step
    t0 = time.perf_counter()
    for step in range(2, steps + 2):
        chunk.forward(0, step, 15 + step, token)
    elapsed = time.perf_counter() - t0
    chunk.release(0)
    return steps * end / elapsed

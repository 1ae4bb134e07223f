"""Chunk execution: a contiguous range of decoder layers with per-request KV caches.

A chunk builds only its own decoder layers (plus the rotary embedding they
need) and reads only their tensors from the safetensors files, so its weight
memory is its share of the model. Each request gets its own KV cache on its
prefill; decode steps extend it; a release (or an idle timeout) frees it.
"""
from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .codec import DTYPES
from .decoder import NATIVE_MODEL_TYPES, DecoderSpec, DecoderStack
from .errors import ActivationRejected
from .kernels import check_kernels, pack_linears
from .kvcache import BLOCK_TOKENS, KVBatch, KVPool, RequestKVCache
from .errors import ModelError
from .models import ModelInfo, is_quantizable
from .quant import Int4Weight, check_quantization, join_linears, linear_of, quantized_weight
from .weights import meta_model, open_weights


@dataclass
class ChunkStats:
    tokens_processed: int = 0
    decode_forwards: int = 0          # decode forwards run; decode tokens / this = mean micro-batch
    decode_tokens: int = 0
    bytes_received: int = 0
    busy_seconds: float = 0.0
    evictions: int = 0                # caches freed that the coordinator did not have in flight
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, cause: str) -> None:
        self.drops[cause] = self.drops.get(cause, 0) + 1


class ChunkExecutor:
    """Runs decoder layers [start, end) of a model for many requests, each with its own cache."""

    def __init__(self, info: ModelInfo, start: int, end: int, *, device: str = "cpu",
                 dtype: str = "float32", max_cached_requests: int = 64,
                 cache_idle_timeout_s: float = 600.0, reader=None, kernels: str = "exact",
                 plausible_ids: int = 256, quantization: str = "none",
                 progress: Callable[[str], None] | None = None) -> None:
        if not 0 <= start <= end <= info.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {info.num_layers} layers")
        self.info = info
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        check_kernels(kernels, self.device, self.dtype)
        check_quantization(quantization, self.device)
        self.kernels = kernels
        self.quantization = quantization
        self.weight_sources: Counter[str] = Counter()   # how each quantized matrix was made, e.g. "Q4_1 as is"
        self.max_cached_requests = max_cached_requests
        self.cache_idle_timeout_s = cache_idle_timeout_s
        self.caches: dict[int, RequestKVCache] = {}
        # what the coordinator's last heartbeat said (see note_coordinator); ids this far past its
        # next one are not given out soon
        self.coordinator_inflight: set[int] = set()
        self.next_request_id = 0
        self.plausible_ids = plausible_ids
        self.stats = ChunkStats()
        self._lock = threading.Lock()

        self.hidden_size = info.hidden_size
        self.reader = reader or open_weights(info)
        self.spec, self.fallback_reason = DecoderSpec.support(info.raw_config)
        if self.spec is None:
            window = getattr(info.config, "sliding_window", None)
            if window is not None and window < info.max_positions:
                raise ModelError(
                    f"model_type {info.model_type!r} uses sliding-window attention ({window} positions), which "
                    f"chunks compute only for {', '.join(NATIVE_MODEL_TYPES)} models ({self.fallback_reason})")
        self.layer_bytes: dict[int, int] = {}           # parameter bytes of each layer held
        self._load(start, end, {}, progress)

    def _load(self, start: int, end: int, keep: dict[int, nn.Module],
              progress: Callable[[str], None] | None) -> None:
        """Build layers [start, end), reading from the file only those not in `keep` (layers
        already held, by index), and a KV pool for them.
        """
        self.start, self.end = start, end
        info = self.info
        if self.spec is not None:
            # our own layers: the same arithmetic as transformers, without importing it
            with torch.device("meta"):
                stack = DecoderStack(self.spec, start, end)
            stack.rotaries = stack.rotaries.to(self.device)
            for i, layer in keep.items():
                stack.layers[i - start] = layer
            layers = stack.layers
            self.native: DecoderStack | None = stack
        else:
            skeleton = meta_model(info.config)
            layers = nn.ModuleList(skeleton.model.layers[start:end])
            # Rotary tables are computed, not stored: build them for real on the device.
            self.rotary = type(skeleton.model.rotary_emb)(config=info.config).to(self.device)
            self.native = None
            layers.to_empty(device=self.device)
        # One layer at a time, assigned straight to the meta modules (no empty parameters first);
        # packed kernels read each layer into one reused buffer and pack it before the next, so
        # plain and packed copies never coexist beyond one layer (docs/performance.md: memory).
        todo = [(start + j, layer) for j, layer in enumerate(layers) if start + j not in keep]
        layer_names = {i: {k: f"model.layers.{i}.{k}" for k in layer.state_dict()} for i, layer in todo}
        buffer = None
        if self.kernels == "packed" and todo:
            buffer = torch.empty(max(self.reader.stored_bytes(names.values()) for names in layer_names.values()),
                                 dtype=torch.uint8)
        self.layer_bytes = {i: b for i, b in self.layer_bytes.items() if i in keep}
        every = max(1, len(todo) // 5)
        for n, (i, layer) in enumerate(todo):
            before = sum(self.layer_bytes.values())
            self.parameter_bytes = before
            names = layer_names[i]
            if self.quantization != "none":
                names = self._quantize_linears(layer, names, info)
            tensors = self.reader.read(names.values(), self.dtype, str(self.device), buffer=buffer)
            self.parameter_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            layer.load_state_dict({k: tensors[name] for k, name in names.items()}, strict=True, assign=True)
            del tensors
            if self.kernels == "packed":
                pack_linears(layer)     # the reordered weights replace the plain ones
            self.layer_bytes[i] = self.parameter_bytes - before
            if progress is not None and ((n + 1) % every == 0 or n + 1 == len(todo)):
                sources = f" ({self.describe_sources()})" if self.weight_sources else ""
                progress(f"layers loaded: {n + 1}/{len(todo)}{sources}")
        del buffer
        self.parameter_bytes = sum(self.layer_bytes.values())
        self.layers = layers.eval()
        if self.native is not None:
            self.native.eval()
        # A CPU pool's untouched blocks cost no resident memory, so it starts large and rarely
        # doubles (each doubling leaves heap holes); GPU memory is committed when allocated.
        blocks = max(64, self.max_cached_requests * 256 // BLOCK_TOKENS) if self.device.type == "cpu" else 64
        self.pool = KVPool(start, end - start, device=self.device, dtype=self.dtype, blocks=blocks)

    def reassign(self, start: int, end: int, progress: Callable[[str], None] | None = None) -> tuple[int, int]:
        """Hold layers [start, end) from now on (a new view of the ring): the layers kept stay as
        they are, those lost are freed first, those gained are read from the file (only their
        tensors). Every cache is dropped: the coordinator replays the requests in flight.
        Returns (layers freed, layers loaded).
        """
        if not 0 <= start <= end <= self.info.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {self.info.num_layers} layers")
        with self._lock:
            self.caches.clear()
            held = {self.start + j: layer for j, layer in enumerate(self.layers)}
            keep = {i: layer for i, layer in held.items() if start <= i < end} if self.native is not None else {}
            freed = len(held) - len(keep)
            self.layers = nn.ModuleList()
            self.native = None
            self.pool = None
            del held
            gc.collect()
            self._load(start, end, keep, progress)
            return freed, (end - start) - len(keep)

    @classmethod
    def for_plan(cls, plan, node, info: ModelInfo, progress: Callable[[str], None] | None = None,
                 reader=None) -> "ChunkExecutor":
        """The executor of one chunk node of a plan (core.plan.NodePlan): the one place that turns the
        config's keys into its options, for the ROS node and LocalRing alike.
        """
        c, chunk = plan.config.coordinator, plan.config.chunk(node.name)
        return cls(info, node.layer_start, node.layer_end, device=node.device, dtype=plan.dtype,
                   kernels=plan.kernels, quantization=plan.quantization,
                   max_cached_requests=chunk.max_cached_requests, cache_idle_timeout_s=chunk.cache_idle_timeout_s,
                   plausible_ids=4 * (c.max_inflight + c.queue_limit) + 64, progress=progress, reader=reader)

    def _quantize_linears(self, layer: nn.Module, names: dict[str, str], info: ModelInfo) -> dict[str, str]:
        """Replace the layer's matrices by integer ones made from the file (its own blocks where they
        map exactly, else re-quantized); returns the names of what is left to load as float.
        """
        matrices = {k: n for k, n in names.items() if is_quantizable(n, info.tensor_shapes[n])}
        biases = {k[:-len("weight")] + "bias" for k in matrices} & set(names)
        rest = {k: n for k, n in names.items() if k not in matrices and k not in biases}
        bias_of = self.reader.read([names[b] for b in biases], self.dtype, str(self.device))
        linears: dict[str, nn.Module] = {}
        for key, name in matrices.items():          # made and packed one matrix at a time
            kind = info.tensor_kinds.get(name, "F32")
            w = quantized_weight(self.reader.linear_source(name), self.quantization, kind)
            fmt = "int4" if isinstance(w, Int4Weight) else "int8"
            self.weight_sources[f"{kind} {'as is' if w.exact else 're-quantized'} to {fmt}"] += 1
            linears[key] = linear_of(w, bias_of.get(names.get(key[:-len("weight")] + "bias", "")), self.device)
            del w
        if self.native is not None and not bias_of:       # q, k, v and gate, up as one matmul each
            for owner, parts, fused in (("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                                        ("mlp", ("gate_proj", "up_proj"), "gate_up_proj")):
                keys = [f"{owner}.{p}.weight" for p in parts]
                joined = join_linears([linears[k] for k in keys]) if all(k in linears for k in keys) else None
                if joined is not None:
                    module = layer.get_submodule(owner)
                    for k, p in zip(keys, parts, strict=True):
                        del linears[k]
                        delattr(module, p)
                    linears[f"{owner}.{fused}.weight"] = joined
        for key, linear in linears.items():
            owner, _, attr = key[:-len(".weight")].rpartition(".")
            parent = layer.get_submodule(owner) if owner else layer
            setattr(parent, attr, linear)
            bias = linear.bias
            self.parameter_bytes += linear.nbytes + (bias.numel() * bias.element_size() if bias is not None else 0)
        return rest

    def describe_sources(self) -> str:
        """How the quantized matrices were made, e.g. "210 Q4_1 as is" (for the node's log)."""
        return ", ".join(f"{n} {what}" for what, n in sorted(self.weight_sources.items()))

    @property
    def num_cached(self) -> int:
        return len(self.caches)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache blocks that live requests hold now (0 once every request is released)."""
        pool = self.pool
        return pool.bytes_in_use if pool is not None else 0

    @property
    def kv_cache_peak_bytes(self) -> int:
        """The most KV cache bytes held at once since start: its share of the node's peak memory."""
        pool = self.pool
        return pool.peak_bytes if pool is not None else 0

    @torch.inference_mode()
    def forward(self, request_id: int, step: int, position: int, hidden: torch.Tensor,
                prefill: bool | None = None) -> torch.Tensor:
        """Run this chunk's layers on one request's hidden states.

        hidden: (1, seq, hidden_size). A prefill (default: step 0) at position 0
        starts a fresh cache, replacing any earlier one: that is also how a
        replayed history rebuilds a lost cache, at the step it replaces. A
        prefill at a later position is the next piece of a chunked prefill: same
        step, at the cache's length. A decode step must follow the previous step
        at the cache's length.
        """
        prefill = step == 0 if prefill is None else prefill
        with self._lock:
            cache = self._cache_for(request_id, step, position, hidden, prefill)
            return self._run([cache], [step], [position], hidden)

    @torch.inference_mode()
    def forward_decode_batch(self, items: list[tuple[int, int, int, torch.Tensor]]) -> list[torch.Tensor | Exception]:
        """Micro-batched decode: several requests' single-token steps in one forward.

        items: (request_id, step, position, hidden (1, 1, hidden_size)) of distinct requests.
        Weights are read once for the whole batch. Returns one output (1, 1, hidden) or the
        ActivationRejected of each item; a rejected item does not affect the others.
        """
        with self._lock:
            out, good, caches = self._caches_for(items, prefill=False)
            if not good:
                return out
            self.stats.decode_forwards += 1
            self.stats.decode_tokens += len(good)
            x = torch.cat([items[i][3] for i in good])                                        # (batch, 1, hidden)
            y = self._run(caches, [items[i][1] for i in good], [items[i][2] for i in good], x)
        for row, i in enumerate(good):
            out[i] = y[row:row + 1]
        return out

    @torch.inference_mode()
    def forward_prefill_batch(self, items: list[tuple[int, int, int, torch.Tensor]]) -> list[torch.Tensor | Exception]:
        """Several requests' prefills (prompts of any lengths) in one padded forward.

        items: (request_id, step, position, hidden (1, seq_i, hidden_size)) of distinct
        requests; position 0 starts a request's cache, a later one (a piece of a chunked
        prefill) extends it. Prompts that arrive together share one read of the weights instead of one
        each. Returns each item's output (1, seq_i, hidden) or its ActivationRejected. Chunks
        on transformers' layers, and a single item, run the prefills one by one (a lone
        prefill stays on the exact single-request path).
        """
        if len(items) == 1 or self.native is None:
            alone: list[torch.Tensor | Exception] = []
            for rid, step, position, hidden in items:
                try:
                    alone.append(self.forward(rid, step, position, hidden, prefill=True))
                except ActivationRejected as exc:
                    alone.append(exc)
            return alone
        with self._lock:
            out, good, caches = self._caches_for(items, prefill=True)
            if not good:
                return out
            lengths = [items[i][3].shape[1] for i in good]
            x = items[good[0]][3].new_zeros((len(good), max(lengths), self.hidden_size))   # (batch, seq, hidden)
            for row, i in enumerate(good):
                x[row, :lengths[row]] = items[i][3][0]
            y = self._run(caches, [items[i][1] for i in good], [items[i][2] for i in good], x, valid=lengths)
        for row, i in enumerate(good):
            out[i] = y[row:row + 1, :lengths[row]]
        return out

    def _run(self, caches: list[RequestKVCache], steps: list[int], positions: list[int],
             hidden: torch.Tensor, valid: list[int] | None = None) -> torch.Tensor:
        """hidden: (batch, seq, hidden). batch > 1: single-token decode steps, or prefills
        right-padded to one length, with `valid` giving each row's real length.
        """
        x = hidden.to(device=self.device, dtype=self.dtype)
        batch, seq = x.shape[0], x.shape[1]
        kv = KVBatch(self.pool, caches, positions, seq, valid=valid)
        position_ids = (torch.tensor(positions, device=self.device)[:, None]
                        + torch.arange(seq, device=self.device)[None, :])                    # (batch, seq)
        # A lone request from position 0 (or a lone decode step) sees every cached position up to
        # its own: causal attention needs no mask (transformers' path). A batch, or a prefill
        # piece that extends a cache, needs one.
        mask = kv.mask(seq) if batch > 1 or (seq > 1 and positions[0] > 0) else None       # (batch, 1, seq, L)
        if self.native is not None:
            x = self.native(x, position_ids, kv, mask)
        else:
            position_embeddings = self.rotary(x, position_ids)
            for layer in self.layers:
                x = layer(x, attention_mask=mask, position_ids=position_ids, cache=kv,
                          use_cache=True, position_embeddings=position_embeddings)
        now = time.monotonic()
        for cache, step, length in zip(caches, steps, kv.lengths, strict=True):
            cache.length, cache.last_step, cache.last_used = length, step, now
        self.stats.tokens_processed += batch * seq
        return x

    def _caches_for(self, items: list[tuple[int, int, int, torch.Tensor]], prefill: bool
                    ) -> tuple[list, list[int], list[RequestKVCache]]:
        """Each item's cache, or its rejection in `out`: (out, indices of accepted items, their caches)."""
        out: list[torch.Tensor | Exception | None] = [None] * len(items)
        good, caches = [], []
        for i, (rid, step, position, hidden) in enumerate(items):
            try:
                caches.append(self._cache_for(rid, step, position, hidden, prefill))
                good.append(i)
            except ActivationRejected as exc:
                out[i] = exc
        return out, good, caches

    def _cache_for(self, request_id: int, step: int, position: int, hidden: torch.Tensor,
                   prefill: bool) -> RequestKVCache:
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1:
            raise ActivationRejected("bad_shape", f"expected (1, seq, hidden), got {tuple(hidden.shape)}")
        if hidden.shape[2] != self.hidden_size:
            raise ActivationRejected(
                "bad_shape", f"hidden size {hidden.shape[2]} != model's {self.hidden_size}")
        if prefill and position == 0:
            old = self.caches.pop(request_id, None)
            if old is not None:
                self.pool.release(old)
            elif len(self.caches) >= self.max_cached_requests and not self._evict_one():
                raise ActivationRejected(
                    "cache_full", f"{len(self.caches)} requests cached (max_cached_requests), all of them in "
                    "flight at the coordinator; raise chunks[].max_cached_requests or lower coordinator.max_inflight")
            cache = RequestKVCache()
            cache.last_step = step - 1
            self.caches[request_id] = cache
            return cache
        # extending a cache: a decode step follows the last step; a later piece of a chunked
        # prefill belongs to the step its first piece started
        what = "prefill piece" if prefill else "step"
        cache = self.caches.get(request_id)
        if cache is None:
            raise ActivationRejected("unknown_request", f"request {request_id} has no cache on this chunk "
                                     f"for its {what} at position {position}")
        expected = cache.last_step if prefill else cache.last_step + 1
        if step < expected:
            raise ActivationRejected("duplicate_step", f"request {request_id} {what} {step} already done")
        if step != expected:
            raise ActivationRejected(
                "out_of_order", f"request {request_id} {what} {step} after step {cache.last_step}")
        if position != cache.length:
            raise ActivationRejected(
                "bad_position", f"request {request_id} {what} at position {position} != cache length {cache.length}")
        return cache

    def note_coordinator(self, inflight_ids: list[int], next_request_id: int) -> list[int]:
        """The coordinator's heartbeat said which requests it has in flight: free the caches of
        requests it has finished (ids it gave out that are not in flight; their release may be
        lost) and remember the rest, so that a full cache evicts what it does not serve first.
        """
        with self._lock:
            self.coordinator_inflight = set(inflight_ids)
            self.next_request_id = next_request_id
            dead = [rid for rid in self.caches if rid < next_request_id and rid not in self.coordinator_inflight]
            for rid in dead:
                self.pool.release(self.caches.pop(rid))
            self.stats.evictions += len(dead)
            return dead

    def _evict_one(self) -> bool:
        """Make room for a new request: free the cache the coordinator is least likely to serve.

        Never one it has in flight. First ids it gave out and finished, then ids far beyond the
        next it will give (nothing real gets them soon), then the least recently used. Caches
        that no request of the coordinator's owns (forged or stale prefills) can therefore never
        lock out a real request.
        """
        nxt = self.next_request_id
        victims = [rid for rid in self.caches if rid not in self.coordinator_inflight]
        if not victims:
            return False

        def order(rid: int) -> tuple[int, float]:
            kind = 0 if rid < nxt else 1 if rid >= nxt + self.plausible_ids else 2
            return kind, self.caches[rid].last_used

        victim = min(victims, key=order)
        self.pool.release(self.caches.pop(victim))
        self.stats.evictions += 1
        return True

    def release(self, request_id: int) -> bool:
        """Free a request's cache blocks; True if there was one."""
        with self._lock:
            cache = self.caches.pop(request_id, None)
            if cache is not None:
                self.pool.release(cache)
            return cache is not None

    def release_all(self) -> int:
        """Free every cache (a new coordinator epoch: the old one's requests are gone)."""
        with self._lock:
            n = len(self.caches)
            self.caches.clear()
            self.pool.release_all()
            self.coordinator_inflight, self.next_request_id = set(), 0
            return n

    def evict_idle(self, now: float | None = None) -> list[int]:
        """Drop caches unused for cache_idle_timeout_s (their coordinator forgot them)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [rid for rid, c in self.caches.items() if now - c.last_used > self.cache_idle_timeout_s]
            for rid in stale:
                self.pool.release(self.caches.pop(rid))
        return stale


def measure_speed(info: ModelInfo, *, dtype: str = "float32", device: str = "cpu", layers: int = 2,
                  steps: int = 32) -> float:
    """This device's decode speed in layer-steps per second, for `speed:` and placement: speed.

    Runs `layers` real decoder layers of the model for a short prompt and `steps`
    single-token steps: the same work a chunk node does per generated token.
    """
    end = min(layers, info.num_layers)
    chunk = ChunkExecutor(info, 0, end, device=device, dtype=dtype)
    hidden_size = info.hidden_size
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

"""Paged key/value cache of a chunk: one block pool per layer, a block list per request.

Every request's keys and values live in fixed-size blocks of a pool shared by all
requests of the chunk, so a decode step writes its new entries with one indexed copy
per layer, a micro-batch gathers its members' caches with one more (no per-request
loops, no zero-filled padding), a request's memory grows by the block, and a released
request's blocks are reused at once. The pool doubles when no block is free; it is
allocated empty and blocks are zeroed as they are handed out, so the untouched tail
of a pool costs no resident memory.
Block 0 is never handed out and stays zero: it pads the block tables of shorter
requests in a batch, whose padded positions the attention mask hides.
"""
from __future__ import annotations

import time

import torch

# Positions per block: a request's last block is half empty on average, so small blocks waste
# little, and the gathers copy the same bytes either way.
BLOCK_TOKENS = 8


class RequestKVCache:
    """One request's place in the pool: its blocks, how many positions they hold, its last step."""

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.length = 0
        self.last_step = -1
        self.last_used = time.monotonic()


class KVPool:
    """Block pools of a chunk's layers; grows by doubling when no block is free."""

    def __init__(self, layer_start: int, num_layers: int, *, device: torch.device, dtype: torch.dtype,
                 blocks: int = 64) -> None:
        self.layer_start = layer_start
        self.num_layers = num_layers
        self.device, self.dtype = device, dtype
        self.num_blocks = blocks
        # per layer: (blocks, BLOCK_TOKENS, kv_heads, head_dim), made on first write (shape from the keys)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.free = list(range(blocks - 1, 0, -1))
        self.peak_blocks = 0    # the most blocks held at once: the cache's share of the node's peak memory

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    @property
    def block_bytes(self) -> int:
        """Bytes one block holds over all layers (keys and values); 0 before the first write."""
        return sum(pool[0].nbytes for pool in self.keys + self.values if pool is not None)

    @property
    def bytes_in_use(self) -> int:
        return self.blocks_in_use * self.block_bytes

    @property
    def peak_bytes(self) -> int:
        return self.peak_blocks * self.block_bytes

    def reserve(self, cache: RequestKVCache, length: int) -> None:
        """Give `cache` blocks for positions [0, length), taking (zeroed) blocks from the pool."""
        need = -(-length // BLOCK_TOKENS) - len(cache.blocks)
        if need <= 0:
            return
        if need > len(self.free):
            self._grow(need - len(self.free))
        new = [self.free.pop() for _ in range(need)]
        self.peak_blocks = max(self.peak_blocks, self.blocks_in_use)
        index = torch.tensor(new, device=self.device)
        for pool in self.keys + self.values:
            if pool is not None:
                pool.index_fill_(0, index, 0.0)    # stale entries of a former owner stay finite and hidden
        cache.blocks.extend(new)

    def release(self, cache: RequestKVCache) -> None:
        self.free.extend(reversed(cache.blocks))
        cache.blocks = []
        cache.length = 0

    def release_all(self) -> None:
        self.free = list(range(self.num_blocks - 1, 0, -1))

    def _grow(self, at_least: int) -> None:
        old = self.num_blocks
        new = max(old * 2, old + at_least)
        for pools in (self.keys, self.values):
            for i, pool in enumerate(pools):
                if pool is not None:
                    bigger = pool.new_empty((new, *pool.shape[1:]))   # blocks are zeroed when handed out
                    bigger[:old] = pool
                    pools[i] = bigger
        self.free = list(range(new - 1, old - 1, -1)) + self.free
        self.num_blocks = new

    def _pools(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[i] is None:
            shape = (self.num_blocks, BLOCK_TOKENS, like.shape[1], like.shape[-1])
            # empty, not zeros: pages of blocks not yet handed out stay untouched until the pool
            # grows; block 0 (padding) and blocks already handed out are zeroed here, later ones
            # by `reserve`
            self.keys[i] = torch.empty(shape, device=self.device, dtype=self.dtype)
            self.values[i] = torch.empty(shape, device=self.device, dtype=self.dtype)
            free = set(self.free)
            handed_out = torch.tensor([b for b in range(self.num_blocks) if b not in free], device=self.device)
            self.keys[i].index_fill_(0, handed_out, 0.0)
            self.values[i].index_fill_(0, handed_out, 0.0)
        return self.keys[i], self.values[i]


class KVBatch:
    """One forward's view of the pool: where the new entries go and which blocks each row reads.

    Layers call `update(keys, values, layer_index)` (the Hugging Face cache protocol, so
    transformers' own layers can use it too) and get every cached position back.
    """

    def __init__(self, pool: KVPool, caches: list[RequestKVCache], positions: list[int], seq: int,
                 valid: list[int] | None = None) -> None:
        """Every row writes `seq` new positions from its own; `valid`: how many of them are real
        (right-padded prefills), the rest are written but lie beyond the row's length, hidden
        by the mask and overwritten by the row's next steps.
        """
        self.pool = pool
        dev = pool.device
        for cache, pos in zip(caches, positions, strict=True):
            pool.reserve(cache, pos + seq)
        # where each new (row, token) entry goes, in the order of keys.transpose(1, 2).reshape(-1, ...)
        where = [(c.blocks[p // BLOCK_TOKENS], p % BLOCK_TOKENS)
                 for c, start in zip(caches, positions, strict=True) for p in range(start, start + seq)]
        self.write_blocks = torch.tensor([b for b, _ in where], device=dev)    # (rows * seq,)
        self.write_offsets = torch.tensor([o for _, o in where], device=dev)   # (rows * seq,)
        self.positions = list(positions)
        self.lengths = [p + n for p, n in zip(positions, valid or [seq] * len(positions), strict=True)]
        self.length = max(p + seq for p in positions)
        width = -(-self.length // BLOCK_TOKENS)
        self.table = torch.tensor([b for c in caches for b in c.blocks[:width] + [0] * (width - len(c.blocks))],
                                  device=dev)                                  # (rows * blocks,) row-major

    def mask(self, seq: int = 1) -> torch.Tensor:
        """(rows, 1, seq, length) bool: which positions each new token sees: its row's cached
        positions before it and itself (causal), never a padded position past the row's real
        length. Covers decode (seq 1), prefills from position 0 and prefill pieces that extend
        a cache (rows starting at different positions).
        """
        dev = self.pool.device
        starts = torch.tensor(self.positions, device=dev)
        lengths = torch.tensor(self.lengths, device=dev)
        keys = torch.arange(self.length, device=dev)[None, None, :]                 # (1, 1, length)
        queries = (starts[:, None] + torch.arange(seq, device=dev)[None, :])[:, :, None]   # (rows, seq, 1)
        return ((keys < lengths[:, None, None]) & (keys <= queries))[:, None]       # (rows, 1, seq, length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store new keys/values (rows, kv_heads, seq, head_dim); return all (rows, kv_heads, length, head_dim)."""
        keys, values = self.pool._pools(layer_idx - self.pool.layer_start, key_states)
        rows, heads, _, dim = key_states.shape
        keys[self.write_blocks, self.write_offsets] = key_states.transpose(1, 2).reshape(-1, heads, dim)
        values[self.write_blocks, self.write_offsets] = value_states.transpose(1, 2).reshape(-1, heads, dim)
        # index_select copies whole blocks (memcpy): faster than advanced indexing, and than a
        # view of one request's consecutive blocks.
        k = keys.index_select(0, self.table).view(rows, -1, heads, dim)[:, :self.length].transpose(1, 2)
        v = values.index_select(0, self.table).view(rows, -1, heads, dim)[:, :self.length].transpose(1, 2)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

"""Token sampling: greedy, temperature, top-k, top-p, with a per-request seed.

Each request owns its torch.Generator, so its tokens depend only on its own
seed and logits, never on which other requests share the ring.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    seed: int = -1             # -1 = random

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks the next token of one request from its logits."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed >= 0 else random.SystemRandom().randrange(2**63)
            self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: (vocab,) float tensor of the last position."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits).item())
        # Shifted so the largest score is 0, and in float64: dividing by any temperature the
        # request contract accepts (down to the smallest float32) cannot overflow to inf - inf.
        scores = logits.double()
        scores = (scores - scores.max()) / p.temperature              # (vocab,), max 0, rest <= 0
        if not torch.isfinite(scores.max()):
            raise ValueError("the logits are not finite numbers")
        if p.top_k > 0 and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs_sorted = torch.softmax(sorted_scores, dim=-1)
            # drop tokens once the mass before them already reaches top_p (keep at least one)
            drop_sorted = (probs_sorted.cumsum(dim=-1) - probs_sorted) >= p.top_p
            drop_sorted[0] = False
            scores = scores.masked_fill(drop_sorted.scatter(0, order, drop_sorted), -math.inf)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator).item())

    def skip(self, n: int, vocab: int) -> None:
        """Advance a sampling request's generator past `n` tokens it already drew (a request resumed
        after a coordinator failover): each draw takes the same random numbers whatever the
        probabilities, so the tokens after these are the ones an undisturbed run would draw.
        """
        if self.generator is None or n <= 0:
            return
        uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
        for _ in range(n):
            torch.multinomial(uniform, 1, generator=self.generator)

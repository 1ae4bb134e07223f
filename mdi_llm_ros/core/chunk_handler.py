"""The chunk side of the ring protocol, transport-agnostic.

`ChunkHandler` is everything a chunk node does with ring messages: check that each
belongs to this cluster and epoch, decode the tensor, run the layers, and produce the
message for the next hop, or drop it and count why; and follow the coordinator's
heartbeats. `take_ring_work` picks what a chunk computes next from its queue.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from . import codec
from .chunk import ChunkExecutor
from .errors import ActivationRejected
from .liveness import EpochFollower
from .message import KIND_DECODE, KIND_PREFILL, KIND_RELEASE, HopMessage

# Prompts that arrive together are prefilled as one padded batch of at most this many
# positions (rows x longest prompt); a longer one runs alone. Bounds the activations and
# the attention mask a batched prefill holds.
PREFILL_BATCH_TOKENS = 2048
# A chunk node merges queued prompts into one forward until they hold this many tokens: from
# about 64 rows on, a matrix multiply is compute-bound (merging more saves no weight reads),
# and a smaller batch reaches the next node sooner.
PREFILL_MERGE_TOKENS = 64


def take_ring_work(pending: deque, limit: int, max_tokens: int = PREFILL_MERGE_TOKENS) -> list:
    """The ring messages a chunk computes next, taken from the front of `pending` (its queue).

    * Decode steps go first: the first message that carries decode steps (or releases) passes
      the prompts queued before it, unless one of them belongs to the same request. Requests
      that are generating keep their pace while long prompts are prefilled in pieces.
    * Otherwise the prompts at the front are merged, at most `limit` messages and until they
      hold `max_tokens` prompt tokens: a burst of new requests is prefilled in batches (one
      read of the weights each) just big enough for the matrix multiplies to be
      compute-bound, so the next node starts on the first batch while this one computes the
      second. The next piece of a prompt already taken is not merged: the piece in hand
      leaves first, so the next node computes it while this one computes the next piece.
    * A decode wave is never merged with another message: each keeps its place in the pipeline.
    * Before all that, a message of a priority request (Activation.priority > 0: it travels on
      its own) goes first, unless it would pass its own request's earlier message.
    """
    def prompts_only(batch) -> bool:
        return bool(batch.hops) and all(h.kind == KIND_PREFILL for h in batch.hops)

    def tokens(batch) -> int:
        return sum(h.shape[1] if len(h.shape) > 1 else 0 for h in batch.hops)

    if not pending:
        return []
    earlier: set[int] = set()
    for i, batch in enumerate(pending):
        ids = {h.request_id for h in batch.hops}
        if any(getattr(h, "priority", 0) > 0 for h in batch.hops) and not ids & earlier:
            del pending[i]
            return [batch]
        earlier |= ids
    ahead: set[int] = set()           # requests of the prompts queued before
    for i, batch in enumerate(pending):
        ids = {h.request_id for h in batch.hops}
        if not prompts_only(batch):
            if ids & ahead:
                break                  # it must not pass its own request's prompt
            del pending[i]
            return [batch]
        ahead |= ids
    batches = [pending.popleft()]
    taken = {h.request_id for h in batches[0].hops}
    merged = tokens(batches[0])
    # here the front message holds prompts only (a message with decode steps would have gone above)
    while (pending and prompts_only(pending[0]) and len(batches) < limit
           and merged < max_tokens and not taken & {h.request_id for h in pending[0].hops}):
        batches.append(pending.popleft())
        taken |= {h.request_id for h in batches[-1].hops}
        merged += tokens(batches[-1])
    return batches


@dataclass
class CoordinatorNews:
    """What a coordinator heartbeat changed at a chunk (for the node's log)."""

    adopted: bool = False           # the chunk now serves this (new) epoch
    dropped: int = 0                # caches of the previous epoch freed
    evicted: int = 0                # caches of requests the coordinator has finished, freed
    serving: bool | None = None     # set when this process became (True) or stopped being (False) a member
    # a new view that moves this node: (view, hop or None when off the ring, layers [start, end), last hop)
    assignment: tuple[int, int | None, tuple[int, int], bool] | None = None


class ChunkHandler:
    """Applies one chunk's layers to ring messages; never raises on bad input."""

    def __init__(self, executor: ChunkExecutor, *, cluster: str, hop: int,
                 max_payload_bytes: int = 256 * 1024 * 1024, last: bool = False, name: str = "",
                 instance: int = 0, epoch_silence_s: float = 1.25) -> None:
        self.executor = executor
        self.cluster = cluster
        self.hop = hop
        self.name = name
        self.instance = instance          # this process (its started_at_ns), as the coordinator names it
        # The last chunk of the ring returns only a prefill's last position: the coordinator
        # samples from it alone, and a long prompt's whole output would cross the wire for nothing.
        self.last = last
        self.max_payload_bytes = max_payload_bytes
        self.follower = EpochFollower(epoch_silence_s)
        self.view = 0                     # the ring view this node computes in (core.view)
        self.layers = (executor.start, executor.end) if hop >= 0 else (0, 0)
        self._moving_to: int | None = None    # a view whose layers are being loaded
        self.serving = True               # False while the coordinator serves another process of this name
        self.released: set[int] = set()  # recently released ids: late messages for them are stale
        self.last_drop: ActivationRejected | None = None   # for rate-limited logging by the node
        self._lock = threading.Lock()

    @property
    def epoch(self) -> int:
        """Epoch of the coordinator we serve (0: none yet)."""
        return self.follower.epoch

    @property
    def stats(self):
        return self.executor.stats

    def adopt_epoch(self, epoch: int) -> int:
        """Serve `epoch` from now on (announced in a coordinator heartbeat, never taken from an
        activation). A new epoch means a restarted coordinator: every cache of the old one is
        dropped. Returns how many.
        """
        with self._lock:
            if epoch == self.follower.epoch:
                return 0
            self.follower.epoch = epoch
            self.follower.last_heard = self.follower.clock()
            self.released.clear()
            return self.executor.release_all()

    def on_coordinator(self, epoch: int, inflight_ids: list[int], next_request_id: int,
                       members: list[str], instances: list[int], view: int = 0,
                       layer_starts: list[int] = (), layer_ends: list[int] = ()) -> CoordinatorNews:
        """A coordinator heartbeat: follow its epoch (see EpochFollower), free the caches of
        requests it finished, stay idle while it serves another process of this name, and
        follow its view (members in ring order and their layers): news.assignment says where
        this node moves when the view moves it.
        """
        news = CoordinatorNews()
        if self.follower.heard(epoch):
            with self._lock:
                self.released.clear()
                news.adopted, news.dropped = True, self.executor.release_all()
        if epoch != self.epoch:
            return news
        news.evicted = len(self.executor.note_coordinator(inflight_ids, next_request_id))
        owner = instances[members.index(self.name)] if self.name in members else 0
        if owner:                          # 0: the coordinator has not heard any process of this name yet
            serving = owner == self.instance
            if serving != self.serving:
                self.serving = news.serving = serving
        if len(layer_starts) == len(members) == len(layer_ends) and view not in (self.view, self._moving_to):
            if self.name in members:
                hop = members.index(self.name)
                target = (view, hop, (int(layer_starts[hop]), int(layer_ends[hop])), hop == len(members) - 1)
            else:
                target = (view, None, (0, 0), False)
            if target[1:] == (self.hop if self.layers != (0, 0) else None, self.layers, self.last):
                self.view = view              # the same place in the new view: nothing to load
            else:
                self._moving_to = view
                news.assignment = target
        return news

    def enter_view(self, view: int, hop: int | None, layers: tuple[int, int], last: bool) -> None:
        """This node's layers for `view` are loaded: compute in it (hop None: off the ring)."""
        with self._lock:
            self.view, self.hop, self.layers, self.last = view, -1 if hop is None else hop, layers, last
            self.released.clear()
            if self._moving_to == view:
                self._moving_to = None

    @property
    def moving(self) -> bool:
        """Whether a new view's layers are being loaded."""
        return self._moving_to is not None

    def decline_move(self) -> None:
        """The node does not load the view it was told of (it is leaving): the next heartbeat of
        that view tells it again, should it stay after all.
        """
        with self._lock:
            self._moving_to = None

    def handle(self, msg: HopMessage) -> HopMessage | None:
        """Process a message addressed to this chunk; return the next hop's message or None (dropped)."""
        return self.handle_many([msg])[0]

    def handle_many(self, msgs: list[HopMessage]) -> list[HopMessage | None]:
        """Process messages; decode steps of distinct requests run as one micro-batch, and so
        do prefills (up to PREFILL_BATCH_TOKENS padded positions), so weights are read once for
        all of them. Each request's messages keep their order; a release of another request
        runs without splitting a batch. Outputs are in input order. Never raises on bad input.
        """
        stats = self.executor.stats
        t0 = time.perf_counter()
        out: list[HopMessage | None] = [None] * len(msgs)
        decodes: list[tuple[int, HopMessage, torch.Tensor]] = []
        prefills: list[tuple[int, HopMessage, torch.Tensor]] = []

        def run(batch: list[tuple[int, HopMessage, torch.Tensor]], forward) -> None:
            if not batch:
                return
            results = forward([(m.request_id, m.step, m.first_position, h) for _, m, h in batch])
            for (i, m, _), r in zip(batch, results, strict=True):
                if isinstance(r, ActivationRejected):
                    self._drop(r)
                else:
                    if self.last and m.kind == KIND_PREFILL:
                        r = r[:, -1:]                                     # (1, 1, hidden)
                    out[i] = HopMessage.with_tensor(r, **self._next_fields(m))
            batch.clear()

        def flush() -> None:
            run(prefills, self.executor.forward_prefill_batch)
            run(decodes, self.executor.forward_decode_batch)

        for i, msg in enumerate(msgs):
            stats.bytes_received += msg.nbytes
            try:
                hidden = self._check(msg)
                if any(m.request_id == msg.request_id for _, m, _ in decodes + prefills):
                    flush()             # keep each request's own order; others may pass
                if msg.kind == KIND_DECODE:
                    decodes.append((i, msg, hidden))
                elif msg.kind == KIND_RELEASE:
                    self.executor.release(msg.request_id)
                    self._remember_released(msg.request_id)
                    out[i] = HopMessage(**self._next_fields(msg))
                else:
                    if msg.first_position == 0:          # a new prompt (not a later piece of one)
                        self.released.discard(msg.request_id)
                    longest = max([hidden.shape[1]] + [h.shape[1] for _, _, h in prefills])
                    if prefills and longest * (len(prefills) + 1) > PREFILL_BATCH_TOKENS:
                        run(prefills, self.executor.forward_prefill_batch)
                    prefills.append((i, msg, hidden))
            except ActivationRejected as exc:
                self._drop(exc)
        flush()
        stats.busy_seconds += time.perf_counter() - t0
        return out

    def _drop(self, exc: ActivationRejected) -> None:
        self.executor.stats.drop(exc.cause)
        self.last_drop = exc

    @staticmethod
    def _next_fields(msg: HopMessage) -> dict:
        return dict(cluster=msg.cluster, epoch=msg.epoch, request_id=msg.request_id, step=msg.step,
                    first_position=msg.first_position, kind=msg.kind, hop=msg.hop + 1, view=msg.view,
                    priority=msg.priority)

    def _check(self, msg: HopMessage) -> torch.Tensor | None:
        """Reject a message that is not for us or is malformed; return its tensor (None for release)."""
        if msg.cluster != self.cluster:
            raise ActivationRejected("foreign_cluster", f"cluster {msg.cluster!r} != {self.cluster!r}")
        if not self.serving:
            raise ActivationRejected("not_member", "the coordinator serves another process of this node's name")
        if msg.hop != self.hop:
            raise ActivationRejected("wrong_hop", f"hop {msg.hop} sent to hop {self.hop}")
        if msg.epoch != self.epoch:
            cause = "stale_epoch" if msg.epoch < self.epoch else "foreign_epoch"
            raise ActivationRejected(cause, f"epoch {msg.epoch} is not the coordinator's epoch {self.epoch}")
        if msg.view != self.view or self._moving_to is not None:
            raise ActivationRejected("other_view", f"view {msg.view} while this node computes in view {self.view}"
                                     + (" and loads another" if self._moving_to is not None else ""))
        if msg.kind == KIND_RELEASE:
            return None
        if msg.kind not in (KIND_PREFILL, KIND_DECODE):
            raise ActivationRejected("bad_kind", f"unknown kind {msg.kind}")
        if msg.kind == KIND_DECODE and msg.request_id in self.released:
            raise ActivationRejected("released_request", f"request {msg.request_id} was released")
        try:
            hidden = msg.tensor(self.max_payload_bytes)             # (1, seq, hidden)
        except codec.CodecError as exc:
            cause = "oversized" if "exceeds the limit" in str(exc) else "bad_tensor"
            raise ActivationRejected(cause, str(exc)) from exc
        if msg.kind == KIND_DECODE and hidden.dim() == 3 and hidden.shape[1] != 1:
            raise ActivationRejected("bad_shape", f"decode carries {hidden.shape[1]} tokens, expected 1")
        return hidden

    def _remember_released(self, request_id: int) -> None:
        self.released.add(request_id)
        if len(self.released) > 4096:           # bounded: forget the oldest half
            for rid in sorted(self.released)[:2048]:
                self.released.discard(rid)

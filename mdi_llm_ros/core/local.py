"""In-process ring: the whole cluster in one process, for tests and `mdi-llm generate --local`.

It runs exactly the code the ROS nodes run (RingScheduler on the coordinator
side, ChunkHandler per chunk); only the transport differs: a FIFO of
HopMessages instead of DDS topics.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from .chunk import ChunkExecutor
from .coordinator_model import CoordinatorModel
from .request import GenerateParams, GenerationResult
from .models import ModelInfo
from .plan import ClusterPlan
from .chunk_handler import ChunkHandler
from .message import HopMessage
from .scheduler import RequestHandle, RingScheduler


class LocalRing:
    """Coordinator + chunk handlers wired by an in-memory queue."""

    def __init__(self, plan: ClusterPlan, info: ModelInfo, *, epoch: int = 1, waves: int = 0) -> None:
        self.plan = plan
        self.model = CoordinatorModel.for_plan(plan, info)
        self.info = info
        self.handlers = [ChunkHandler(ChunkExecutor.for_plan(plan, n, info), cluster=plan.config.namespace,
                                      hop=n.hop, last=n.last_chunk, name=n.name) for n in plan.chunks]
        for handler in self.handlers:
            handler.adopt_epoch(epoch)
        self._queue: deque[list[HopMessage]] = deque()     # ring messages: batches of hops
        self.messages = 0
        self.wire_bytes = 0
        self.scheduler = RingScheduler.for_plan(self.model, plan, lambda msg: self._queue.append([msg]),
                                                send_wave=self._queue.append, waves=waves, epoch=epoch)

    def submit(self, params: GenerateParams,
               on_piece: Callable[[str, list[int], int], None] | None = None) -> RequestHandle:
        return self.scheduler.submit(params, on_piece)

    def pump(self, max_messages: int | None = None) -> int:
        """Deliver queued messages around the ring; return how many hops ran."""
        n = 0
        while self._queue and (max_messages is None or n < max_messages):
            batch = self._queue.popleft()
            for handler in self.handlers:
                self.messages += len(batch)
                self.wire_bytes += sum(m.nbytes for m in batch)
                batch = [m for m in handler.handle_many(batch) if m is not None]
                if not batch:
                    break
                n += len(batch)
            else:
                self.scheduler.on_ring_outputs(batch)
        return n

    def move_to(self, plan: ClusterPlan, view: int) -> int:
        """The ring takes a new view (core.view): each member keeps, frees and loads layers as the
        plan says (a node not in it is gone), what travelled is dropped, and the requests in
        flight are replayed. Returns how many were replayed.
        """
        self.scheduler.set_view(view)
        self._queue.clear()
        by_name = {h.name: h for h in self.handlers}
        handlers = []
        for n in plan.chunks:
            handler = by_name.get(n.name)
            if handler is None:
                handler = ChunkHandler(ChunkExecutor.for_plan(plan, n, self.info), cluster=plan.config.namespace,
                                       hop=n.hop, last=n.last_chunk, name=n.name)
                handler.adopt_epoch(self.scheduler.epoch)
            else:
                handler.executor.reassign(n.layer_start, n.layer_end)
            handler.enter_view(view, n.hop, (n.layer_start, n.layer_end), n.last_chunk)
            handlers.append(handler)
        self.handlers = handlers
        self.plan = plan
        return self.scheduler.replay_inflight()

    def run(self, handles: list[RequestHandle]) -> list[GenerationResult]:
        """Pump until every handle has its result."""
        while not all(h.done for h in handles):
            if not self._queue:
                raise RuntimeError("ring went idle with unfinished requests")
            self.pump()
        return [h.result for h in handles]  # type: ignore[misc]

    def generate(self, params: GenerateParams,
                 on_piece: Callable[[str, list[int], int], None] | None = None) -> GenerationResult:
        return self.run([self.submit(params, on_piece)])[0]

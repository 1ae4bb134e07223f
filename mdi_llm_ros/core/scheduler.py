"""Recurrent pipeline scheduler: many requests in flight around the ring at once.

Requests are admitted continuously up to `max_inflight`; the rest wait in a
bounded FIFO queue (beyond it: BUSY). When a request's activation comes back
from the last chunk, its next token is sampled and it re-enters the ring at
once, so while one request is being sampled the others keep every chunk busy.
A finished request sends a release around the ring so every chunk frees its
cache. The scheduler only calls `send(HopMessage)` / `send_wave`; the transport
(ROS topics, or the in-process LocalRing) delivers them and hands ring output back
through `on_ring_outputs`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .codec import CodecError
from .coordinator_model import CoordinatorModel
from .detokenizer import IncrementalDetokenizer
from .errors import ErrorCode, RequestError
from .request import GenerateParams, GenerationResult, PieceCallback, validate_params
from .message import KIND_DECODE, KIND_PREFILL, KIND_RELEASE, HopMessage
from .sampling import SamplingParams, Sampler

if TYPE_CHECKING:
    from .plan import ClusterPlan

log = logging.getLogger("mdi_llm_ros.scheduler")


class RequestHandle:
    """What a caller holds for one submitted request: wait for it, or cancel it."""

    def __init__(self, scheduler: "RingScheduler", request_id: int) -> None:
        self._scheduler = scheduler
        self.request_id = request_id
        self._done = threading.Event()
        self.result: GenerationResult | None = None

    def wait(self, timeout: float | None = None) -> GenerationResult | None:
        self._done.wait(timeout)
        return self.result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._scheduler.cancel(self.request_id)

    def _finish(self, result: GenerationResult) -> None:
        self.result = result
        self._done.set()


@dataclass
class _Request:
    rid: int
    params: GenerateParams
    prompt_ids: list[int]
    sampler: Sampler
    detok: IncrementalDetokenizer
    handle: RequestHandle
    on_piece: PieceCallback | None
    submitted: float
    tokens: list[int] = field(default_factory=list)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    in_ring: bool = False          # a message of this request is travelling the ring
    sent_at: float = 0.0
    wave: int = 0                  # requests of one wave travel the ring as one micro-batch
    parked_token: int | None = None   # sampled, waiting for the rest of its wave
    parked_at: float = 0.0
    # chunked prefill: pieces (position, token ids) not sent yet, and where the last piece starts
    pieces: deque = field(default_factory=deque)
    last_piece_at: int = 0
    in_pieces: bool = False        # its prefill is in pieces and not through: it does not hold its wave
    late: bool = False             # its wave left without it: it holds no wave until it is back
    priority: int = 0              # > 0: admitted first, travels on its own; the waves wait while it runs
    resumed: int = 0               # tokens it arrived with (resume_token_ids, after a coordinator failover)
    emitted: int = 0               # tokens whose text the caller has been given (feedback)


class RingScheduler:
    """Admission, in-flight bookkeeping, sampling and completion of requests."""

    def __init__(self, model: CoordinatorModel, send: Callable[[HopMessage], None], *,
                 cluster: str = "", epoch: int | None = None, max_inflight: int = 8,
                 queue_limit: int = 32, max_context: int = 2048,
                 request_timeout_s: float = 120.0, clock: Callable[[], float] = time.monotonic,
                 waves: int = 0, send_wave: Callable[[list[HopMessage]], None] | None = None,
                 wave_hold_s: float = 0.25, prefill_chunk_tokens: int = 0, pieces_ahead: int = 1,
                 priority_slots: int = 0, priority_aging_s: float = 10.0) -> None:
        self.model = model
        self._send = send
        # Chunked prefill (prefill_chunk_tokens > 0): a longer prompt travels the ring in pieces
        # of at most that many tokens, `pieces_ahead` of them at a time (one per ring node), so
        # the next node starts on the first piece while this one computes the second, and
        # decode waves pass between pieces instead of waiting behind the whole prompt.
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.pieces_ahead = max(1, pieces_ahead)
        # Waves (waves > 0): requests in flight are split into this many groups; a group's next
        # steps leave together (send_wave: one message) once all its members are back, so each
        # hop runs a whole wave as one micro-batch, and with one wave per ring node every node
        # has a wave to work on. waves = 0: every request re-enters the ring on its own.
        self.waves = waves
        self._send_wave = send_wave or (lambda msgs: [send(m) for m in msgs])
        self.wave_hold_s = wave_hold_s
        self.cluster = cluster
        self.epoch = epoch if epoch is not None else time.time_ns()
        self.max_inflight = max_inflight
        self.queue_limit = queue_limit
        self.max_context = max_context
        self.request_timeout_s = request_timeout_s
        self.clock = clock
        self._lock = threading.RLock()
        self.next_request_id = 1       # ids are unique per epoch; chunks learn this from the heartbeat
        self._inflight: dict[int, _Request] = {}
        self._queue: deque[_Request] = deque()
        self.max_inflight_seen = 0
        self.tokens_generated = 0
        self.completed = 0
        self.drops: Counter[str] = Counter()    # ring outputs dropped, per cause (the heartbeat reports them)
        self.not_ready_reason: str | None = None   # set while the ring is incomplete (set_missing)
        self.lost_nodes: list[str] = []
        # Requests of priority > 0 may be in flight beyond max_inflight by this many; a queued
        # request gains one priority level per priority_aging_s of waiting, so none waits forever.
        self.priority_slots = priority_slots
        self.priority_aging_s = priority_aging_s
        self.view = 0                  # the ring view messages are sent in (core.view)
        self.held: str | None = None   # why admission and decoding wait (a takeover under way)

    @classmethod
    def for_plan(cls, model: CoordinatorModel, plan: "ClusterPlan", send: Callable[[HopMessage], None], *,
                 waves: int, send_wave: Callable[[list[HopMessage]], None] | None = None,
                 epoch: int | None = None) -> "RingScheduler":
        """A scheduler with a cluster plan's coordinator settings: the one place that turns
        the config's keys into scheduler options, for the ROS coordinator and LocalRing alike.
        """
        c = plan.config.coordinator
        return cls(model, send, send_wave=send_wave, waves=waves, cluster=plan.config.namespace, epoch=epoch,
                   max_inflight=c.max_inflight, queue_limit=c.queue_limit, max_context=plan.max_context,
                   request_timeout_s=c.request_timeout_s, prefill_chunk_tokens=c.prefill_chunk_tokens,
                   pieces_ahead=len(plan.chunks), priority_slots=c.priority_slots,
                   priority_aging_s=c.priority_aging_s)

    # --- the ring's state, as the coordinator's watch sees it -----------------------------
    def set_missing(self, missing: list[str], hold: bool = False) -> None:
        """Chunk nodes without a heartbeat: new requests are refused NOT_READY while any is
        missing (hold: queued instead, a takeover is expected), and requests that time out
        meanwhile fail NODE_LOST.
        """
        with self._lock:
            self.lost_nodes = list(missing)
            self.not_ready_reason = (f"ring incomplete: no heartbeat from {', '.join(missing)}; start them "
                                     "(mdi-llm cluster / ros2 launch) or check their logs") if missing and not hold \
                else None
            if hold and missing:
                self.held = f"waiting for {', '.join(missing)} (a takeover follows if they stay silent)"

    def set_view(self, view: int) -> None:
        """The ring moves to a new view: what is on the ring now is stale; admission and decoding
        wait until replay_inflight, once every member is ready in it.
        """
        with self._lock:
            self.view = view
            self.held = f"the ring is moving to view {view}"
            for req in self._inflight.values():
                req.parked_token = None         # the replay sends the whole history
                req.in_ring = False

    def _capacity(self, priority: int) -> int:
        return self.max_inflight + (self.priority_slots if priority > 0 else 0)

    def refusal(self, priority: int = 0) -> RequestError | None:
        """Why a new request would be refused now (NOT_READY, BUSY), or None: the one rule for the
        service and the action.
        """
        with self._lock:
            if self.not_ready_reason:
                return RequestError(ErrorCode.NOT_READY, self.not_ready_reason)
            if len(self._inflight) >= self._capacity(priority) and len(self._queue) >= self.queue_limit:
                return RequestError(ErrorCode.BUSY,
                                    f"{len(self._inflight)} requests in flight and {len(self._queue)} queued "
                                    f"(queue_limit {self.queue_limit}); retry later")
            return None

    # --- submission ----------------------------------------------------------------
    def submit(self, params: GenerateParams, on_piece: PieceCallback | None = None) -> RequestHandle:
        """Validate and admit (or queue) a request; raises RequestError if refused."""
        validate_params(params, self.max_context)
        prompt_ids = self.model.encode_prompt(params.prompt, params.use_chat_template, params.parse_special_tokens)
        if not prompt_ids:
            raise RequestError(ErrorCode.EMPTY_PROMPT, "the prompt encodes to zero tokens")
        if len(prompt_ids) >= self.max_context:
            raise RequestError(ErrorCode.PROMPT_TOO_LONG,
                               f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_context} "
                               "including at least one new token: shorten it")
        resume = list(params.resume_token_ids)
        vocab = self.model.info.vocab_size
        if any(t >= vocab for t in resume):
            raise RequestError(ErrorCode.INVALID_RESUME, f"resume_token_ids holds ids beyond the vocabulary ({vocab})")
        if len(prompt_ids) + len(resume) >= self.max_context:
            raise RequestError(ErrorCode.INVALID_RESUME, f"prompt ({len(prompt_ids)}) and resumed tokens "
                               f"({len(resume)}) fill the context of {self.max_context}: the request has ended")
        with self._lock:
            refused = self.refusal(params.priority)
            if refused is not None:
                raise refused
            rid = self.next_request_id
            self.next_request_id += 1
            handle = RequestHandle(self, rid)
            sampling = SamplingParams(params.temperature, params.top_k, params.top_p, params.seed)
            sampler = Sampler(sampling)
            detok = IncrementalDetokenizer(self.model.tokenizer, tuple(params.stop))
            for t in resume:                     # what the caller already holds: no pieces for it again
                detok.add(t)
            sampler.skip(len(resume), vocab)     # a seeded request draws on from where it was
            req = _Request(rid=rid, params=params, prompt_ids=prompt_ids, sampler=sampler, detok=detok,
                           handle=handle, on_piece=on_piece, submitted=self.clock(), tokens=resume,
                           priority=params.priority, resumed=len(resume), emitted=len(resume))
            if self.held is None and len(self._inflight) < self._capacity(req.priority):
                self._admit(req)
            else:
                self._queue.append(req)
        return handle

    def cancel(self, request_id: int) -> bool:
        """Stop a request; it finishes with finish_reason 'cancelled' and its caches are released."""
        with self._lock:
            for req in self._queue:
                if req.rid == request_id:
                    self._queue.remove(req)
                    self._complete(req, "cancelled")
                    return True
            req = self._inflight.get(request_id)
            if req is None:
                return False
            self._finish(req, "cancelled")
            return True

    # --- ring traffic ----------------------------------------------------------------
    def _admit(self, req: _Request) -> None:
        if self.waves:
            sizes = [0] * self.waves
            for other in self._inflight.values():
                if other.wave >= 0:
                    sizes[other.wave] += 1
            # a priority request joins no wave: it travels on its own, at once, every step
            req.wave = -1 if req.priority > 0 else min(range(self.waves), key=lambda w: (sizes[w], w))
        self._inflight[req.rid] = req
        self.max_inflight_seen = max(self.max_inflight_seen, len(self._inflight))
        log.info("request %d admitted (%d prompt tokens%s, priority %d); in flight: %d", req.rid,
                 len(req.prompt_ids), f", {req.resumed} resumed" if req.resumed else "", req.priority,
                 len(self._inflight))
        self._send_prefill(req, req.prompt_ids + req.tokens)

    def _admit_queued(self) -> None:
        """Admit queued requests while there is room: the highest priority first, a request's
        priority growing by one per priority_aging_s it waits (so none waits forever); FIFO
        among equals.
        """
        if self.held is not None or self.not_ready_reason:
            return
        now = self.clock()
        while self._queue:
            best = max(self._queue, key=lambda r: (r.priority + int((now - r.submitted) / self.priority_aging_s),
                                                   -r.submitted, -r.rid))
            if len(self._inflight) >= self._capacity(best.priority):
                return
            self._queue.remove(best)
            self._admit(best)

    def _send_prefill(self, req: _Request, token_ids: list[int]) -> None:
        """Send a prompt (or a replayed history) whole, or its first pieces (chunked prefill)."""
        size = self.prefill_chunk_tokens or len(token_ids)
        req.pieces = deque((start, token_ids[start:start + size]) for start in range(0, len(token_ids), size))
        req.last_piece_at = req.pieces[-1][0]
        req.in_pieces = len(req.pieces) > 1
        for _ in range(self.pieces_ahead):
            if req.pieces:
                self._send_next_piece(req)

    def _send_next_piece(self, req: _Request) -> None:
        position, ids = req.pieces.popleft()
        hidden = self.model.embed_tokens(ids)                          # (1, piece, hidden)
        self._send_hidden(req, KIND_PREFILL, len(req.tokens), position, hidden)

    def _send_hidden(self, req: _Request, kind: int, step: int, position: int, hidden: torch.Tensor) -> None:
        self._send(self._hidden_message(req, kind, step, position, hidden))

    def _hidden_message(self, req: _Request, kind: int, step: int, position: int,
                        hidden: torch.Tensor) -> HopMessage:
        local = self.model.local_layers
        if local is not None:
            hidden = local.forward(req.rid, step, position, hidden, prefill=kind == KIND_PREFILL)
        req.in_ring = True
        req.sent_at = self.clock()
        return HopMessage.with_tensor(hidden, cluster=self.cluster, epoch=self.epoch, request_id=req.rid,
                                      step=step, first_position=position, kind=kind, hop=0, view=self.view,
                                      priority=min(req.priority, 255))

    def _send_release(self, rid: int, step: int) -> None:
        if self.model.local_layers is not None:
            self.model.local_layers.release(rid)
        self._send(HopMessage(cluster=self.cluster, epoch=self.epoch, request_id=rid, step=step,
                              first_position=0, kind=KIND_RELEASE, hop=0, view=self.view))

    def on_ring_outputs(self, msgs: list[HopMessage]) -> None:
        """Several ring outputs at once: one LM-head matmul and one embedding lookup for all of
        them (the head's weights are read once), then per request: sample, re-inject or finish.
        A bad output is dropped on its own, and one request's failure ends that request alone.
        """
        ready: list[tuple[_Request, torch.Tensor]] = []
        with self._lock:
            for msg in msgs:
                if msg.epoch != self.epoch or msg.cluster != self.cluster or msg.view != self.view:
                    self.drops["stale_output"] += 1
                    continue
                req = self._inflight.get(msg.request_id)
                if msg.kind == KIND_RELEASE:
                    if req is not None:              # ours went round after the request had ended
                        self.drops["foreign_release"] += 1
                        self._finish(req, "error", error=(
                            ErrorCode.RING_FAULT, "a release of this request that the coordinator did not send "
                            "freed its caches on the ring; send it again (with cluster.secret_file set, only "
                            "the team's nodes can send one)"))
                    continue
                if req is None or not req.in_ring or msg.step != len(req.tokens):
                    self.drops["stale_output"] += 1    # cancelled, finished, or a duplicate
                    continue
                try:
                    hidden = self._output(msg)
                except ValueError:
                    self.drops["bad_output"] += 1      # the request's real output may still come
                    continue
                req.late = False
                if req.pieces or (msg.kind == KIND_PREFILL and msg.first_position != req.last_piece_at):
                    # A prompt still going out in pieces: a piece is through, the next one goes.
                    # Its last piece is not sent yet, so nothing else can be its answer: a
                    # decode output computed before a replay is stale (its next step would
                    # reach the chunks before the replay's last pieces and be dropped there).
                    if msg.kind == KIND_PREFILL and req.pieces:
                        self._send_next_piece(req)
                    elif msg.kind != KIND_PREFILL:
                        self.drops["stale_output"] += 1
                    continue
                req.in_ring = req.in_pieces = False
                ready.append((req, hidden))
        if not ready:
            return
        try:
            last = torch.cat([h[:, -1:, :] for _, h in ready])          # (batch, 1, hidden)
            logits = self.model.logits_batch(last)                     # (batch, vocab)
        except Exception as exc:  # noqa: BLE001 - whatever failed, these requests end with a code
            log.exception("next-token logits failed for %d requests", len(ready))
            self._fail(ready, f"the coordinator could not compute the next token: {exc}")
            return
        tokens: list[int | Exception] = []
        for b, (req, _) in enumerate(ready):
            try:
                tokens.append(req.sampler(logits[b]))
            except Exception as exc:  # noqa: BLE001 - one request's sampling error is its own
                tokens.append(exc)
        now = self.clock()
        with self._lock:
            going: list[tuple[_Request, int]] = []                       # (request, sampled token)
            for (req, _), token in zip(ready, tokens, strict=True):
                if self._inflight.get(req.rid) is not req:
                    continue                                             # cancelled meanwhile
                if isinstance(token, Exception):
                    self._finish(req, "error", error=(ErrorCode.INTERNAL, f"sampling failed: {token}"))
                elif self._record_token(req, token, now):                # not finished by this token
                    going.append((req, token))
            if not going:
                return
            if self.held is not None:            # a takeover is under way: the replay sends them
                return
            alone = [(req, token) for req, token in going if not self.waves or req.wave < 0]
            for msg in self._decode_messages(alone) if alone else []:
                self._send(msg)
            waving = [(req, token) for req, token in going if self.waves and req.wave >= 0]
            for req, token in waving:
                req.parked_token, req.parked_at = token, now
            if waving:
                self._send_complete_waves({req.wave for req, _ in waving})

    def _output(self, msg: HopMessage) -> torch.Tensor:
        """A ring output's hidden states (1, seq, hidden) in the model's dtype; ValueError if malformed."""
        try:
            hidden = msg.tensor(self.max_context * self.model.info.hidden_size * 4)
        except CodecError as exc:
            raise ValueError(str(exc)) from exc
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.model.info.hidden_size:
            raise ValueError(f"ring output of shape {tuple(hidden.shape)}, expected (1, seq, hidden)")
        return hidden.to(self.model.dtype)

    def _fail(self, reqs: list[tuple[_Request, object]], message: str) -> None:
        with self._lock:
            for req, _ in reqs:
                if self._inflight.get(req.rid) is req:
                    self._finish(req, "error", error=(ErrorCode.INTERNAL, message))

    def _decode_messages(self, going: list[tuple[_Request, int]]) -> list[HopMessage]:
        """The next decode step of each (request, sampled token), embedded in one lookup."""
        hidden = self.model.embed_tokens_batch([token for _, token in going])   # (batch, 1, hidden)
        msgs = []
        for b, (req, _) in enumerate(going):
            step = len(req.tokens)
            msgs.append(self._hidden_message(req, KIND_DECODE, step, len(req.prompt_ids) + step - 1,
                                             hidden[b:b + 1]))
        return msgs

    def _send_complete_waves(self, waves: set[int], force: bool = False) -> None:
        """Send the next step of every parked request of a wave whose members are all back
        (or, with force, whose oldest parked member waited longer than wave_hold_s).
        """
        if self.held is not None:
            return
        now = self.clock()
        # A priority request on the ring goes at an idle ring's pace: lower requests' decode
        # steps wait meanwhile, each at most priority_aging_s (never starved).
        preempted = any(r.priority > 0 and r.wave < 0 for r in self._inflight.values())
        for w in sorted(waves):
            if w < 0:
                continue
            members = [r for r in self._inflight.values() if r.wave == w]
            parked = [r for r in members if r.parked_token is not None]
            if not parked:
                continue
            if preempted and now - min(r.parked_at for r in parked) <= self.priority_aging_s:
                continue
            # A member still in its prefill holds the wave (a burst of new prompts comes back
            # together and forms full waves), unless its prompt goes in pieces: that takes
            # seconds, and its wave's other members keep decoding meanwhile.
            complete = all(r.parked_token is not None or not r.in_ring or r.in_pieces or r.late for r in members)
            if not complete and not (force and now - min(r.parked_at for r in parked) > self.wave_hold_s):
                continue
            for r in members:       # left behind once: it holds no wave until its output is back
                if r.in_ring and r.parked_token is None and not r.in_pieces:
                    r.late = True
            msgs = self._decode_messages([(r, r.parked_token) for r in parked])
            for req in parked:
                req.parked_token = None
            self._send_wave(msgs)

    def _record_token(self, req: _Request, token: int, now: float) -> bool:
        """Append a sampled token; finish the request if it is done. True if it goes on."""
        req.tokens.append(token)
        self.tokens_generated += 1
        if len(req.tokens) == req.resumed + 1:
            req.first_token_at = now
        req.last_token_at = now
        reason = None
        piece = ""
        if token in self.model.eos_ids:
            reason = "eos"
        else:
            piece = req.detok.add(token)
            if req.detok.stopped:
                reason = "stop"
            elif len(req.tokens) >= req.params.max_new_tokens:
                reason = "length"
            elif len(req.prompt_ids) + len(req.tokens) >= self.max_context:
                reason = "length"
        if piece and req.on_piece:
            self._emit(req, piece)
        if reason:
            self._finish(req, reason, last_token=token)
            return False
        return True

    def _emit(self, req: _Request, piece: str) -> None:
        """Give the caller a piece of text and the tokens it completes (every token since the last
        piece: a client that resumes after a failover sends them all back).
        """
        ids, req.emitted = req.tokens[req.emitted:], len(req.tokens)
        try:
            req.on_piece(piece, ids, len(req.tokens))
        except Exception:                              # a client callback must not stop the ring
            log.exception("feedback callback of request %d failed", req.rid)

    # --- completion ----------------------------------------------------------------------
    def _finish(self, req: _Request, reason: str, last_token: int | None = None,
                error: tuple[str, str] | None = None) -> None:
        tail = req.detok.finish()
        if tail and req.on_piece and error is None:
            self._emit(req, tail)
        self._inflight.pop(req.rid, None)
        self._send_release(req.rid, len(req.tokens) + 1)
        self._complete(req, reason, error=error)
        if self.waves:      # the last priority request off the ring lets every wave go again
            self._send_complete_waves(set(range(self.waves)) if req.priority > 0 else {req.wave})
        self._admit_queued()

    def _complete(self, req: _Request, reason: str, error: tuple[str, str] | None = None) -> None:
        n = len(req.tokens)
        new = n - req.resumed
        decode_time = req.last_token_at - req.first_token_at
        result = GenerationResult(
            success=error is None and reason != "cancelled",
            error_code=error[0] if error else (ErrorCode.CANCELLED if reason == "cancelled" else ""),
            error_message=error[1] if error else ("request was cancelled" if reason == "cancelled" else ""),
            text=req.detok.text, token_ids=list(req.tokens), prompt_tokens=len(req.prompt_ids),
            generated_tokens=n, finish_reason="error" if error else reason,
            time_to_first_token=(req.first_token_at - req.submitted) if new else 0.0,
            tokens_per_second=(new - 1) / decode_time if new > 1 and decode_time > 0 else 0.0)
        self.completed += 1
        log.info("request %d finished: %s, %d tokens", req.rid, result.finish_reason, n)
        req.handle._finish(result)

    def fail_all(self, code: str, message: str) -> int:
        """End every queued and in-flight request with an error (node lost, shutdown)."""
        with self._lock:
            victims = list(self._inflight.values()) + list(self._queue)
            self._queue.clear()
            for req in victims:
                if req.rid in self._inflight:
                    self._inflight.pop(req.rid)
                    self._send_release(req.rid, len(req.tokens) + 1)
                self._complete(req, "error", error=(code, message))
            return len(victims)

    def poll(self) -> None:
        """Time out requests that exceeded request_timeout_s (NODE_LOST if nodes are missing);
        send waves held longer than wave_hold_s (a member is slow or lost).
        """
        now = self.clock()
        with self._lock:
            if self.waves:
                self._send_complete_waves(set(range(self.waves)), force=True)
            self._admit_queued()
            expired = [r for r in list(self._inflight.values()) + list(self._queue)
                       if now - r.submitted > self.request_timeout_s]
            for req in expired:
                if self.lost_nodes:
                    error = (ErrorCode.NODE_LOST, f"ring node(s) {', '.join(self.lost_nodes)} stopped answering "
                             f"and did not come back within {self.request_timeout_s:.0f} s")
                else:
                    error = (ErrorCode.TIMEOUT, f"no answer within request_timeout_s={self.request_timeout_s:.0f} s")
                if req in self._queue:
                    self._queue.remove(req)
                    self._complete(req, "error", error=error)
                else:
                    self._finish(req, "error", error=error)

    def replay_inflight(self) -> int:
        """Rebuild every in-flight request's caches by sending its whole token history as a prefill.

        Used after a lost chunk node came back, or the ring moved to a new view: the request
        continues where it was, at the step its lost message would have produced. Admission and
        decoding, held meanwhile, go on.
        """
        with self._lock:
            self.held = None
            reqs = list(self._inflight.values())
            for req in reqs:
                req.parked_token = None         # the history below already holds it
                history = req.prompt_ids + req.tokens
                self._send_prefill(req, history)
            self._admit_queued()
            return len(reqs)

    def resume(self) -> None:
        """The ring is whole again with nothing to replay: admit what waited."""
        with self._lock:
            self.held = None
            self._admit_queued()

    # --- introspection ------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def ring_view(self) -> tuple[list[int], int]:
        """(requests in flight, the id the next one gets), read together: the heartbeat tells the
        chunks, which free the caches of ids below the second that are not in the first.
        """
        with self._lock:
            return sorted(self._inflight), self.next_request_id

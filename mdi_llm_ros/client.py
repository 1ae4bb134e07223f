"""Client side of /generate and /generate_stream, for robot nodes and `mdi-llm generate`.

`GenerateClient` wraps both on any rclpy node:

    client = GenerateClient(node)                       # namespace "" -> /generate
    result = client.generate("Where is the charger?", max_new_tokens=64)
    for piece in client.stream("Tell me a story"): ...  # action feedback as it arrives

Calls block the calling thread: spin the node in another thread (or call
from a callback of a MultiThreadedExecutor with a separate callback group).
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator

from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from mdi_llm_ros.action import Generate as GenerateAction
from mdi_llm_ros.msg import NodeStatus
from mdi_llm_ros.srv import Generate

from .convert import fill_request, result_from
from .core.errors import ErrorCode, RequestError
from .core.plan import service_name, status_topic
from .core.request import GenerateParams, GenerationResult, validate_params
from .qos import STATUS_QOS
from .session import ros_session
from .signing import is_sealed, seal_request


def _params(prompt: str | GenerateParams, kwargs: dict) -> GenerateParams | GenerationResult:
    """The request to send, checked against the contract's limits first: a value the message
    cannot carry is refused here with the coordinator's code, never wrapped around or cut.
    """
    try:
        params = prompt if isinstance(prompt, GenerateParams) else GenerateParams(prompt=prompt, **kwargs)
        validate_params(params)
    except RequestError as exc:
        return GenerationResult.failure(exc.code, exc.message)
    return params


REPLY_DEPTH = 100
# rmw_fastrtps drops a reply when the server has not yet matched the caller's reply reader
# 100 ms after the request (ros2/rmw_fastrtps#390, #467); discovery under full CPU load can
# take longer. A new client therefore waits this long after first seeing the server.
SETTLE_S = 0.75


@dataclass
class StreamPiece:
    text: str
    token_id: int
    token_count: int
    token_ids: tuple[int, ...] = ()     # every token since the previous piece


class CoordinatorWatch:
    """Which coordinator serves (its epoch) and when it was last heard, from the ring's status
    topic: a call whose coordinator falls silent is sent again to the one that takes over.
    """

    def __init__(self, node: Node, namespace: str, key: bytes | None) -> None:
        self.namespace, self.key = namespace, key
        self.heard: dict[int, float] = {}            # epoch of a serving coordinator -> last heard
        self._lock = threading.Lock()
        self.subscription = node.create_subscription(NodeStatus, status_topic(namespace), self._on_status,
                                                     STATUS_QOS)

    def _on_status(self, s: NodeStatus) -> None:
        if s.role != "coordinator" or s.standby or s.cluster != self.namespace:
            return
        if self.key and not is_sealed(s, self.key):
            return
        with self._lock:
            self.heard[s.epoch] = time.monotonic()

    def serving(self, within_s: float) -> int | None:
        """The newest epoch heard within `within_s`, or None."""
        now = time.monotonic()
        with self._lock:
            live = [e for e, t in self.heard.items() if now - t <= within_s]
        return max(live) if live else None

    def silent_for(self, epoch: int) -> float:
        with self._lock:
            return time.monotonic() - self.heard.get(epoch, time.monotonic())

    def last_heard(self, epoch: int) -> float:
        with self._lock:
            return self.heard.get(epoch, time.monotonic())


class _Lost(Exception):
    """The coordinator of a call fell silent (see CoordinatorWatch)."""

    def __init__(self, lost_at: float) -> None:
        super().__init__("coordinator lost")
        self.lost_at = lost_at


class GenerateClient:
    """Blocking helpers around the coordinator's service and action."""

    def __init__(self, node: Node, namespace: str = "", key: bytes | None = None,
                 failover_after_s: float | None = 3.0) -> None:
        """`key`: the team's key (core.auth.load_key, or ClusterConfig.key()) where the cluster runs
        with cluster.secret_file; requests are then sealed and only sealed answers are believed.
        `failover_after_s`: a call whose coordinator is silent this long (its heartbeat timeout)
        is sent again to the coordinator that takes over (coordinator.standby_hosts), with the
        tokens already received; None: never (one status subscription less).
        """
        self.node = node
        self.key = key
        self.failover_after_s = failover_after_s
        self.watch = CoordinatorWatch(node, namespace, key) if failover_after_s else None
        self.service = service_name(namespace, "generate")
        self.action = service_name(namespace, "generate_stream")
        # Deep reply queues: every client's reader also sees the replies to other callers of the
        # same service, and with the default depth of 10 a burst of replies overwrote its own.
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=REPLY_DEPTH, reliability=ReliabilityPolicy.RELIABLE)
        self._qos = qos
        self._srv = node.create_client(Generate, self.service, qos_profile=qos)
        # The action client is made on first stream(): a caller of the service alone adds 2 DDS
        # endpoints, not 10.
        self._act: ActionClient | None = None
        self._settled_at: float | None = None
        self._action_settled_at = 0.0

    def _believed(self, answer, nonce: int) -> GenerationResult:
        """The result an answer carries; with a key, only if the cluster sealed it for this request."""
        if self.key and not is_sealed(answer, self.key, nonce):
            return GenerationResult.failure(
                ErrorCode.UNAUTHORIZED, "the answer is not sealed with this client's key: the cluster runs without "
                "cluster.secret_file or with another key, or someone else answered; use the cluster's key file")
        return result_from(answer)

    def _action(self) -> ActionClient:
        if self._act is None:
            q = self._qos
            self._act = ActionClient(self.node, GenerateAction, self.action, goal_service_qos_profile=q,
                                     result_service_qos_profile=q, cancel_service_qos_profile=q,
                                     feedback_sub_qos_profile=q)
            self._action_settled_at = time.monotonic() + SETTLE_S   # its endpoints are new
        return self._act

    def settle(self) -> None:
        """Wait until the server has had SETTLE_S to discover this client's reply reader, counted
        from when this client first saw the service; every call does this, so a caller that times
        its calls (a benchmark) does it before starting the clock.
        """
        if self._settled_at is None:
            self._settled_at = time.monotonic() + SETTLE_S
        time.sleep(max(0.0, self._settled_at - time.monotonic()))

    def wait_for_service(self, timeout_s: float) -> bool:
        found = self._srv.wait_for_service(timeout_sec=timeout_s)
        if found and self._settled_at is None:
            self._settled_at = time.monotonic() + SETTLE_S
        return found

    def wait_until_ready(self, timeout_s: float, probe_timeout_s: float = 10.0) -> GenerationResult:
        """Wait until the cluster serves requests (every node up): ask for one token until the
        answer is neither NOT_READY (nodes still loading) nor a lost reply, for up to timeout_s.

        A short timeout per probe bounds what a reply lost during discovery costs (see SETTLE_S).
        Returns the last probe's result: success, or why the cluster is not ready.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            result = self.generate("ready?", max_new_tokens=1, timeout_s=max(1.0, min(probe_timeout_s, left)))
            if result.error_code not in (ErrorCode.NOT_READY, ErrorCode.TIMEOUT) or time.monotonic() >= deadline:
                return result
            time.sleep(0.3)

    def wait_for_action(self, timeout_s: float) -> bool:
        return self._action().wait_for_server(timeout_sec=timeout_s)

    def generate(self, prompt: str | GenerateParams, timeout_s: float = 300.0, **kwargs) -> GenerationResult:
        """Call /generate; never waits longer than timeout_s. A coordinator that falls silent
        meanwhile is replaced by the one that takes over: the call is sent again (the result
        says how long that took, in interrupted_s).
        """
        params = _params(prompt, kwargs)
        if isinstance(params, GenerationResult):
            return params
        deadline = time.monotonic() + timeout_s
        interrupted = 0.0
        while True:
            # A request sent before this client has matched the service's endpoints is lost
            # (DDS delivers nothing to readers it has not discovered yet): wait for them first.
            if not self._srv.wait_for_service(timeout_sec=max(0.1, min(deadline - time.monotonic(), 30.0))):
                return GenerationResult.failure(ErrorCode.NOT_READY,
                                                f"no {self.service} on this ROS domain; is the cluster running?")
            self.settle()
            epoch = self._serving_epoch()
            request = fill_request(Generate.Request(), params)
            nonce = seal_request(request, self.key) if self.key else 0
            future = self._srv.call_async(request)
            try:
                done = self._wait(future, deadline, epoch)
            except _Lost as lost:
                self._srv.remove_pending_request(future)
                failed = self._await_takeover(epoch, deadline)
                if failed is not None:
                    return failed
                interrupted += time.monotonic() - lost.lost_at
                continue
            if not done:
                self._srv.remove_pending_request(future)
                return GenerationResult.failure(ErrorCode.TIMEOUT,
                                                f"no answer from {self.service} within {timeout_s:.0f} s")
            result = self._believed(future.result(), nonce)
            if interrupted and result.error_code == ErrorCode.NOT_READY and time.monotonic() < deadline:
                time.sleep(0.3)                  # the new coordinator is still gathering the ring
                continue
            return replace(result, interrupted_s=result.interrupted_s + interrupted)

    def _serving_epoch(self) -> int | None:
        return self.watch.serving(self.failover_after_s) if self.watch is not None else None

    def _wait(self, future, deadline: float, epoch: int | None) -> bool:
        """Wait for a future until `deadline`; raises _Lost when the coordinator of `epoch` falls silent."""
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        while not future.done():
            if time.monotonic() > deadline:
                return False
            if epoch is not None and self.watch.silent_for(epoch) > self.failover_after_s:
                raise _Lost(self.watch.last_heard(epoch))
            done.wait(0.05)
        return True

    def _await_takeover(self, epoch: int | None, deadline: float) -> GenerationResult | None:
        """Wait for another coordinator to serve; None once one does, else why not."""
        while time.monotonic() < deadline:
            new = self._serving_epoch()
            if new is not None and new != epoch:
                return None
            time.sleep(0.1)
        return GenerationResult.failure(ErrorCode.NODE_LOST, "the coordinator stopped answering and no standby "
                                        "coordinator took over (coordinator.standby_hosts); restart it")

    def stream(self, prompt: str | GenerateParams, timeout_s: float = 300.0, cancel_after: int | None = None,
               **kwargs) -> Iterator[StreamPiece | GenerationResult]:
        """Yield a StreamPiece per feedback, then the GenerationResult last.

        `cancel_after=n` cancels the goal once n pieces have arrived (tests, demos). A coordinator
        that falls silent meanwhile is replaced by the one that takes over: the goal is sent again
        with the tokens already received (resume_token_ids) and the pieces go on where they
        were; the result says how long that took (interrupted_s).
        """
        params = _params(prompt, kwargs)
        if isinstance(params, GenerationResult):
            yield params
            return
        deadline = time.monotonic() + timeout_s
        received: list[int] = []
        interrupted = 0.0
        given_total = 0
        while True:
            attempt = replace(params, resume_token_ids=tuple(received)) if received else params
            outcome: list = []
            try:
                for item in self._stream_once(attempt, deadline, cancel_after, given_total, outcome):
                    if isinstance(item, StreamPiece):
                        received.extend(item.token_ids)
                        given_total += 1
                    yield item if not isinstance(item, GenerationResult) else \
                        replace(item, interrupted_s=item.interrupted_s + interrupted)
                return
            except _Lost as lost:
                failed = self._await_takeover(outcome[0] if outcome else None, deadline)
                if failed is not None:
                    yield failed
                    return
                interrupted += time.monotonic() - lost.lost_at

    def _stream_once(self, params: GenerateParams, deadline: float, cancel_after: int | None, given_before: int,
                     epoch_out: list) -> Iterator[StreamPiece | GenerationResult]:
        goal = fill_request(GenerateAction.Goal(), params)
        nonce = seal_request(goal, self.key) if self.key else 0
        pieces: list[StreamPiece] = []
        arrived = threading.Condition()

        def on_feedback(fb) -> None:
            f = fb.feedback
            if self.key and (not is_sealed(f, self.key, nonce) or (pieces and f.token_count <= pieces[-1].token_count)):
                return                           # not the cluster's, or a replayed piece
            with arrived:
                pieces.append(StreamPiece(f.text, f.token_id, f.token_count, tuple(f.token_ids)))
                arrived.notify_all()

        timeout_s = deadline - time.monotonic()
        if not self._action().wait_for_server(timeout_sec=max(0.1, min(timeout_s, 30.0))):
            yield GenerationResult.failure(ErrorCode.NOT_READY,
                                           f"no {self.action} on this ROS domain; is the cluster running?")
            return
        time.sleep(max(0.0, self._action_settled_at - time.monotonic()))
        epoch = self._serving_epoch()
        epoch_out.append(epoch)
        send = self._action().send_goal_async(goal, feedback_callback=on_feedback)
        if not self._wait(send, deadline, epoch):
            yield GenerationResult.failure(ErrorCode.TIMEOUT,
                                           f"{self.action} did not answer the goal in {timeout_s:.0f} s")
            return
        goal_handle = send.result()
        if not goal_handle.accepted:
            yield GenerationResult.failure(ErrorCode.BUSY, f"{self.action} rejected the goal: the cluster is busy "
                                           "or not ready (its log says which); retry later")
            return
        result_future = goal_handle.get_result_async()
        given = 0
        cancelled = False
        while True:
            with arrived:
                while given < len(pieces):
                    yield pieces[given]
                    given += 1
                if result_future.done():
                    break
                if cancel_after is not None and given_before + given >= cancel_after and not cancelled:
                    goal_handle.cancel_goal_async()
                    cancelled = True
                if time.monotonic() > deadline:
                    goal_handle.cancel_goal_async()
                    yield GenerationResult.failure(ErrorCode.TIMEOUT, f"no result from {self.action} in time")
                    return
                if epoch is not None and self.watch.silent_for(epoch) > self.failover_after_s:
                    raise _Lost(self.watch.last_heard(epoch))
                arrived.wait(0.02)
        # Feedback may still be in flight when the result lands: give it a moment.
        time.sleep(0.05)
        with arrived:
            for piece in pieces[given:]:
                yield piece
        yield self._believed(result_future.result().result, nonce)


def _wait_future(future, timeout_s: float) -> bool:
    """Wait for an rclpy future completed by the spin thread. Its done-callback may never run
    when the future completed before the callback was added, so the future itself is polled too.
    """
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    deadline = time.monotonic() + timeout_s
    while not future.done():
        if time.monotonic() > deadline:
            return False
        done.wait(0.05)
    return True


def run_cli_client(cfg, params: GenerateParams, *, stream: bool, wait_s: float) -> int:
    """`mdi-llm generate` over ROS: only the continuation on stdout, errors on stderr."""
    with ros_session(f"mdi_generate_client_{int(time.time() * 1000) % 10**9}", cfg) as node:
        client = GenerateClient(node, cfg.namespace, cfg.key())
        ready = client.wait_for_action(wait_s) if stream else client.wait_for_service(wait_s)
        if not ready:
            print(f"mdi-llm: error: NOT_READY: no {client.action if stream else client.service} on this "
                  f"ROS domain after {wait_s:.0f} s; start the cluster (mdi-llm cluster) and check "
                  "ROS_DOMAIN_ID", file=sys.stderr)
            return 1
        timeout = cfg.coordinator.request_timeout_s + 30
        if stream:
            result = None
            for item in client.stream(params, timeout_s=timeout):
                if isinstance(item, StreamPiece):
                    sys.stdout.write(item.text)
                    sys.stdout.flush()
                else:
                    result = item
        else:
            result = client.generate(params, timeout_s=timeout)
            if result.success:
                sys.stdout.write(result.text)
        if not result.success:
            print(f"mdi-llm: error: {result.error_code}: {result.error_message}", file=sys.stderr)
            return 1
        sys.stdout.write("\n")
        print(result.summary(), file=sys.stderr)
        return 0

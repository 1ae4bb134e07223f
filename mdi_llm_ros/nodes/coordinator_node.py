"""Coordinator node: tokenizer, embedding, head, sampling and the recurrent pipeline.

Serves `/generate` (mdi_llm_ros/srv/Generate) and the streaming action `/generate_stream`
(mdi_llm_ros/action/Generate) under the cluster namespace. Ring traffic has a node, an
executor and a compute thread of its own (a RingLoop), so a client call that waits for its
answer never blocks the ring traffic that produces it. What is decided lives in core:
RingScheduler (admission, sampling, completion) and RingWatch (which chunk nodes serve).

    ros2 run mdi_llm_ros coordinator_node --ros-args -p config_file:=cluster.yaml
"""
from __future__ import annotations

import sys
import threading
import time

import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from mdi_llm_ros.action import Generate as GenerateAction
from mdi_llm_ros.msg import ActivationBatch, NodeStatus
from mdi_llm_ros.srv import Generate

from ..convert import fill_result, params_from
from ..core.coordinator_model import CoordinatorModel
from ..core.errors import ErrorCode, RequestError
from ..core.liveness import RingWatch
from ..core.plan import load_plan, service_name, status_topic
from ..core.request import GenerationResult
from ..core.scheduler import RingScheduler
from ..signing import RequestGate, seal
from ..qos import RING_QOS, STATUS_QOS
from .common import NodeAuth, RingLoop, from_batch_msgs, make_status, run_node, set_threads, spin_quietly, to_batch_msg

MAX_OUTPUTS_AT_ONCE = 64        # ring outputs sampled together (one LM-head matmul)


class CoordinatorNode(Node):
    def __init__(self) -> None:
        super().__init__("mdi_coordinator")
        self.declare_parameter("config_file", "", ParameterDescriptor(
            description="cluster config YAML; the plan made from it defines the ring"))
        config_file = self.get_parameter("config_file").value
        if not config_file:
            raise SystemExit("coordinator_node needs parameter config_file (--ros-args -p config_file:=FILE)")
        cfg, plan, info = load_plan(config_file)
        self.cfg, self.plan = cfg, plan
        self.auth = NodeAuth(cfg.key(), cfg.auth_max_age_s)
        self.request_gate = RequestGate(self.auth.key, cfg.auth_max_age_s) if self.auth.key else None
        c = plan.coordinator
        set_threads(c.threads)
        t0 = time.monotonic()
        self.model = CoordinatorModel.for_plan(plan, info)
        self.get_logger().info(f"coordinator: model parts loaded in {time.monotonic() - t0:.1f} s "
                               f"({self.model.parameter_bytes / 1e6:.1f} MB)")
        self.bytes_received = 0
        self.busy_seconds = 0.0
        self._send_lock = threading.Lock()
        # use_global_arguments=False: the launcher's `-r __node:=NAME` must not rename it too.
        self.ring_node = rclpy.create_node(f"{self.get_name()}_ring", context=self.context,
                                           use_global_arguments=False)
        self.ring_pub = self.ring_node.create_publisher(ActivationBatch, c.outbound_topic, RING_QOS)
        self.scheduler = RingScheduler.for_plan(self.model, plan, self.send, send_wave=self.send_wave,
                                                waves=plan.waves())
        self.watch = RingWatch([n.name for n in plan.chunks], cfg.coordinator.heartbeat_timeout_s,
                               self.scheduler.epoch)
        self.scheduler.set_missing(self.watch.missing)
        self._watch_lock = threading.Lock()
        self.ring = RingLoop(self.ring_node, c.inbound_topic, admit=self.admitted, compute=self.compute,
                             take=lambda p: [p.popleft() for _ in range(min(MAX_OUTPUTS_AT_ONCE, len(p)))])
        self.ring_executor = SingleThreadedExecutor(context=self.context)
        self.ring_executor.add_node(self.ring_node)
        self.ring_thread = threading.Thread(target=spin_quietly, args=(self.ring_executor,), name="ring",
                                            daemon=True)
        self.ring_thread.start()
        # Reentrant groups only: rclpy's MultiThreadedExecutor busy-spins while a ready entity
        # waits for a busy mutually exclusive group.
        client_group = ReentrantCallbackGroup()
        status_group = ReentrantCallbackGroup()
        self.status_pub = self.create_publisher(NodeStatus, status_topic(cfg.namespace), STATUS_QOS)
        self.create_subscription(NodeStatus, status_topic(cfg.namespace), self.on_status, STATUS_QOS,
                                 callback_group=status_group)
        self.create_timer(0.2, self.check_ring, callback_group=status_group)
        self.create_timer(cfg.heartbeat_period_s, self.publish_status, callback_group=status_group)
        # Deep request queues: with the default depth of 10, a burst of more concurrent callers
        # than that overwrote requests in the reader's history and those callers waited forever.
        depth = max(100, 2 * (cfg.coordinator.max_inflight + cfg.coordinator.queue_limit))
        request_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE)
        self.create_service(Generate, service_name(cfg.namespace, "generate"), self.on_generate,
                            qos_profile=request_qos, callback_group=client_group)
        self.action = ActionServer(
            self, GenerateAction, service_name(cfg.namespace, "generate_stream"), self.on_goal_execute,
            goal_callback=self.on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
            callback_group=client_group, goal_service_qos_profile=request_qos,
            result_service_qos_profile=request_qos, cancel_service_qos_profile=request_qos,
            feedback_pub_qos_profile=QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                                                reliability=ReliabilityPolicy.RELIABLE))
        self.get_logger().info(
            f"coordinator: epoch {self.scheduler.epoch}; serving {service_name(cfg.namespace, 'generate')} and "
            f"{service_name(cfg.namespace, 'generate_stream')}; waiting for chunk nodes "
            f"{', '.join(self.watch.missing)}")

    # --- ring -----------------------------------------------------------------------
    def send(self, msg) -> None:
        self.send_wave([msg])

    def send_wave(self, msgs) -> None:
        """A wave's next steps leave as one message: one micro-batch at every hop."""
        with self._send_lock:
            self.auth.publish(self.ring_pub, to_batch_msg(msgs))

    def admitted(self, batch: ActivationBatch) -> bool:
        cause = self.auth.admit_batch(batch)
        if cause is not None:
            self.scheduler.drops[cause] += max(1, len(batch.hops))
        return cause is None

    def compute(self, batches: list[ActivationBatch]) -> None:
        """Every ring output that waits, at once (one LM-head matmul for all of them)."""
        t0 = time.perf_counter()
        hops = from_batch_msgs(batches)
        self.bytes_received += sum(h.nbytes for h in hops)
        try:
            self.scheduler.on_ring_outputs(hops)
        finally:
            self.busy_seconds += time.perf_counter() - t0

    # --- which chunk nodes serve ----------------------------------------------------------
    def _log(self, lines: list[tuple[str, str]]) -> None:
        # one call site per severity: rclpy refuses a call site whose severity changes between calls
        logger = self.get_logger()
        for level, text in lines:
            if level == "error":
                logger.error(text)
            elif level == "warning":
                logger.warning(text)
            else:
                logger.info(text)

    def on_status(self, s: NodeStatus) -> None:
        if s.cluster != self.cfg.namespace or s.role != "chunk":
            return
        cause = self.auth.admit_status(s)
        if cause is not None:
            self.scheduler.drops[cause] += 1
            return
        with self._watch_lock:
            lines = self.watch.heard(s.name, s.started_at_ns, s.pid, s.host, s.epoch, s.ready,
                                     requests_in_flight=self.scheduler.inflight > 0)
        self._log(lines)

    def check_ring(self) -> None:
        if not self._watch_lock.acquire(blocking=False):
            return                              # the previous check is still running
        try:
            check = self.watch.check(requests_in_flight=self.scheduler.inflight > 0)
            self.scheduler.set_missing(self.watch.missing)
        finally:
            self._watch_lock.release()
        self._log(check.log)
        if check.replay_for:
            n = self.scheduler.replay_inflight()
            self.get_logger().warning(f"{', '.join(check.replay_for)} back: replayed the history of {n} "
                                      "in-flight requests")
        self.scheduler.poll()

    def publish_status(self) -> None:
        c = self.plan.coordinator
        inflight, next_id = self.scheduler.ring_view()
        with self._watch_lock:
            members, instances = self.watch.liveness.members()
            missing = list(self.watch.missing)
        status = make_status(
            self, name=c.name, cluster=self.cfg.namespace, role="coordinator", host=c.host, device=c.device,
            layers=(0, c.layer_end), epoch=self.scheduler.epoch, ready=not missing,
            cached=self.scheduler.inflight, queue=self.scheduler.queued,
            tokens=self.scheduler.tokens_generated, drops=dict(self.scheduler.drops),
            missing=missing, bytes_received=self.bytes_received, busy_seconds=self.busy_seconds)
        status.inflight_requests, status.next_request_id = inflight, next_id
        status.members, status.member_instances = members, instances
        self.auth.publish(self.status_pub, status)

    # --- clients ------------------------------------------------------------------------
    def _wait(self, handle, is_cancelled=lambda: False) -> GenerationResult:
        deadline = time.monotonic() + self.cfg.coordinator.request_timeout_s + 10
        while not handle.done:
            if is_cancelled():
                handle.cancel()
            if time.monotonic() > deadline or not rclpy.ok():
                handle.cancel()
                return GenerationResult.failure(ErrorCode.TIMEOUT, "no answer from the ring in time")
            handle.wait(0.02)
        return handle.result

    def _refused(self, request) -> GenerationResult | None:
        """Authenticated mode: UNAUTHORIZED for a request without the team's MAC, replayed or stale."""
        why = self.request_gate.refuse(request) if self.request_gate else None
        if why is None:
            return None
        self.scheduler.drops["unauthorized_request"] += 1
        return GenerationResult.failure(ErrorCode.UNAUTHORIZED, why)

    def _answer(self, msg, result: GenerationResult, request):
        """Fill a response / action result; authenticated mode: sealed, bound to the request's nonce."""
        fill_result(msg, result)
        if self.auth.key:
            seal(msg, self.auth.key, request.nonce)
        return msg

    def on_generate(self, request, response):
        refused = self._refused(request)
        if refused is not None:
            return self._answer(response, refused, request)
        try:
            handle = self.scheduler.submit(params_from(request))
        except RequestError as exc:
            self.get_logger().info(f"/generate refused: {exc.code}: {exc.message}")
            return self._answer(response, GenerationResult.failure(exc.code, exc.message), request)
        except Exception as exc:       # never leave a caller without an answer
            self.get_logger().error(f"/generate failed: {exc!r}")
            return self._answer(response, GenerationResult.failure(ErrorCode.INTERNAL, f"coordinator error: {exc!r}"),
                                request)
        return self._answer(response, self._wait(handle), request)

    def on_goal(self, goal) -> GoalResponse:
        refused = self.scheduler.refusal()
        if refused is not None:
            self.get_logger().warning(f"goal rejected: {refused.code}: {refused.message}")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def on_goal_execute(self, goal_handle):
        result = GenerateAction.Result()
        goal = goal_handle.request
        refused = self._refused(goal)
        if refused is not None:          # accepted only to say why: a rejected goal carries no code
            goal_handle.abort()
            return self._answer(result, refused, goal)

        def on_piece(piece: str, token: int, count: int) -> None:
            fb = GenerateAction.Feedback()
            fb.text, fb.token_id, fb.token_count = piece, int(token), int(count)
            if self.auth.key:
                seal(fb, self.auth.key, goal.nonce)
            goal_handle.publish_feedback(fb)

        try:
            handle = self.scheduler.submit(params_from(goal), on_piece)
        except RequestError as exc:
            goal_handle.abort()
            return self._answer(result, GenerationResult.failure(exc.code, exc.message), goal)
        except Exception as exc:       # never leave a caller without an answer
            self.get_logger().error(f"/generate_stream failed: {exc!r}")
            goal_handle.abort()
            return self._answer(result, GenerationResult.failure(ErrorCode.INTERNAL, f"coordinator error: {exc!r}"),
                                goal)
        r = self._wait(handle, lambda: goal_handle.is_cancel_requested)
        if goal_handle.is_cancel_requested and r.finish_reason == "cancelled":
            goal_handle.canceled()
        elif r.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return self._answer(result, r, goal)

    def destroy_node(self) -> None:
        self.ring.stop()
        self.ring_executor.shutdown(timeout_sec=2.0)
        self.ring_thread.join(timeout=3.0)
        self.ring_node.destroy_node()
        super().destroy_node()

    def stop(self) -> None:
        n = self.scheduler.fail_all(ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down")
        if n:
            self.get_logger().info(f"answered {n} waiting requests with SHUTTING_DOWN")


def main() -> int:
    def threads(node: CoordinatorNode) -> int:
        c = node.cfg.coordinator        # one thread per waiting client call, plus ring and timers
        return min(64, c.max_inflight + c.queue_limit + 4)
    return run_node(CoordinatorNode, num_threads=threads)


if __name__ == "__main__":
    sys.exit(main())

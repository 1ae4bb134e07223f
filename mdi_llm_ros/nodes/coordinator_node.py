"""Coordinator node: tokenizer, embedding, head, sampling and the recurrent pipeline; a managed node.

Serves `/generate` (mdi_llm_ros/srv/Generate) and the streaming action `/generate_stream`
(mdi_llm_ros/action/Generate) under the cluster namespace. Ring traffic has a node, an
executor and a compute thread of its own (a RingLoop), so a client call that waits for its
answer never blocks the ring traffic that produces it. What is decided lives in core:
RingScheduler (admission, sampling, completion), RingWatch (which chunk nodes serve) and
ViewKeeper (when a lost chunk's layers go to the others).

With coordinator.standby_hosts, every coordinator process (the primary and one standby per
listed host) first listens: the lowest-ranked live one serves when no coordinator is heard for
heartbeat_timeout_s, with a new epoch; the others stay standby (loaded, serving nothing), and
one that hears a newer serving coordinator steps down, so two never serve /generate.

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
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from diagnostic_msgs.msg import DiagnosticArray
from mdi_llm_ros.action import Generate as GenerateAction
from mdi_llm_ros.msg import ActivationBatch, NodeStatus
from mdi_llm_ros.srv import Generate

from ..convert import fill_result, params_from
from ..core.coordinator_model import CoordinatorModel
from ..core.errors import ConfigError, ErrorCode, ModelError, RequestError
from ..core.health import coordinator_health, rate
from ..core.liveness import RingWatch
from ..core.plan import COORDINATOR, hop_topic, load_plan, service_name, standby_coordinator_name, status_topic
from ..core.request import GenerationResult
from ..core.scheduler import RingScheduler
from ..core.view import ViewKeeper
from ..signing import RequestGate, seal
from ..qos import RING_QOS, STATUS_QOS
from .common import (NodeAuth, RingLoop, autostart, declare_plan_parameters, diagnostics_of, from_batch_msgs,
                     lifecycle_state, make_status, node_name_from_argv, rss_bytes, run_node, set_threads,
                     spin_quietly, to_batch_msg)

# A coordinator that starts listens this long at least before it would serve: under load, discovering
# a standby that serves already can take seconds, and serving beside it makes one of them step down.
FAILOVER_LISTEN_S = 6.0
MAX_OUTPUTS_AT_ONCE = 64        # ring outputs sampled together (one LM-head matmul)
DIAGNOSTICS_PERIOD_S = 1.0


class CoordinatorNode(LifecycleNode):
    def __init__(self) -> None:
        super().__init__(node_name_from_argv(sys.argv, "mdi_coordinator"))
        self.declare_parameter("config_file", "", ParameterDescriptor(
            description="cluster config YAML; the plan made from it defines the ring"))
        self.declare_parameter("node_name", "", ParameterDescriptor(
            description="coordinator, or coordinator_<host> for the standby on a host of coordinator.standby_hosts"))
        self.declare_parameter("autostart", True, ParameterDescriptor(
            description="configure and activate at once; false: wait for a lifecycle manager"))
        config_file = self.get_parameter("config_file").value
        if not config_file:
            raise SystemExit("coordinator_node needs parameter config_file (--ros-args -p config_file:=FILE)")
        cfg, plan, info = load_plan(config_file)
        self.cfg, self.plan, self.info = cfg, plan, info
        self.node_name = self.get_parameter("node_name").value or COORDINATOR
        self.me = plan.node(self.node_name)
        if self.me.role != "coordinator":
            raise SystemExit(f"{self.node_name!r} is not a coordinator in {config_file}")
        # failover order: the primary, then the standby hosts as listed
        self.candidates = [COORDINATOR] + [standby_coordinator_name(h) for h in cfg.coordinator.standby_hosts]
        self.rank = self.candidates.index(self.node_name)
        self.failover = len(self.candidates) > 1
        declare_plan_parameters(self, plan, self.me, cfg.namespace)
        self.auth = NodeAuth(cfg.key(), cfg.auth_max_age_s)
        self.request_gate = RequestGate(self.auth.key, cfg.auth_max_age_s) if self.auth.key else None
        set_threads(plan.coordinator.threads)
        self.model: CoordinatorModel | None = None
        self.serving = False
        self.scheduler: RingScheduler | None = None
        self.watch: RingWatch | None = None
        self.keeper: ViewKeeper | None = None
        self.ring: RingLoop | None = None
        self.ring_node = None
        self.ring_pub = None
        self.generate_services: list = []
        self.action = None
        self.epoch = 0
        self.bytes_received = 0
        self.busy_seconds = 0.0
        self.hold_until_ready = False           # after a takeover: requests queue until the ring is whole
        self._listening_since = time.monotonic()
        self._others: dict[str, tuple[int, bool, float]] = {}   # coordinator name -> (epoch, serving, heard at)
        self._heard_cluster = False             # any other node of the cluster heard: discovery works
        self._send_lock = threading.Lock()
        self._watch_lock = threading.Lock()
        self._diag_last = (time.monotonic(), 0, 0)
        self.status_group = ReentrantCallbackGroup()
        self.client_group = ReentrantCallbackGroup()
        self.status_pub = self.create_publisher(NodeStatus, status_topic(cfg.namespace), STATUS_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(NodeStatus, status_topic(cfg.namespace), self.on_status, STATUS_QOS,
                                 callback_group=self.status_group)
        self.create_timer(0.2, self.check_ring, callback_group=self.status_group)
        self.create_timer(cfg.heartbeat_period_s, self.publish_status, callback_group=self.status_group)
        self.create_timer(DIAGNOSTICS_PERIOD_S, self.publish_diagnostics, callback_group=self.status_group)
        autostart(self)

    # --- lifecycle ------------------------------------------------------------------
    configure_error: BaseException | None = None

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the tokenizer, embedding, head (and any first layers)."""
        self.configure_error = None
        try:
            t0 = time.monotonic()
            self.model = CoordinatorModel.for_plan(self.plan, self.info)
        except (ModelError, ConfigError, ValueError, OSError) as exc:
            self.configure_error = exc if isinstance(exc, (ModelError, ConfigError)) else ModelError(str(exc))
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f"{self.node_name}: model parts loaded in {time.monotonic() - t0:.1f} s "
                               f"({self.model.parameter_bytes / 1e6:.1f} MB)")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Serve (or, with standby coordinators configured, listen first: see check_failover)."""
        self._listening_since = time.monotonic()
        if not self.failover:
            self.start_serving(time.time_ns(), takeover=False)
        else:
            self.get_logger().info(f"{self.node_name}: standby (rank {self.rank} of {len(self.candidates)}); serves "
                                   "when no coordinator is heard")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop serving: waiting and new requests are refused, the ring is left."""
        self.stop_serving(ErrorCode.SHUTTING_DOWN, "the coordinator was deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.model = None
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_serving(ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down")
        return TransitionCallbackReturn.SUCCESS

    # --- serving ----------------------------------------------------------------------
    def start_serving(self, epoch: int, takeover: bool) -> None:
        """Open the ring (a scheduler of a new epoch) and the service and action."""
        cfg, plan = self.cfg, self.plan
        self.epoch = epoch
        self.scheduler = RingScheduler.for_plan(self.model, plan, self.send, send_wave=self.send_wave,
                                                waves=plan.waves(), epoch=epoch)
        self.keeper = ViewKeeper(plan, self.info, cfg.coordinator.heartbeat_timeout_s)
        if takeover:        # a chunk never heard by this coordinator can still be lost
            for name in plan.members:
                self.keeper.heard(name)
        self.watch = RingWatch(list(plan.members), cfg.coordinator.heartbeat_timeout_s, epoch)
        self.hold_until_ready = takeover
        self.scheduler.set_missing(self.watch.missing, hold=self.hold_until_ready)
        # use_global_arguments=False: the launcher's `-r __node:=NAME` must not rename it too.
        self.ring_node = rclpy.create_node(f"{self.get_name()}_ring", context=self.context,
                                           use_global_arguments=False)
        self.ring_pub = self.ring_node.create_publisher(ActivationBatch, plan.coordinator.outbound_topic, RING_QOS)
        self.ring = RingLoop(self.ring_node, hop_topic(cfg.namespace, len(plan.members)), admit=self.admitted,
                             compute=self.compute,
                             take=lambda p: [p.popleft() for _ in range(min(MAX_OUTPUTS_AT_ONCE, len(p)))])
        self.ring_executor = SingleThreadedExecutor(context=self.context)
        self.ring_executor.add_node(self.ring_node)
        self.ring_thread = threading.Thread(target=spin_quietly, args=(self.ring_executor,), name="ring",
                                            daemon=True)
        self.ring_thread.start()
        # Deep request queues: with the default depth of 10, a burst of more concurrent callers
        # than that overwrote requests in the reader's history and those callers waited forever.
        depth = max(100, 2 * (cfg.coordinator.max_inflight + cfg.coordinator.queue_limit))
        request_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE)
        self.generate_services = [self.create_service(
            Generate, service_name(cfg.namespace, "generate"), self.on_generate, qos_profile=request_qos,
            callback_group=self.client_group)]
        self.action = ActionServer(
            self, GenerateAction, service_name(cfg.namespace, "generate_stream"), self.on_goal_execute,
            goal_callback=self.on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
            callback_group=self.client_group, goal_service_qos_profile=request_qos,
            result_service_qos_profile=request_qos, cancel_service_qos_profile=request_qos,
            feedback_pub_qos_profile=QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                                                reliability=ReliabilityPolicy.RELIABLE))
        self.serving = True
        self.get_logger().info(
            f"coordinator: epoch {epoch}{' (took over)' if takeover else ''}; serving "
            f"{service_name(cfg.namespace, 'generate')} and {service_name(cfg.namespace, 'generate_stream')}; "
            f"waiting for chunk nodes {', '.join(self.watch.missing)}")
        self.publish_status()

    def stop_serving(self, code: str, message: str) -> None:
        if not self.serving:
            return
        self.serving = False
        n = self.scheduler.fail_all(code, message)
        if n:
            self.get_logger().info(f"answered {n} waiting requests with {code}")
        for srv in self.generate_services:
            self.destroy_service(srv)
        self.generate_services = []
        if self.action is not None:
            self.action.destroy()
            self.action = None
        self.ring.stop()
        self.ring_executor.shutdown(timeout_sec=2.0)
        self.ring_thread.join(timeout=3.0)
        self.ring_node.destroy_node()
        self.ring = self.ring_node = self.ring_pub = None

    # --- ring -----------------------------------------------------------------------
    def send(self, msg) -> None:
        self.send_wave([msg])

    def send_wave(self, msgs) -> None:
        """A wave's next steps leave as one message: one micro-batch at every hop."""
        with self._send_lock:
            if self.ring_pub is not None:
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

    # --- which chunk nodes serve, and which coordinator ----------------------------------
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
        if s.cluster != self.cfg.namespace:
            return
        cause = self.auth.admit_status(s)
        if cause is not None:
            if self.scheduler is not None:
                self.scheduler.drops[cause] += 1
            return
        if s.name != self.node_name:
            self._heard_cluster = True
        if s.role == "coordinator":
            if s.name != self.node_name:
                self._others[s.name] = (s.epoch, not s.standby, time.monotonic())
                if self.serving and not s.standby and s.epoch > self.epoch:
                    self.get_logger().warning(f"{s.name} serves a newer epoch ({s.epoch}): stepping down to standby")
                    self.stop_serving(ErrorCode.NODE_LOST, "another coordinator took over; send the request again")
            return
        if not self.serving:
            return
        with self._watch_lock:
            # only the process the ring serves speaks for its name: an impostor that leaves is no loss
            accepted = self.watch.liveness.speaks_for(s.name, s.started_at_ns)
            if s.leaving and accepted:
                self.watch.forget(s.name)
            lines = self.watch.heard(s.name, s.started_at_ns, s.pid, s.host, s.epoch, s.ready and not s.leaving,
                                     requests_in_flight=self.scheduler.inflight > 0, view=s.view)
        if accepted:
            self.keeper.heard(s.name, leaving=s.leaving)
        self._log(lines)

    def check_failover(self) -> None:
        """Not serving: serve when no coordinator has been heard for heartbeat_timeout_s and no
        lower-ranked live candidate is left to do it.
        """
        if self.serving or not self.failover or self.model is None or lifecycle_state(self) != "active":
            return
        now = time.monotonic()
        timeout = self.cfg.coordinator.heartbeat_timeout_s
        heard = {name: v for name, v in self._others.items() if now - v[2] <= timeout}
        if any(serving for _, serving, _ in heard.values()):
            return
        # listen long enough to have discovered the others: a coordinator that returns while another
        # serves must hear it before it would decide that none does
        if not self._heard_cluster or now - self._listening_since < max(2 * timeout, FAILOVER_LISTEN_S):
            return
        alive_ranks = [self.candidates.index(name) for name in heard if name in self.candidates]
        if any(r < self.rank for r in alive_ranks):
            return
        newest = max([v[0] for v in self._others.values()] + [0])
        epoch = max(time.time_ns(), newest + 1)
        self.get_logger().warning(f"{self.node_name}: no coordinator heard for {timeout:g} s: taking over "
                                  f"(rank {self.rank})")
        self.start_serving(epoch, takeover=bool(self._others))

    def check_ring(self) -> None:
        self.check_failover()
        if not self.serving:
            return
        if not self._watch_lock.acquire(blocking=False):
            return                              # the previous check is still running
        try:
            change = self.keeper.check()
            if change.view is not None:
                self._enter_view(change)
            check = self.watch.check(requests_in_flight=self.scheduler.inflight > 0)
            if not self.watch.missing:
                self.hold_until_ready = False
            hold = bool(self.watch.missing) and (self.hold_until_ready or (
                self.keeper.enabled and self.scheduler.view > 0 or self._takeover_pending()))
            self.scheduler.set_missing(self.watch.missing, hold=hold)
        finally:
            self._watch_lock.release()
        self._log(change.log + check.log)
        if check.replay_for:
            n = self.scheduler.replay_inflight()
            if n:
                self.get_logger().warning(f"{', '.join(check.replay_for)} ready: replayed the history of {n} "
                                          "in-flight requests")
        elif not self.watch.missing and self.scheduler.held is not None:
            self.scheduler.resume()
        self.scheduler.poll()

    def _takeover_pending(self) -> bool:
        """A member is missing that a takeover will replace (takeover on, and it was heard before)."""
        return self.keeper.takeover_expected(list(self.watch.missing))

    def _enter_view(self, change) -> None:
        """A new view: the scheduler holds, the ring's last hop may move, the members are awaited."""
        view = change.view
        self.scheduler.set_view(view.number)
        self.watch.set_view(list(view.members), view.number)
        inbound = hop_topic(self.cfg.namespace, len(view.members))
        if self.ring is not None:
            self.ring.retopic(self.ring_node, inbound)
        self.scheduler.pieces_ahead = len(view.members)

    def publish_status(self) -> None:
        c = self.me
        if not self.serving or self.scheduler is None:
            status = make_status(self, name=self.node_name, cluster=self.cfg.namespace, role="coordinator",
                                 host=c.host, device=c.device, layers=(0, c.layer_end), epoch=self.epoch,
                                 ready=False, cached=0, queue=0, tokens=0, drops={}, standby=True)
            self.auth.publish(self.status_pub, status)
            return
        inflight, next_id = self.scheduler.ring_view()
        view = self.keeper.view
        with self._watch_lock:
            _, instances = self.watch.liveness.members()
            owners = self.watch.liveness.owners
            missing = list(self.watch.missing)
        status = make_status(
            self, name=self.node_name, cluster=self.cfg.namespace, role="coordinator", host=c.host, device=c.device,
            layers=(0, c.layer_end), epoch=self.scheduler.epoch, ready=not missing,
            cached=self.scheduler.inflight, queue=self.scheduler.queued,
            tokens=self.scheduler.tokens_generated, drops=dict(self.scheduler.drops),
            missing=missing, bytes_received=self.bytes_received, busy_seconds=self.busy_seconds, view=view.number)
        status.inflight_requests, status.next_request_id = inflight, next_id
        status.members = list(view.members)
        status.member_instances = [owners[m].started_at_ns if m in owners else 0 for m in view.members]
        status.member_layer_starts = [a for a, _ in view.layers]
        status.member_layer_ends = [b for _, b in view.layers]
        self.auth.publish(self.status_pub, status)

    def publish_diagnostics(self) -> None:
        now = time.monotonic()
        then, tokens_then, drops_then = self._diag_last
        sched = self.scheduler if self.serving else None
        tokens = sched.tokens_generated if sched else 0
        drops = dict(sched.drops) if sched else {}
        self._diag_last = (now, tokens, sum(drops.values()))
        weights = (f"{self.plan.quantization} head" if self.plan.quantization != "none"
                   else f"{self.plan.dtype}, {self.plan.kernels} kernels")
        health = coordinator_health(
            state=lifecycle_state(self), serving=self.serving, epoch=self.epoch,
            view=self.keeper.view.number if sched else 0,
            members=list(self.keeper.view.members) if sched else [], device=self.me.device, weights=weights,
            rss=rss_bytes(), weight_bytes=self.model.parameter_bytes if self.model else 0,
            inflight=sched.inflight if sched else 0, queued=sched.queued if sched else 0,
            tokens_per_s=rate(tokens, tokens_then, now - then), drops=drops,
            new_drops=sum(drops.values()) - drops_then, missing=list(self.watch.missing) if sched else [],
            held=sched.held if sched else None)
        self.diag_pub.publish(diagnostics_of(self, health, self.node_name, self.me.host))

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
        scheduler = self.scheduler
        if not self.serving or scheduler is None:
            return self._answer(response, GenerationResult.failure(
                ErrorCode.NOT_READY, "this coordinator does not serve now (a standby, or deactivated)"), request)
        refused = self._refused(request)
        if refused is not None:
            return self._answer(response, refused, request)
        try:
            handle = scheduler.submit(params_from(request))
        except RequestError as exc:
            self.get_logger().info(f"/generate refused: {exc.code}: {exc.message}")
            return self._answer(response, GenerationResult.failure(exc.code, exc.message), request)
        except Exception as exc:       # never leave a caller without an answer
            self.get_logger().error(f"/generate failed: {exc!r}")
            return self._answer(response, GenerationResult.failure(ErrorCode.INTERNAL, f"coordinator error: {exc!r}"),
                                request)
        return self._answer(response, self._wait(handle), request)

    def on_goal(self, goal) -> GoalResponse:
        if not self.serving:
            return GoalResponse.REJECT
        refused = self.scheduler.refusal(goal.priority)
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

        def on_piece(piece: str, token_ids: list[int], count: int) -> None:
            fb = GenerateAction.Feedback()
            fb.text, fb.token_count = piece, int(count)
            fb.token_ids = [int(t) for t in token_ids]
            fb.token_id = int(token_ids[-1]) if token_ids else -1
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
        if self.serving:
            self.serving = False
            self.ring.stop()
            self.ring_executor.shutdown(timeout_sec=2.0)
            self.ring_thread.join(timeout=3.0)
            self.ring_node.destroy_node()
        super().destroy_node()

    def stop(self) -> None:
        if self.scheduler is None:
            return
        n = self.scheduler.fail_all(ErrorCode.SHUTTING_DOWN, "the coordinator is shutting down")
        if n:
            self.get_logger().info(f"answered {n} waiting requests with SHUTTING_DOWN")


def main() -> int:
    def threads(node: CoordinatorNode) -> int:
        c = node.cfg.coordinator        # one thread per waiting client call, plus ring and timers
        return min(64, c.max_inflight + c.priority_slots + c.queue_limit + 4)
    return run_node(CoordinatorNode, num_threads=threads)


if __name__ == "__main__":
    sys.exit(main())

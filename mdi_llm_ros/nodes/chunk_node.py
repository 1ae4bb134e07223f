"""Chunk node: one contiguous range of decoder layers on the ring, a managed (lifecycle) node.

Runs its layers (core.chunk_handler.ChunkHandler) on what arrives on its inbound hop topic,
in the compute thread of a RingLoop, publishes the result on its outbound hop topic, follows
the coordinator's heartbeats (its epoch and its view of the ring) and sends its own.

Transitions: configure loads its layers (only those), activate joins the ring, deactivate
leaves it (the coordinator hands its layers to the others, or its requests finish first),
cleanup frees the weights. By default (autostart) it goes to active on its own.

    ros2 run mdi_llm_ros chunk_node --ros-args -p config_file:=cluster.yaml -p node_name:=chunk_0
"""
from __future__ import annotations

import gc
import os
import sys
import threading
import time

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from diagnostic_msgs.msg import DiagnosticArray
from mdi_llm_ros.msg import ActivationBatch, NodeStatus

from ..core.chunk import ChunkExecutor
from ..core.chunk_handler import ChunkHandler, take_ring_work
from ..core.errors import ActivationRejected, ConfigError, ModelError
from ..core.formats import DTYPE_BYTES
from ..core.health import chunk_health, rate
from ..core.liveness import EVENT_COORDINATOR_SILENT, EVENT_JOINED
from ..core.plan import hop_topic, load_plan, status_topic
from ..qos import RING_QOS, STATUS_QOS
from .common import (PROCESS_STARTED_NS, NodeAuth, RingLoop, autostart, declare_plan_parameters, diagnostics_of,
                     from_batch_msgs, lifecycle_state, make_status, node_name_from_argv, rss_bytes, run_node,
                     set_threads, supervisor_event, to_batch_msg)

LINK_SETTLE_S = 0.3   # both sides of a new DDS match learn of it at about, not exactly, the same time
COORDINATOR_SILENCE_WARN_S = 10.0   # say so when the coordinator has not been heard for this long,
COORDINATOR_SILENCE_REPEAT_S = 30.0  # and again this often while it lasts
EPOCH_SILENCE_HEARTBEATS = 2.5   # a new coordinator epoch is followed once the current one misses this many
MAX_MERGED_PREFILLS = 64   # ring messages of prompts taken together (handle_many bounds the positions)
DROP_LOG_EVERY_S = 5.0     # each drop cause is logged at most this often
DIAGNOSTICS_PERIOD_S = 1.0
LEAVE_DRAIN_S = 30.0       # a leaving node keeps computing at most this long while its requests finish


class ChunkNode(LifecycleNode):
    def __init__(self) -> None:
        super().__init__(node_name_from_argv(sys.argv, "mdi_chunk"))
        self.declare_parameter("config_file", "", ParameterDescriptor(
            description="cluster config YAML; the plan made from it says which layers this node runs"))
        self.declare_parameter("node_name", "", ParameterDescriptor(
            description="this chunk's name in the config (chunks[].name)"))
        self.declare_parameter("autostart", True, ParameterDescriptor(
            description="configure and activate at once; false: wait for a lifecycle manager"))
        config_file = self.get_parameter("config_file").value
        name = self.get_parameter("node_name").value
        if not config_file or not name:
            raise SystemExit("chunk_node needs parameters config_file and node_name "
                             "(--ros-args -p config_file:=FILE -p node_name:=chunk_0)")
        self.cfg, self.plan, self.info = load_plan(config_file)
        n = self.plan_node = self.plan.node(name)
        if n.role != "chunk":
            raise SystemExit(f"{name!r} is not a chunk node in {config_file}")
        self.cluster = self.cfg.namespace
        declare_plan_parameters(self, self.plan, n, self.cluster)
        set_threads(n.threads)
        self.auth = NodeAuth(self.cfg.key(), self.cfg.auth_max_age_s)
        self.handler: ChunkHandler | None = None
        self.ring: RingLoop | None = None
        self.pub = None
        self.leaving = False
        self._leave_started = 0.0
        self._links_up_since: float | None = None
        self._ready = False
        self._coordinator_heard_at = time.monotonic()   # counts from start: silence since then is news
        self._silence_warned_at = -1e9
        self._last_drop_log: dict[str, float] = {}
        self._loader: threading.Thread | None = None
        self._diag_last = (time.monotonic(), 0, 0)      # (when, tokens, drops) at the last diagnostics
        self.status_pub = self.create_publisher(NodeStatus, status_topic(self.cluster), STATUS_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(NodeStatus, status_topic(self.cluster), self.on_status, STATUS_QOS)
        self.create_timer(self.cfg.heartbeat_period_s, self.publish_status)
        self.create_timer(DIAGNOSTICS_PERIOD_S, self.publish_diagnostics)
        self.create_timer(0.2, self.check_leaving)
        autostart(self)

    # --- lifecycle ------------------------------------------------------------------
    configure_error: BaseException | None = None

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load this node's layers (a standby: none), and only their tensors."""
        n = self.plan_node
        self.configure_error = None
        try:
            t0 = time.monotonic()
            start, end = (n.layer_start, n.layer_end) if not n.standby else (0, 0)
            self.get_logger().info(f"{n.name}: loading layers [{start}, {end}) on {n.device} ..." if end > start
                                   else f"{n.name}: standby, holding no layers until a takeover gives it some")
            executor = ChunkExecutor(self.info, start, end, device=n.device, dtype=self.plan.dtype,
                                     kernels=self.plan.kernels, quantization=self.plan.quantization,
                                     max_cached_requests=self.cfg.chunk(n.name).max_cached_requests,
                                     cache_idle_timeout_s=self.cfg.chunk(n.name).cache_idle_timeout_s,
                                     plausible_ids=4 * (self.cfg.coordinator.max_inflight
                                                        + self.cfg.coordinator.queue_limit) + 64,
                                     progress=self.get_logger().info)
        except (ModelError, ConfigError, ValueError, OSError) as exc:
            self.configure_error = exc if isinstance(exc, (ModelError, ConfigError)) else ModelError(str(exc))
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        # The largest legal activation: a prefill of the whole context.
        max_payload = self.plan.max_context * self.info.hidden_size * DTYPE_BYTES[self.plan.dtype]
        self.handler = ChunkHandler(executor, cluster=self.cluster, hop=n.hop, max_payload_bytes=max_payload,
                                    last=n.last_chunk, name=n.name, instance=PROCESS_STARTED_NS,
                                    epoch_silence_s=EPOCH_SILENCE_HEARTBEATS * self.cfg.heartbeat_period_s)
        if end > start:
            layers = ("own decoder layers" if executor.native is not None
                      else f"transformers' decoder layers ({executor.fallback_reason})")
            self.get_logger().info(f"{n.name}: {executor.parameter_bytes / 1e6:.1f} MB of weights loaded in "
                                   f"{time.monotonic() - t0:.1f} s from {self.info.source}, {layers}, "
                                   f"{self._weights_text()}; inbound {n.inbound_topic} -> {n.outbound_topic}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Join the ring: listen on this node's hop, publish to the next."""
        self.leaving = False
        self._join(self.handler.hop if self.handler.layers != (0, 0) else None)
        self.publish_status()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Leave the ring gracefully: say so in the heartbeat (the coordinator hands the layers to the
        others, or stops admitting), keep computing until the view no longer holds this node or its
        requests are finished (check_leaving), then stop listening.
        """
        self.leaving = True
        self._leave_started = time.monotonic()
        self.get_logger().info("leaving the ring: the coordinator hands these layers over, or lets the requests "
                               "in flight finish")
        self.publish_status()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Free the weights."""
        self._leave_ring()
        freed = self.handler.executor.parameter_bytes if self.handler else 0
        self.handler = None
        gc.collect()
        self.get_logger().info(f"weights freed ({freed / 1e6:.1f} MB)")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._leave_ring()
        return TransitionCallbackReturn.SUCCESS

    # --- the ring ---------------------------------------------------------------------
    def _join(self, hop: int | None) -> None:
        """Ring topics for `hop` (None: off the ring, a standby)."""
        self._ready = False
        self._links_up_since = None
        if hop is None:
            self._leave_ring()
            return
        inbound, outbound = hop_topic(self.cluster, hop), hop_topic(self.cluster, hop + 1)
        old_pub, self.pub = self.pub, self.create_publisher(ActivationBatch, outbound, RING_QOS)
        if old_pub is not None:
            self.destroy_publisher(old_pub)
        if self.ring is None:
            self.ring = RingLoop(self, inbound, admit=self.admitted,
                                 take=lambda pending: take_ring_work(pending, MAX_MERGED_PREFILLS),
                                 compute=self.compute, idle=self._idle, name="chunk-compute")
        else:
            self.ring.retopic(self, inbound)

    def _leave_ring(self) -> None:
        ring, self.ring = self.ring, None         # taken first: a stop and a view change may race here
        pub, self.pub = self.pub, None
        if ring is not None:
            ring.stop()
            self.destroy_subscription(ring.subscription)
        if pub is not None:
            self.destroy_publisher(pub)

    def _idle(self) -> None:
        if self.handler is not None:
            self.handler.executor.evict_idle()

    def compute(self, batches: list[ActivationBatch]) -> None:
        """One ring message at a time, as a rule: the decode steps in it (a wave of requests, formed
        by the coordinator) share one forward, and what comes out leaves as one message, so the
        wave stays together at the next hop and every node has one to work on.
        """
        handler, pub = self.handler, self.pub
        if handler is None or pub is None:
            return
        ready = []
        for out in handler.handle_many(from_batch_msgs(batches)):
            if out is None:
                self.log_drop()
            else:
                ready.append(out)
        if ready:
            self.auth.publish(pub, to_batch_msg(ready))

    def admitted(self, batch: ActivationBatch) -> bool:
        """Authenticated mode: a batch that is not sealed with the team's key, is replayed or stale
        is dropped whole and counted (once per hop it carries).
        """
        cause = self.auth.admit_batch(batch)
        if cause is None:
            return True
        if self.handler is not None:
            for _ in range(max(1, len(batch.hops))):
                self.handler.stats.drop(cause)
            self.handler.last_drop = ActivationRejected(cause, "ring message without the team's MAC, replayed or "
                                                               "stale")
        self.log_drop()
        return False

    def log_drop(self) -> None:
        """Log each drop cause at most once per DROP_LOG_EVERY_S (a flood must not flood the log)."""
        exc = self.handler.last_drop if self.handler else None
        if exc is None:
            return
        now = time.monotonic()
        if now - self._last_drop_log.get(exc.cause, -1e9) > DROP_LOG_EVERY_S:
            self._last_drop_log[exc.cause] = now
            count = self.handler.stats.drops.get(exc.cause, 0)
            self.get_logger().warning(f"dropped activation ({exc.cause}, {count} so far): {exc.detail}")

    # --- the coordinator ----------------------------------------------------------------
    def on_status(self, s: NodeStatus) -> None:
        """Follow the coordinator (ChunkHandler.on_coordinator): its epoch, which of its requests are
        finished, whether it serves this process or another of the same name, and its view.
        """
        if s.role != "coordinator" or s.cluster != self.cluster or s.standby or self.handler is None:
            return
        cause = self.auth.admit_status(s)
        if cause is not None:
            self.handler.stats.drop(cause)
            return
        news = self.handler.on_coordinator(s.epoch, list(s.inflight_requests), s.next_request_id,
                                           list(s.members), list(s.member_instances), s.view,
                                           list(s.member_layer_starts), list(s.member_layer_ends))
        if s.epoch == self.handler.epoch:
            self._coordinator_heard_at = time.monotonic()
        if news.adopted:
            supervisor_event(EVENT_JOINED, epoch=s.epoch)
            self.get_logger().info(f"joined coordinator epoch {s.epoch}"
                                   + (f"; dropped {news.dropped} caches of the previous epoch" if news.dropped else ""))
        if news.serving is False:
            self.get_logger().error(
                f"the coordinator serves another process named {self.plan_node.name}; this one (pid {os.getpid()}) "
                "stays idle until that one is gone. Stop one of them, or give this one another chunks[].name")
        elif news.serving:
            self.get_logger().info(f"the coordinator serves this process as {self.plan_node.name} now")
        if news.assignment is not None:
            if self.leaving:              # a node on its way out loads nothing
                self.handler.decline_move()
            else:
                self._move(*news.assignment)
        if news.adopted or news.serving is not None:
            self.publish_status()

    def _move(self, view: int, hop: int | None, layers: tuple[int, int], last: bool) -> None:
        """A new view moves this node: load what it gains and free what it loses in a thread of its
        own (heartbeats go on meanwhile), then listen on its new hop.
        """
        handler = self.handler
        where = f"layers [{layers[0]}, {layers[1]}) at hop {hop}" if hop is not None else "no layers (off the ring)"
        self.get_logger().info(f"view {view}: moving from layers [{handler.executor.start}, {handler.executor.end}) "
                               f"to {where}")

        def load() -> None:
            t0 = time.monotonic()
            try:
                freed, loaded = handler.executor.reassign(*layers, progress=self.get_logger().info)
            except Exception as exc:  # noqa: BLE001 - say why, and stay out of the ring
                self.get_logger().error(f"view {view}: loading layers [{layers[0]}, {layers[1]}) failed: {exc!r}")
                return
            gc.collect()
            handler.enter_view(view, hop, layers, last)
            if self.handler is handler and lifecycle_state(self) == "active" and not self.leaving:
                self._join(hop)
            self.get_logger().info(f"view {view}: {loaded} layers loaded, {freed} freed in "
                                   f"{time.monotonic() - t0:.1f} s; {handler.executor.parameter_bytes / 1e6:.1f} MB "
                                   "of weights held")
            self.publish_status()

        self._loader = threading.Thread(target=load, name="view-loader", daemon=True)
        self._loader.start()

    def check_leaving(self) -> None:
        """A leaving node stops listening once the coordinator's view no longer holds it, or its
        requests have finished (no takeover), or LEAVE_DRAIN_S have passed.
        """
        if not self.leaving or self.ring is None or self.handler is None:
            return
        off_ring = self.handler.layers == (0, 0) or self.handler.moving
        drained = self.handler.executor.num_cached == 0 and time.monotonic() - self._leave_started > 1.0
        if off_ring or drained or time.monotonic() - self._leave_started > LEAVE_DRAIN_S:
            self._leave_ring()
            self.get_logger().info("left the ring")
            self.publish_status()

    def ring_links_up(self) -> bool:
        """Ready once both ring neighbours are matched (and were a moment ago): a message
        published before discovery has matched the next hop is lost, and the coordinator replays
        in-flight requests as soon as a restarted node reports ready. Once ready, a node stays
        ready: a neighbour that dies later is reported missing by its own silence.
        """
        if self._ready:
            return True
        pub, ring = self.pub, self.ring       # the view loader's thread may leave the ring meanwhile
        if pub is None or ring is None:
            return False
        matched = pub.get_subscription_count() > 0 and ring.subscription.get_publisher_count() > 0
        now = time.monotonic()
        if not matched:
            self._links_up_since = None
            return False
        if self._links_up_since is None:
            self._links_up_since = now
        self._ready = now - self._links_up_since >= LINK_SETTLE_S
        return self._ready

    def warn_if_coordinator_silent(self) -> None:
        """A chunk node that never hears its coordinator serves nobody: say so, and what to check,
        instead of waiting in silence (and tell a launcher, which may restart a respawned node).
        """
        now = time.monotonic()
        silent = now - self._coordinator_heard_at
        if silent < COORDINATOR_SILENCE_WARN_S or now - self._silence_warned_at < COORDINATOR_SILENCE_REPEAT_S:
            return
        self._silence_warned_at = now
        supervisor_event(EVENT_COORDINATOR_SILENT, seconds=round(silent, 1))
        self.get_logger().warning(
            f"no status from the coordinator on {status_topic(self.cluster)} "
            f"for {silent:.0f} s (ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', '0')}): start it, or check "
            "that both use the same config, domain id and discovery range")

    def publish_status(self) -> None:
        n, handler = self.plan_node, self.handler
        if handler is None:              # unconfigured: alive, holding nothing
            self.auth.publish(self.status_pub, make_status(
                self, name=n.name, cluster=self.cluster, role="chunk", host=n.host, device=n.device, layers=(0, 0),
                epoch=0, ready=False, cached=0, queue=0, tokens=0, drops={}, leaving=self.leaving,
                standby=n.standby))
            return
        self.warn_if_coordinator_silent()
        ex, ring = handler.executor, self.ring
        active = lifecycle_state(self) == "active"
        self.auth.publish(self.status_pub, make_status(
            self, name=n.name, cluster=self.cluster, role="chunk", host=n.host, device=n.device,
            layers=handler.layers, epoch=handler.epoch,
            ready=active and not self.leaving and handler.serving and not handler.moving and self.ring_links_up(),
            cached=ex.num_cached, queue=ring.depth if ring else 0, tokens=ex.stats.tokens_processed,
            drops=dict(ex.stats.drops), bytes_received=ex.stats.bytes_received,
            busy_seconds=ex.stats.busy_seconds, kv_cache=(ex.kv_cache_bytes, ex.kv_cache_peak_bytes),
            view=handler.view, leaving=self.leaving, standby=handler.layers == (0, 0)))

    def _weights_text(self) -> str:
        if self.plan.quantization != "none":
            sources = self.handler.executor.describe_sources() if self.handler else ""
            return f"{self.plan.quantization} weights" + (f" ({sources})" if sources else "")
        return f"{self.plan.dtype} weights, {self.plan.kernels} kernels"

    def publish_diagnostics(self) -> None:
        n, handler = self.plan_node, self.handler
        now = time.monotonic()
        then, tokens_then, drops_then = self._diag_last
        ex = handler.executor if handler else None
        tokens = ex.stats.tokens_processed if ex else 0
        drops = dict(ex.stats.drops) if ex else {}
        self._diag_last = (now, tokens, sum(drops.values()))
        missing = []
        pub, ring = self.pub, self.ring
        if handler is not None and pub is not None and ring is not None:
            if pub.get_subscription_count() == 0:
                missing.append(f"next hop {hop_topic(self.cluster, handler.hop + 1)}")
            if ring.subscription.get_publisher_count() == 0:
                missing.append(f"previous hop {hop_topic(self.cluster, handler.hop)}")
        health = chunk_health(
            state=lifecycle_state(self), view=handler.view if handler else 0,
            layers=handler.layers if handler else (0, 0), on_ring=bool(handler and handler.layers != (0, 0)),
            device=n.device, weights=self._weights_text(), rss=rss_bytes(),
            weight_bytes=ex.parameter_bytes if ex else 0, kv_bytes=ex.kv_cache_bytes if ex else 0,
            queue=ring.depth if ring else 0, cached=ex.num_cached if ex else 0,
            tokens_per_s=rate(tokens, tokens_then, now - then), drops=drops,
            new_drops=sum(drops.values()) - drops_then, missing_neighbours=missing,
            coordinator_silent_s=now - self._coordinator_heard_at if handler else 0.0,
            moving=bool(handler and handler.moving), leaving=self.leaving)
        self.diag_pub.publish(diagnostics_of(self, health, n.name, n.host))

    def stop(self) -> None:
        """SIGINT/SIGTERM: say that this node leaves (a takeover need not wait for its silence)."""
        self.leaving = True
        try:
            self.publish_status()
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass
        if self.handler is not None:
            st = self.handler.stats
            if st.decode_forwards:
                self.get_logger().info(f"{st.decode_tokens} decode steps in {st.decode_forwards} forwards "
                                       f"(mean micro-batch {st.decode_tokens / st.decode_forwards:.2f})")
            loader = self._loader
            if loader is not None and loader.is_alive():
                loader.join(10.0)          # a view's layers being loaded: let it end before the process does
            self._leave_ring()
            self.handler.executor.release_all()


def main() -> int:
    return run_node(ChunkNode, num_threads=1)   # callbacks only enqueue; compute has its own thread


if __name__ == "__main__":
    sys.exit(main())

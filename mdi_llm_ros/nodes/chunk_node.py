"""Chunk node: one contiguous range of decoder layers on the ring.

Runs its layers (core.chunk_handler.ChunkHandler) on what arrives on its inbound hop topic,
in the compute thread of a RingLoop, publishes the result on its outbound hop topic, follows
the coordinator's heartbeats and sends its own.

    ros2 run mdi_llm_ros chunk_node --ros-args -r __node:=chunk_0 -p config_file:=cluster.yaml -p node_name:=chunk_0
"""
from __future__ import annotations

import os
import sys
import time

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node

from mdi_llm_ros.msg import ActivationBatch, NodeStatus

from ..core.chunk import ChunkExecutor
from ..core.chunk_handler import ChunkHandler, take_ring_work
from ..core.errors import ActivationRejected
from ..core.formats import DTYPE_BYTES
from ..core.liveness import EVENT_COORDINATOR_SILENT, EVENT_JOINED
from ..core.plan import load_plan, status_topic
from ..qos import RING_QOS, STATUS_QOS
from .common import (PROCESS_STARTED_NS, NodeAuth, RingLoop, from_batch_msgs, make_status, run_node, set_threads,
                     supervisor_event, to_batch_msg)

LINK_SETTLE_S = 0.3   # both sides of a new DDS match learn of it at about, not exactly, the same time
COORDINATOR_SILENCE_WARN_S = 10.0   # say so when the coordinator has not been heard for this long,
COORDINATOR_SILENCE_REPEAT_S = 30.0  # and again this often while it lasts
EPOCH_SILENCE_HEARTBEATS = 2.5   # a new coordinator epoch is followed once the current one misses this many
MAX_MERGED_PREFILLS = 64   # ring messages of prompts taken together (handle_many bounds the positions)
DROP_LOG_EVERY_S = 5.0     # each drop cause is logged at most this often


class ChunkNode(Node):
    def __init__(self) -> None:
        super().__init__("mdi_chunk")
        self.declare_parameter("config_file", "", ParameterDescriptor(
            description="cluster config YAML; the plan made from it says which layers this node runs"))
        self.declare_parameter("node_name", "", ParameterDescriptor(
            description="this chunk's name in the config (chunks[].name)"))
        config_file = self.get_parameter("config_file").value
        name = self.get_parameter("node_name").value
        if not config_file or not name:
            raise SystemExit("chunk_node needs parameters config_file and node_name "
                             "(--ros-args -p config_file:=FILE -p node_name:=chunk_0)")
        cfg, plan, info = load_plan(config_file)
        n = self.plan_node = plan.node(name)
        if n.role != "chunk":
            raise SystemExit(f"{name!r} is not a chunk node in {config_file}")
        set_threads(n.threads)
        self.cluster = cfg.namespace
        self.auth = NodeAuth(cfg.key(), cfg.auth_max_age_s)
        t0 = time.monotonic()
        self.get_logger().info(f"{name}: loading layers [{n.layer_start}, {n.layer_end}) on {n.device} ...")
        executor = ChunkExecutor.for_plan(plan, n, info, progress=self.get_logger().info)
        # The largest legal activation: a prefill of the whole context.
        max_payload = plan.max_context * info.hidden_size * DTYPE_BYTES[plan.dtype]
        self.handler = ChunkHandler(executor, cluster=self.cluster, hop=n.hop, max_payload_bytes=max_payload,
                                    last=n.last_chunk, name=name, instance=PROCESS_STARTED_NS,
                                    epoch_silence_s=EPOCH_SILENCE_HEARTBEATS * cfg.heartbeat_period_s)
        layers = ("own decoder layers" if executor.native is not None
                  else f"transformers' decoder layers ({executor.fallback_reason})")
        weights = (f"{plan.quantization} weights ({executor.describe_sources()})" if plan.quantization != "none"
                   else f"{plan.dtype} weights, {plan.kernels} kernels")
        self.get_logger().info(f"{name}: {executor.parameter_bytes / 1e6:.1f} MB of weights loaded in "
                               f"{time.monotonic() - t0:.1f} s from {info.source}, {layers}, {weights}; inbound "
                               f"{n.inbound_topic} -> {n.outbound_topic}")
        self.pub = self.create_publisher(ActivationBatch, n.outbound_topic, RING_QOS)
        self.status_pub = self.create_publisher(NodeStatus, status_topic(self.cluster), STATUS_QOS)
        self._links_up_since: float | None = None
        self._ready = False
        self._coordinator_heard_at = time.monotonic()   # counts from start: silence since then is news
        self._silence_warned_at = -1e9
        self._last_drop_log: dict[str, float] = {}
        self.create_subscription(NodeStatus, status_topic(self.cluster), self.on_status, STATUS_QOS)
        self.create_timer(cfg.heartbeat_period_s, self.publish_status)
        self.ring = RingLoop(self, n.inbound_topic, admit=self.admitted,
                             take=lambda pending: take_ring_work(pending, MAX_MERGED_PREFILLS),
                             compute=self.compute, idle=executor.evict_idle, name="chunk-compute")
        self.publish_status()

    def compute(self, batches: list[ActivationBatch]) -> None:
        """One ring message at a time, as a rule: the decode steps in it (a wave of requests, formed
        by the coordinator) share one forward, and what comes out leaves as one message, so the
        wave stays together at the next hop and every node has one to work on."""
        ready = []
        for out in self.handler.handle_many(from_batch_msgs(batches)):
            if out is None:
                self.log_drop()
            else:
                ready.append(out)
        if ready:
            self.auth.publish(self.pub, to_batch_msg(ready))

    def admitted(self, batch: ActivationBatch) -> bool:
        """Authenticated mode: a batch that is not sealed with the team's key, is replayed or stale
        is dropped whole and counted (once per hop it carries)."""
        cause = self.auth.admit_batch(batch)
        if cause is None:
            return True
        for _ in range(max(1, len(batch.hops))):
            self.handler.stats.drop(cause)
        self.handler.last_drop = ActivationRejected(cause, "ring message without the team's MAC, replayed or stale")
        self.log_drop()
        return False

    def log_drop(self) -> None:
        """Log each drop cause at most once per DROP_LOG_EVERY_S (a flood must not flood the log)."""
        exc = self.handler.last_drop
        if exc is None:
            return
        now = time.monotonic()
        if now - self._last_drop_log.get(exc.cause, -1e9) > DROP_LOG_EVERY_S:
            self._last_drop_log[exc.cause] = now
            count = self.handler.stats.drops.get(exc.cause, 0)
            self.get_logger().warning(f"dropped activation ({exc.cause}, {count} so far): {exc.detail}")

    def on_status(self, s: NodeStatus) -> None:
        """Follow the coordinator (ChunkHandler.on_coordinator): its epoch, which of its requests are
        finished, and whether it serves this process or another of the same name."""
        if s.role != "coordinator" or s.cluster != self.cluster:
            return
        cause = self.auth.admit_status(s)
        if cause is not None:
            self.handler.stats.drop(cause)
            return
        news = self.handler.on_coordinator(s.epoch, list(s.inflight_requests), s.next_request_id,
                                           list(s.members), list(s.member_instances))
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
        if news.adopted or news.serving is not None:
            self.publish_status()

    def ring_links_up(self) -> bool:
        """Ready once both ring neighbours are matched (and were a moment ago): a message
        published before discovery has matched the next hop is lost, and the coordinator replays
        in-flight requests as soon as a restarted node reports ready. Once ready, a node stays
        ready: a neighbour that dies later is reported missing by its own silence."""
        if self._ready:
            return True
        matched = self.pub.get_subscription_count() > 0 and self.ring.subscription.get_publisher_count() > 0
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
        instead of waiting in silence (and tell a launcher, which may restart a respawned node)."""
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
        self.warn_if_coordinator_silent()
        n, ex = self.plan_node, self.handler.executor
        self.auth.publish(self.status_pub, make_status(
            self, name=n.name, cluster=self.cluster, role="chunk", host=n.host, device=n.device,
            layers=(n.layer_start, n.layer_end), epoch=self.handler.epoch,
            ready=self.handler.serving and self.ring_links_up(),
            cached=ex.num_cached, queue=self.ring.depth, tokens=ex.stats.tokens_processed,
            drops=dict(ex.stats.drops), bytes_received=ex.stats.bytes_received,
            busy_seconds=ex.stats.busy_seconds, kv_cache=(ex.kv_cache_bytes, ex.kv_cache_peak_bytes)))

    def stop(self) -> None:
        st = self.handler.stats
        if st.decode_forwards:
            self.get_logger().info(f"{st.decode_tokens} decode steps in {st.decode_forwards} forwards "
                                   f"(mean micro-batch {st.decode_tokens / st.decode_forwards:.2f})")
        self.ring.stop()
        self.handler.executor.release_all()


def main() -> int:
    return run_node(ChunkNode, num_threads=1)   # callbacks only enqueue; compute has its own thread


if __name__ == "__main__":
    sys.exit(main())

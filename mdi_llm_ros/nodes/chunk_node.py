"""Chunk node: one contiguous range of decoder layers on the ring.

Subscribes to its inbound hop topic, runs its layers (core.ring.ChunkHandler)
in a worker thread so DDS callbacks never wait on compute, publishes the
result on its outbound hop topic, and sends NodeStatus heartbeats.

    ros2 run mdi_llm_ros chunk_node --ros-args -p config_file:=cluster.yaml -p node_name:=chunk_0
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import deque

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node

from mdi_llm_ros.msg import ActivationBatch, NodeStatus

from ..core.chunk import ChunkExecutor
from ..core.errors import ActivationRejected
from ..core.plan import COORDINATOR_JOINED, COORDINATOR_SILENT, DTYPE_BYTES, load_plan, status_topic
from ..core.ring import ChunkHandler, take_ring_work
from .common import (PROCESS_STARTED_NS, RING_QOS, STATUS_QOS, NodeAuth, from_batch_msgs, make_status,
                     run_node, set_threads, to_batch_msg)

LINK_SETTLE_S = 0.3   # both sides of a new DDS match learn of it at about, not exactly, the same time
COORDINATOR_SILENCE_WARN_S = 10.0   # say so when the coordinator has not been heard for this long,
COORDINATOR_SILENCE_REPEAT_S = 30.0  # and again this often while it lasts
EPOCH_SILENCE_HEARTBEATS = 2.5   # a new coordinator epoch is followed once the current one misses this many
MAX_MERGED_PREFILLS = 64   # ring messages of prompts taken together (handle_many bounds the positions)


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
        self.plan_node = plan.node(name)
        if self.plan_node.role != "chunk":
            raise SystemExit(f"{name!r} is not a chunk node in {config_file}")
        chunk_cfg = cfg.chunks[self.plan_node.hop]
        set_threads(self.plan_node.threads)
        self.cluster = cfg.namespace
        self.auth = NodeAuth(cfg.key(), cfg.auth_max_age_s)
        t0 = time.monotonic()
        n = self.plan_node
        self.get_logger().info(f"{name}: loading layers [{n.layer_start}, {n.layer_end}) on {n.device} ...")
        c = cfg.coordinator
        executor = ChunkExecutor(info, n.layer_start, n.layer_end, device=n.device, dtype=plan.dtype,
                                 kernels=plan.kernels,
                                 max_cached_requests=chunk_cfg.max_cached_requests,
                                 cache_idle_timeout_s=chunk_cfg.cache_idle_timeout_s,
                                 plausible_ids=4 * (c.max_inflight + c.queue_limit) + 64)
        # The largest legal activation: a prefill of the whole context.
        max_payload = plan.max_context * info.hidden_size * DTYPE_BYTES[plan.dtype]
        self.handler = ChunkHandler(executor, cluster=self.cluster, hop=n.hop, max_payload_bytes=max_payload,
                                    last=n is plan.chunks[-1], name=name, instance=PROCESS_STARTED_NS,
                                    epoch_silence_s=EPOCH_SILENCE_HEARTBEATS * cfg.heartbeat_period_s)
        layers = ("own decoder layers" if executor.native is not None
                  else f"transformers' decoder layers ({executor.fallback_reason})")
        layers += f", {plan.kernels} kernels"
        self.get_logger().info(f"{name}: {executor.parameter_bytes / 1e6:.1f} MB of weights loaded in "
                               f"{time.monotonic() - t0:.1f} s, {layers}; inbound {n.inbound_topic} -> "
                               f"{n.outbound_topic}")
        self.inbox: queue.Queue = queue.Queue()
        self.pub = self.create_publisher(ActivationBatch, n.outbound_topic, RING_QOS)
        self.status_pub = self.create_publisher(NodeStatus, status_topic(self.cluster), STATUS_QOS)
        self.ring_sub = self.create_subscription(
            ActivationBatch, n.inbound_topic, lambda b: self.inbox.put(b) if self.admitted(b) else None, RING_QOS)
        self._links_up_since: float | None = None
        self._ready = False
        self._coordinator_heard_at = time.monotonic()   # counts from start: silence since then is news
        self._silence_warned_at = -1e9
        self.create_subscription(NodeStatus, status_topic(self.cluster), self.on_status, STATUS_QOS)
        self.create_timer(cfg.heartbeat_period_s, self.publish_status)
        self._stop = threading.Event()
        self.pending: deque[ActivationBatch] = deque()   # taken from the inbox, not yet processed
        self._last_drop_log: dict[str, float] = {}
        self.worker = threading.Thread(target=self.work, name="chunk-compute", daemon=True)
        self.worker.start()
        self.publish_status()

    def work(self) -> None:
        """Compute loop, one ring message at a time: the decode steps in it (a wave of requests,
        formed by the coordinator) share one forward (micro-batching), and what comes out leaves
        as one message, so the wave stays together at the next hop. Messages are not merged:
        each wave keeps its place in the pipeline, so every node has one to work on."""
        while not self._stop.is_set():
            try:
                batches = self.next_batches()
            except queue.Empty:
                self.handler.executor.evict_idle()
                continue
            ready = []
            for out in self.handler.handle_many(from_batch_msgs(batches)):
                if out is None:
                    self.log_drop()
                else:
                    ready.append(out)
            if not ready:
                continue
            try:
                self.auth.publish(self.pub, to_batch_msg(ready))
            except Exception as exc:  # context shut down while publishing
                if not self._stop.is_set():
                    self.get_logger().error(f"publish failed: {exc}")

    def next_batches(self) -> list[ActivationBatch]:
        """The next ring messages to compute (take_ring_work picks them from all that wait)."""
        if not self.pending:
            self.pending.append(self.inbox.get(timeout=0.2))
        while True:
            try:
                self.pending.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return take_ring_work(self.pending, MAX_MERGED_PREFILLS)

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
        """Log each drop cause at most once per 5 s (a flood must not flood the log)."""
        exc = self.handler.last_drop
        if exc is None:
            return
        now = time.monotonic()
        if now - self._last_drop_log.get(exc.cause, -1e9) > 5.0:
            self._last_drop_log[exc.cause] = now
            count = self.handler.stats.drops.get(exc.cause, 0)
            self.get_logger().warning(f"dropped activation ({exc.cause}, {count} so far): {exc.detail}")

    def on_status(self, s: NodeStatus) -> None:
        """Follow the coordinator (core.ring.ChunkHandler.on_coordinator): its epoch, which of its
        requests are finished, and whether it serves this process or another of the same name."""
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
            self.get_logger().info(f"{COORDINATOR_JOINED} {s.epoch}"
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
        matched = self.pub.get_subscription_count() > 0 and self.ring_sub.get_publisher_count() > 0
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
        instead of waiting in silence."""
        now = time.monotonic()
        silent = now - self._coordinator_heard_at
        if silent < COORDINATOR_SILENCE_WARN_S or now - self._silence_warned_at < COORDINATOR_SILENCE_REPEAT_S:
            return
        self._silence_warned_at = now
        self.get_logger().warning(
            f"{COORDINATOR_SILENT} on {status_topic(self.cluster)} "
            f"for {silent:.0f} s (ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID', '0')}): start it, or check "
            "that both use the same config, domain id and discovery range")

    def publish_status(self) -> None:
        self.warn_if_coordinator_silent()
        n, ex = self.plan_node, self.handler.executor
        self.auth.publish(self.status_pub, make_status(
            self, name=n.name, cluster=self.cluster, role="chunk", host=n.host, device=n.device,
            layers=(n.layer_start, n.layer_end), epoch=self.handler.epoch,
            ready=self.handler.serving and self.ring_links_up(),
            cached=ex.num_cached, queue=self.inbox.qsize() + len(self.pending), tokens=ex.stats.tokens_processed,
            drops=dict(ex.stats.drops), bytes_received=ex.stats.bytes_received,
            busy_seconds=ex.stats.busy_seconds, kv_cache=(ex.kv_cache_bytes, ex.kv_cache_peak_bytes)))

    def stop(self) -> None:
        st = self.handler.stats
        if st.decode_forwards:
            self.get_logger().info(f"{st.decode_tokens} decode steps in {st.decode_forwards} forwards "
                                   f"(mean micro-batch {st.decode_tokens / st.decode_forwards:.2f})")
        self._stop.set()
        self.worker.join(timeout=2)     # a forward takes well under a second
        self.handler.executor.release_all()


def main() -> int:
    return run_node(ChunkNode, num_threads=1)   # callbacks only enqueue; compute has its own thread


if __name__ == "__main__":
    sys.exit(main())

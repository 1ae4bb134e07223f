"""Helpers shared by the ROS node processes: message conversion, QoS, status, process setup.

Everything that decides or computes lives in mdi_llm_ros.core; the nodes only
convert messages and call it.
"""
from __future__ import annotations

import array
import faulthandler
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from typing import Callable

import psutil
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.signals import SignalHandlerOptions

from mdi_llm_ros.msg import Activation, ActivationBatch, NodeStatus

from ..core.auth import Sealer
from ..core.health import ERROR, OK, WARN, Health
from ..core.errors import ConfigError
from ..core.liveness import EVENTS_FD_ENV
from ..core.errors import ModelError
from ..core.message import HopMessage
from ..qos import RING_QOS
from ..signing import Gate, seal
from ..spin import spin_resilient

PROCESS_STARTED_NS = time.time_ns()


def to_msg(h: HopMessage) -> Activation:
    m = Activation()
    m.cluster = h.cluster
    m.epoch = h.epoch
    m.view = h.view
    m.priority = h.priority
    m.request_id = h.request_id
    m.step = h.step
    m.first_position = h.first_position
    m.kind = h.kind
    m.hop = h.hop
    m.dtype = h.dtype
    m.shape = [int(s) for s in h.shape]
    if memoryview(h.data).nbytes:
        # array.array('B') is taken as-is by the generated setter (no per-element checks).
        buf = array.array("B")
        buf.frombytes(memoryview(h.data).cast("B"))
        m.data = buf
    return m


def from_msg(m: Activation) -> HopMessage:
    return HopMessage(cluster=m.cluster, epoch=m.epoch, request_id=m.request_id, step=m.step,
                      first_position=m.first_position, kind=m.kind, hop=m.hop, dtype=m.dtype,
                      shape=list(m.shape), data=m.data, view=m.view, priority=m.priority)


def to_batch_msg(hops: list[HopMessage]) -> ActivationBatch:
    """Hops published together (what the ring topics carry)."""
    m = ActivationBatch()
    m.hops = [to_msg(h) for h in hops]
    return m


def from_batch_msgs(batches: list[ActivationBatch]) -> list[HopMessage]:
    """Every hop of the received batches, in arrival order."""
    return [from_msg(m) for b in batches for m in b.hops]


class NodeAuth:
    """A node's side of the authenticated mode (cluster.secret_file): it seals what it publishes
    on the ring and the status topic, and lets in only what is sealed, fresh and not replayed.
    Without a key (plain mode) everything passes unchanged.
    """

    def __init__(self, key: bytes | None, max_age_s: float) -> None:
        self.key = key
        self.sealer = Sealer(key, PROCESS_STARTED_NS) if key else None
        self.gate = Gate(key, max_age_s) if key else None

    def publish(self, publisher, msg) -> None:
        """Seal and publish an ActivationBatch or a NodeStatus; counters leave in order."""
        if self.sealer is None:
            publisher.publish(msg)
            return
        with self.sealer.lock:
            counter, stamp_ns = self.sealer.next()
            if hasattr(msg, "hops"):
                msg.sender, msg.counter, msg.stamp_ns = self.sealer.sender, counter, stamp_ns
            else:
                msg.counter = counter
            seal(msg, self.key)
            publisher.publish(msg)

    def admit_batch(self, msg) -> str | None:
        """None, or why an ActivationBatch is dropped."""
        return None if self.gate is None else self.gate.check_batch(msg)

    def admit_status(self, msg) -> str | None:
        return None if self.gate is None else self.gate.check_status(msg)


class RingLoop:
    """Ring messages in, one compute thread, results out: the loop both kinds of node run.

    The DDS callback only checks a batch (`admit`) and queues it, so DDS callbacks never wait
    on compute; the compute thread takes what waits (`take` picks from the queue) and hands it
    to `compute`, which publishes what comes out. `idle` runs when nothing arrived for 0.2 s.
    """

    def __init__(self, node, topic: str, *, admit: Callable[[ActivationBatch], bool],
                 take: Callable[[deque], list], compute: Callable[[list], None],
                 idle: Callable[[], None] | None = None, name: str = "ring-compute") -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.pending: deque = deque()          # taken from the inbox, not yet computed
        self._admit, self._take, self._compute, self._idle = admit, take, compute, idle
        self._log = node.get_logger()
        self.subscription = node.create_subscription(ActivationBatch, topic, self._on_batch, RING_QOS)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        """Ring messages waiting to be computed."""
        return self.inbox.qsize() + len(self.pending)

    def _on_batch(self, batch: ActivationBatch) -> None:
        if self._admit(batch):
            self.inbox.put(batch)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.pending:
                try:
                    self.pending.append(self.inbox.get(timeout=0.2))
                except queue.Empty:
                    if self._idle is not None:
                        self._idle()
                    continue
            while True:
                try:
                    self.pending.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            batches = self._take(self.pending)
            try:
                self._compute(batches)
            except Exception as exc:  # noqa: BLE001 - the ring must outlive one bad batch
                if not self._stop.is_set():
                    self._log.error(f"{len(batches)} ring messages dropped: {exc!r}")

    def retopic(self, node, topic: str) -> None:
        """Listen on another ring topic (a new view moved this node to another hop)."""
        old = self.subscription
        self.subscription = node.create_subscription(ActivationBatch, topic, self._on_batch, RING_QOS)
        node.destroy_subscription(old)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self.thread.join(timeout)       # a forward takes well under a second


def supervisor_event(event: str, **fields) -> None:
    """Tell the launcher that started this node what happened (a JSON line on the pipe it passed
    in MDI_EVENTS_FD): it acts on these, never on log text. No launcher, no pipe: nothing.
    """
    fd = os.environ.get(EVENTS_FD_ENV)
    if not fd:
        return
    try:
        os.write(int(fd), (json.dumps({"event": event, **fields}) + "\n").encode())
    except (OSError, ValueError):
        pass


_LEVELS = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}


def diagnostics_of(node, health: Health, name: str, hardware_id: str) -> DiagnosticArray:
    """One node's health as /diagnostics carries it (one status per node)."""
    status = DiagnosticStatus()
    status.level = _LEVELS[health.level]
    status.name = f"mdi_llm_ros: {name}"
    status.message = health.message
    status.hardware_id = hardware_id
    status.values = [KeyValue(key=k, value=v) for k, v in health.values.items()]
    array = DiagnosticArray()
    array.header.stamp = node.get_clock().now().to_msg()
    array.status = [status]
    return array


def declare_plan_parameters(node, plan, n, namespace: str) -> None:
    """Read-only parameters with this node's slice of the configured plan, so that
    `ros2 param dump /chunk_0` shows what it runs. The config file stays the one source of truth:
    these say what it planned (a takeover's view is in /diagnostics and the status topic).
    """
    values = {"role": n.role, "host": n.host, "device": n.device, "layer_start": n.layer_start,
              "layer_end": n.layer_end, "hop": n.hop, "inbound_topic": n.inbound_topic,
              "outbound_topic": n.outbound_topic, "dtype": plan.dtype, "kernels": plan.kernels,
              "quantization": plan.quantization, "standby": n.standby, "cluster_namespace": namespace}
    meaning = {"role": "coordinator or chunk", "host": "the device this node is planned on",
               "device": "torch device of its layers", "layer_start": "first layer held (inclusive)",
               "layer_end": "last layer held (exclusive)", "hop": "index on the ring (-1: coordinator, spare)",
               "inbound_topic": "ring topic it computes from", "outbound_topic": "ring topic it publishes to",
               "dtype": "activation dtype", "kernels": "model.kernels", "quantization": "model.quantization",
               "standby": "a spare: off the ring until a takeover", "cluster_namespace": "cluster.namespace"}
    for key, value in values.items():
        node.declare_parameter(f"plan.{key}", value, ParameterDescriptor(
            description=f"{meaning[key]} (from the config's plan; read-only)", read_only=True))


def node_name_from_argv(argv: list[str], default: str) -> str:
    """The name given as `-p node_name:=X` on the command line, so that a node started with
    `ros2 run` without `-r __node:=X` is still /X (a remap, if given, wins anyway).
    """
    for arg in argv:
        if arg.startswith("node_name:=") and len(arg) > len("node_name:="):
            return arg[len("node_name:="):]
    return default


def lifecycle_state(node) -> str:
    """The managed node's state label: unconfigured, inactive, active, finalized (or a transition)."""
    try:
        return node._state_machine.current_state[1]
    except AttributeError:
        return "active"


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def make_status(node, *, name: str, cluster: str, role: str, host: str, device: str, layers: tuple[int, int],
                epoch: int, ready: bool, cached: int, queue: int, tokens: int, drops: dict[str, int],
                missing: list[str] = (), bytes_received: int = 0, busy_seconds: float = 0.0,
                kv_cache: tuple[int, int] = (0, 0), view: int = 0, leaving: bool = False,
                standby: bool = False) -> NodeStatus:
    """kv_cache: (bytes held now, most held at once) of a chunk's KV cache."""
    s = NodeStatus()
    s.stamp = node.get_clock().now().to_msg()
    s.name, s.cluster, s.role, s.host, s.device = name, cluster, role, host, device
    s.layer_start, s.layer_end = layers
    s.epoch = epoch
    s.started_at_ns = PROCESS_STARTED_NS
    s.pid = os.getpid()
    s.ready = ready
    s.lifecycle_state = lifecycle_state(node)
    s.leaving, s.standby, s.view = leaving, standby, view
    s.requests_cached = cached
    s.queue_depth = queue
    s.resident_memory_bytes = rss_bytes()
    s.kv_cache_bytes, s.kv_cache_peak_bytes = (int(v) for v in kv_cache)
    s.tokens_processed = tokens
    s.bytes_received = int(bytes_received)
    s.busy_seconds = float(busy_seconds)
    s.messages_dropped = sum(drops.values())
    s.drop_causes = list(drops)
    s.drop_counts = [int(v) for v in drops.values()]
    s.missing_nodes = list(missing)
    return s


def set_threads(threads: int | None) -> None:
    env = os.environ.get("MDI_TORCH_THREADS")
    n = threads or (int(env) if env else None)
    if n:
        torch.set_num_threads(n)


def spin_quietly(executor) -> None:
    """Spin until shut down; an error from rclpy's wait-set races is logged, not fatal."""
    spin_resilient(executor, executor.context, logging.getLogger("mdi_llm_ros.executor").warning)


def run_node(make_node, num_threads: int | Callable[[object], int] = 2, grace_s: float = 0.5) -> int:
    """Create a node and spin it until SIGINT/SIGTERM, then stop it cleanly.

    rclpy's own signal handling would shut the context down before waiting
    clients could be answered; here a signal first calls `node.stop()` (which
    answers or releases what is pending), waits `grace_s` for those answers to
    leave, and only then shuts the executor and the context down.
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="[%(levelname)s] [%(name)s]: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from ..shm import hold_dead_ports
    hold_dead_ports()             # before the first participant: never reopen a dead process's port
    rclpy.init(args=sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    node = None
    try:
        node = make_node()
        threads = num_threads(node) if callable(num_threads) else num_threads
        # rclpy's MultiThreadedExecutor busy-spins while a ready entity waits for a busy
        # mutually exclusive group, stealing the GIL from the compute thread: a node whose
        # callbacks never block uses the single-threaded executor.
        executor = SingleThreadedExecutor() if threads == 1 else MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        spinner = threading.Thread(target=spin_quietly, args=(executor,), name="executor", daemon=True)
        spinner.start()
        while not stop.wait(0.5) and spinner.is_alive():
            pass
        # Everything below stays well inside the launchers' 10 s before they kill a node; one
        # that still hangs prints every thread's stack (to its log) after 8 s, saying where.
        faulthandler.dump_traceback_later(8.0, exit=False)
        node.stop()
        time.sleep(grace_s)
        executor.shutdown(timeout_sec=2.0)
        spinner.join(timeout=3.0)   # a spin thread left inside rcl at exit aborts the process
        return 0
    except (SystemExit, ModelError, ConfigError) as exc:   # a configuration or model problem: say it, exit 2
        print(f"[{os.path.basename(sys.argv[0])}] {exc}", file=sys.stderr)
        return 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        faulthandler.cancel_dump_traceback_later()


def autostart(node) -> None:
    """Bring a lifecycle node to active now, unless its `autostart` parameter is false (then a
    lifecycle manager drives it). A failed configure raises its error: the process exits saying why.
    """
    if node.get_parameter("autostart").value:
        node.trigger_configure()
        if node.configure_error is not None:
            raise node.configure_error
        node.trigger_activate()

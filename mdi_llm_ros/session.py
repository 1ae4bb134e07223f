"""A client process's ROS session: an rclpy context with one node spun in the background.

Robot clients, `mdi-llm generate`, the soak and the bench's drivers all need the same few
steps, in this order: the config's discovery settings into the environment (DDS reads them
when the context starts), rclpy.init, a node, a spin thread that outlives rclpy's races, and
on the way out the spin thread stopped before rclpy shuts down. Torch-free.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from .core.config import ClusterConfig, apply_discovery_env
from .spin import spin_resilient


class BackgroundSpin:
    """Spin a node in a background thread; `close()` stops and joins it before rclpy shuts down
    (a spin thread still inside rcl at interpreter exit aborts the process).
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.executor = SingleThreadedExecutor(context=node.context)
        self.executor.add_node(node)
        self.thread = threading.Thread(target=self._spin, name="ros-spin", daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        spin_resilient(self.executor, self.node.context, self.node.get_logger().warning)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.thread.join(timeout=5.0)
        self.node.destroy_node()


@contextlib.contextmanager
def ros_session(name: str, config: ClusterConfig | None = None) -> Iterator[Node]:
    """Give a node of this process, spun in a thread of its own until the block ends."""
    if config is not None:
        apply_discovery_env(config)
    rclpy.init()
    node = rclpy.create_node(name)
    spin = BackgroundSpin(node)
    try:
        yield node
    finally:
        spin.close()
        rclpy.try_shutdown()

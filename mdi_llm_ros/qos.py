"""Quality of service of the ring's topics, shared by the nodes and every client-side watcher."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

# Ring traffic: reliable and KEEP_ALL, so a slow hop applies back-pressure instead of silently
# overwriting activations (a reliable keep_last writer drops the oldest unacknowledged sample
# when its history is full).
RING_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)
STATUS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)

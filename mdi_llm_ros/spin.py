"""An executor spin loop that survives rclpy's races with entities made in other threads.

rclpy's `Executor.spin()` ends at the first exception from building its wait set, and one
comes when another thread creates an entity at the wrong moment: an `ActionClient` is added
to its node before its constructor has finished (`'ActionClient' object has no attribute
'_lock'`, seen in 3 of 30 tries of 16 clients made while spinning). A spin thread that died
that way left every later reply of that process unread: callers timed out although the
coordinator had answered. This loop logs such an error and spins on.
"""
from __future__ import annotations

import time
from typing import Callable


def spin_resilient(executor, context, log: Callable[[str], None] | None = None) -> None:
    """Spin until the context or the executor is shut down, surviving transient errors."""
    from rclpy.executors import ExternalShutdownException, ShutdownException
    failures = 0
    while context.ok() and not getattr(executor, "_is_shutdown", False):
        try:
            executor.spin_once(timeout_sec=0.2)
        except (ExternalShutdownException, ShutdownException):
            return
        except Exception as exc:       # noqa: BLE001 - see the module docstring
            if not context.ok() or getattr(executor, "_is_shutdown", False):
                return
            failures += 1
            if log is not None and (failures in (1, 10, 100) or failures % 1000 == 0):
                log(f"executor error, spinning on ({failures} so far): {exc!r}")
            time.sleep(0.01)

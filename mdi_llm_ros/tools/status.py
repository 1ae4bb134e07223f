"""Watching the ring's heartbeats (NodeStatus) from a client process: the soak, the bench, tests."""
from __future__ import annotations

import time

from ..core.plan import status_topic


class StatusWatch:
    """Latest NodeStatus per node name."""

    def __init__(self, node, namespace: str) -> None:
        from mdi_llm_ros.msg import NodeStatus

        from ..qos import STATUS_QOS
        self.latest: dict = {}
        self._node = node
        self._sub = node.create_subscription(NodeStatus, status_topic(namespace), self._on, STATUS_QOS)

    def close(self) -> None:
        self._node.destroy_subscription(self._sub)

    def _on(self, s) -> None:
        self.latest[s.name] = s

    def fresh(self, wait_s: float = 1.5, expect: int = 0, max_wait_s: float = 5.0) -> dict:
        """Statuses published from now on: at least `wait_s`, and until `expect` nodes were heard
        (a node busy computing may publish late) or `max_wait_s` passed.
        """
        self.latest.clear()
        time.sleep(wait_s)
        end = time.monotonic() + max_wait_s - wait_s
        while len(self.latest) < expect and time.monotonic() < end:
            time.sleep(0.05)
        return dict(self.latest)


def status_rows(statuses: dict) -> list[dict]:
    """One plain dict per node, coordinator first, then chunks by their first layer."""
    order = sorted(statuses.values(), key=lambda s: (s.role != "coordinator", s.layer_start, s.name))
    return [{"name": s.name, "role": s.role, "host": s.host, "pid": s.pid, "device": s.device,
             "layers": [s.layer_start, s.layer_end], "epoch": s.epoch, "ready": s.ready,
             "requests": s.requests_cached, "queue": s.queue_depth, "rss_mb": round(s.resident_memory_bytes / 1e6),
             "kv_cache_mb": round(s.kv_cache_bytes / 1e6, 1), "drops": dict(zip(s.drop_causes, s.drop_counts)),
             "missing": list(s.missing_nodes)} for s in order]


def format_rows(rows: list[dict]) -> str:
    head = ("node", "role", "host", "pid", "layers", "ready", "requests", "queue", "RSS MB", "KV MB", "drops")
    lines = [head] + [(r["name"], r["role"], r["host"], str(r["pid"]), f"[{r['layers'][0]}, {r['layers'][1]})",
                       "yes" if r["ready"] else "no", str(r["requests"]), str(r["queue"]), str(r["rss_mb"]),
                       str(r["kv_cache_mb"]), ", ".join(f"{k} {v}" for k, v in r["drops"].items()) or "-")
                      for r in rows]
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in lines)


def run_status(cfg, *, wait_ready_s: float | None, as_json: bool) -> int:
    """`mdi-llm status`: what every node of the cluster says in its heartbeat (from any device of the
    domain). With wait_ready_s: first wait until the coordinator says the ring is complete.
    """
    import json
    import sys

    from ..session import ros_session
    with ros_session(f"mdi_status_{int(time.time() * 1000) % 10**9}", cfg) as node:
        watch = StatusWatch(node, cfg.namespace)
        ready = True
        if wait_ready_s is not None:
            end = time.monotonic() + wait_ready_s
            while not (c := watch.latest.get("coordinator")) or not c.ready:
                if time.monotonic() > end:
                    ready = False
                    break
                time.sleep(0.1)
        rows = status_rows(watch.fresh(1.5, expect=len(cfg.chunks) + 1))
    print(json.dumps(rows) if as_json else format_rows(rows))
    if not ready:
        missing = next((r["missing"] for r in rows if r["role"] == "coordinator"), None)
        print(f"mdi-llm: error: NOT_READY: the ring is not complete after {wait_ready_s:.0f} s"
              + (f" (missing: {', '.join(missing)})" if missing else " (no coordinator heard)"), file=sys.stderr)
        return 1
    return 0

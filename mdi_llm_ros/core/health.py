"""What a node says on /diagnostics: a level, a line, and key-values, from plain values.

The ROS nodes turn the result into diagnostic_msgs/DiagnosticStatus (about once a second), so
standard tools (`ros2 topic echo /diagnostics`, rqt_robot_monitor) show the ring's health.
NodeStatus stays the ring's own protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field

OK, WARN, ERROR = "OK", "WARN", "ERROR"


@dataclass
class Health:
    level: str
    message: str
    values: dict[str, str] = field(default_factory=dict)


def _drops(drops: dict[str, int]) -> dict[str, str]:
    return {"drops_total": str(sum(drops.values())),
            **{f"drops.{cause}": str(n) for cause, n in sorted(drops.items())}}


def rate(count: float, previous: float, seconds: float) -> float:
    return (count - previous) / seconds if seconds > 0 else 0.0


def chunk_health(*, state: str, view: int, layers: tuple[int, int], on_ring: bool, device: str, weights: str,
                 rss: int, weight_bytes: int, kv_bytes: int, queue: int, cached: int, tokens_per_s: float,
                 drops: dict[str, int], new_drops: int, missing_neighbours: list[str], coordinator_silent_s: float,
                 moving: bool, leaving: bool) -> Health:
    """A chunk node's health (weights: e.g. "int4" or "float32, exact kernels")."""
    values = {"state": state, "view": str(view), "layers": f"[{layers[0]}, {layers[1]})" if on_ring else "none",
              "device": device, "weights": weights, "rss_bytes": str(rss), "weight_bytes": str(weight_bytes),
              "kv_cache_bytes": str(kv_bytes), "queue_depth": str(queue), "requests_cached": str(cached),
              "tokens_per_s": f"{tokens_per_s:.1f}", "missing_neighbours": ", ".join(missing_neighbours),
              **_drops(drops)}
    if state != "active":
        return Health(WARN, f"{state}: not on the ring", values)
    if leaving:
        return Health(WARN, "leaving the ring: its layers are handed over", values)
    if moving:
        return Health(WARN, "loading the layers of a new view", values)
    if coordinator_silent_s > 10:
        return Health(ERROR, f"no coordinator heard for {coordinator_silent_s:.0f} s", values)
    if not on_ring:
        return Health(OK, "standby: holds no layers until a takeover gives it some", values)
    if missing_neighbours:
        return Health(ERROR, f"ring neighbours not matched: {', '.join(missing_neighbours)}", values)
    if new_drops:
        return Health(WARN, f"{new_drops} ring messages dropped in the last second", values)
    return Health(OK, f"layers [{layers[0]}, {layers[1]}) serving", values)


def coordinator_health(*, state: str, serving: bool, epoch: int, view: int, members: list[str], device: str,
                       weights: str, rss: int, weight_bytes: int, inflight: int, queued: int, tokens_per_s: float,
                       drops: dict[str, int], new_drops: int, missing: list[str], held: str | None) -> Health:
    """A coordinator's (or a standby coordinator's) health."""
    values = {"state": state, "role": "active" if serving else "standby", "epoch": str(epoch), "view": str(view),
              "members": ", ".join(members), "device": device, "weights": weights, "rss_bytes": str(rss),
              "weight_bytes": str(weight_bytes), "requests_in_flight": str(inflight), "queue_depth": str(queued),
              "tokens_per_s": f"{tokens_per_s:.1f}", "missing_nodes": ", ".join(missing), **_drops(drops)}
    if state != "active":
        return Health(WARN, f"{state}: serving nothing", values)
    if not serving:
        return Health(OK, "standby coordinator: takes over when the active one falls silent", values)
    if missing and not held:
        return Health(ERROR, f"ring incomplete: {', '.join(missing)} missing", values)
    if held:
        return Health(WARN, held, values)
    if new_drops:
        return Health(WARN, f"{new_drops} ring outputs dropped in the last second", values)
    return Health(OK, f"serving; {inflight} requests in flight, {queued} queued", values)

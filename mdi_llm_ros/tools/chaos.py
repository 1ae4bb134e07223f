"""`mdi-llm chaos`: like soak, while chunk nodes and the coordinator are killed with SIGKILL.

It starts the cluster, asks every prompt once undisturbed (the reference texts), then runs N
streaming clients (greedy) while a killer SIGKILLs a random chunk node every --kill-every
seconds and brings it back after --down-for (never with --permanent), and kills the serving
coordinator at least once (when coordinator.standby_hosts gives it a standby). It reports
requests, lost ones, wrong texts, the p50/p99 of each request's longest gap between two tokens,
the time from each kill to the ring serving again, and memory before and after; it exits 1 on
any lost request or wrong text.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from ..client import GenerateClient, StreamPiece
from ..core.config import ClusterConfig
from ..launcher import Cluster, LineBuffer, node_specs, survivable_roles
from ..session import ros_session
from .soak import PROMPTS
from .status import StatusWatch

TOKENS = 32


@dataclass
class Kill:
    name: str
    role: str
    at: float
    back_at: float | None = None        # restarted
    serving_again_s: float | None = None


@dataclass
class ChaosReport:
    requests: int = 0
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)       # each request's longest gap between two tokens
    interrupted: list[float] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    rss_warm: dict[str, int] = field(default_factory=dict)
    rss_end: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.wrong


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _client(idx: int, client: GenerateClient, deadline: float, refs: dict[str, str], report: ChaosReport,
            lock: threading.Lock) -> None:
    turn = idx
    while time.monotonic() < deadline:
        prompt = PROMPTS[turn % len(PROMPTS)]
        turn += 1
        arrivals, result = [time.monotonic()], None
        for item in client.stream(prompt, max_new_tokens=TOKENS, timeout_s=600):
            if isinstance(item, StreamPiece):
                arrivals.append(time.monotonic())
            else:
                result = item
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        with lock:
            report.requests += 1
            report.gaps.append(max(gaps, default=0.0))
            if result is None or not result.success:
                why = f"{result.error_code}: {result.error_message}" if result else "no result"
                report.lost.append(f"{prompt!r}: {why}")
            elif result.text != refs[prompt]:
                report.wrong.append(f"{prompt!r}: {result.text!r} != {refs[prompt]!r}")
            if result is not None and result.interrupted_s:
                report.interrupted.append(result.interrupted_s)


def _serving_coordinator(watch: StatusWatch):
    """The heartbeat (NodeStatus) of the coordinator that serves now, or None."""
    for s in watch.fresh(0.6).values():
        if s.role == "coordinator" and not s.standby:
            return s
    return None


def _wait_serving(watch: StatusWatch, since: float, timeout: float, killed: str | None = None,
                  epoch: int = 0) -> float | None:
    """Seconds from `since` until a serving coordinator reports the ring ready again (after having
    been heard not ready), or None. After killing the coordinator `killed` (serving `epoch`): until
    another one serves a new epoch, ready.
    """
    saw_broken = killed is not None
    deadline = since + timeout
    while time.monotonic() < deadline:
        for s in watch.fresh(0.3).values():
            if s.role != "coordinator" or s.standby or (killed is not None and (s.name == killed or s.epoch == epoch)):
                continue
            if not s.ready:
                saw_broken = True
            elif saw_broken:
                return time.monotonic() - since
        if not saw_broken and time.monotonic() - since > 12:      # never seen broken: served throughout
            return 0.0
        time.sleep(0.1)
    return None


def _kill(cluster: Cluster, name: str) -> None:
    proc = cluster.procs.get(name)
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_chaos(cfg: ClusterConfig, cluster: Cluster, *, duration_s: float, clients: int, kill_every_s: float,
              down_for_s: float, permanent: bool, seed: int = 0, log=print) -> ChaosReport:
    report = ChaosReport()
    rng = random.Random(seed)
    chunks = [s.name for s in cluster.specs.values() if s.role == "chunk"]
    standby_coordinators = bool(cfg.coordinator.standby_hosts)
    if not standby_coordinators:
        report.notes.append("coordinator not killed: no coordinator.standby_hosts, so nothing would take over")
    with ros_session(f"mdi_chaos_{os.getpid()}", cfg) as node:
        watch = StatusWatch(node, cfg.namespace)
        pool = [GenerateClient(node, cfg.namespace, cfg.key(), failover_after_s=cfg.coordinator.heartbeat_timeout_s)
                for _ in range(clients)]
        if not pool[0].wait_for_service(180) or not pool[0].wait_until_ready(180).success:
            report.lost.append("the cluster never became ready")
            return report
        refs = {}
        for prompt in PROMPTS:                    # undisturbed reference texts
            r = pool[0].generate(prompt, max_new_tokens=TOKENS, timeout_s=300)
            if not r.success:
                report.lost.append(f"reference {prompt!r}: {r.error_code}: {r.error_message}")
                return report
            refs[prompt] = r.text
        log(f"[chaos] references taken; {clients} clients for {duration_s:.0f} s, a kill every {kill_every_s:.0f} s"
            + (", never back" if permanent else f", back after {down_for_s:.0f} s"))
        lock = threading.Lock()
        deadline = time.monotonic() + duration_s
        threads = [threading.Thread(target=_client, args=(i, c, deadline, refs, report, lock), daemon=True)
                   for i, c in enumerate(pool)]
        for t in threads:
            t.start()
        time.sleep(min(10.0, kill_every_s / 2))
        report.rss_warm = {n: s.resident_memory_bytes for n, s in watch.fresh().items()}
        coordinator_killed = False
        down: list[Kill] = []
        next_kill = time.monotonic() + kill_every_s / 2
        alive_chunks = list(chunks)
        while time.monotonic() < deadline - 5:
            now = time.monotonic()
            for k in [k for k in down if not permanent and now - k.at >= down_for_s]:
                cluster.start_node(k.name)
                cluster.gone.discard(k.name)
                k.back_at = now
                down.remove(k)
                log(f"[chaos] {k.name} restarted after {now - k.at:.0f} s")
            if now >= next_kill:
                next_kill = now + kill_every_s
                want_coordinator = standby_coordinators and not coordinator_killed and \
                    now > deadline - duration_s / 2
                served = _serving_coordinator(watch) if want_coordinator else None
                target = served.name if served is not None else None
                candidates = [c for c in alive_chunks if c not in {k.name for k in down}]
                if target is None and (not candidates or (permanent and len(alive_chunks) <= 1)):
                    continue
                name = target or rng.choice(candidates)
                kill = Kill(name, "coordinator" if target else "chunk", time.monotonic())
                _kill(cluster, name)
                cluster.gone.add(name)
                log(f"[chaos] SIGKILL {name}")
                coordinator_killed = coordinator_killed or bool(target)
                report.kills.append(kill)
                if target or not permanent:
                    down.append(kill)
                else:
                    alive_chunks.remove(name)
                kill.serving_again_s = _wait_serving(watch, kill.at, max(60.0, kill_every_s), target,
                                                     served.epoch if served is not None else 0)
                log(f"[chaos] ring serving again {kill.serving_again_s if kill.serving_again_s is not None else '?'} "
                    f"s after killing {name}")
            time.sleep(0.2)
        for t in threads:
            t.join(600)
        for k in down:
            if not permanent or k.role == "coordinator":
                cluster.start_node(k.name)
                cluster.gone.discard(k.name)
        time.sleep(2.0)
        report.rss_end = {n: s.resident_memory_bytes for n, s in watch.fresh().items()}
        if standby_coordinators and not coordinator_killed:
            report.notes.append("the run was too short to kill the coordinator")
    return report


def format_report(r: ChaosReport) -> str:
    recov = [k.serving_again_s for k in r.kills if k.serving_again_s is not None]
    lines = [f"requests: {r.requests}, lost: {len(r.lost)}, wrong text: {len(r.wrong)}",
             f"longest gap between two tokens per request: p50 {_percentile(r.gaps, 0.5):.2f} s, "
             f"p99 {_percentile(r.gaps, 0.99):.2f} s, max {max(r.gaps, default=0):.2f} s",
             f"kills: {len(r.kills)} ({sum(k.role == 'coordinator' for k in r.kills)} of the coordinator); ring "
             "serving again after: " + (", ".join(f"{k.name} {k.serving_again_s:.1f} s"
                                                  if k.serving_again_s is not None else f"{k.name} ?"
                                                  for k in r.kills) or "-"),
             f"recovery: max {max(recov, default=0):.1f} s; failovers seen by clients: {len(r.interrupted)}"
             + (f" (interrupted {_percentile(r.interrupted, 0.5):.1f} s p50)" if r.interrupted else "")]
    for name in sorted(r.rss_warm):
        end = r.rss_end.get(name)
        lines.append(f"{name}: RSS {r.rss_warm[name] / 1e6:.0f} MB after warm-up -> "
                     + (f"{end / 1e6:.0f} MB at the end ({end / r.rss_warm[name] - 1:+.0%})" if end else "gone"))
    lines += [f"note: {n}" for n in r.notes]
    lines += [f"LOST: {x}" for x in r.lost[:10]] + [f"WRONG: {x}" for x in r.wrong[:10]]
    lines.append("chaos: ok" if r.ok else "chaos: FAILED")
    return "\n".join(lines)


def chaos_cluster(cfg: ClusterConfig, *, duration_s: float, clients: int, kill_every_s: float, down_for_s: float,
                  permanent: bool) -> int:
    """`mdi-llm chaos`: start the cluster, run the chaos, report, stop it."""
    if cfg.takeover_after_s <= 0 and permanent:
        print("mdi-llm: error: --permanent needs cluster.takeover_after_s > 0 (the survivors take the layers over)",
              file=sys.stderr)
        return 2
    logs = LineBuffer()
    cluster = Cluster(node_specs(cfg.source), out=logs, survivable=survivable_roles(cfg) + ("chunk",))
    cluster.start()
    stop = threading.Event()

    def supervise() -> None:
        while not stop.wait(0.5):
            cluster.supervise_once()
    threading.Thread(target=supervise, daemon=True).start()
    try:
        report = run_chaos(cfg, cluster, duration_s=duration_s, clients=clients, kill_every_s=kill_every_s,
                           down_for_s=down_for_s, permanent=permanent,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        stop.set()
        cluster.stop()
    print(format_report(report))
    if not report.ok:
        sys.stderr.write(logs.tail(60))
    return 0 if report.ok else 1

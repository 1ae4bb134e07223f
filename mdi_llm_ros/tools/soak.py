"""`mdi-llm soak`: many concurrent clients sending a mixed stream against a live cluster.

Each client loops until the deadline, choosing in turn a valid short request,
an invalid one, a streamed one that it cancels, and a long one. Afterwards it
checks the promises: every request got exactly one terminal answer, invalid
ones the right error code, equal greedy prompts equal text; no request state
or KV cache is left on any node; every node's resident memory is within 10% of
its level after warm-up.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from ..client import GenerateClient, StreamPiece
from ..core.config import ClusterConfig
from ..launcher import Cluster, LineBuffer, node_specs
from ..session import ros_session
from .status import StatusWatch

PROMPTS = ["The robot picked up", "Battery status report:", "Navigation goal reached, next",
           "Obstacle detected ahead, so the robot"]
INVALID = [(dict(temperature=-1.0), "INVALID_TEMPERATURE"), (dict(top_p=0.0), "INVALID_TOP_P"),
           (dict(max_new_tokens=0), "INVALID_MAX_NEW_TOKENS"), (dict(prompt=""), "EMPTY_PROMPT"),
           (dict(top_k=-2), "INVALID_TOP_K")]


@dataclass
class SoakReport:
    sent: Counter = field(default_factory=Counter)
    answered: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    rss_warm: dict[str, int] = field(default_factory=dict)
    rss_end: dict[str, int] = field(default_factory=dict)
    leftover: dict[str, tuple[int, int, int]] = field(default_factory=dict)   # cached, queued, KV bytes

    @property
    def ok(self) -> bool:
        return not self.problems


def _client_loop(idx: int, client: GenerateClient, deadline: float, report: SoakReport,
                 texts: dict, lock: threading.Lock) -> None:
    turn = idx
    while time.monotonic() < deadline:
        kind = ("valid", "invalid", "cancelled", "long")[turn % 4]
        prompt = PROMPTS[turn % len(PROMPTS)]
        turn += 1
        with lock:
            report.sent[kind] += 1
        if kind == "valid" or kind == "long":
            n = 12 if kind == "valid" else 120
            r = client.generate(prompt, max_new_tokens=n, timeout_s=300)
            answered = f"{kind}:{'ok' if r.success else r.error_code}"
            if r.success:
                with lock:
                    seen = texts.setdefault((prompt, n), r.text)
                    if seen != r.text:
                        report.problems.append(f"greedy text differs for {prompt!r}: {seen!r} vs {r.text!r}")
            elif r.error_code != "BUSY":
                with lock:
                    report.problems.append(f"{kind} request failed: {r.error_code} {r.error_message}")
        elif kind == "invalid":
            change, code = INVALID[turn % len(INVALID)]
            args = dict(prompt=prompt, max_new_tokens=8)
            args.update(change)
            r = client.generate(args.pop("prompt"), timeout_s=60, **args)
            answered = f"invalid:{r.error_code}"
            if r.error_code != code:
                with lock:
                    report.problems.append(f"invalid request {change} answered {r.error_code}, expected {code}")
        else:
            items = list(client.stream(prompt, max_new_tokens=200, cancel_after=2, timeout_s=300))
            results = [i for i in items if not isinstance(i, StreamPiece)]
            if len(results) != 1:
                with lock:
                    report.problems.append(f"stream gave {len(results)} terminal answers")
                continue
            r = results[0]
            answered = f"cancelled:{r.finish_reason if r.finish_reason == 'cancelled' else r.error_code or 'done'}"
        with lock:
            report.answered[answered] += 1


def run_soak(cfg: ClusterConfig, *, duration_s: float, clients: int, warmup_s: float = 8.0) -> SoakReport:
    """Drive an already running cluster; returns the report (see module doc)."""
    report = SoakReport()
    with ros_session(f"mdi_soak_{int(time.time()) % 100000}", cfg) as node:
        watch = StatusWatch(node, cfg.namespace)
        clients_ = [GenerateClient(node, cfg.namespace, cfg.key()) for _ in range(clients)]
        if not clients_[0].wait_for_service(120):
            report.problems.append("no /generate service")
            return report
        ready = clients_[0].wait_until_ready(120)
        if not ready.success:
            report.problems.append(f"cluster not ready: {ready.error_code}: {ready.error_message}")
            return report
        lock = threading.Lock()
        texts: dict = {}
        deadline = time.monotonic() + duration_s
        threads = [threading.Thread(target=_client_loop, args=(i, c, deadline, report, texts, lock))
                   for i, c in enumerate(clients_)]
        for t in threads:
            t.start()
        time.sleep(min(warmup_s, duration_s / 3))
        report.rss_warm = {n: s.resident_memory_bytes for n, s in watch.fresh().items()}
        for t in threads:
            t.join()
        time.sleep(1.0)                       # releases travel the ring
        end = watch.fresh()
        report.rss_end = {n: s.resident_memory_bytes for n, s in end.items()}
        report.leftover = {n: (s.requests_cached, s.queue_depth, s.kv_cache_bytes) for n, s in end.items()}
        total_sent = sum(report.sent.values())
        total_answered = sum(report.answered.values())
        if total_sent != total_answered:
            report.problems.append(f"{total_sent} requests sent but {total_answered} terminal answers")
        for name, (cached, queued, kv_bytes) in report.leftover.items():
            if cached or queued or kv_bytes:
                report.problems.append(f"{name} still holds {cached} requests/caches, {queued} queued "
                                       f"and {kv_bytes} bytes of KV cache blocks")
        for name, warm in report.rss_warm.items():
            final = report.rss_end.get(name)
            if final is None:
                report.problems.append(f"{name} stopped reporting")
            elif final > warm * 1.10:
                report.problems.append(f"{name} resident memory grew from {warm / 1e6:.0f} MB after warm-up "
                                       f"to {final / 1e6:.0f} MB (> 10%)")
        return report


def format_report(r: SoakReport) -> str:
    lines = [f"sent: {dict(r.sent)}", f"answered: {dict(sorted(r.answered.items()))}"]
    for name in sorted(r.rss_warm):
        lines.append(f"{name}: RSS {r.rss_warm[name] / 1e6:.0f} MB after warm-up -> "
                     f"{r.rss_end.get(name, 0) / 1e6:.0f} MB at the end; left: {r.leftover.get(name)}")
    lines += [f"PROBLEM: {p}" for p in r.problems[:20]] or ["all checks passed"]
    return "\n".join(lines)


def soak_cluster(cfg: ClusterConfig, *, duration_s: float, clients: int) -> int:
    """`mdi-llm soak`: start the cluster, soak it, check, stop it."""
    logs = LineBuffer()
    cluster = Cluster(node_specs(cfg.source), out=logs)
    cluster.start()
    try:
        print(f"[soak] {clients} clients for {duration_s:.0f} s against {cfg.source} ...", file=sys.stderr)
        report = run_soak(cfg, duration_s=duration_s, clients=clients)
    finally:
        codes = cluster.stop()
    print(format_report(report))
    crashed = [n for n, c in codes.items() if c != 0]
    if crashed:
        print(f"PROBLEM: nodes exited uncleanly: {crashed}")
        sys.stderr.write(logs.tail(80))
    return 0 if report.ok and not crashed else 1

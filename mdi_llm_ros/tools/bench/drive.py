"""The clients' side of a scenario: a child process that sends N concurrent requests to a running
ring (on a client device of its own with --netlab) and prints what it measured as one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from .common import LONG_PROMPT, PROMPTS, percentile


def handshake(word: str) -> None:
    """Driver side: tell the parent where we are and wait for its go-ahead (stdin line)."""
    print(word, flush=True)
    sys.stdin.readline()


def drive_main(argv: list[str]) -> int:
    """Child: python -m mdi_llm_ros.tools.bench --drive SPEC.json. One scenario: N concurrent
    requests against a running ring, as a separate process so that it can run on a
    client device (a network namespace) of its own. Prints one JSON line.
    """
    from ...client import GenerateClient
    from ...core.config import load_config
    from ...session import ros_session
    from ..status import StatusWatch

    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("scenario") == "long":
        return drive_long(spec)
    if spec.get("scenario") == "priority":
        return drive_priority(spec)
    cfg = load_config(spec["config"])
    n, tokens, references = spec["n"], spec["tokens"], spec["references"]
    with ros_session(f"mdi_bench_driver_{os.getpid()}", cfg) as node:
        watch = StatusWatch(node, cfg.namespace)
        clients = [GenerateClient(node, cfg.namespace, cfg.key()) for _ in range(n)]
        if not clients[0].wait_for_service(120):
            raise RuntimeError("the ring's /generate did not appear within 120 s")
        ready = clients[0].wait_until_ready(120)
        if not ready.success:
            raise RuntimeError(f"the ring is not ready after 120 s: {ready.error_code}: {ready.error_message}")
        for c in clients:                   # every client's reply reader is matched before timing
            c.wait_for_service(30)
        for c in clients:                   # and each client's discovery wait (SETTLE_S) is over:
            c.settle()                      # inside the timed part it delayed all but one request
        before = watch.fresh(0.7, expect=len(cfg.chunks) + 1)
        handshake("READY")                 # the parent reads the link counters, then says go
        results: list = [None] * n
        t0 = time.perf_counter()

        def call(i: int) -> None:
            results[i] = clients[i].generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=tokens, timeout_s=900)

        workers = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        handshake("DONE")
        after = watch.fresh(0.7, expect=len(cfg.chunks) + 1)
    ok = all(r is not None and r.success for r in results)
    generated = sum(r.generated_tokens for r in results if r)
    first_diff = diverged = None
    for i, r in enumerate(results):
        ref = references[PROMPTS[i % len(PROMPTS)]]
        if r and r.text != ref:
            first_diff = next((j for j, (a, b) in enumerate(zip(r.text, ref)) if a != b),
                              min(len(r.text), len(ref)))
            diverged = {"prompt": PROMPTS[i % len(PROMPTS)], "text": r.text}
            break
    nbytes = sum(after[x].bytes_received - before[x].bytes_received for x in after if x in before)
    busy = {x: (after[x].busy_seconds - before[x].busy_seconds) / wall for x in after if x in before}
    ttfts = [r.time_to_first_token for r in results if r]
    print(json.dumps({
        "n": n, "ok": ok, "errors": sorted({r.error_code for r in results if r and not r.success}),
        "tokens": generated, "wall_s": wall,
        "tokens_per_s": generated / wall, "ttft_p50": percentile(ttfts, 0.5), "ttft_p95": percentile(ttfts, 0.95),
        "per_token_ms": 1000 / results[0].tokens_per_second if n == 1 and results[0].tokens_per_second else None,
        "wire_bytes_per_token": nbytes / generated if generated else 0, "busy_share": busy,
        "greedy_identical": first_diff is None and ok, "first_diverging_char": first_diff,
        "diverged": diverged, "kv_cache_peak": {x: after[x].kv_cache_peak_bytes for x in after}}))
    return 0


def drive_long(spec: dict) -> int:
    """Child: the long prompt against a running ring. Its time to first token alone (median of
    3), then once more while a short request streams: how long that request's tokens stall
    while the long prompt is prefilled (its longest gap between two tokens). Prints one JSON line.
    """
    from ...client import GenerateClient, StreamPiece
    from ...core.config import load_config
    from ...session import ros_session

    cfg = load_config(spec["config"])
    with ros_session(f"mdi_bench_long_{os.getpid()}", cfg) as node:
        client, streamer = (GenerateClient(node, cfg.namespace, cfg.key()) for _ in range(2))
        if not client.wait_for_service(120) or not client.wait_until_ready(120).success:
            raise RuntimeError("the ring is not ready after 120 s")
        client.generate(LONG_PROMPT, max_new_tokens=2, timeout_s=600)            # warm-up
        ttfts, result = [], None
        for _ in range(3):
            result = client.generate(LONG_PROMPT, max_new_tokens=spec["tokens"], timeout_s=600)
            if not result.success:
                raise RuntimeError(f"long prompt failed: {result.error_code}: {result.error_message}")
            ttfts.append(result.time_to_first_token)
        arrivals: list[float] = []
        started = threading.Event()

        def stream() -> None:
            for item in streamer.stream(PROMPTS[0], max_new_tokens=spec["short_tokens"], timeout_s=600):
                if isinstance(item, StreamPiece):
                    arrivals.append(time.monotonic())
                    if len(arrivals) == 4:
                        started.set()
            started.set()

        worker = threading.Thread(target=stream)
        worker.start()
        started.wait(120)
        loaded = client.generate(LONG_PROMPT, max_new_tokens=spec["tokens"], timeout_s=600)
        worker.join(600)
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    print(json.dumps({"prompt_tokens": result.prompt_tokens, "ttft_s": sorted(ttfts)[1], "text": result.text,
                      "ttft_loaded_s": loaded.time_to_first_token if loaded.success else None,
                      "short_gap_max_ms": 1000 * max(gaps, default=0.0),
                      "short_gap_median_ms": 1000 * percentile(gaps, 0.5)}))
    return 0


PRIORITY_PROMPT = "Obstacle ahead. Should the robot stop or go around?"


def drive_priority(spec: dict) -> int:
    """Child: a priority request (priority 5), `repeats` times on an idle ring, then `repeats` times
    while `background` greedy streams keep the ring saturated; its time to first token and its
    tokens/s in both cases. Prints one JSON line.
    """
    from ...client import GenerateClient
    from ...core.config import load_config
    from ...session import ros_session

    cfg = load_config(spec["config"])
    with ros_session(f"mdi_bench_priority_{os.getpid()}", cfg) as node:
        urgent = GenerateClient(node, cfg.namespace, cfg.key())
        background = [GenerateClient(node, cfg.namespace, cfg.key()) for _ in range(spec["background"])]
        if not urgent.wait_for_service(120) or not urgent.wait_until_ready(120).success:
            raise RuntimeError("the ring is not ready after 120 s")
        for c in background:
            c.wait_for_service(30)
            c.settle()

        def ask() -> tuple[float, float]:
            r = urgent.generate(PRIORITY_PROMPT, max_new_tokens=spec["tokens"], priority=5, timeout_s=300)
            if not r.success:
                raise RuntimeError(f"priority request failed: {r.error_code}: {r.error_message}")
            return r.time_to_first_token, r.tokens_per_second

        idle = [ask() for _ in range(spec["repeats"])]
        stop = threading.Event()

        def load(i: int) -> None:
            while not stop.is_set():
                background[i].generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=64, timeout_s=300)

        workers = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(len(background))]
        for w in workers:
            w.start()
        time.sleep(3.0)                       # the ring is saturated
        loaded = []
        for _ in range(spec["repeats"]):
            loaded.append(ask())
            time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(300)
    print(json.dumps({"idle_ttft": [t for t, _ in idle], "idle_tps": [v for _, v in idle],
                      "loaded_ttft": [t for t, _ in loaded], "loaded_tps": [v for _, v in loaded],
                      "background": spec["background"]}))
    return 0

"""`mdi-llm demo` (the README's `make demo`): a localhost cluster answering several robots.

Starts the coordinator and chunk nodes from the config, runs one robot client
process per prompt calling /generate at the same time, prints every answer
with its stats and the aggregate token rate, then stops the cluster cleanly.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from ..core.config import ClusterConfig
from ..launcher import Cluster, LineBuffer, node_specs

PROMPTS = [
    "What is the capital of France?",
    "Give one tip for a robot that must cross a busy hallway.",
    "Name three sensors a mobile robot uses.",
    "Write a short haiku about teamwork.",
    "What does a battery store?",
    "Explain what a map is in one sentence.",
    "Why do robots need to charge?",
    "What is a neural network?",
]


def run_demo(cfg: ClusterConfig, clients: int = 4, max_new_tokens: int = 48) -> int:
    logs = LineBuffer()                 # node logs, shown only if something fails
    cluster = Cluster(node_specs(cfg.source), out=logs)
    print(f"[demo] starting {len(cluster.specs)} nodes from {cfg.source} "
          f"(coordinator + {len(cluster.specs) - 1} chunk nodes)", file=sys.stderr)
    t0 = time.monotonic()
    cluster.start()
    try:
        procs = []
        for i in range(clients):
            cmd = [sys.executable, "-m", "mdi_llm_ros.robot_client", "--name", f"robot_{i + 1}", "--json",
                   "--chat", "--max-new-tokens", str(max_new_tokens), "--config", cfg.source,
                   PROMPTS[i % len(PROMPTS)]]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        print(f"[demo] {clients} robot clients are asking /generate at once (nodes load in ~10 s) ...",
              file=sys.stderr)
        results, failures = [], 0
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=cfg.coordinator.request_timeout_s + 120)
            line = out.strip().splitlines()[-1] if out.strip() else ""
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                failures += 1
                print(f"[robot_{i + 1}] no answer (exit {proc.returncode}): {err.strip()[-500:]}")
                continue
            results.append(r)
            if not r["success"]:
                failures += 1
        total_tokens = sum(r["generated_tokens"] for r in results if r["success"])
        # Serving time of the batch: from acceptance to each request's last token.
        span = max((r["time_to_first_token"] + (r["generated_tokens"] - 1) / r["tokens_per_second"]
                    for r in results if r["success"] and r["tokens_per_second"] > 0), default=0.0)
        for r in results:
            print(f"\n[{r['robot']}] {r['prompt']}")
            if r["success"]:
                print(f"  -> {r['text'].strip()}")
                print(f"     ({r['generated_tokens']} tokens, {r['finish_reason']}, first token "
                      f"{r['time_to_first_token']:.2f} s, {r['tokens_per_second']:.1f} tokens/s)")
            else:
                print(f"  !! {r['error_code']}: {r['error_message']}")
        print(f"\n[demo] {clients - failures}/{clients} robots answered; {total_tokens} tokens generated; "
              f"aggregate {total_tokens / span if span else 0:.1f} tokens/s while serving them at once "
              f"({time.monotonic() - t0:.0f} s in all, start-up included)")
        return 0 if failures == 0 else 1
    finally:
        cluster.stop()
        if cluster.procs and any(p.returncode not in (0, None) for p in cluster.procs.values()):
            sys.stderr.write(logs.tail(60))
        print("[demo] cluster stopped", file=sys.stderr)

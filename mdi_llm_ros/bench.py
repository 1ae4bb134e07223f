"""`mdi-llm bench`: the ring over real DDS against plain transformers, measured in one run.

Scenarios, all on the same model, prompts and token budget:
  * baselines in one process with plain transformers: sequential `generate` (one request at a
    time) and batched `generate` (all N requests left-padded into one batch), each in a child
    process so its peak memory is its own;
  * the ROS ring with K chunk nodes (+ coordinator) and N concurrent client requests.
Figures: aggregate generated tokens/s, time to first token p50/p95, single-request per-token
latency, peak RSS (VmHWM) of every process, ring bytes per generated token, and the share of
wall time each node spends computing. Greedy outputs are checked against the sequential
baseline. Results go to bench/results/<timestamp>.{json,md,png}.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

PROMPTS = ["The history of robotics begins with", "A warehouse robot moves boxes by",
           "The main parts of a drone are", "To navigate a building, a mobile robot"]


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- baselines (child processes) -------------------------------------------------------

def baseline_main(argv: list[str]) -> int:
    """Child: python -m mdi_llm_ros.bench --baseline MODE MODEL_DIR N TOKENS THREADS."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    mode, model_dir, n, tokens, threads = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    texts, generated = [], 0
    with torch.inference_mode():
        model.generate(**tok(prompts[0], return_tensors="pt"), max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        if mode == "sequential":
            for p in prompts:
                ids = tok(p, return_tensors="pt").input_ids
                out = model.generate(ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:]
                generated += len(out)
                texts.append(tok.decode(out, skip_special_tokens=True))
        else:
            tok.padding_side = "left"
            batch = tok(prompts, return_tensors="pt", padding=True)
            out = model.generate(**batch, max_new_tokens=tokens, do_sample=False)[:, batch.input_ids.shape[1]:]
            for row in out:
                keep = row[row != tok.pad_token_id] if tok.pad_token_id is not None else row
                generated += len(keep)
                texts.append(tok.decode(keep, skip_special_tokens=True))
        wall = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "n": n, "tokens": generated, "wall_s": wall,
                      "tokens_per_s": generated / wall, "texts": texts,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def run_baseline(mode: str, model_dir: str, n: int, tokens: int, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "mdi_llm_ros.bench", "--baseline", mode, model_dir, str(n),
                        str(tokens), str(threads)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"baseline {mode} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- ring scenarios -------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_ring(model: str, k: int, ns: list[int], tokens: int, *, pin: bool, threads: int | None,
             references: dict[str, str], workdir: Path) -> dict:
    import rclpy

    from .client import BackgroundSpin, GenerateClient
    from .launcher import Cluster, node_specs
    from .soak import StatusWatch

    cfg_path = workdir / f"ring_k{k}.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": {"name": model, "dtype": "float32", "max_context": 2048},
        "coordinator": {"max_inflight": max(ns), "queue_limit": max(ns)},
        "chunks": [{"name": f"chunk_{i}"} for i in range(k)]}))
    env = dict(os.environ)
    if threads:
        env["MDI_TORCH_THREADS"] = str(threads)

    log = open(workdir / f"ring_k{k}.log", "w")          # the nodes' logs, for a failed run
    cluster = Cluster(node_specs(cfg_path), out=log, env=env, pin_cores=pin)
    cluster.start()
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(f"mdi_bench_{k}", context=context)
    spin = BackgroundSpin(node)
    scenarios = []
    try:
        watch = StatusWatch(node, "")
        clients = [GenerateClient(node) for _ in range(max(ns))]
        if not clients[0].wait_for_service(120):
            raise RuntimeError("the ring's /generate did not appear")
        while clients[0].generate(PROMPTS[0], max_new_tokens=2).error_code == "NOT_READY":
            time.sleep(0.3)
        for n in ns:
            before = watch.fresh(0.7)
            results: list = [None] * n
            t0 = time.perf_counter()

            def call(i: int) -> None:
                results[i] = clients[i].generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=tokens, timeout_s=1800)

            workers = [threading.Thread(target=call, args=(i,)) for i in range(n)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0
            after = watch.fresh(0.7)
            ok = all(r is not None and r.success for r in results)
            generated = sum(r.generated_tokens for r in results if r)
            identical = all(r.text == references[PROMPTS[i % len(PROMPTS)]] for i, r in enumerate(results) if r)
            first_diff = None
            if not identical:
                for i, r in enumerate(results):
                    ref = references[PROMPTS[i % len(PROMPTS)]]
                    if r and r.text != ref:
                        first_diff = next((j for j, (a, b) in enumerate(zip(r.text, ref)) if a != b),
                                          min(len(r.text), len(ref)))
                        break
            nbytes = sum(after[x].bytes_received - before[x].bytes_received for x in after if x in before)
            busy = {x: (after[x].busy_seconds - before[x].busy_seconds) / wall for x in after if x in before}
            ttfts = [r.time_to_first_token for r in results if r]
            scenarios.append({
                "k": k, "n": n, "ok": ok, "tokens": generated, "wall_s": wall,
                "tokens_per_s": generated / wall, "ttft_p50": _percentile(ttfts, 0.5),
                "ttft_p95": _percentile(ttfts, 0.95),
                "per_token_ms": 1000 / results[0].tokens_per_second if n == 1 and results[0].tokens_per_second else None,
                "wire_bytes_per_token": nbytes / generated if generated else 0, "busy_share": busy,
                "greedy_identical": identical, "first_diverging_char": first_diff})
            _log(f"ring K={k} N={n}: {generated / wall:.1f} tokens/s, identical={identical}")
        peaks = cluster.peak_rss()
    finally:
        spin.close()
        rclpy.try_shutdown(context=context)
        cluster.stop()
        log.close()
    return {"k": k, "scenarios": scenarios, "peak_rss": peaks}


# --- report ------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    seq = {b["n"]: b for b in res["baselines"] if b["mode"] == "sequential"}
    bat = {b["n"]: b for b in res["baselines"] if b["mode"] == "batched"}
    lines = [f"Model {res['model']}, float32, {res['tokens']} new tokens per request, "
             f"{os.cpu_count()} cores, pin={res['pin']}, threads/node={res['threads'] or 'auto'}.", "",
             "| config | N | tokens/s | × sequential HF | × batched HF (batch N) | TTFT p50 / p95 s | "
             "per-token ms (N=1) | wire bytes/token | greedy = HF |",
             "|---|---|---|---|---|---|---|---|---|"]
    base_seq = seq[min(seq)]["tokens_per_s"]
    for n, b in sorted(seq.items()):
        lines.append(f"| transformers sequential | {n} | {b['tokens_per_s']:.1f} | 1.00 | | | | | yes |")
    for n, b in sorted(bat.items()):
        lines.append(f"| transformers batched | {n} | {b['tokens_per_s']:.1f} | {b['tokens_per_s'] / base_seq:.2f} "
                     f"| 1.00 | | | | |")
    for ring in res["rings"]:
        for s in ring["scenarios"]:
            b = bat.get(s["n"])
            lines.append(
                f"| ring K={s['k']} | {s['n']} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base_seq:.2f} | "
                f"{s['tokens_per_s'] / b['tokens_per_s']:.2f} | " if b else
                f"| ring K={s['k']} | {s['n']} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base_seq:.2f} | - | ")
            lines[-1] += (f"{s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} | "
                          f"{s['per_token_ms']:.1f} | " if s["per_token_ms"] else
                          f"{s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} | | ")
            lines[-1] += (f"{s['wire_bytes_per_token']:.0f} | "
                          f"{'yes' if s['greedy_identical'] else 'NO (char ' + str(s['first_diverging_char']) + ')'} |")
    lines += ["", "| config | peak RSS per process (MB) |", "|---|---|"]
    for b in res["baselines"]:
        lines.append(f"| transformers {b['mode']} N={b['n']} | {b['peak_rss'] / 1e6:.0f} |")
    for ring in res["rings"]:
        lines.append(f"| ring K={ring['k']} | " + ", ".join(f"{n} {v / 1e6:.0f}" for n, v in ring["peak_rss"].items())
                     + " |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in ("sequential", "batched"):
        pts = sorted((b["n"], b["tokens_per_s"]) for b in res["baselines"] if b["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--o", label=f"transformers {mode}")
    for ring in res["rings"]:
        pts = [(s["n"], s["tokens_per_s"]) for s in ring["scenarios"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-s", label=f"ring K={ring['k']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests N")
    ax.set_ylabel("aggregate generated tokens/s")
    ax.legend()
    ax.grid(alpha=0.3)
    labels, values = [], []
    for b in res["baselines"]:
        if b["n"] == 1:
            labels.append(f"HF {b['mode'][:3]}")
            values.append(b["peak_rss"] / 1e6)
    for ring in res["rings"]:
        for name, v in ring["peak_rss"].items():
            labels.append(f"K{ring['k']} {name.replace('chunk_', 'c')}")
            values.append(v / 1e6)
    bx.bar(range(len(values)), values)
    bx.set_xticks(range(len(values)), labels, rotation=60, ha="right", fontsize=8)
    bx.set_ylabel("peak RSS (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_bench(*, quick: bool, pin: bool, threads: int | None, model: str, out_dir: Path,
              ks: list[int] | None = None, ns: list[int] | None = None, tokens: int | None = None) -> dict:
    from .core.models import resolve_model_dir
    model_dir = str(resolve_model_dir(model))
    ks = ks or ([1, 3] if quick else [1, 2, 3])
    ns = ns or ([1, 4] if quick else [1, 2, 4, 8, 16])
    tokens = tokens or (24 if quick else 64)
    cores = len(os.sched_getaffinity(0))
    res = {"model": model, "tokens": tokens, "pin": pin, "threads": threads, "quick": quick,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "baselines": [], "rings": []}
    _log(f"baselines: transformers sequential and batched ({cores} threads)")
    seq = run_baseline("sequential", model_dir, len(PROMPTS), tokens, cores)
    res["baselines"].append(seq)
    references = dict(zip(PROMPTS, seq["texts"]))
    for n in sorted(set(ns) - {1}) or [1]:
        res["baselines"].append(run_baseline("batched", model_dir, n, tokens, cores))
        _log(f"batched N={n}: {res['baselines'][-1]['tokens_per_s']:.1f} tokens/s")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = out_dir / f"{stamp}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for k in ks:
        _log(f"ring with K={k} chunk nodes, N in {ns} (node logs: {logs})")
        res["rings"].append(run_ring(model, k, ns, tokens, pin=pin, threads=threads, references=references,
                                     workdir=logs))
    (out_dir / f"{stamp}.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    (out_dir / f"{stamp}.md").write_text(table + "\n")
    plot(res, out_dir / f"{stamp}.png")
    print(table)
    _log(f"wrote {out_dir / stamp}.json, .md and .png")
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline":
        sys.exit(baseline_main(sys.argv[2:]))
    print("use `mdi-llm bench`", file=sys.stderr)
    sys.exit(2)

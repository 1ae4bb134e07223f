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

from .core.plan import COORDINATOR, load_plan

PROMPTS = ["The history of robotics begins with", "A warehouse robot moves boxes by",
           "The main parts of a drone are", "To navigate a building, a mobile robot"]
# The long-prompt scenario (chunked prefill): ~1500 tokens of a robot's log to summarize.
LONG_PROMPT = ("Robot log. The mobile robot started its patrol at the loading dock, checked the doors of hall A, "
               "B and C, measured the temperature in the server room and found it normal, then recharged. ") * 36 \
    + "Summary of the patrol:"
LONG_TOKENS = 8                     # new tokens of the long prompt (its greedy check)
LONG_PIECES = (0, 256)              # coordinator.prefill_chunk_tokens compared: whole prompt, default pieces


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
    if mode == "prefill":
        return _baseline_prefill(model, tok, tokens)
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


def _baseline_prefill(model, tok, tokens: int) -> int:
    """The long prompt in one process: time to its first token (median of 3) and its greedy text."""
    import resource

    import torch
    ids = tok(LONG_PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        model.generate(ids[:, :64], max_new_tokens=1, do_sample=False)           # warm-up
        ttfts = []
        for _ in range(3):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            ttfts.append(time.perf_counter() - t0)
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:]
    print(json.dumps({"mode": "prefill", "n": 1, "prompt_tokens": ids.shape[1], "ttft_s": sorted(ttfts)[1],
                      "text": tok.decode(out, skip_special_tokens=True),
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def run_baseline(mode: str, model_dir: str, n: int, tokens: int, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "mdi_llm_ros.bench", "--baseline", mode, model_dir, str(n),
                        str(tokens), str(threads)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"baseline {mode} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def floor_main() -> int:
    """Child: python -m mdi_llm_ros.bench --floor. A chunk node process's runtime before any
    weights or caches: the interpreter, the chunk node's imports (torch, numpy, rclpy) and one
    ROS node with its DDS participant, spun for a second. Prints one JSON line."""
    import resource

    import rclpy

    from .nodes import chunk_node  # noqa: F401  (what a chunk process imports)
    rclpy.init()
    node = rclpy.create_node(f"mdi_bench_floor_{os.getpid()}")
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.1)
    node.destroy_node()
    rclpy.try_shutdown()
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    return 0


def run_floor() -> int:
    """Peak RSS of a chunk node process's runtime alone (see floor_main), in bytes."""
    r = subprocess.run([sys.executable, "-m", "mdi_llm_ros.bench", "--floor"], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"runtime floor probe failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss"]


# --- ring scenarios -------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def drive_main(argv: list[str]) -> int:
    """Child: python -m mdi_llm_ros.bench --drive SPEC.json. One scenario: N concurrent
    requests against a running ring, as a separate process so that it can run on a
    client device (a network namespace) of its own. Prints one JSON line."""
    import rclpy

    from .client import BackgroundSpin, GenerateClient
    from .core.config import apply_discovery_env, load_config
    from .soak import StatusWatch

    spec = json.loads(Path(argv[0]).read_text())
    if spec.get("scenario") == "long":
        return drive_long(spec)
    cfg = load_config(spec["config"])
    apply_discovery_env(cfg)
    n, tokens, references = spec["n"], spec["tokens"], spec["references"]
    rclpy.init()
    node = rclpy.create_node(f"mdi_bench_driver_{os.getpid()}")
    spin = BackgroundSpin(node)
    try:
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
        _handshake("READY")                 # the parent reads the link counters, then says go
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
        _handshake("DONE")
        after = watch.fresh(0.7, expect=len(cfg.chunks) + 1)
    finally:
        spin.close()
        rclpy.try_shutdown()
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
        "tokens_per_s": generated / wall, "ttft_p50": _percentile(ttfts, 0.5), "ttft_p95": _percentile(ttfts, 0.95),
        "per_token_ms": 1000 / results[0].tokens_per_second if n == 1 and results[0].tokens_per_second else None,
        "wire_bytes_per_token": nbytes / generated if generated else 0, "busy_share": busy,
        "greedy_identical": first_diff is None and ok, "first_diverging_char": first_diff,
        "diverged": diverged, "kv_cache_peak": {x: after[x].kv_cache_peak_bytes for x in after}}))
    return 0


def drive_long(spec: dict) -> int:
    """Child: the long prompt against a running ring. Its time to first token alone (median of
    3), then once more while a short request streams: how long that request's tokens stall
    while the long prompt is prefilled (its longest gap between two tokens). Prints one JSON line."""
    import rclpy

    from .client import BackgroundSpin, GenerateClient, StreamPiece
    from .core.config import load_config

    cfg = load_config(spec["config"])
    rclpy.init()
    node = rclpy.create_node(f"mdi_bench_long_{os.getpid()}")
    spin = BackgroundSpin(node)
    try:
        client, streamer = GenerateClient(node, cfg.namespace, cfg.key()), GenerateClient(node, cfg.namespace, cfg.key())
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
    finally:
        spin.close()
        rclpy.try_shutdown()
    print(json.dumps({"prompt_tokens": result.prompt_tokens, "ttft_s": sorted(ttfts)[1], "text": result.text,
                      "ttft_loaded_s": loaded.time_to_first_token if loaded.success else None,
                      "short_gap_max_ms": 1000 * max(gaps, default=0.0),
                      "short_gap_median_ms": 1000 * _percentile(gaps, 0.5)}))
    return 0


def first_divergence(model, tokenizer, prompt: str, ring_text: str, tokens: int) -> dict:
    """Where the ring's greedy text leaves `transformers`' own, and how close that step was.

    Returns the first generated token position whose text is not a prefix of the ring's,
    the token `transformers` picks there and its logit margin over the runner-up: a margin
    within float noise (~1e-4) means a near tie that summation order alone can flip.
    """
    import torch
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        position = len(ref)
        for p in range(1, len(ref) + 1):
            if not ring_text.startswith(tokenizer.decode(ref[:p], skip_special_tokens=True)):
                position = p - 1
                break
        if position == len(ref):
            return {"position": None, "margin": None, "token": None}
        context = torch.tensor([ids[0].tolist() + ref[:position]])
        top = model(context).logits[0, -1].float().topk(2)
    return {"position": position, "margin": float(top.values[0] - top.values[1]),
            "token": tokenizer.decode([ref[position]])}


def divergence_main(argv: list[str]) -> int:
    """Child: python -m mdi_llm_ros.bench --divergence MODEL_DIR TOKENS PROMPT RING_TEXT."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, tokens, prompt, ring_text = argv[0], int(argv[1]), argv[2], argv[3]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(json.dumps(first_divergence(model, AutoTokenizer.from_pretrained(model_dir), prompt, ring_text, tokens)))
    return 0


def _explain_divergences(res: dict, model_dir: str) -> None:
    """For every ring scenario whose greedy text differs: the diverging token and its margin."""
    for ring in res["rings"]:
        for s in ring["scenarios"]:
            if s.get("diverged"):
                out = subprocess.run([sys.executable, "-m", "mdi_llm_ros.bench", "--divergence", model_dir,
                                      str(res["tokens"]), s["diverged"]["prompt"], s["diverged"]["text"]],
                                     capture_output=True, text=True, timeout=600)
                if out.returncode == 0:
                    s["divergence"] = json.loads(out.stdout.strip().splitlines()[-1])
                    _log(f"{_label(s)} N={s['n']}: greedy text diverges at token {s['divergence']['position']} "
                         f"(transformers' margin there {s['divergence']['margin']:.2e})")


def _handshake(word: str) -> None:
    """Driver side: tell the parent where we are and wait for its go-ahead (stdin line)."""
    print(word, flush=True)
    sys.stdin.readline()


def _drive(spec: dict, workdir: Path, prefix: tuple[str, ...] = (), on_mark=None) -> dict:
    """Run one scenario in a driver process; on_mark("READY"/"DONE") is called at the
    start and end of the timed part (to read link counters around exactly that)."""
    path = workdir / f"drive_{spec['tag']}_n{spec['n']}.json"
    path.write_text(json.dumps(spec))
    err_path = workdir / f"drive_{spec['tag']}_n{spec['n']}.log"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "mdi_llm_ros.bench", "--drive", str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        lines = []
        try:
            for line in proc.stdout:                     # type: ignore[union-attr]
                word = line.strip()
                if word in ("READY", "DONE"):
                    if on_mark:
                        on_mark(word)
                    proc.stdin.write("go\n")            # type: ignore[union-attr]
                    proc.stdin.flush()                   # type: ignore[union-attr]
                elif word:
                    lines.append(word)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench driver for {spec['tag']} N={spec['n']} failed (exit {proc.returncode}): "
                           f"{err_path.read_text()[-2000:]}")
    return json.loads(lines[-1])


def ring_config(model: str, k: int, max_n: int, lab=None, kernels: str = "exact") -> dict:
    """The bench's cluster config: K chunk nodes; on a lab, coordinator + chunk_0 on robot_0 and
    chunk_i on robot_i, with discovery over the lab's subnet and UDP only (no shared memory)."""
    cfg: dict = {"model": {"name": model, "dtype": "float32", "max_context": 2048, "kernels": kernels},
                 "coordinator": {"max_inflight": max_n, "queue_limit": max_n},
                 "chunks": [{"name": f"chunk_{i}"} for i in range(k)]}
    if lab is not None:
        cfg["cluster"] = {"discovery_range": "SUBNET", "transport": "udp",
                          "domain_id": int(os.environ.get("ROS_DOMAIN_ID", "0") or 0)}
        cfg["coordinator"]["host"] = "robot_0"
        for i, ch in enumerate(cfg["chunks"]):
            ch["host"] = f"robot_{i}"
    return cfg


def run_ring(model: str, k: int, ns: list[int], tokens: int, *, pin: bool, threads: int | None,
             references: dict[str, str], workdir: Path, rates: list[str | None] | None = None,
             kernels: str = "exact") -> dict:
    """Start a ring of K chunk nodes, drive N concurrent requests for each N, stop it.

    rates: None runs everything on this host's network (shared memory + loopback); a list
    runs each node on its own emulated device (network namespace) and repeats the scenarios
    for each link rate in it (None: unshaped).
    """
    from dataclasses import replace

    from .launcher import Cluster, node_specs
    from .netlab import NetLab

    lab = None
    if rates is not None:
        lab = NetLab(hosts=[f"robot_{i}" for i in range(k)] + ["client"], name=f"mdibench{os.getpid() % 10000}")
    name = f"ring_k{k}_{kernels}{'_netlab' if lab else ''}"
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(ring_config(model, k, max(ns), lab, kernels)))
    env = dict(os.environ)
    if threads:
        env["MDI_TORCH_THREADS"] = str(threads)
    specs = node_specs(cfg_path)
    weights = ring_weights(cfg_path)
    if lab is not None:
        lab.up()
        specs = [replace(s, prefix=lab.exec_prefix(s.host)) for s in specs]
    log = open(workdir / f"{name}.log", "w")   # the nodes' logs, for a failed run
    cluster = Cluster(specs, out=log, env=env, pin_cores=pin)
    cluster.start()
    scenarios = []
    try:
        for rate in (rates if lab is not None else [None]):
            network = "localhost" if lab is None else f"netns {rate or 'unshaped'}"
            if lab is not None:
                lab.shape(rate)
            for n in ns:
                marks: dict[str, dict] = {}
                spec = {"config": str(cfg_path), "n": n, "tokens": tokens, "references": references,
                        "tag": f"k{k}_{kernels}_{network.replace(' ', '_')}"}
                s = _drive(spec, workdir, lab.exec_prefix("client") if lab else (),
                           on_mark=(lambda word: marks.__setitem__(word, lab.counters())) if lab else None)
                s.update(k=k, network=network, rate=rate, kernels=kernels)
                if lab is not None:
                    # every byte the devices put on their links while the requests ran: ring
                    # activations, service calls and replies, DDS acks and heartbeats
                    sent = sum(marks["DONE"][h]["tx_bytes"] - marks["READY"][h]["tx_bytes"] for h in lab.hosts)
                    s["link_bytes_per_token"] = sent / s["tokens"] if s["tokens"] else 0
                scenarios.append(s)
                _log(f"{_label(s)} N={n} ({network}): {s['tokens_per_s']:.1f} tokens/s, "
                     f"identical={s['greedy_identical']}")
        peaks = cluster.peak_rss()
    finally:
        cluster.stop()
        log.close()
        if lab is not None:
            lab.down()
    kv = {name: max(s.get("kv_cache_peak", {}).get(name, 0) for s in scenarios) for name in peaks}
    return {"k": k, "kernels": kernels, "network": "localhost" if lab is None else "netns", "scenarios": scenarios,
            "peak_rss": peaks, "weights": weights, "kv_cache_peak": kv}


def ring_weights(cfg_path: Path) -> dict[str, int]:
    """Parameter bytes each node of the config's plan holds (the coordinator: embedding, norm, head)."""
    _, plan, _ = load_plan(cfg_path)
    return {n.name: n.weight_bytes for n in plan.nodes}


def run_long_prompt(model: str, k: int, piece: int, *, workdir: Path, reference: str) -> dict:
    """Start a ring of K chunk nodes (exact kernels) that prefills in pieces of `piece` tokens
    (0: whole prompts) and drive the long-prompt scenario against it."""
    from .launcher import Cluster, node_specs

    name = f"long_k{k}_p{piece}"
    cfg = ring_config(model, k, 4)
    cfg["coordinator"]["prefill_chunk_tokens"] = piece
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = open(workdir / f"{name}.log", "w")
    cluster = Cluster(node_specs(cfg_path), out=log)
    cluster.start()
    try:
        s = _drive({"scenario": "long", "config": str(cfg_path), "tokens": LONG_TOKENS, "short_tokens": 64,
                    "tag": name, "n": 1}, workdir)
    finally:
        cluster.stop()
        log.close()
    s.update(k=k, piece=piece, greedy_identical=s["text"] == reference)
    _log(f"long prompt, ring K={k}, {'pieces of ' + str(piece) if piece else 'whole prefill'}: "
         f"TTFT {s['ttft_s']:.2f} s, a decoding request's longest token gap {s['short_gap_max_ms']:.0f} ms, "
         f"identical={s['greedy_identical']}")
    return s


def long_prompt_markdown(long: dict) -> list[str]:
    base = long["baseline"]
    whole = {s["k"]: s["ttft_s"] for s in long["rings"] if s["piece"] == 0}
    lines = ["", f"Long prompt ({base['prompt_tokens']} tokens, {LONG_TOKENS} new; exact kernels): time to first "
             "token, whole prefill (`prefill_chunk_tokens: 0`) against pieces, and how long a request that is "
             "decoding meanwhile waits for a token:", "",
             "| config | prefill | TTFT s | × transformers TTFT | × whole prefill | "
             "decoding request's longest / median token gap (ms) | greedy = HF |", "|---|---|---|---|---|---|---|",
             f"| transformers (one process) | whole | {base['ttft_s']:.2f} | 1.00 | | | yes |"]
    for s in long["rings"]:
        speedup = f"{whole[s['k']] / s['ttft_s']:.2f}" if s["k"] in whole else ""
        lines.append(f"| ring K={s['k']} | {'pieces of ' + str(s['piece']) if s['piece'] else 'whole'} | "
                     f"{s['ttft_s']:.2f} | {base['ttft_s'] / s['ttft_s']:.2f} | {speedup} | "
                     f"{s['short_gap_max_ms']:.0f} / {s['short_gap_median_ms']:.0f} | "
                     f"{'yes' if s['greedy_identical'] else 'NO'} |")
    return lines


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
            label = _label(s)
            lines.append(
                f"| {label} | {s['n']} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base_seq:.2f} | "
                f"{s['tokens_per_s'] / b['tokens_per_s']:.2f} | " if b else
                f"| {label} | {s['n']} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base_seq:.2f} | - | ")
            lines[-1] += (f"{s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} | "
                          f"{s['per_token_ms']:.1f} | " if s["per_token_ms"] else
                          f"{s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} | | ")
            lines[-1] += (f"{s['wire_bytes_per_token']:.0f} | "
                          f"{'yes' if s['greedy_identical'] else _divergence_text(s)} |")
    lines += ["", "| config | peak RSS per process (MB) |", "|---|---|"]
    for b in res["baselines"]:
        lines.append(f"| transformers {b['mode']} N={b['n']} | {b['peak_rss'] / 1e6:.0f} |")
    for ring in res["rings"]:
        where = "" if ring.get("network", "localhost") == "localhost" else f" ({ring['network']})"
        lines.append(f"| {_ring_label(ring)}{where} | "
                     + ", ".join(f"{n} {v / 1e6:.0f}" for n, v in ring["peak_rss"].items()) + " |")
    lines += memory_markdown(res)
    lab = [s for ring in res["rings"] for s in ring["scenarios"] if s.get("network", "localhost") != "localhost"]
    if lab:
        lines += ["", "Emulated devices (one network namespace per device, UDP over veth links through a bridge; "
                  "client in its own namespace):", "",
                  "| config | links | N | tokens/s | × unshaped | ring payload bytes/token | "
                  "link bytes/token (all traffic) | greedy = HF |", "|---|---|---|---|---|---|---|---|"]
        unshaped = {(s["k"], s["n"]): s["tokens_per_s"] for s in lab if s["rate"] is None}
        for s in lab:
            ref = unshaped.get((s["k"], s["n"]))
            lines.append(f"| ring K={s['k']} | {s['rate'] or 'unshaped'} | {s['n']} | {s['tokens_per_s']:.1f} | "
                         f"{s['tokens_per_s'] / ref:.2f} | " if ref else "- | ")
            lines[-1] += (f"{s['wire_bytes_per_token']:.0f} | {s['link_bytes_per_token']:.0f} | "
                          f"{'yes' if s['greedy_identical'] else 'NO'} |")
    if res.get("long_prompt"):
        lines += long_prompt_markdown(res["long_prompt"])
    lines += target_lines(res)
    return "\n".join(lines)


# Issue 7's memory targets: a node's peak RSS may exceed the weights it holds by at most this much.
CHUNK_ALLOWANCE = 350e6
COORDINATOR_ALLOWANCE = 450e6


def over_limit(ring: dict, name: str) -> float:
    """Bytes by which a node's peak RSS exceeds its weights + allowance (<= 0: within)."""
    allowance = COORDINATOR_ALLOWANCE if name == COORDINATOR else CHUNK_ALLOWANCE
    return ring["peak_rss"][name] - ring["weights"].get(name, 0) - allowance


def memory_split(ring: dict, name: str, floor: float) -> tuple[float, float, float, float]:
    """A node's peak RSS as (weights, KV cache most held, runtime alone, rest), in bytes. The runtime
    alone (`floor`) is a chunk process's, so a coordinator's and an unsplit ring's count as rest."""
    peak = ring["peak_rss"][name]
    weights = ring.get("weights", {}).get(name, 0)
    kv = ring.get("kv_cache_peak", {}).get(name, 0)
    runtime = floor if name != COORDINATOR and "weights" in ring else 0
    return weights, kv, runtime, peak - weights - kv - runtime


def memory_markdown(res: dict) -> list[str]:
    """Where each node's peak memory goes: weights (from the plan), the most KV cache its requests
    held at once (the node's own count), the runtime a chunk process has before loading anything
    (measured in this run), and the rest (kernels' working memory, messages, DDS traffic)."""
    rings = [r for r in res["rings"] if "weights" in r]
    if not rings:
        return []
    floor = res.get("runtime_floor")
    lines = ["", "| config | node | peak RSS | weights | KV cache (most held) | runtime alone | rest | "
             "limit (weights + 350 / 450) | within |", "|---|---|---|---|---|---|---|---|---|"]
    for ring in rings:
        where = "" if ring.get("network", "localhost") == "localhost" else f" ({ring['network']})"
        for name, peak in ring["peak_rss"].items():
            weights, kv, runtime, rest = memory_split(ring, name, floor or 0)
            over = over_limit(ring, name)
            parts = (f"{kv / 1e6:.0f} | {runtime / 1e6:.0f} | {rest / 1e6:.0f}"
                     if name != COORDINATOR and floor else "- | - | -")
            lines.append(f"| {_ring_label(ring)}{where} | {name} | {peak / 1e6:.0f} | {weights / 1e6:.0f} | {parts} | "
                         f"{(peak - over) / 1e6:.0f} | {'yes' if over <= 0 else f'NO (+{over / 1e6:.0f})'} |")
    return lines


def target_lines(res: dict) -> list[str]:
    """Issue 7's targets, judged on this run's figures (those it measured)."""
    seq = {b["n"]: b for b in res["baselines"] if b["mode"] == "sequential"}
    bat = {b["n"]: b for b in res["baselines"] if b["mode"] == "batched"}
    base_seq = seq[min(seq)]["tokens_per_s"]
    local = [r for r in res["rings"] if r.get("network", "localhost") == "localhost"]
    kernels = list(dict.fromkeys(r.get("kernels", "exact") for r in local))

    def scenario(kern: str, k: int, n: int) -> dict | None:
        return next((s for r in local if r["k"] == k and r.get("kernels", "exact") == kern
                     for s in r["scenarios"] if s["n"] == n), None)

    def judge(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = ["", "Targets (issue 7) in this run" + (f" (quick: N ≤ {max(s['n'] for r in local for s in r['scenarios'])}, "
                                                f"{res['tokens']} tokens; the targets are for the full run)"
                                                if res.get("quick") and local else "") + ":"]
    for what, k, n, over, need in (("≥ 4× sequential", 2, 16, None, 4.0), ("≥ 1.0× batched", 2, 16, 16, 1.0),
                                   ("≥ 0.9× sequential", 3, 1, None, 0.9)):
        base = base_seq if over is None else bat.get(over, {}).get("tokens_per_s")
        found = [(kern, scenario(kern, k, n)) for kern in kernels]
        found = [(kern, s["tokens_per_s"] / base) for kern, s in found if s and base]
        if found:
            out.append(f"* K={k}, N={n} {what}: " + "; ".join(
                f"{kern} {ratio:.2f}× {judge(ratio >= need)}" for kern, ratio in found))
    for kern in kernels:
        rings = sorted((r for r in local if r.get("kernels", "exact") == kern and "weights" in r), key=lambda r: r["k"])
        if not rings:
            continue
        over = [f"K={r['k']} {name} +{over_limit(r, name) / 1e6:.0f} MB"
                for r in rings for name in r["peak_rss"] if name != COORDINATOR and over_limit(r, name) > 0]
        most = [max(v for name, v in r["peak_rss"].items() if name != COORDINATOR) for r in rings]
        falls = all(a > b for a, b in zip(most, most[1:]))
        coord = [over_limit(r, COORDINATOR) for r in rings if COORDINATOR in r["peak_rss"]]
        out.append(f"* {kern}: chunk peak ≤ weights + 350 MB {judge(not over)}"
                   + (f" ({', '.join(over)})" if over else "")
                   + (f"; falls as K grows {judge(falls)} ({' → '.join(f'{m / 1e6:.0f}' for m in most)} MB)"
                      if len(rings) > 1 else "")
                   + f"; coordinator ≤ head + 450 MB {judge(all(c <= 0 for c in coord))}")
    same = [s["greedy_identical"] for r in res["rings"] for s in r["scenarios"]]
    out.append(f"* greedy output identical to transformers: {judge(all(same))} ({sum(same)} of {len(same)} "
               "ring scenarios)")
    return out


def _divergence_text(s: dict) -> str:
    d = s.get("divergence") or {}
    if d.get("position") is not None:
        return f"NO (token {d['position']}, margin {d['margin']:.1e})"
    return f"NO (char {s['first_diverging_char']})"


def _ring_label(ring: dict) -> str:
    return f"ring K={ring['k']}" + (" packed" if ring.get("kernels", "exact") == "packed" else "")


def _label(s: dict) -> str:
    network = s.get("network", "localhost")
    return _ring_label(s) + ("" if network == "localhost" else f", {network}")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in ("sequential", "batched"):
        pts = sorted((b["n"], b["tokens_per_s"]) for b in res["baselines"] if b["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--o", label=f"transformers {mode}")
    for ring in res["rings"]:
        for label in dict.fromkeys(_label(s) for s in ring["scenarios"]):
            pts = [(s["n"], s["tokens_per_s"]) for s in ring["scenarios"] if _label(s) == label]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-s", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests N")
    ax.set_ylabel("aggregate generated tokens/s")
    ax.legend()
    ax.grid(alpha=0.3)
    # per-node memory bars, stacked where the run split them: weights, KV cache, runtime alone, rest
    labels, stacks = [], []
    biggest = max((b["n"] for b in res["baselines"] if b["mode"] == "batched"), default=0)
    for b in res["baselines"]:
        if b["mode"] == "sequential" or b["n"] == biggest:
            labels.append(f"HF {b['mode'][:3]}" + (f" N={b['n']}" if b["mode"] == "batched" else ""))
            stacks.append((0, 0, 0, b["peak_rss"] / 1e6))
    floor = res.get("runtime_floor") or 0
    for ring in res["rings"]:
        for name in ring["peak_rss"]:
            where = "" if ring.get("network", "localhost") == "localhost" else " ns"
            packed = "p" if ring.get("kernels", "exact") == "packed" else ""
            labels.append(f"K{ring['k']}{packed}{where} {name.replace('chunk_', 'c')}")
            stacks.append(tuple(x / 1e6 for x in memory_split(ring, name, floor)))
    bottom = [0.0] * len(stacks)
    for i, part in enumerate(("weights", "KV cache (most held)", "chunk runtime alone", "rest")):
        heights = [st[i] for st in stacks]
        bx.bar(range(len(stacks)), heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    bx.legend(fontsize=8)
    bx.set_xticks(range(len(stacks)), labels, rotation=60, ha="right", fontsize=8)
    bx.set_ylabel("peak RSS (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_bench(*, quick: bool, pin: bool, threads: int | None, model: str, out_dir: Path,
              ks: list[int] | None = None, ns: list[int] | None = None, tokens: int | None = None,
              netlab: bool = False, rate: str = "20mbit", kernels: list[str] | None = None,
              long_prompt: bool | None = None) -> dict:
    from .core.models import resolve_model_dir
    model_dir = str(resolve_model_dir(model))
    rates = None
    if netlab:
        from .netlab import NetLabError, describe_probe, probe
        found = probe()
        _log(describe_probe(found))
        if not found["netns"] or not found["tbf"]:
            raise NetLabError(f"--netlab needs network namespaces and tbf: {describe_probe(found)}")
        rates = [None, rate]
        ks = ks or [3]
        ns = ns or ([1, 4] if quick else [1, 4, 16])
    ks = ks or ([1, 3] if quick else [1, 2, 3])
    ns = ns or ([1, 4] if quick else [1, 2, 4, 8, 16])
    tokens = tokens or (24 if quick else 64)
    kernels = kernels or (["exact"] if netlab else ["exact", "packed"])
    from .core.config import KERNEL_CHOICES
    from .core.errors import ConfigError
    if bad := [x for x in kernels if x not in KERNEL_CHOICES]:
        raise ConfigError(f"--kernels: {bad[0]!r} is not one of {', '.join(KERNEL_CHOICES)}")
    cores = len(os.sched_getaffinity(0))
    res = {"model": model, "tokens": tokens, "pin": pin, "threads": threads, "quick": quick, "netlab": netlab,
           "kernels": kernels,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "baselines": [], "rings": []}
    _log(f"baselines: transformers sequential and batched ({cores} threads)")
    seq = run_baseline("sequential", model_dir, len(PROMPTS), tokens, cores)
    res["baselines"].append(seq)
    references = dict(zip(PROMPTS, seq["texts"]))
    for n in sorted(set(ns) - {1}) or [1]:
        res["baselines"].append(run_baseline("batched", model_dir, n, tokens, cores))
        _log(f"batched N={n}: {res['baselines'][-1]['tokens_per_s']:.1f} tokens/s")
    res["runtime_floor"] = run_floor()
    _log(f"a chunk node's runtime alone (imports + one ROS node): {res['runtime_floor'] / 1e6:.0f} MB")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = out_dir / f"{stamp}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for kern in kernels:
        for k in ks:
            _log(f"ring with K={k} chunk nodes, {kern} kernels, N in {ns} (node logs: {logs})")
            res["rings"].append(run_ring(model, k, ns, tokens, pin=pin, threads=threads, references=references,
                                         workdir=logs, rates=rates, kernels=kern))
    if long_prompt if long_prompt is not None else not (quick or netlab):
        _log("long prompt: transformers, then rings with whole and chunked prefill")
        base = run_baseline("prefill", model_dir, 1, LONG_TOKENS, cores)
        res["long_prompt"] = {"baseline": base, "rings": [
            run_long_prompt(model, k, piece, workdir=logs, reference=base["text"])
            for k in ([k for k in ks if k > 1] or [2]) for piece in LONG_PIECES]}
    _explain_divergences(res, model_dir)
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
    if len(sys.argv) > 1 and sys.argv[1] == "--drive":
        sys.exit(drive_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--divergence":
        sys.exit(divergence_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--floor":
        sys.exit(floor_main())
    print("use `mdi-llm bench`", file=sys.stderr)
    sys.exit(2)

"""`mdi-llm bench`: the ring over real DDS against plain transformers, measured in one run.

Scenarios, all on the same model, prompts and token budget:
  * baselines in one process with plain transformers: sequential `generate` (one request at a
    time) and batched `generate` (all N requests left-padded into one batch), each in a child
    process so its peak memory is its own (baselines.py);
  * the ROS ring with K chunk nodes (+ coordinator) and N concurrent client requests, driven by
    a client process (rings.py, drive.py).
Figures: aggregate generated tokens/s, time to first token p50/p95, single-request per-token
latency, peak RSS (VmHWM) of every process split into weights, KV cache, runtime and rest, ring
bytes per generated token, and the share of wall time each node spends computing. Greedy
outputs are checked against the sequential baseline. Results go to
bench/results/<timestamp>.{json,md,png} (report.py).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .baselines import explain_divergences, run_baseline, run_floor
from .common import LONG_PIECES, LONG_TOKENS, PROMPTS, log
from .peers import measure as measure_peers
from .peers import peer_binaries
from .report import markdown, plot
from .rings import run_long_prompt, run_priority, run_ring


def run_bench(*, quick: bool, pin: bool, threads: int | None, model: str, out_dir: Path,
              ks: list[int] | None = None, ns: list[int] | None = None, tokens: int | None = None,
              netlab: bool = False, rate: str = "20mbit", kernels: list[str] | None = None,
              quantization: list[str] | None = None, long_prompt: bool | None = None, peers: bool = False,
              synthetic: bool = False, secret: bool = False, priority: bool = False) -> dict:
    from ...core.errors import ConfigError
    from ...core.formats import KERNELS, QUANTIZATIONS
    from ...core.models import model_file, reference_dir
    model_dir = str(reference_dir(model, log=log))
    rates = None
    if netlab:
        from ..netlab import NetLabError, describe_probe, probe
        found = probe()
        log(describe_probe(found))
        if not found["netns"] or not found["tbf"]:
            raise NetLabError(f"--netlab needs network namespaces and tbf: {describe_probe(found)}")
        rates = [None, rate]
        ks = ks or [3]
        ns = ns or ([1, 4] if quick else [1, 4, 16])
    ks = ks or ([1, 3] if quick else [1, 2, 3])
    ns = ns or ([1, 4] if quick else [1, 2, 4, 8, 16])
    tokens = tokens or (24 if quick else 64)
    kernels = kernels or (["exact"] if netlab else ["exact", "packed"])
    if quantization is None:
        quantization = [] if netlab else ["int4"] if quick else ["int4", "int8"]
    if bad := [x for x in kernels if x not in KERNELS]:
        raise ConfigError(f"--kernels: {bad[0]!r} is not one of {', '.join(KERNELS)}")
    if bad := [x for x in quantization if x not in QUANTIZATIONS or x == "none"]:
        raise ConfigError(f"--quantization: {bad[0]!r} is not one of int4, int8")
    variants = kernels + quantization
    gguf = model_file(model)
    if peers and gguf is None:
        raise ConfigError(f"--peers compares with llama.cpp on the same GGUF file; {model!r} is no GGUF model")
    if peers:
        peer_binaries(build=True)
    cores = len(os.sched_getaffinity(0))
    res = {"model": model, "tokens": tokens, "pin": pin, "threads": threads, "quick": quick, "netlab": netlab,
           "kernels": kernels, "variants": variants,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "baselines": [], "rings": []}
    log(f"baselines: transformers sequential and batched ({cores} threads)")
    seq = run_baseline("sequential", model_dir, len(PROMPTS), tokens, cores)
    res["baselines"].append(seq)
    references = dict(zip(PROMPTS, seq["texts"]))
    for n in sorted(set(ns) - {1}) or [1]:
        res["baselines"].append(run_baseline("batched", model_dir, n, tokens, cores))
        log(f"batched N={n}: {res['baselines'][-1]['tokens_per_s']:.1f} tokens/s")
    res["runtime_floor"] = run_floor()
    log(f"a chunk node's runtime alone (imports + one ROS node): {res['runtime_floor'] / 1e6:.0f} MB")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = out_dir / f"{stamp}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        for k in ks:
            log(f"ring with K={k} chunk nodes, {variant}, N in {ns} (node logs: {logs})")
            res["rings"].append(run_ring(model, k, ns, tokens, pin=pin, threads=threads, references=references,
                                         workdir=logs, rates=rates, variant=variant))
    if secret:
        from ...core.auth import new_key_file
        key = new_key_file((logs / "team.key").resolve(), force=True)   # the config resolves paths from its folder
        k, variant, n = max(ks), quantization[0] if quantization else kernels[0], max(ns)
        log(f"authenticated mode: ring K={k}, {variant}, N={n} with cluster.secret_file")
        res["rings"].append(run_ring(model, k, [n], tokens, pin=pin, threads=threads, references=references,
                                     workdir=logs, variant=variant, secret_file=str(key)))
    if peers:
        res["peers"] = measure_peers(gguf, ns, [k for k in ks if k > 1] or [2], tokens, cores)
    if quantization:
        res["quality"] = [run_eval(model, q, logs) for q in quantization]
    if long_prompt if long_prompt is not None else not (quick or netlab):
        log("long prompt: transformers, then rings with whole and chunked prefill")
        base = run_baseline("prefill", model_dir, 1, LONG_TOKENS, cores)
        res["long_prompt"] = {"baseline": base, "rings": [
            run_long_prompt(model, k, piece, workdir=logs, reference=base["text"])
            for k in ([k for k in ks if k > 1] or [2]) for piece in LONG_PIECES]}
    if priority:
        log("a priority request on an idle ring, then with 16 greedy streams saturating it (K=2)")
        res["priority"] = run_priority(model, 2, workdir=logs, variant=quantization[0] if quantization else "exact")
    if synthetic:
        res["synthetic"] = run_synthetic([k for k in ks if k > 1] or [2, 3], tokens, logs, peers, pin, threads)
    explain_divergences(res, model_dir)
    (out_dir / f"{stamp}.json").write_text(json.dumps(res, indent=1))
    table = markdown(res)
    (out_dir / f"{stamp}.md").write_text(table + "\n")
    plot(res, out_dir / f"{stamp}.png")
    print(table)
    log(f"wrote {out_dir / stamp}.json, .md and .png")
    return res


def run_eval(model: str, quantization: str, workdir: Path) -> dict:
    """`mdi-llm eval` of the bench's model with `quantization`, in a child process; its last line parsed."""
    import subprocess
    import sys

    import yaml
    cfg = workdir / f"eval_{quantization}.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": model, "quantization": quantization},
                                   "chunks": [{"name": "chunk_0"}, {"name": "chunk_1"}]}))
    log(f"quality of {quantization}: mdi-llm eval on the shipped text")
    r = subprocess.run([sys.executable, "-m", "mdi_llm_ros.cli", "eval", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"eval {quantization} failed: {r.stderr[-2000:]}")
    last = r.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.removeprefix("eval: ").split())
    log(last)
    return {"line": last, "quantization": quantization, "ppl": float(fields["ppl"]),
            "ref_ppl": float(fields["ref_ppl"]), "top1_agreement": float(fields["top1_agreement"]),
            "tokens": int(fields["tokens"])}


def run_synthetic(ks: list[int], tokens: int, workdir: Path, peers: bool, pin: bool, threads: int | None) -> dict:
    """The 1.1B synthetic model (random weights, TinyLlama's shape, GGUF Q4_0): int4 rings of K chunk
    nodes, one request, and llama.cpp over K RPC servers on the same file.
    """
    from ..synth import synthesize
    gguf = synthesize("tinyllama-1b")
    out: dict = {"model": "tinyllama-1b (synthetic)", "gguf": str(gguf), "rings": []}
    refs = {p: "" for p in PROMPTS}              # random weights: no reference text to compare with
    for k in ks:
        log(f"synthetic 1.1B: ring K={k}, int4, N=1")
        out["rings"].append(run_ring(str(gguf), k, [1], tokens, pin=pin, threads=threads, references=refs,
                                     workdir=workdir, variant="int4", model_label="1.1B"))
    if peers:
        out["peers"] = measure_peers(gguf, [1], ks, tokens, len(os.sched_getaffinity(0)))
    return out

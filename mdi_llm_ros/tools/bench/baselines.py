"""Baselines in one process (plain transformers), the node runtime's own memory, and where a
greedy text leaves transformers'. Each runs as a child process (see common.child_json).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .common import LONG_PROMPT, PROMPTS, child_json, label, log


def baseline_main(argv: list[str]) -> int:
    """Child: python -m mdi_llm_ros.tools.bench --baseline MODE MODEL_DIR N TOKENS THREADS."""
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
    return child_json(["--baseline", mode, model_dir, str(n), str(tokens), str(threads)], f"baseline {mode}")


def floor_main() -> int:
    """Child: python -m mdi_llm_ros.tools.bench --floor. A chunk node process's runtime before any
    weights or caches: the interpreter, the chunk node's imports (torch, numpy, rclpy) and one
    ROS node with its DDS participant, spun for a second. Prints one JSON line.
    """
    import resource

    import rclpy

    from ...nodes import chunk_node  # noqa: F401  (what a chunk process imports)
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
    return child_json(["--floor"], "runtime floor probe", timeout=300)["peak_rss"]


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
    """Child: python -m mdi_llm_ros.tools.bench --divergence MODEL_DIR TOKENS PROMPT RING_TEXT."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, tokens, prompt, ring_text = argv[0], int(argv[1]), argv[2], argv[3]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    print(json.dumps(first_divergence(model, AutoTokenizer.from_pretrained(model_dir), prompt, ring_text, tokens)))
    return 0


def explain_divergences(res: dict, model_dir: str) -> None:
    """For every float ring scenario whose greedy text differs: the diverging token and its margin
    (a quantized ring is judged by `mdi-llm eval`, not by the greedy text).
    """
    for ring in res["rings"]:
        if ring.get("variant") in ("int4", "int8"):
            continue
        for s in ring["scenarios"]:
            if s.get("diverged"):
                out = subprocess.run([sys.executable, "-m", "mdi_llm_ros.tools.bench", "--divergence", model_dir,
                                      str(res["tokens"]), s["diverged"]["prompt"], s["diverged"]["text"]],
                                     capture_output=True, text=True, timeout=600)
                if out.returncode == 0:
                    s["divergence"] = json.loads(out.stdout.strip().splitlines()[-1])
                    log(f"{label(s)} N={s['n']}: greedy text diverges at token {s['divergence']['position']} "
                        f"(transformers' margin there {s['divergence']['margin']:.2e})")

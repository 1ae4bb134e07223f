"""The report of a run: Markdown tables, the targets judged on the run's own figures, the plot."""
from __future__ import annotations

import os
from pathlib import Path

from ...core.plan import COORDINATOR
from .common import LONG_TOKENS, label, ring_label


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
            row = label(s)
            lines.append(
                f"| {row} | {s['n']} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base_seq:.2f} | "
                f"{s['tokens_per_s'] / b['tokens_per_s']:.2f} | " if b else
                f"| {row} | {s['n']} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base_seq:.2f} | - | ")
            lines[-1] += (f"{s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} | "
                          f"{s['per_token_ms']:.1f} | " if s["per_token_ms"] else
                          f"{s['ttft_p50']:.2f} / {s['ttft_p95']:.2f} | | ")
            lines[-1] += (f"{s['wire_bytes_per_token']:.0f} | "
                          f"{'yes' if s['greedy_identical'] else divergence_text(s)} |")
    lines += ["", "| config | peak RSS per process (MB) |", "|---|---|"]
    for b in res["baselines"]:
        lines.append(f"| transformers {b['mode']} N={b['n']} | {b['peak_rss'] / 1e6:.0f} |")
    for ring in res["rings"]:
        where = "" if ring.get("network", "localhost") == "localhost" else f" ({ring['network']})"
        lines.append(f"| {ring_label(ring)}{where} | "
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
            lines.append(f"| {ring_label(ring)}{where} | {name} | {peak / 1e6:.0f} | {weights / 1e6:.0f} | {parts} | "
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

    quick = (f" (quick: N ≤ {max(s['n'] for r in local for s in r['scenarios'])}, {res['tokens']} tokens; "
             "the targets are for the full run)") if res.get("quick") and local else ""
    out = ["", f"Targets (issue 7) in this run{quick}:"]
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


def divergence_text(s: dict) -> str:
    d = s.get("divergence") or {}
    if d.get("position") is not None:
        return f"NO (token {d['position']}, margin {d['margin']:.1e})"
    return f"NO (char {s['first_diverging_char']})"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in ("sequential", "batched"):
        pts = sorted((b["n"], b["tokens_per_s"]) for b in res["baselines"] if b["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--o", label=f"transformers {mode}")
    for ring in res["rings"]:
        for name in dict.fromkeys(label(s) for s in ring["scenarios"]):
            pts = [(s["n"], s["tokens_per_s"]) for s in ring["scenarios"] if label(s) == name]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-s", label=name)
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

"""The report of a run: Markdown tables, the targets judged on the run's own figures, the plot."""
from __future__ import annotations

import os
from pathlib import Path

from ...core.plan import COORDINATOR
from .common import LONG_TOKENS, label, ring_label, variant_of

QUANTIZED = ("int4", "int8")


def _by_int(d: dict) -> dict:
    """JSON turns int keys into strings; the report reads both a fresh run and a stored one."""
    return {int(k): v for k, v in d.items() if str(k).isdigit()}


def peer_rows(res: dict) -> tuple[dict[int, dict], dict[int, dict[int, dict]]]:
    """llama.cpp's figures of this run: {N: row} in one process, {K: {N: row}} over K RPC servers."""
    peers = res.get("peers") or {}
    return _by_int(peers.get("one_process", {})), {k: _by_int(v) for k, v in _by_int(peers.get("rpc", {})).items()}


def _ratio(value: float, row: dict | None) -> str:
    return f"{value / row['tokens_per_s']:.2f}" if row and row.get("tokens_per_s") else "-"


def greedy_text(s: dict) -> str:
    """The greedy check applies to float rings: quantized ones are judged by `mdi-llm eval` instead."""
    if variant_of(s) in QUANTIZED or s.get("model_label"):
        return "n/a (quantized)" if variant_of(s) in QUANTIZED else "n/a"
    if s["greedy_identical"]:
        return "yes"
    d = s.get("divergence") or {}
    if d.get("position") is not None:
        return f"NO (token {d['position']}, margin {d['margin']:.1e})"
    return f"NO (char {s['first_diverging_char']})"


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


def speed_markdown(res: dict) -> list[str]:
    seq = {b["n"]: b for b in res["baselines"] if b["mode"] == "sequential"}
    bat = {b["n"]: b for b in res["baselines"] if b["mode"] == "batched"}
    one, rpc = peer_rows(res)
    base_seq = seq[min(seq)]["tokens_per_s"]
    lines = ["| config | N | tokens/s | × sequential HF | × batched HF (batch N) | × llama.cpp (1 process) | "
             "× llama.cpp (K RPC servers) | TTFT p50 / p95 s | per-token ms (N=1) | wire bytes/token | greedy = HF |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, b in sorted(seq.items()):
        lines.append(f"| transformers sequential | {n} | {b['tokens_per_s']:.1f} | 1.00 | | | | | | | yes |")
    for n, b in sorted(bat.items()):
        lines.append(f"| transformers batched | {n} | {b['tokens_per_s']:.1f} | {b['tokens_per_s'] / base_seq:.2f} "
                     f"| 1.00 | | | | | | |")
    for n, row in sorted(one.items()):
        lines.append(f"| llama.cpp, one process | {n} | {row['tokens_per_s']:.1f} | "
                     f"{row['tokens_per_s'] / base_seq:.2f} | {_ratio(row['tokens_per_s'], bat.get(n))} | 1.00 | "
                     "| | | | |")
    for k, rows in sorted(rpc.items()):
        for n, row in sorted(rows.items()):
            lines.append(f"| llama.cpp over {k} RPC servers | {n} | {row['tokens_per_s']:.1f} | "
                         f"{row['tokens_per_s'] / base_seq:.2f} | {_ratio(row['tokens_per_s'], bat.get(n))} | "
                         f"{_ratio(row['tokens_per_s'], one.get(n))} | 1.00 | | | | |")
    for ring in res["rings"]:
        if ring.get("model_label"):
            continue
        for s in ring["scenarios"]:
            tps = s["tokens_per_s"]
            ttft = f"{s['ttft_p50']:.2f} / {s['ttft_p95']:.2f}"
            per_token = f"{s['per_token_ms']:.1f}" if s.get("per_token_ms") else ""
            lines.append(f"| {label(s)} | {s['n']} | {tps:.1f} | {tps / base_seq:.2f} | "
                         f"{_ratio(tps, bat.get(s['n']))} | {_ratio(tps, one.get(s['n']))} | "
                         f"{_ratio(tps, rpc.get(s['k'], {}).get(s['n']))} | {ttft} | {per_token} | "
                         f"{s['wire_bytes_per_token']:.0f} | {greedy_text(s)} |")
    if res.get("peers"):
        lines += ["", f"llama.cpp: llama-batched-bench on the same GGUF file, N parallel sequences of "
                  f"{res['peers']['prompt_tokens']} prompt + {res['tokens']} new tokens; tokens/s over the whole run "
                  "(prompt included, as the ring's). Its RPC servers run one thread each, as one device each."]
    return lines


def memory_split(ring: dict, name: str, floor: float) -> tuple[float, float, float, float]:
    """A node's peak RSS as (weights, KV cache most held, runtime alone, rest), in bytes. The runtime
    alone (`floor`) is a chunk process's, so a coordinator's and an unsplit ring's count as rest.
    """
    peak = ring["peak_rss"][name]
    weights = ring.get("weights", {}).get(name, 0)
    kv = ring.get("kv_cache_peak", {}).get(name, 0)
    runtime = floor if name != COORDINATOR and "weights" in ring else 0
    return weights, kv, runtime, peak - weights - kv - runtime


def fp32_share(res: dict, ring: dict, name: str) -> float | None:
    """A quantized node's weight bytes as a share of the same node's in the float ring of the same K."""
    for other in res["rings"]:
        if (other["k"] == ring["k"] and variant_of(other) == "exact" and not other.get("model_label")
                and not other.get("secret") and other.get("weights", {}).get(name)):
            return ring["weights"].get(name, 0) / other["weights"][name]
    return None


def memory_markdown(res: dict) -> list[str]:
    """Where each node's peak memory goes: weights (from the plan), the most KV cache its requests
    held at once (the node's own count), the runtime a chunk process has before loading anything
    (measured in this run), and the rest (kernels' working memory, messages, DDS traffic); llama.cpp's
    processes beside them.
    """
    floor = res.get("runtime_floor") or 0
    lines = ["", "| config | node | peak RSS MB | weights MB | × fp32 weights | KV cache (most held) | "
             "runtime alone | rest |", "|---|---|---|---|---|---|---|---|"]
    for b in res["baselines"]:
        lines.append(f"| transformers {b['mode']} N={b['n']} | one process | {b['peak_rss'] / 1e6:.0f} | | | | | |")
    peers = res.get("peers") or {}
    if peers.get("one_process_peak_rss"):
        lines.append(f"| llama.cpp, one process | one process | {peers['one_process_peak_rss'] / 1e6:.0f} | | | | | |")
    for k, rows in sorted(_by_int(peers.get("rpc", {})).items()):
        for name, peak in rows.get("peak_rss", {}).items():
            lines.append(f"| llama.cpp over {k} RPC servers | {name} | {peak / 1e6:.0f} | | | | | |")
    for ring in res["rings"]:
        if ring.get("model_label"):
            continue
        where = "" if ring.get("network", "localhost") == "localhost" else f" ({ring['network']})"
        for name, peak in ring["peak_rss"].items():
            weights, kv, runtime, rest = memory_split(ring, name, floor)
            share = fp32_share(res, ring, name) if variant_of(ring) in QUANTIZED else None
            parts = (f"{kv / 1e6:.0f} | {runtime / 1e6:.0f} | {rest / 1e6:.0f}"
                     if name != COORDINATOR and floor and "weights" in ring else "- | - | -")
            lines.append(f"| {ring_label(ring)}{where} | {name} | {peak / 1e6:.0f} | {weights / 1e6:.0f} | "
                         f"{'' if share is None else f'{share:.3f}'} | {parts} |")
    return lines


def profile_markdown(res: dict) -> list[str]:
    """Where one token's time goes at N=1: each node's compute (its busy share of the run times the
    per-token time) and the rest, which is the hops between nodes (messages, DDS, executors).
    """
    rows = [s for r in res["rings"] if r.get("network", "localhost") == "localhost"
            for s in r["scenarios"] if s["n"] == 1 and s.get("per_token_ms") and s.get("busy_share")]
    if not rows:
        return []
    lines = ["", "One token at N=1, end to end: each node's compute, and the hops between them "
             "(messages, DDS, executors: the per-token time less all compute).", "",
             "| config | per-token ms | coordinator (embedding, head, sampling) ms | chunk nodes' layers ms | "
             "hops ms | hops share |", "|---|---|---|---|---|---|"]
    for s in rows:
        ms = s["per_token_ms"]
        coord = s["busy_share"].get(COORDINATOR, 0.0) * ms
        chunks = [s["busy_share"][x] * ms for x in sorted(s["busy_share"]) if x != COORDINATOR]
        hops = max(0.0, ms - coord - sum(chunks))
        lines.append(f"| {label(s)} | {ms:.1f} | {coord:.1f} | {' + '.join(f'{c:.1f}' for c in chunks)} | "
                     f"{hops:.1f} | {hops / ms:.0%} |")
    return lines


def quality_markdown(res: dict) -> list[str]:
    if not res.get("quality"):
        return []
    lines = ["", "Quality on the shipped text (`mdi-llm eval`, teacher-forced; agreement: the share of "
             "positions where the ring's argmax equals float32 transformers' on the same weights):", "",
             "| quantization | perplexity | float perplexity | Δ perplexity | top-1 agreement | tokens |",
             "|---|---|---|---|---|---|"]
    for q in res["quality"]:
        lines.append(f"| {q['quantization']} | {q['ppl']:.4f} | {q['ref_ppl']:.4f} | "
                     f"{q['ppl'] / q['ref_ppl'] - 1:+.2%} | {q['top1_agreement']:.4f} | {q['tokens']} |")
    return lines


def synthetic_markdown(res: dict) -> list[str]:
    syn = res.get("synthetic")
    if not syn:
        return []
    rpc = {k: _by_int(v) for k, v in _by_int((syn.get("peers") or {}).get("rpc", {})).items()}
    one = _by_int((syn.get("peers") or {}).get("one_process", {}))
    lines = ["", f"{syn['model']}: {Path(syn['gguf']).name}, random weights (speed and memory only), int4 rings, "
             "one request:", "",
             "| config | N | tokens/s | × llama.cpp (1 process) | × llama.cpp (K RPC servers) | per-token ms |",
             "|---|---|---|---|---|---|"]
    for n, row in sorted(one.items()):
        lines.append(f"| llama.cpp, one process | {n} | {row['tokens_per_s']:.1f} | 1.00 | | |")
    for k, rows in sorted(rpc.items()):
        for n, row in sorted(rows.items()):
            lines.append(f"| llama.cpp over {k} RPC servers | {n} | {row['tokens_per_s']:.1f} | "
                         f"{_ratio(row['tokens_per_s'], one.get(n))} | 1.00 | |")
    for ring in syn["rings"]:
        for s in ring["scenarios"]:
            tps = s["tokens_per_s"]
            lines.append(f"| {label(s)} | {s['n']} | {tps:.1f} | {_ratio(tps, one.get(s['n']))}"
                         f" | {_ratio(tps, rpc.get(s['k'], {}).get(s['n']))} | "
                         f"{s['per_token_ms'] or 0:.1f} |")
    lines += ["", "| config | node | peak RSS MB | weights MB | peak − weights MB |", "|---|---|---|---|---|"]
    peers = syn.get("peers") or {}
    if peers.get("one_process_peak_rss"):
        lines.append(f"| llama.cpp, one process | one process | {peers['one_process_peak_rss'] / 1e6:.0f} | | |")
    for k, rows in sorted(_by_int(peers.get("rpc", {})).items()):
        for name, peak in rows.get("peak_rss", {}).items():
            lines.append(f"| llama.cpp over {k} RPC servers | {name} | {peak / 1e6:.0f} | | |")
    for ring in syn["rings"]:
        for name, peak in ring["peak_rss"].items():
            w = ring["weights"].get(name, 0)
            lines.append(f"| {ring_label(ring)} | {name} | {peak / 1e6:.0f} | {w / 1e6:.0f} | {(peak - w) / 1e6:.0f} |")
    return lines


def secret_markdown(res: dict) -> list[str]:
    pairs = secret_pairs(res)
    if not pairs:
        return []
    lines = ["", "Authenticated mode (`cluster.secret_file`: every ring message signed and checked):", "",
             "| config | N | tokens/s with key | without | cost |", "|---|---|---|---|---|"]
    for keyed, plain in pairs:
        lines.append(f"| {label(keyed)} | {keyed['n']} | {keyed['tokens_per_s']:.1f} | {plain['tokens_per_s']:.1f} | "
                     f"{1 - keyed['tokens_per_s'] / plain['tokens_per_s']:+.1%} |")
    return lines


def secret_pairs(res: dict) -> list[tuple[dict, dict]]:
    """(scenario with a key, the same ring and N without) of this run."""
    out = []
    for ring in res["rings"]:
        if not ring.get("secret"):
            continue
        for s in ring["scenarios"]:
            plain = next((p for r in res["rings"] if not r.get("secret") and r["k"] == ring["k"]
                          and variant_of(r) == variant_of(ring) and not r.get("model_label")
                          and r.get("network", "localhost") == ring.get("network", "localhost")
                          for p in r["scenarios"] if p["n"] == s["n"]), None)
            if plain:
                out.append((s, plain))
    return out


def priority_figures(pr: dict) -> dict:
    """TTFT p95 and median tokens/s of the priority request, idle and loaded, and their ratios."""
    from statistics import median

    from .common import percentile
    idle_ttft, loaded_ttft = percentile(pr["idle_ttft"], 0.95), percentile(pr["loaded_ttft"], 0.95)
    idle_tps, loaded_tps = median(pr["idle_tps"]), median(pr["loaded_tps"])
    return {"idle_ttft": idle_ttft, "loaded_ttft": loaded_ttft, "ttft_ratio": loaded_ttft / idle_ttft,
            "idle_tps": idle_tps, "loaded_tps": loaded_tps, "tps_ratio": loaded_tps / idle_tps}


def priority_markdown(res: dict) -> list[str]:
    pr = res.get("priority")
    if not pr:
        return []
    f = priority_figures(pr)
    return ["", f"A priority request (priority 5, {pr['tokens']} tokens) on ring K={pr['k']} {pr['variant']}, "
            f"{len(pr['idle_ttft'])} times on the idle ring and {len(pr['loaded_ttft'])} times while "
            f"{pr['background']} greedy streams saturate it:", "",
            "| | TTFT p95 s | tokens/s (median) |", "|---|---|---|",
            f"| idle ring | {f['idle_ttft']:.3f} | {f['idle_tps']:.1f} |",
            f"| {pr['background']} streams | {f['loaded_ttft']:.3f} | {f['loaded_tps']:.1f} |",
            f"| loaded / idle | {f['ttft_ratio']:.2f} | {f['tps_ratio']:.2f} |"]


def netlab_markdown(res: dict) -> list[str]:
    lab = [s for ring in res["rings"] for s in ring["scenarios"] if s.get("network", "localhost") != "localhost"]
    if not lab:
        return []
    lines = ["", "Emulated devices (one network namespace per device, UDP over veth links through a bridge; "
             "client in its own namespace):", "",
             "| config | links | N | tokens/s | × unshaped | ring payload bytes/token | "
             "link bytes/token (all traffic) | greedy = HF |", "|---|---|---|---|---|---|---|---|"]
    unshaped = {(s["k"], s["n"]): s["tokens_per_s"] for s in lab if s["rate"] is None}
    for s in lab:
        ref = unshaped.get((s["k"], s["n"]))
        lines.append(f"| {ring_label(s)} | {s['rate'] or 'unshaped'} | {s['n']} | {s['tokens_per_s']:.1f} | "
                     f"{s['tokens_per_s'] / ref:.2f} | " if ref else "- | ")
        lines[-1] += (f"{s['wire_bytes_per_token']:.0f} | {s['link_bytes_per_token']:.0f} | {greedy_text(s)} |")
    return lines


def markdown(res: dict) -> str:
    head = (f"Model {res['model']}, {res['tokens']} new tokens per request, {os.cpu_count()} cores, "
            f"pin={res['pin']}, threads/node={res['threads'] or 'auto'}. Rings: `exact`/`packed` serve float32 "
            "weights (`quantization: none`), `int4`/`int8` the quantized ones.")
    lines = [head, ""] + speed_markdown(res) + memory_markdown(res) + profile_markdown(res)
    lines += quality_markdown(res) + secret_markdown(res) + priority_markdown(res) + synthetic_markdown(res)
    lines += netlab_markdown(res)
    if res.get("long_prompt"):
        lines += long_prompt_markdown(res["long_prompt"])
    lines += target_lines(res)
    return "\n".join(lines)


# Issue 15's targets (and issue 16's cost of the key), judged on the run's own figures.
CHUNK_PEAK_K3 = 330e6
COORDINATOR_PEAK = 360e6
SYNTH_ALLOWANCE = 300e6
INT4_WEIGHT_SHARE = 0.17


def target_lines(res: dict) -> list[str]:
    """The targets this run measured, each with its figure and met / NOT met."""
    one, rpc = peer_rows(res)
    local = [r for r in res["rings"] if r.get("network", "localhost") == "localhost" and not r.get("model_label")
             and not r.get("secret")]

    def ring(variant: str, k: int) -> dict | None:
        return next((r for r in local if r["k"] == k and variant_of(r) == variant), None)

    def scenario(variant: str, k: int, n: int) -> dict | None:
        r = ring(variant, k)
        return next((s for s in r["scenarios"] if s["n"] == n), None) if r else None

    def judge(ok: bool) -> str:
        return "met" if ok else "NOT met"

    quick = (f" (quick: N ≤ {max(s['n'] for r in local for s in r['scenarios'])}, {res['tokens']} tokens; "
             "the targets are for the full run)") if res.get("quick") and local else ""
    out = ["", f"Targets in this run{quick}:"]
    for k, n, peer, need in ((2, 1, "rpc", 1.0), (3, 1, "rpc", 1.0), (2, 16, "rpc", 2.0), (2, 16, "one", 1.0)):
        s = scenario("int4", k, n)
        base = (rpc.get(k, {}) if peer == "rpc" else one).get(n)
        if s and base:
            ratio = s["tokens_per_s"] / base["tokens_per_s"]
            what = f"llama.cpp over {k} RPC servers" if peer == "rpc" else "llama.cpp in one process"
            out.append(f"* int4 K={k}, N={n} ≥ {need:.1f}× {what}: {s['tokens_per_s']:.1f} / "
                       f"{base['tokens_per_s']:.1f} = {ratio:.2f}× {judge(ratio >= need)}")
    shares = [(r["k"], name, fp32_share(res, r, name)) for r in local if variant_of(r) == "int4"
              for name in r.get("weights", {}) if name != COORDINATOR]
    shares = [x for x in shares if x[2] is not None]
    if shares:
        worst = max(shares, key=lambda x: x[2])
        out.append(f"* int4 chunk weights ≤ {INT4_WEIGHT_SHARE}× their fp32 share: at most {worst[2]:.3f}× "
                   f"(K={worst[0]} {worst[1]}) {judge(worst[2] <= INT4_WEIGHT_SHARE)}")
    if r3 := ring("int4", 3):
        chunk = max(v for name, v in r3["peak_rss"].items() if name != COORDINATOR)
        out.append(f"* int4 K=3 chunk node peak RSS ≤ {CHUNK_PEAK_K3 / 1e6:.0f} MB: at most {chunk / 1e6:.0f} MB "
                   f"{judge(chunk <= CHUNK_PEAK_K3)}")
    coords = [r["peak_rss"][COORDINATOR] for r in local if variant_of(r) == "int4" and COORDINATOR in r["peak_rss"]]
    if coords:
        out.append(f"* int4 coordinator peak RSS ≤ {COORDINATOR_PEAK / 1e6:.0f} MB: at most {max(coords) / 1e6:.0f} MB "
                   f"{judge(max(coords) <= COORDINATOR_PEAK)}")
    syn = res.get("synthetic")
    if syn:
        syn_rpc = {k: _by_int(v) for k, v in _by_int((syn.get("peers") or {}).get("rpc", {})).items()}
        for r in syn["rings"]:
            if r["k"] == 3:
                over = {name: v - r["weights"].get(name, 0) for name, v in r["peak_rss"].items() if name != COORDINATOR}
                worst = max(over, key=over.get)
                out.append(f"* 1.1B synthetic K=3: every chunk node's peak ≤ its int4 weights + "
                           f"{SYNTH_ALLOWANCE / 1e6:.0f} MB: at most +{over[worst] / 1e6:.0f} MB ({worst}) "
                           f"{judge(over[worst] <= SYNTH_ALLOWANCE)}")
            s = next((s for s in r["scenarios"] if s["n"] == 1), None)
            base = syn_rpc.get(r["k"], {}).get(1)
            if r["k"] == 2 and s and base:
                ratio = s["tokens_per_s"] / base["tokens_per_s"]
                out.append(f"* 1.1B synthetic int4 K=2, N=1 ≥ 1.0× llama.cpp over 2 RPC servers: "
                           f"{s['tokens_per_s']:.1f} / {base['tokens_per_s']:.1f} = {ratio:.2f}× {judge(ratio >= 1.0)}")
    for q in res.get("quality") or []:
        need = 0.98 if q["quantization"] == "int4" else 0.995
        drift = q["ppl"] / q["ref_ppl"] - 1
        ok = q["top1_agreement"] >= need and (q["quantization"] != "int4" or abs(drift) <= 0.01)
        out.append(f"* {q['quantization']} top-1 agreement ≥ {need:.1%}"
                   + (" and perplexity within 1%" if q["quantization"] == "int4" else "")
                   + f": {q['top1_agreement']:.2%}, perplexity {drift:+.2%} {judge(ok)}")
    for keyed, plain in secret_pairs(res):
        cost = 1 - keyed["tokens_per_s"] / plain["tokens_per_s"]
        out.append(f"* the key's cost at {label(keyed)}, N={keyed['n']} ≤ 3%: {cost:+.1%} {judge(cost <= 0.03)}")
    if res.get("priority"):
        f = priority_figures(res["priority"])
        out.append(f"* priority request under 16 streams: TTFT p95 ≤ 1.5× idle: {f['ttft_ratio']:.2f}× "
                   f"{judge(f['ttft_ratio'] <= 1.5)}; tokens/s ≥ 0.8× idle: {f['tps_ratio']:.2f}× "
                   f"{judge(f['tps_ratio'] >= 0.8)}")
    same = [s["greedy_identical"] for r in res["rings"] for s in r["scenarios"]
            if variant_of(r) not in QUANTIZED and not r.get("model_label")]
    if same:
        out.append(f"* float rings' greedy output identical to transformers: {judge(all(same))} ({sum(same)} of "
                   f"{len(same)} scenarios)")
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    for mode in ("sequential", "batched"):
        pts = sorted((b["n"], b["tokens_per_s"]) for b in res["baselines"] if b["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--o", color="grey" if mode == "batched" else "silver",
                label=f"transformers {mode}")
    one, rpc = peer_rows(res)
    local = [r for r in res["rings"] if not r.get("model_label") and not r.get("secret")
             and r.get("network", "localhost") == "localhost"]
    # one ring size on the speed plot (K=2 where measured), every variant of it, beside its peers
    shown_k = 2 if any(r["k"] == 2 for r in local) else max((r["k"] for r in local), default=0)
    if one:
        ax.plot(sorted(one), [one[n]["tokens_per_s"] for n in sorted(one)], ":^", color="black",
                label="llama.cpp, 1 process")
    if shown_k in rpc:
        rows = rpc[shown_k]
        ax.plot(sorted(rows), [rows[n]["tokens_per_s"] for n in sorted(rows)], ":v", color="dimgrey",
                label=f"llama.cpp, {shown_k} RPC servers")
    for ring in local:
        if ring["k"] != shown_k and len(local) > 4:
            continue
        for name in dict.fromkeys(label(s) for s in ring["scenarios"]):
            pts = [(s["n"], s["tokens_per_s"]) for s in ring["scenarios"] if label(s) == name]
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-s", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests N")
    ax.set_ylabel("aggregate generated tokens/s")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    # per-node memory of the largest ring of each variant, stacked: weights, KV cache, runtime alone, rest
    labels, stacks = [], []
    for b in res["baselines"]:
        if b["mode"] == "sequential":
            labels.append("HF")
            stacks.append((0, 0, 0, b["peak_rss"] / 1e6))
    peers = res.get("peers") or {}
    if peers.get("one_process_peak_rss"):
        labels.append("llama.cpp")
        stacks.append((0, 0, 0, peers["one_process_peak_rss"] / 1e6))
    rpc_raw = {int(k): v for k, v in (peers.get("rpc") or {}).items()}
    if rpc_raw:
        k = max(rpc_raw)
        for name, peak in rpc_raw[k].get("peak_rss", {}).items():
            labels.append(f"llama.cpp RPC{k} {name.replace('rpc-server', 'srv').replace('llama.cpp main', 'main')}")
            stacks.append((0, 0, 0, peak / 1e6))
    floor = res.get("runtime_floor") or 0
    largest: dict[str, dict] = {}
    for ring in res["rings"]:
        if ring.get("model_label") or ring.get("secret") or ring.get("network", "localhost") != "localhost":
            continue
        if ring["k"] >= largest.get(variant_of(ring), {"k": 0})["k"]:
            largest[variant_of(ring)] = ring
    for variant, ring in largest.items():
        for name in ring["peak_rss"]:
            labels.append(f"K{ring['k']} {variant} {name.replace('chunk_', 'c').replace('coordinator', 'coord')}")
            stacks.append(tuple(x / 1e6 for x in memory_split(ring, name, floor)))
    bottom = [0.0] * len(stacks)
    for i, part in enumerate(("weights", "KV cache (most held)", "chunk runtime alone", "rest / whole process")):
        heights = [st[i] for st in stacks]
        bx.bar(range(len(stacks)), heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    bx.legend(fontsize=7)
    bx.set_xticks(range(len(stacks)), labels, rotation=65, ha="right", fontsize=7)
    bx.set_ylabel("peak RSS (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)

"""Rings under test: start a cluster from a bench config, drive its scenarios, stop it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from ...core.plan import load_plan
from .common import LONG_TOKENS, VARIANTS, label, log, percentile


def drive(spec: dict, workdir: Path, prefix: tuple[str, ...] = (), on_mark=None) -> dict:
    """Run one scenario in a driver process; on_mark("READY"/"DONE") is called at the
    start and end of the timed part (to read link counters around exactly that).
    """
    path = workdir / f"drive_{spec['tag']}_n{spec['n']}.json"
    path.write_text(json.dumps(spec))
    err_path = workdir / f"drive_{spec['tag']}_n{spec['n']}.log"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "mdi_llm_ros.tools.bench", "--drive", str(path)],
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


def ring_config(model: str, k: int, max_n: int, lab=None, variant: str = "exact",
                secret_file: str | None = None) -> dict:
    """The bench's cluster config: K chunk nodes running `variant` (common.VARIANTS); on a lab,
    coordinator + chunk_0 on robot_0 and chunk_i on robot_i, with discovery over the lab's subnet
    and UDP only (no shared memory).
    """
    kernels, quantization = VARIANTS[variant]
    cfg: dict = {"model": {"name": model, "dtype": "float32", "max_context": 2048, "kernels": kernels,
                           "quantization": quantization},
                 "coordinator": {"max_inflight": max_n, "queue_limit": max_n},
                 "chunks": [{"name": f"chunk_{i}"} for i in range(k)]}
    if secret_file:
        cfg["cluster"] = {"secret_file": secret_file}
    if lab is not None:
        cfg["cluster"] = {**cfg.get("cluster", {}), "discovery_range": "SUBNET", "transport": "udp",
                          "domain_id": int(os.environ.get("ROS_DOMAIN_ID", "0") or 0)}
        cfg["coordinator"]["host"] = "robot_0"
        for i, ch in enumerate(cfg["chunks"]):
            ch["host"] = f"robot_{i}"
    return cfg


def run_ring(model: str, k: int, ns: list[int], tokens: int, *, pin: bool, threads: int | None,
             references: dict[str, str], workdir: Path, rates: list[str | None] | None = None,
             variant: str = "exact", secret_file: str | None = None, model_label: str = "") -> dict:
    """Start a ring of K chunk nodes, drive N concurrent requests for each N, stop it.

    rates: None runs everything on this host's network (shared memory + loopback); a list
    runs each node on its own emulated device (network namespace) and repeats the scenarios
    for each link rate in it (None: unshaped).
    """
    from dataclasses import replace

    from ...launcher import Cluster, node_specs
    from ..netlab import NetLab

    lab = None
    if rates is not None:
        lab = NetLab(hosts=[f"robot_{i}" for i in range(k)] + ["client"], name=f"mdibench{os.getpid() % 10000}")
    tag = f"k{k}_{variant}{'_key' if secret_file else ''}{'_' + model_label if model_label else ''}"
    name = f"ring_{tag}{'_netlab' if lab else ''}"
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(ring_config(model, k, max(ns), lab, variant, secret_file)))
    env = dict(os.environ)
    if threads:
        env["MDI_TORCH_THREADS"] = str(threads)
    specs = node_specs(cfg_path)
    weights = ring_weights(cfg_path)
    if lab is not None:
        lab.up()
        specs = [replace(s, prefix=lab.exec_prefix(s.host)) for s in specs]
    node_log = open(workdir / f"{name}.log", "w")   # the nodes' logs, for a failed run
    cluster = Cluster(specs, out=node_log, env=env, pin_cores=pin)
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
                        "tag": f"{tag}_{network.replace(' ', '_')}"}
                s = drive(spec, workdir, lab.exec_prefix("client") if lab else (),
                          on_mark=(lambda word: marks.__setitem__(word, lab.counters())) if lab else None)
                s.update(k=k, network=network, rate=rate, variant=variant, kernels=VARIANTS[variant][0],
                         secret=bool(secret_file), model_label=model_label)
                if lab is not None:
                    # every byte the devices put on their links while the requests ran: ring
                    # activations, service calls and replies, DDS acks and heartbeats
                    sent = sum(marks["DONE"][h]["tx_bytes"] - marks["READY"][h]["tx_bytes"] for h in lab.hosts)
                    s["link_bytes_per_token"] = sent / s["tokens"] if s["tokens"] else 0
                scenarios.append(s)
                log(f"{label(s)} N={n} ({network}): {s['tokens_per_s']:.1f} tokens/s, "
                    f"identical={s['greedy_identical']}")
        peaks = cluster.peak_rss()
    finally:
        cluster.stop()
        node_log.close()
        if lab is not None:
            lab.down()
    kv = {name: max(s.get("kv_cache_peak", {}).get(name, 0) for s in scenarios) for name in peaks}
    return {"k": k, "variant": variant, "kernels": VARIANTS[variant][0], "secret": bool(secret_file),
            "model_label": model_label, "network": "localhost" if lab is None else "netns", "scenarios": scenarios,
            "peak_rss": peaks, "weights": weights, "kv_cache_peak": kv}


def ring_weights(cfg_path: Path) -> dict[str, int]:
    """Parameter bytes each node of the config's plan holds (the coordinator: embedding, norm, head)."""
    _, plan, _ = load_plan(cfg_path)
    return {n.name: n.weight_bytes for n in plan.nodes}


def drive_on_ring(name: str, cfg: dict, scenario: dict, workdir: Path) -> dict:
    """Write `cfg`, start its ring, drive one scenario against it in a client process, stop it."""
    from ...launcher import Cluster, node_specs

    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    with open(workdir / f"{name}.log", "w") as node_log:
        cluster = Cluster(node_specs(cfg_path), out=node_log)
        cluster.start()
        try:
            return drive({**scenario, "config": str(cfg_path), "tag": name}, workdir)
        finally:
            cluster.stop()


def run_long_prompt(model: str, k: int, piece: int, *, workdir: Path, reference: str) -> dict:
    """Start a ring of K chunk nodes (exact kernels) that prefills in pieces of `piece` tokens
    (0: whole prompts) and drive the long-prompt scenario against it.
    """
    name = f"long_k{k}_p{piece}"
    cfg = ring_config(model, k, 4)
    cfg["coordinator"]["prefill_chunk_tokens"] = piece
    s = drive_on_ring(name, cfg, {"scenario": "long", "tokens": LONG_TOKENS, "short_tokens": 64, "n": 1}, workdir)
    s.update(k=k, piece=piece, greedy_identical=s["text"] == reference)
    log(f"long prompt, ring K={k}, {'pieces of ' + str(piece) if piece else 'whole prefill'}: "
        f"TTFT {s['ttft_s']:.2f} s, a decoding request's longest token gap {s['short_gap_max_ms']:.0f} ms, "
        f"identical={s['greedy_identical']}")
    return s


def run_priority(model: str, k: int, *, workdir: Path, variant: str = "exact", background: int = 16,
                 repeats: int = 8, tokens: int = 32) -> dict:
    """A ring of K chunk nodes saturated by `background` greedy streams: a priority request's time to
    first token and tokens/s against the same request on the idle ring.
    """
    name = f"priority_k{k}_{variant}"
    cfg = ring_config(model, k, background, variant=variant)
    cfg["coordinator"]["queue_limit"] = background
    s = drive_on_ring(name, cfg, {"scenario": "priority", "background": background, "repeats": repeats,
                                  "tokens": tokens, "n": background}, workdir)
    s.update(k=k, variant=variant, tokens=tokens)
    log(f"priority request, ring K={k} {variant}: TTFT p95 {percentile(s['idle_ttft'], 0.95):.3f} s idle, "
        f"{percentile(s['loaded_ttft'], 0.95):.3f} s under {background} streams")
    return s

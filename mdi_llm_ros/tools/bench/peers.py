"""The peer a user would pick instead, measured in the same run on the same GGUF file: llama.cpp in
one process, and split over its RPC servers (one per device, one thread each), built from the
llama-cpp-python source package by `make peers` (build_peers.sh, into the model cache).
"""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

from .common import log

BUILD_SCRIPT = Path(__file__).with_name("build_peers.sh")
PEER_TOOLS = ("llama-bench", "llama-batched-bench", "rpc-server")
PROMPT_TOKENS = 16          # llama.cpp's prompts: the ring's bench prompts are 6-8 tokens


def peer_bin() -> Path:
    from ...core.models import cache_dir
    return cache_dir() / "peers" / "bin"


def peer_binaries(build: bool) -> Path:
    """Where llama-bench, llama-batched-bench and rpc-server are; builds them first if asked."""
    import os
    import sys
    where = peer_bin()
    missing = [b for b in PEER_TOOLS if not (where / b).is_file()]
    if missing and build:
        log("building llama.cpp from the llama-cpp-python source package (once; several minutes)")
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True,
                       env={**os.environ, "PY": sys.executable, "MDI_LLM_CACHE": str(where.parents[1])})
        missing = [b for b in PEER_TOOLS if not (where / b).is_file()]
    if missing:
        from ...core.errors import ConfigError
        raise ConfigError(f"--peers needs llama.cpp's {', '.join(missing)} in {where}: run `make peers`")
    return where


class PeakWatch:
    """Peak resident memory (VmHWM) of processes, read every 0.2 s until they exit."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self._procs: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, name: str, pid: int) -> None:
        self._procs[name] = pid

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in list(self._procs.items()):
                try:
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("VmHWM:"):
                                self.peaks[name] = max(self.peaks.get(name, 0), int(line.split()[1]) * 1024)
                except OSError:
                    continue

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return dict(self.peaks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rpc_servers(k: int, watch: PeakWatch) -> Iterator[list[str]]:
    """K llama.cpp RPC servers on this machine, one thread each (one per emulated device)."""
    procs, endpoints = [], []
    try:
        for i in range(k):
            port = _free_port()
            p = subprocess.Popen([str(peer_bin() / "rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(p)
            watch.add(f"rpc-server {i}", p.pid)
            endpoints.append(f"127.0.0.1:{port}")
        time.sleep(1.0)
        yield endpoints
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def batched(gguf: Path, ns: list[int], tokens: int, threads: int, rpc: list[str] | None,
            watch: PeakWatch, name: str) -> dict[int, dict]:
    """llama-batched-bench: N parallel sequences of PROMPT_TOKENS + `tokens` each. Per N: tokens/s
    generated over the whole run (prompt processing included, as the ring's figure) and during
    generation alone.
    """
    cmd = [str(peer_bin() / "llama-batched-bench"), "-m", str(gguf), "-c", str(max(ns) * (PROMPT_TOKENS + tokens) + 64),
           "-npp", str(PROMPT_TOKENS), "-ntg", str(tokens), "-npl", ",".join(map(str, ns)), "-t", str(threads),
           "--output-format", "jsonl"]
    if rpc:
        cmd += ["-ngl", "99", "--rpc", ",".join(rpc)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch.add(name, proc.pid)
    out, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed: {err[-2000:]}")
    rows = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            n = int(r["pl"])
            rows[n] = {"tokens_per_s": n * int(r["tg"]) / float(r["t"]), "tg_tokens_per_s": float(r["speed_tg"])}
    return rows


def measure(gguf: Path, ns: list[int], ks: list[int], tokens: int, threads: int) -> dict:
    """llama.cpp in one process (`threads` threads) and over K RPC servers, N parallel sequences."""
    watch = PeakWatch()
    res: dict = {"gguf": str(gguf), "prompt_tokens": PROMPT_TOKENS, "one_process": {}, "rpc": {}}
    log(f"llama.cpp, one process ({threads} threads), N in {ns}")
    res["one_process"] = batched(gguf, ns, tokens, threads, None, watch, "llama.cpp")
    for k in ks:
        log(f"llama.cpp over {k} RPC servers (1 thread each), N in {ns}")
        with rpc_servers(k, watch) as endpoints:
            res["rpc"][k] = batched(gguf, ns, tokens, 1, endpoints, watch, f"llama.cpp main (RPC {k})")
        time.sleep(0.5)
        res["rpc"][k]["peak_rss"] = {name: v for name, v in watch.peaks.items() if name.startswith("rpc-server")
                                     or name == f"llama.cpp main (RPC {k})"}
        for name in [n for n in watch.peaks if n.startswith("rpc-server")]:
            watch.peaks.pop(name)
    res["one_process_peak_rss"] = watch.stop().get("llama.cpp", 0)
    return res

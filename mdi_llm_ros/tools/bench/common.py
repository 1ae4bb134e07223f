"""What every part of the benchmark shares: the prompts, logging, percentiles, child processes."""
from __future__ import annotations

import json
import subprocess
import sys

PROMPTS = ["The history of robotics begins with", "A warehouse robot moves boxes by",
           "The main parts of a drone are", "To navigate a building, a mobile robot"]


# The long-prompt scenario (chunked prefill): ~1500 tokens of a robot's log to summarize.
LONG_PROMPT = ("Robot log. The mobile robot started its patrol at the loading dock, checked the doors of hall A, "
               "B and C, measured the temperature in the server room and found it normal, then recharged. ") * 36 \
    + "Summary of the patrol:"


LONG_TOKENS = 8                     # new tokens of the long prompt (its greedy check)


LONG_PIECES = (0, 256)              # coordinator.prefill_chunk_tokens compared: whole prompt, default pieces


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def child_json(args: list[str], what: str, timeout: float = 1800) -> dict:
    """Run `python -m mdi_llm_ros.tools.bench ARGS` (a measurement in a process of its own, so its
    peak memory is its own) and return the JSON line it prints last.
    """
    r = subprocess.run([sys.executable, "-m", "mdi_llm_ros.tools.bench", *args], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# What a ring runs: its kernels (float weights) or its quantization (integer weights, exact kernels).
VARIANTS = {"exact": ("exact", "none"), "packed": ("packed", "none"), "int4": ("exact", "int4"),
            "int8": ("exact", "int8")}


def variant_of(ring: dict) -> str:
    return ring.get("variant", ring.get("kernels", "exact"))


def ring_label(ring: dict) -> str:
    variant = variant_of(ring)
    return (f"ring K={ring['k']}" + ("" if variant == "exact" else f" {variant}")
            + (" + key" if ring.get("secret") else "")
            + (f" ({ring['model_label']})" if ring.get("model_label") else ""))


def label(s: dict) -> str:
    network = s.get("network", "localhost")
    return ring_label(s) + ("" if network == "localhost" else f", {network}")

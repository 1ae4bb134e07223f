"""Example robot node that asks the shared model through /generate.

    python -m mdi_llm_ros.robot_client --name robot_1 "Which room is the charger in?"

It is what `mdi-llm demo` runs once per robot; copy it as the starting point of
your own node. With --json it prints one JSON line with the answer and stats.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from .client import GenerateClient
from .core.config import load_config
from .core.errors import ConfigError, ErrorCode
from .session import ros_session


def ask(node, prompt: str, namespace: str = "", ready_timeout_s: float = 120.0, key: bytes | None = None,
        **kwargs):
    """Call /generate once the cluster is ready (nodes loaded, ring complete)."""
    client = GenerateClient(node, namespace, key)
    if not client.wait_for_service(ready_timeout_s):
        raise TimeoutError(f"no {client.service} within {ready_timeout_s:.0f} s")
    ready = client.wait_until_ready(ready_timeout_s)
    if ready.error_code in (ErrorCode.NOT_READY, ErrorCode.TIMEOUT):
        return ready
    return client.generate(prompt, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--name", default="robot_client", help="ROS node name of this robot")
    p.add_argument("--config", help="cluster config YAML: its namespace and discovery settings "
                   "(domain id, discovery range, static peers, transport) are used")
    p.add_argument("--namespace", default=None, help="cluster namespace (default: the config's, else none)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--chat", action="store_true", help="apply the chat template")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    namespace, key, cfg = args.namespace or "", None, None
    if args.config:
        try:
            cfg = load_config(args.config)
            key = cfg.key()
        except ConfigError as exc:
            print(f"{args.name}: {exc}", file=sys.stderr)
            return 2
        namespace = cfg.namespace if args.namespace is None else args.namespace
    with ros_session(args.name, cfg) as node:      # the config's domain and discovery settings apply
        t0 = time.monotonic()
        try:
            result = ask(node, args.prompt, namespace, key=key, use_chat_template=args.chat,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        except TimeoutError as exc:
            print(f"{args.name}: {exc}", file=sys.stderr)
            return 1
        wall = time.monotonic() - t0
        if args.json:
            print(json.dumps({"robot": args.name, "prompt": args.prompt, "wall_s": wall, **asdict(result)}))
        else:
            print(result.text if result.success else f"{result.error_code}: {result.error_message}")
        return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())

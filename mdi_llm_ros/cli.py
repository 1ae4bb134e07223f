"""`mdi-llm`: the command-line entry point (plan, model, generate, cluster, demo, bench)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .core.config import ClusterConfig, default_config_path, load_config
from .core.errors import ConfigError, RequestError
from .core.errors import ModelError
from .core.models import DEFAULT_MODEL, MARKER, PACKAGED_MODELS
from .tools.netlab import NetLabError


def _err(msg: str) -> None:
    print(f"mdi-llm: error: {msg}", file=sys.stderr)


def _load(args) -> ClusterConfig:
    path = Path(args.config) if getattr(args, "config", None) else default_config_path()
    return load_config(path)


def _plan(cfg: ClusterConfig):
    from .core.models import load_model_info
    from .core.plan import make_plan
    info = load_model_info(cfg.model.name)
    return make_plan(cfg, info), info


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `generate --local` and the ROS client (same contract)."""
    p.add_argument("prompt", help="text to continue (raw unless --chat)")
    p.add_argument("--config", help="cluster config YAML (default: config/cluster.yaml)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default from config)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=-1, help="sampler seed; -1 = random")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")


def generation_params(args, cfg: ClusterConfig):
    from .core.request import GenerateParams
    d = cfg.coordinator.defaults
    return GenerateParams(
        prompt=args.prompt, use_chat_template=args.chat,
        max_new_tokens=d.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        temperature=d.temperature if args.temperature is None else args.temperature,
        top_k=d.top_k if args.top_k is None else args.top_k,
        top_p=d.top_p if args.top_p is None else args.top_p,
        seed=args.seed, stop=tuple(args.stop))


# --- subcommands ------------------------------------------------------------------------

def cmd_plan(args) -> int:
    from .core.plan import format_loss_plans, format_plan
    cfg = _load(args)
    plan, info = _plan(cfg)
    print(f"config: {cfg.source}")
    print(format_plan(plan))
    print()
    print(format_loss_plans(plan, info))
    if args.measure:
        import torch

        from .core.chunk import measure_speed
        device = args.device or cfg.coordinator.device
        print(f"measuring this device ({device}, {torch.get_num_threads()} torch threads) ...", file=sys.stderr)
        speed = measure_speed(info, dtype=cfg.model.dtype, device=device)
        print(f"\nthis device: speed {speed:.0f} (decode layer-steps/s of this model). Write it as `speed: "
              f"{speed:.0f}` of the chunks this device runs, and set cluster.placement: speed.")
    return 0


def cmd_model(args) -> int:
    from .core.models import gguf_metadata_dir, packaged_path, prepare_model
    if args.action == "list":
        for name, spec in PACKAGED_MODELS.items():
            path = packaged_path(spec)
            ready = path is not None and path.is_file() and (gguf_metadata_dir(path) / MARKER).is_file()
            print(f"{name}\t{'prepared' if ready else 'not prepared'}\t{path or spec.pip_name}\t{spec.description}")
        return 0
    if args.action == "synth":
        from .tools.synth import synthesize
        print(synthesize(args.name, force=args.force))
        return 0
    print(prepare_model(args.name, force=args.force))
    return 0


def cmd_generate(args) -> int:
    from .core.request import validate_params
    cfg = _load(args)
    params = generation_params(args, cfg)
    validate_params(params)            # what the wire cannot carry fails here, as CODE: message
    if args.local:
        return _generate_local(cfg, params, args)
    from .client import run_cli_client
    return run_cli_client(cfg, params, stream=args.stream, wait_s=args.wait)


def _generate_local(cfg: ClusterConfig, params, args) -> int:
    from .core.local import LocalRing
    from .core.request import validate_params
    plan, info = _plan(cfg)
    validate_params(params, plan.max_context)          # fail before loading weights
    print(f"[local] loading a ring of {len(plan.chunks)} chunks in-process ...", file=sys.stderr)
    ring = LocalRing(plan, info)

    def on_piece(piece: str, token: int, count: int) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = ring.generate(params, on_piece)
    sys.stdout.write("\n")
    if not result.success:
        _err(f"{result.error_code}: {result.error_message}")
        return 1
    print(result.summary(), file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .tools.eval import run_eval
    return run_eval(args.config, args.text, args.quantization)


def cmd_status(args) -> int:
    from .tools.status import run_status
    return run_status(_load(args), wait_ready_s=args.wait_ready, as_json=args.json)


def cmd_cluster(args) -> int:
    from .launcher import run_cluster
    cfg = _load(args)
    return run_cluster(cfg, host=args.host, respawn=args.respawn, log_dir=args.log_dir, autostart=args.autostart)


def cmd_demo(args) -> int:
    from .tools.demo import run_demo
    return run_demo(_load(args), clients=args.clients, max_new_tokens=args.max_new_tokens)


def cmd_soak(args) -> int:
    from .tools.soak import soak_cluster
    return soak_cluster(_load(args), duration_s=args.duration, clients=args.clients)


def cmd_chaos(args) -> int:
    from .tools.chaos import chaos_cluster
    return chaos_cluster(_load(args), duration_s=args.duration, clients=args.clients, kill_every_s=args.kill_every,
                         down_for_s=args.down_for, permanent=args.permanent)


def cmd_bench(args) -> int:
    from .tools.bench import run_bench

    def ints(text):
        return [int(x) for x in text.split(",")] if text else None
    res = run_bench(quick=args.quick, pin=args.pin, threads=args.threads, model=args.model,
                    out_dir=Path(args.out), ks=ints(args.k), ns=ints(args.n), tokens=args.tokens,
                    netlab=args.netlab, rate=args.rate,
                    kernels=args.kernels.split(",") if args.kernels else None,
                    quantization=([q for q in args.quantization.split(",") if q] if args.quantization is not None
                                  else None),
                    long_prompt=args.long_prompt, peers=args.peers, synthetic=args.synthetic, secret=args.secret,
                    priority=args.priority)
    ok = all(s["ok"] for ring in res["rings"] for s in ring["scenarios"])
    return 0 if ok else 1


def cmd_secret(args) -> int:
    from .core.auth import new_key_file
    path = new_key_file(args.file, force=args.force)
    print(f"wrote a new key to {path} (mode 0600). Set `cluster.secret_file: {path}` in the config, and copy the "
          "file to every device and to every client that may call the cluster", file=sys.stderr)
    return 0


def cmd_netlab(args) -> int:
    from .tools.netlab import main
    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdi-llm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print which node runs which layers where, and weight memory per device")
    p.add_argument("--config", help="cluster config YAML (default: config/cluster.yaml)")
    p.add_argument("--measure", action="store_true",
                   help="also measure this device's speed (for `speed:` and cluster.placement: speed)")
    p.add_argument("--device", help="device to measure (default: the coordinator's device)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("model", help="prepare (convert) or list models")
    msub = p.add_subparsers(dest="action", required=True)
    mp = msub.add_parser("prepare", help="a packaged model ready to serve: its GGUF file, config and tokenizer "
                                         "(once; no weights are converted)")
    mp.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(PACKAGED_MODELS))
    mp.add_argument("--force", action="store_true", help="convert again even if already prepared")
    msub.add_parser("list", help="list known models and where they are")
    sp = msub.add_parser("synth", help="write a seeded random-weight model of a realistic size (GGUF Q4_0 and "
                                       "safetensors), to measure memory and speed where the weights dominate")
    sp.add_argument("name", nargs="?", default="tinyllama-1b", choices=["tinyllama-1b"])
    sp.add_argument("--force", action="store_true", help="write it again")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("generate", help="generate text (via /generate, or --local in-process)")
    add_generation_args(p)
    p.add_argument("--local", action="store_true", help="run the whole ring in this process (no ROS)")
    p.add_argument("--stream", action="store_true", help="use the streaming action, print tokens as they come")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the service to appear")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="quality of the configured ring on a fixed text: perplexity and top-1 "
                                    "agreement with float32 transformers")
    p.add_argument("--config", help="cluster config YAML (default: config/cluster.yaml)")
    p.add_argument("--text", help="a UTF-8 text (default: the public-domain text shipped with the package)")
    p.add_argument("--quantization", choices=["none", "int8", "int4"], help="override model.quantization")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("status", help="every node's heartbeat: host, layers, ready, requests, memory, drops")
    p.add_argument("--config", help="cluster config YAML (default: config/cluster.yaml)")
    p.add_argument("--wait-ready", type=float, metavar="SEC",
                   help="first wait up to SEC seconds until the ring is complete (exit 1 if it is not)")
    p.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cluster", help="start the ring's node processes from the config")
    p.add_argument("--config", help="cluster config YAML (default: config/cluster.yaml)")
    p.add_argument("--host", help="start only the nodes assigned to this host")
    p.add_argument("--respawn", action="store_true", help="restart a chunk node that dies")
    p.add_argument("--log-dir", help="ROS log directory (default: ~/.ros/log)")
    p.add_argument("--no-autostart", dest="autostart", action="store_false",
                   help="leave every node unconfigured (lifecycle), for a lifecycle manager to bring up")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("demo", help="start a localhost cluster, ask it from several robot clients, stop it")
    p.add_argument("--config", help="cluster config YAML (default: config/cluster.yaml)")
    p.add_argument("--clients", type=int, default=4, help="concurrent robot client processes")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("soak", help="load test: concurrent clients with a mixed stream, then leak checks")
    p.add_argument("--config", help="cluster config YAML (default: config/cluster.yaml)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of traffic (default 180)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.set_defaults(func=cmd_soak)

    p = sub.add_parser("chaos", help="soak while chunk nodes and the coordinator are killed (SIGKILL); "
                                     "every answer must arrive, identical")
    p.add_argument("--config", help="cluster config YAML (default: config/cluster.yaml)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of traffic (default 300)")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills (default 60)")
    p.add_argument("--down-for", type=float, default=30.0, help="seconds a killed node stays down (default 30)")
    p.add_argument("--permanent", action="store_true", help="killed chunk nodes never come back")
    p.set_defaults(func=cmd_chaos)

    p = sub.add_parser("bench", help="benchmark the ring against plain transformers (tokens/s, TTFT, memory)")
    p.add_argument("--quick", action="store_true", help="K=1,3 and N=1,4 with 24 tokens (a few minutes)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="prepared model name or local folder")
    p.add_argument("--k", help="comma-separated chunk-node counts (default 1,2,3)")
    p.add_argument("--n", help="comma-separated concurrent request counts (default 1,2,4,8,16)")
    p.add_argument("--tokens", type=int, help="new tokens per request (default 64; quick 24)")
    p.add_argument("--pin", action="store_true", help="pin node i to core i mod cores")
    p.add_argument("--threads", type=int, help="torch threads per node (default: cores / nodes)")
    p.add_argument("--kernels", help="comma-separated model.kernels to run float rings with "
                                     "(default exact,packed; with --netlab exact)")
    p.add_argument("--quantization", help="comma-separated model.quantization of further rings, each with its "
                                          "`mdi-llm eval` quality (default int4,int8; quick int4; '' for none)")
    p.add_argument("--peers", action="store_true",
                   help="also measure llama.cpp on the same GGUF file, in one process and over K of its RPC "
                        "servers (builds it once from the llama-cpp-python source package: make peers)")
    p.add_argument("--synthetic", action="store_true",
                   help="also run int4 rings (and with --peers llama.cpp) on a 1.1B synthetic model "
                        "(mdi-llm model synth tinyllama-1b, written once)")
    p.add_argument("--secret", action="store_true",
                   help="also run the largest ring at the largest N with cluster.secret_file (the cost of the "
                        "authenticated mode)")
    p.add_argument("--priority", action="store_true",
                   help="also time a priority request on an idle ring and under 16 greedy streams (K=2)")
    p.add_argument("--long-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="time to first token of a ~1500-token prompt, whole prefill against pieces "
                        "(default: on in the full run, off with --quick or --netlab)")
    p.add_argument("--out", default="bench/results", help="where results go (default bench/results)")
    p.add_argument("--netlab", action="store_true",
                   help="run the ring across emulated devices (network namespaces, needs root), "
                        "unshaped and rate-limited to --rate")
    p.add_argument("--rate", default="20mbit", help="link rate limit for --netlab (tbf; default 20mbit)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("secret", help="the team's key for the authenticated mode (cluster.secret_file)")
    ssub = p.add_subparsers(dest="action", required=True)
    sp = ssub.add_parser("new", help="write a new random key, readable by its owner only")
    sp.add_argument("file")
    sp.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_secret)

    p = sub.add_parser("netlab", help="emulated devices: network namespaces on a bridge, optional rate limit")
    p.add_argument("--name", default="mdilab", help="lab name (namespace prefix; default mdilab)")
    lsub = p.add_subparsers(dest="action", required=True)
    lp = lsub.add_parser("up", help="create one namespace per host, linked by a bridge")
    lp.add_argument("--hosts", default="robot_a,robot_b,robot_c,client", help="comma-separated host names")
    lp.add_argument("--rate", help="rate-limit every link, e.g. 20mbit (tbf)")
    lsub.add_parser("down", help="kill the lab's processes and delete its namespaces")
    lsub.add_parser("status", help="namespaces, processes and link counters")
    lsub.add_parser("probe", help="what this machine offers (namespaces, tbf, netem, fq_codel)")
    lp = lsub.add_parser("shape", help="change the rate limit of every link")
    lp.add_argument("--rate", help="e.g. 20mbit; omit to remove the limit")
    lp = lsub.add_parser("exec", help="run a command on a host: netlab exec HOST -- CMD ...")
    lp.add_argument("host")
    lp.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_netlab)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (ConfigError, ModelError, NetLabError) as exc:
        _err(str(exc))
        return 2
    except RequestError as exc:
        _err(f"{exc.code}: {exc.message}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

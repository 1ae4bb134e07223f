"""Partition planning: config + model metadata -> exact per-node assignment.

`make_plan` is the one function that the launch file, the pip launcher, the
nodes and the CLI use to decide which node runs which layers where, and which
topics connect them into a ring.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .config import ClusterConfig
from .errors import ConfigError
from .formats import DTYPE_BYTES

COORDINATOR = "coordinator"


@dataclass(frozen=True)
class NodePlan:
    """What one node process runs."""

    name: str
    role: str                 # "coordinator" or "chunk"
    host: str
    device: str
    layer_start: int
    layer_end: int            # exclusive; == layer_start when the node holds no layers
    hop: int                  # chunk: its index on the ring; coordinator: -1
    inbound_topic: str        # chunk: activations to compute; coordinator: ring output
    outbound_topic: str       # chunk: next hop; coordinator: first hop
    prev_node: str
    next_node: str
    weight_bytes: int         # estimated parameter bytes in the configured dtype
    threads: int | None
    memory_mb: float | None = None
    kv_bytes_per_position: int = 0   # KV cache one position of one request takes on this node's layers
    standby: bool = False     # a spare: off the ring in this plan (a standby chunk or coordinator)

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def last_chunk(self) -> bool:
        """The chunk whose output goes back to the coordinator."""
        return self.role == "chunk" and self.next_node == COORDINATOR


@dataclass(frozen=True)
class ClusterPlan:
    config: ClusterConfig
    model_path: str
    num_layers: int
    dtype: str
    max_context: int
    nodes: tuple[NodePlan, ...]   # coordinator first, then chunks in ring order
    spares: tuple[NodePlan, ...] = ()    # chunk nodes off the ring in this plan, then standby coordinators

    @property
    def coordinator(self) -> NodePlan:
        return self.nodes[0]

    @property
    def members(self) -> tuple[str, ...]:
        """The chunk nodes on the ring, in ring order."""
        return tuple(n.name for n in self.chunks)

    @property
    def processes(self) -> tuple[NodePlan, ...]:
        """Every node process a launcher starts: the ring's, then the spares."""
        return self.nodes + self.spares

    @property
    def kernels(self) -> str:
        return self.config.model.kernels

    @property
    def quantization(self) -> str:
        return self.config.model.quantization

    @property
    def chunks(self) -> tuple[NodePlan, ...]:
        return self.nodes[1:]

    @property
    def hosts(self) -> list[str]:
        seen: list[str] = []
        for n in self.processes:
            if n.host not in seen:
                seen.append(n.host)
        return seen

    def node(self, name: str) -> NodePlan:
        for n in self.processes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the plan; nodes: {[n.name for n in self.processes]}")

    def waves(self, local_cores: int | None = None) -> int:
        """How many waves the coordinator keeps requests in (coordinator.waves, else auto).

        Auto: one wave per chunk node, so that every device has a wave to compute while the
        others travel; chunk nodes that share the coordinator's machine count at most as
        many as it has cores (more waves than cores only shrink the micro-batches).
        """
        if self.config.coordinator.waves is not None:
            return self.config.coordinator.waves
        cores = local_cores or len(os.sched_getaffinity(0))
        here = sum(1 for n in self.chunks if n.host == self.coordinator.host)
        return max(1, min(here, cores) + len(self.chunks) - here)

    def nodes_on_host(self, host: str | None) -> list[NodePlan]:
        if host is None:
            return list(self.processes)
        if host not in self.hosts:
            raise ConfigError(f"host {host!r} runs no node in {self.config.source}; hosts: {', '.join(self.hosts)}")
        return [n for n in self.processes if n.host == host]


def ring_prefix(namespace: str) -> str:
    """Topic prefix of a cluster's ring, e.g. /mdi/ring or /team_a/mdi/ring."""
    return f"/{namespace}/mdi/ring" if namespace else "/mdi/ring"


def hop_topic(namespace: str, hop: int) -> str:
    return f"{ring_prefix(namespace)}/hop_{hop}"


def status_topic(namespace: str) -> str:
    return f"/{namespace}/mdi/status" if namespace else "/mdi/status"


def service_name(namespace: str, name: str) -> str:
    """`/generate` and `/generate_stream`, under the cluster namespace if one is set."""
    return f"/{namespace}/{name}" if namespace else f"/{name}"


def split_by_weight(num_layers: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous ranges proportional to `weights`, each with >= 1 layer (largest remainder)."""
    n = len(weights)
    if num_layers < n:
        raise ConfigError(
            f"chunks: {n} chunk nodes but only {num_layers} layers left for them; "
            "remove chunks or give the coordinator fewer layers")
    total = sum(weights)
    exact = [num_layers * w / total for w in weights]
    counts = [max(1, int(e)) for e in exact]
    while sum(counts) > num_layers:                      # the max(1, .) above over-allocated
        counts[max((i for i in range(n) if counts[i] > 1), key=lambda i: counts[i] - exact[i])] -= 1
    left = num_layers - sum(counts)
    order = sorted(range(n), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def split_capped(num_layers: int, weights: list[float], caps: list[int | None]) -> list[tuple[int, int]]:
    """Like split_by_weight, but no chunk gets more than its cap (layers that fit its memory).

    A chunk whose proportional share exceeds its cap is fixed at the cap and the rest is
    split again among the others, so slow-but-large and fast-but-small devices both fit.
    Raises ConfigError when the caps together hold fewer layers than the model has.
    """
    n = len(weights)
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        left = num_layers - sum(fixed.values())
        if not free or left < len(free):
            break
        shares = split_by_weight(left, [weights[i] for i in free])
        over = [i for i, (s, e) in zip(free, shares, strict=True) if caps[i] is not None and e - s > caps[i]]
        if not over:
            counts = dict(fixed)
            counts.update({i: e - s for i, (s, e) in zip(free, shares, strict=True)})
            ranges, start = [], 0
            for i in range(n):
                ranges.append((start, start + counts[i]))
                start += counts[i]
            return ranges
        for i in over:
            fixed[i] = caps[i]  # type: ignore[assignment]
    room = sum(c for c in caps if c is not None)
    raise ConfigError(
        f"chunks: the declared memory_mb of the chunk nodes holds {room} of the {num_layers} layers they "
        "must share; add memory_mb, add a chunk node, or give the coordinator layers")


def make_plan(config: ClusterConfig, info, members: list[str] | tuple[str, ...] | None = None) -> ClusterPlan:
    """Assign layers, devices and ring topics to every node.

    `info` is a models.ModelInfo (only num_layers, max_positions and the tensor sizes are
    used), so planning needs no weights. `members`: the chunk nodes on the ring (config
    order), None for the configured ones (every chunk that is not a standby). A takeover plans
    over the survivors with this same function: the same placement rules and memory checks;
    explicit `layers` hold only for the configured ring, any other is split by weight (or
    memory, or speed, as cluster.placement says).
    """
    L = info.num_layers
    configured = [c.name for c in config.ring_chunks]
    names = configured if members is None else [c.name for c in config.chunks if c.name in set(members)]
    if members is not None and (unknown := sorted(set(members) - {c.name for c in config.chunks})):
        raise ConfigError(f"chunks: {unknown[0]!r} is not a chunk node of {config.source}")
    if not names:
        raise ConfigError("chunks: no chunk node is left to hold the model's layers")
    ring = [config.chunk(n) for n in names]
    coord_layers = config.coordinator.layers or (0, 0)
    if coord_layers[1] > L:
        raise ConfigError(f"coordinator.layers: {list(coord_layers)} exceeds the model's {L} layers")
    first = coord_layers[1]
    explicit = ring[0].layers is not None and names == configured
    if explicit:
        ranges = [c.layers for c in ring]
        last_end = ranges[-1][1]
        if last_end != L:
            raise ConfigError(
                f"chunks[{len(ranges) - 1}].layers: ranges end at layer {last_end} but the model has "
                f"{L} layers; the last chunk must end at {L}")
    dtype_bytes = DTYPE_BYTES[config.model.dtype]
    quant = config.model.quantization
    if not explicit:
        if config.placement == "memory":
            weights = [c.memory_mb for c in ring]
        elif config.placement == "speed":
            weights = [c.speed for c in ring]
        else:
            weights = [c.weight if c.weight is not None else 1.0 for c in ring]
        per_layer = max(info.layer_bytes(i, dtype_bytes, quant) for i in range(L))
        caps = [int(c.memory_mb * 1e6 // per_layer) if c.memory_mb is not None and
                (config.placement == "speed" or members is not None) else None for c in ring]
        ranges = [(first + s, first + e) for s, e in split_capped(L - first, weights, caps)]

    ns = config.namespace
    k = len(ring)
    max_context = min(config.model.max_context or info.max_positions, info.max_positions)
    if config.model.max_context and config.model.max_context > info.max_positions:
        raise ConfigError(f"model.max_context: {config.model.max_context} exceeds the model's "
                          f"{info.max_positions} positions")

    def layer_bytes(start: int, end: int) -> int:
        return sum(info.layer_bytes(i, dtype_bytes, quant) for i in range(start, end))

    kv_layer = info.kv_bytes_per_position(dtype_bytes)
    c = config.coordinator
    nodes = [NodePlan(
        name=COORDINATOR, role="coordinator", host=c.host, device=c.device,
        layer_start=0, layer_end=first, hop=-1,
        inbound_topic=hop_topic(ns, k), outbound_topic=hop_topic(ns, 0),
        prev_node=ring[-1].name, next_node=ring[0].name,
        weight_bytes=info.head_bytes(dtype_bytes, quant) + layer_bytes(0, first), threads=c.threads,
        kv_bytes_per_position=kv_layer * first, memory_mb=c.memory_mb)]
    for i, (ch, (start, end)) in enumerate(zip(ring, ranges, strict=True)):
        nodes.append(NodePlan(
            name=ch.name, role="chunk", host=ch.host, device=ch.device,
            layer_start=start, layer_end=end, hop=i,
            inbound_topic=hop_topic(ns, i), outbound_topic=hop_topic(ns, i + 1),
            prev_node=ring[i - 1].name if i > 0 else COORDINATOR,
            next_node=ring[i + 1].name if i + 1 < k else COORDINATOR,
            weight_bytes=layer_bytes(start, end), threads=ch.threads, memory_mb=ch.memory_mb,
            kv_bytes_per_position=kv_layer * (end - start)))
    for i, node in enumerate(nodes):
        if node.memory_mb is not None and node.weight_bytes > node.memory_mb * 1e6:
            short = node.weight_bytes / 1e6 - node.memory_mb
            key = "coordinator.memory_mb" if i == 0 else f"chunks[{names_index(config, node.name)}].memory_mb"
            what = "embedding + head" + (" + layers" if node.num_layers else "") if i == 0 else \
                f"{node.num_layers} layers"
            raise ConfigError(
                f"{key}: device {node.host!r} (node {node.name!r}) needs {node.weight_bytes / 1e6:.1f} MB "
                f"for its weights ({what}) but declares {node.memory_mb:.1f} MB, short by {short:.1f} MB; "
                "give it fewer layers (layers/weight, or cluster.placement: memory), more memory, "
                "or add a device")
    spares = [NodePlan(name=ch.name, role="chunk", host=ch.host, device=ch.device, layer_start=0, layer_end=0,
                       hop=-1, inbound_topic="", outbound_topic="", prev_node="", next_node="", weight_bytes=0,
                       threads=ch.threads, memory_mb=ch.memory_mb, standby=True)
              for ch in config.chunks if ch.name not in names]
    spares += [NodePlan(name=standby_coordinator_name(host), role="coordinator", host=host, device=c.device,
                        layer_start=0, layer_end=first, hop=-1, inbound_topic="", outbound_topic="", prev_node="",
                        next_node="", weight_bytes=nodes[0].weight_bytes, threads=c.threads, memory_mb=c.memory_mb,
                        standby=True)
               for host in c.standby_hosts]
    return ClusterPlan(config=config, model_path=str(info.path), num_layers=L, dtype=config.model.dtype,
                       max_context=max_context, nodes=tuple(nodes), spares=tuple(spares))


def names_index(config: ClusterConfig, name: str) -> int:
    return [c.name for c in config.chunks].index(name)


def standby_coordinator_name(host: str) -> str:
    """The ROS node name of the standby coordinator on `host`."""
    return f"{COORDINATOR}_{host}"


def loss_plans(config: ClusterConfig, info) -> list[tuple[str, "ClusterPlan | ConfigError"]]:
    """For each chunk node of the configured ring: the plan a takeover would make without it (with
    every standby chunk), or why none fits.
    """
    out: list[tuple[str, ClusterPlan | ConfigError]] = []
    for lost in config.ring_chunks:
        survivors = [c.name for c in config.chunks if c.name != lost.name]
        try:
            out.append((lost.name, make_plan(config, info, survivors)))
        except ConfigError as exc:
            out.append((lost.name, exc))
    return out


def load_plan(config_file: str | os.PathLike) -> tuple[ClusterConfig, ClusterPlan, object]:
    """Config file -> (config, plan, model info): what every node, the launcher and the bench start from."""
    from .config import load_config
    from .models import load_model_info
    cfg = load_config(str(config_file))
    info = load_model_info(cfg.model.name)
    return cfg, make_plan(cfg, info), info


def format_plan(plan: ClusterPlan) -> str:
    """The plan as a text table (what `mdi-llm plan` prints)."""
    rows = [("node", "role", "host", "device", "layers", "#", "weights MB", "KV KB/position", "inbound", "outbound")]
    for n in plan.processes:
        layers = f"[{n.layer_start}, {n.layer_end})" if n.num_layers else "-"
        role = f"{n.role} (standby)" if n.standby else n.role
        rows.append((n.name, role, n.host, n.device, layers if not n.standby else "-",
                     str(n.num_layers) if not n.standby else "0",
                     f"{n.weight_bytes / 1e6:.1f}" if not n.standby or n.role == COORDINATOR else "0.0",
                     f"{n.kv_bytes_per_position / 1e3:.1f}" if n.num_layers and not n.standby else "-",
                     n.inbound_topic or "-", n.outbound_topic or "-"))
    weights = (f"{plan.quantization} weights (activations {plan.dtype} between layers)"
               if plan.quantization != "none" else f"{plan.dtype} weights")
    head = (f"model {plan.model_path} ({plan.num_layers} layers, {weights}, {plan.kernels} kernels, "
            f"context {plan.max_context}); "
            f"ring of {len(plan.chunks)} chunk nodes; namespace {plan.config.namespace or '(none)'}; "
            f"placement {plan.config.placement}")
    c = plan.config.coordinator
    waves = plan.waves()
    pieces = (f"prompts over {c.prefill_chunk_tokens} tokens prefilled in pieces of {c.prefill_chunk_tokens}"
              if c.prefill_chunk_tokens else "prompts prefilled whole")
    head += (f"\nschedule: up to {c.max_inflight} requests in flight"
             + (f" in {waves} wave{'s' if waves != 1 else ''}" if waves else ", each on its own") + f"; {pieces}")
    devices = [("device (host)", "nodes", "weights MB", "declared MB", "headroom MB", "KV MB at most")]
    full = c.max_inflight * plan.max_context      # positions cached at once when every request is full
    for host in plan.hosts:
        on = [n for n in plan.nodes if n.host == host]
        if not on:
            continue
        weights = sum(n.weight_bytes for n in on) / 1e6
        declared = [n.memory_mb for n in on if n.memory_mb is not None]
        total = sum(declared) if declared else None
        devices.append((host, ", ".join(n.name for n in on), f"{weights:.1f}",
                        f"{total:.0f}" if total is not None else "-",
                        f"{total - weights:.1f}" if total is not None and len(declared) == len(on) else "-",
                        f"{sum(n.kv_bytes_per_position for n in on) * full / 1e6:.0f}"))
    env = plan.config.discovery.env()
    net = ", ".join(f"{k}={v}" for k, v in env.items()) or "(inherited from the environment)"
    return "\n".join([head, _table(rows), "", "memory per device:", _table(devices),
                      f"(declared memory is for weights; besides them a device needs KV cache, at most "
                      f"{c.max_inflight} requests x {plan.max_context} positions, and each node process its "
                      "runtime: `mdi-llm bench` measures both)", "", f"discovery: {net}"])


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_loss_plans(plan: ClusterPlan, info) -> str:
    """What a takeover would do after the loss of each chunk node (what `mdi-llm plan` prints last)."""
    cfg = plan.config
    if cfg.takeover_after_s <= 0:
        return "takeover: off (cluster.takeover_after_s: 0); a lost chunk node must come back"
    lines = [f"takeover after {cfg.takeover_after_s:g} s of silence; the plan after the loss of each chunk node:"]
    for lost, after in loss_plans(cfg, info):
        if isinstance(after, ConfigError):
            lines.append(f"  {lost}: cannot be survived: {after}")
        else:
            ranges = ", ".join(f"{n.name} [{n.layer_start}, {n.layer_end})" for n in after.chunks)
            lines.append(f"  {lost}: {ranges}")
    return "\n".join(lines)

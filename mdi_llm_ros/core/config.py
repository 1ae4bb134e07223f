"""Cluster config: YAML -> validated, typed objects.

The config file is the one source of truth for which node runs which layers
where; `plan.make_plan` turns it into per-node assignments. Every error names
the offending key (e.g. ``chunks[1].layers``) and says how to fix it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .formats import DTYPE_BYTES, KERNELS, QUANTIZATIONS
from .request import defaults as request_defaults

DISCOVERY_RANGES = ("SUBNET", "LOCALHOST", "OFF", "SYSTEM_DEFAULT")
# cluster.transport -> FASTDDS_BUILTIN_TRANSPORTS ("default": leave Fast DDS's own choice)
TRANSPORTS = {"default": None, "udp": "UDPv4", "shm": "SHM", "large_data": "LARGE_DATA"}
PLACEMENTS = ("weight", "memory", "speed")
DEFAULT_CONFIG_NAME = "cluster.yaml"


_REQUEST = request_defaults()   # the request contract's defaults (srv/Generate.srv carries the same; tested)


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling used by the CLI clients when a flag is omitted (coordinator.defaults)."""

    max_new_tokens: int = _REQUEST.max_new_tokens
    temperature: float = _REQUEST.temperature
    top_k: int = _REQUEST.top_k
    top_p: float = _REQUEST.top_p


@dataclass(frozen=True)
class ModelConfig:
    name: str                      # prepared model name or local Hugging Face folder
    dtype: str = "float32"
    max_context: int | None = None  # None: the model's max_position_embeddings
    kernels: str = "exact"          # core.formats.KERNELS: exact (bit-identical to transformers) | packed
    quantization: str = "none"      # core.formats.QUANTIZATIONS: none (the float weights) | int8 | int4


@dataclass(frozen=True)
class CoordinatorConfig:
    host: str = "localhost"
    device: str = "cpu"
    layers: tuple[int, int] | None = None  # first layers held by the coordinator, [0, n)
    max_inflight: int = 8
    queue_limit: int = 32
    request_timeout_s: float = 120.0
    heartbeat_timeout_s: float = 3.0
    ready_timeout_s: float = 120.0
    threads: int | None = None
    memory_mb: float | None = None         # declared memory budget for embedding + head (+ layers)
    waves: int | None = None               # None: auto (ClusterPlan.waves); 0: off
    prefill_chunk_tokens: int = 256        # longer prompts are prefilled in pieces of this many tokens; 0: whole
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    standby_hosts: tuple[str, ...] = ()    # hosts that run a standby coordinator (failover), in takeover order
    priority_slots: int = 2                # requests in flight beyond max_inflight, for priority > 0 only
    priority_aging_s: float = 10.0         # a queued request gains one priority level per this many seconds


@dataclass(frozen=True)
class ChunkConfig:
    name: str
    host: str = "localhost"
    device: str = "cpu"
    layers: tuple[int, int] | None = None  # explicit [start, end)
    weight: float | None = None            # relative share for automatic splitting
    memory_mb: float | None = None         # declared device memory budget for weights
    speed: float | None = None             # relative device speed (placement: speed)
    threads: int | None = None
    max_cached_requests: int = 64
    cache_idle_timeout_s: float = 600.0
    standby: bool = False                  # a spare: holds no layers until a takeover gives it some


@dataclass(frozen=True)
class DiscoveryConfig:
    """How the devices find each other: every node and client started from the
    config gets these as ROS / Fast DDS environment variables (None: inherit).
    """

    domain_id: int | None = None           # ROS_DOMAIN_ID
    discovery_range: str | None = None     # ROS_AUTOMATIC_DISCOVERY_RANGE
    static_peers: tuple[str, ...] = ()     # ROS_STATIC_PEERS (unicast discovery, no multicast needed)
    transport: str = "default"             # FASTDDS_BUILTIN_TRANSPORTS via TRANSPORTS

    def env(self) -> dict[str, str]:
        """The environment variables these settings mean."""
        out: dict[str, str] = {}
        if self.domain_id is not None:
            out["ROS_DOMAIN_ID"] = str(self.domain_id)
        if self.discovery_range is not None:
            out["ROS_AUTOMATIC_DISCOVERY_RANGE"] = self.discovery_range
        if self.static_peers:
            out["ROS_STATIC_PEERS"] = ";".join(self.static_peers)
        if TRANSPORTS[self.transport]:
            out["FASTDDS_BUILTIN_TRANSPORTS"] = TRANSPORTS[self.transport]
        return out


@dataclass(frozen=True)
class ClusterConfig:
    namespace: str
    model: ModelConfig
    coordinator: CoordinatorConfig
    chunks: tuple[ChunkConfig, ...]
    heartbeat_period_s: float = 0.5
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    placement: str = "weight"
    source: str = "<dict>"
    secret_file: str | None = None          # the team's key (authenticated mode); None: plain mode
    auth_max_age_s: float = 30.0            # authenticated messages older than this are refused
    takeover_after_s: float = 10.0          # a chunk node silent this long hands its layers to the others; 0: off

    @property
    def ring_chunks(self) -> tuple[ChunkConfig, ...]:
        """The chunk nodes of the configured plan (standbys hold no layers until a takeover)."""
        return tuple(c for c in self.chunks if not c.standby)

    @property
    def standby_chunks(self) -> tuple[ChunkConfig, ...]:
        return tuple(c for c in self.chunks if c.standby)

    def chunk(self, name: str) -> ChunkConfig:
        for c in self.chunks:
            if c.name == name:
                return c
        raise KeyError(name)

    def key(self) -> bytes | None:
        """The team's key from secret_file, or None in plain mode."""
        if self.secret_file is None:
            return None
        from .auth import load_key
        return load_key(self.secret_file)


def apply_discovery_env(config: ClusterConfig, env: dict | None = None) -> dict:
    """Put the config's discovery settings into `env` (default: os.environ), before rclpy.init."""
    target = os.environ if env is None else env
    target.update(config.discovery.env())
    return target


# --- validation helpers --------------------------------------------------------

def _check_keys(obj: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            raise ConfigError(
                f"{where}.{key}: unknown key; allowed keys are {', '.join(sorted(allowed))}")
    for key in required:
        if key not in obj:
            raise ConfigError(f"{where}.{key}: required key is missing")
    return obj


def _int(obj: dict, key: str, where: str, default: Any, minimum: int | None = None) -> Any:
    value = obj.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}.{key}: must be >= {minimum}, got {value}")
    return value


def _float(obj: dict, key: str, where: str, default: Any, *, positive: bool = False,
           minimum: float | None = None, maximum: float | None = None) -> Any:
    value = obj.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{where}.{key}: must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}.{key}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}.{key}: must be <= {maximum}, got {value}")
    return float(value)


def _str(obj: dict, key: str, where: str, default: Any) -> Any:
    value = obj.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def _name(obj: dict, key: str, where: str, default: Any) -> str:
    value = _str(obj, key, where, default)
    if not value.replace("_", "a").isalnum() or not value[0].isalpha():
        raise ConfigError(
            f"{where}.{key}: {value!r} is not a valid ROS name; use letters, digits and '_', "
            "starting with a letter")
    return value


def _device(obj: dict, where: str, default: str) -> str:
    value = _str(obj, "device", where, default)
    kind, _, index = value.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ConfigError(f"{where}.device: {value!r} is not a device; use cpu, cuda, cuda:N or mps")
    return value


def _layers(obj: dict, where: str) -> tuple[int, int] | None:
    value = obj.get("layers")
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{where}.layers: expected [start, end) as two integers, got {value!r}")
    start, end = value
    if start < 0 or end <= start:
        raise ConfigError(
            f"{where}.layers: [{start}, {end}) must hold at least one layer (0 <= start < end)")
    return (start, end)


# --- parsing ---------------------------------------------------------------------

def parse_config(data: Any, source: str = "<dict>") -> ClusterConfig:
    """Validate a config mapping (as loaded from YAML) into a ClusterConfig."""
    top = _check_keys(data, "config", {"cluster", "model", "coordinator", "chunks"},
                      {"model", "chunks"})

    cluster = _check_keys(top.get("cluster", {}) or {}, "cluster",
                          {"namespace", "heartbeat_period_s", "domain_id", "discovery_range", "static_peers",
                           "transport", "placement", "secret_file", "auth_max_age_s", "takeover_after_s"})
    namespace = cluster.get("namespace", "")
    if not isinstance(namespace, str) or (namespace and not all(
            part.replace("_", "a").isalnum() and part[0].isalpha()
            for part in namespace.strip("/").split("/"))):
        raise ConfigError(
            f"cluster.namespace: {namespace!r} is not a valid ROS namespace; use e.g. 'team_a' or ''")
    heartbeat = _float(cluster, "heartbeat_period_s", "cluster", 0.5, positive=True)
    secret_file = cluster.get("secret_file")
    if secret_file is not None:
        secret_file = _str(cluster, "secret_file", "cluster", None)
        base = Path(source).parent if source != "<dict>" else Path.cwd()
        secret_file = str((base / os.path.expanduser(secret_file)).resolve())
    auth_max_age = _float(cluster, "auth_max_age_s", "cluster", 30.0, positive=True)
    takeover_after = _float(cluster, "takeover_after_s", "cluster", 10.0, minimum=0.0)
    discovery = _discovery(cluster)
    placement = cluster.get("placement", "weight")
    if placement not in PLACEMENTS:
        raise ConfigError(f"cluster.placement: {placement!r} is not a placement; use one of {', '.join(PLACEMENTS)}")

    m = _check_keys(top["model"], "model", {"name", "dtype", "max_context", "kernels", "quantization"}, {"name"})
    dtype = m.get("dtype", "float32")
    if dtype not in tuple(DTYPE_BYTES):
        raise ConfigError(f"model.dtype: {dtype!r} is not supported; use one of {', '.join(tuple(DTYPE_BYTES))}")
    kernels = m.get("kernels", "exact")
    if kernels not in KERNELS:
        raise ConfigError(f"model.kernels: {kernels!r} is not a choice; use one of {', '.join(KERNELS)}")
    if kernels == "packed" and dtype != "float32":
        raise ConfigError(f"model.kernels: packed computes float32 only; set model.dtype: float32 "
                          f"(is {dtype}) or model.kernels: exact")
    quantization = m.get("quantization", "none")
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization: {quantization!r} is not a choice; use one of "
                          f"{', '.join(QUANTIZATIONS)}")
    if quantization != "none" and kernels == "packed":
        raise ConfigError(f"model.kernels: packed reorders float weights; with model.quantization: {quantization} "
                          "the weights are integers: set model.kernels: exact (or quantization: none)")
    model = ModelConfig(name=_str(m, "name", "model", None), dtype=dtype,
                        max_context=_int(m, "max_context", "model", None, minimum=2), kernels=kernels,
                        quantization=quantization)

    c = _check_keys(top.get("coordinator", {}) or {}, "coordinator",
                    {"host", "device", "layers", "max_inflight", "queue_limit", "request_timeout_s",
                     "heartbeat_timeout_s", "ready_timeout_s", "threads", "memory_mb", "waves", "prefill_chunk_tokens",
                     "defaults", "standby_hosts", "priority_slots", "priority_aging_s"})
    coord_layers = _layers(c, "coordinator")
    if coord_layers is not None and coord_layers[0] != 0:
        raise ConfigError(
            f"coordinator.layers: the coordinator holds the first layers, so start must be 0, "
            f"got {list(coord_layers)}")
    d = _check_keys(c.get("defaults", {}) or {}, "coordinator.defaults",
                    {"max_new_tokens", "temperature", "top_k", "top_p"})
    sampling = SamplingDefaults(
        max_new_tokens=_int(d, "max_new_tokens", "coordinator.defaults", _REQUEST.max_new_tokens, minimum=1),
        temperature=_float(d, "temperature", "coordinator.defaults", _REQUEST.temperature, minimum=0.0),
        top_k=_int(d, "top_k", "coordinator.defaults", _REQUEST.top_k, minimum=0),
        top_p=_float(d, "top_p", "coordinator.defaults", _REQUEST.top_p, positive=True, maximum=1.0))
    coordinator = CoordinatorConfig(
        host=_name(c, "host", "coordinator", "localhost"),
        device=_device(c, "coordinator", "cpu"),
        layers=coord_layers,
        max_inflight=_int(c, "max_inflight", "coordinator", 8, minimum=1),
        queue_limit=_int(c, "queue_limit", "coordinator", 32, minimum=0),
        request_timeout_s=_float(c, "request_timeout_s", "coordinator", 120.0, positive=True),
        heartbeat_timeout_s=_float(c, "heartbeat_timeout_s", "coordinator", 3.0, positive=True),
        ready_timeout_s=_float(c, "ready_timeout_s", "coordinator", 120.0, positive=True),
        threads=_int(c, "threads", "coordinator", None, minimum=1),
        memory_mb=_float(c, "memory_mb", "coordinator", None, positive=True),
        waves=_int(c, "waves", "coordinator", None, minimum=0),
        prefill_chunk_tokens=_int(c, "prefill_chunk_tokens", "coordinator", 256, minimum=0),
        defaults=sampling, standby_hosts=_standby_hosts(c),
        priority_slots=_int(c, "priority_slots", "coordinator", 2, minimum=0),
        priority_aging_s=_float(c, "priority_aging_s", "coordinator", 10.0, positive=True))

    raw_chunks = top["chunks"]
    if not isinstance(raw_chunks, list) or not raw_chunks:
        raise ConfigError("chunks: expected a non-empty list of chunk nodes")
    chunks: list[ChunkConfig] = []
    names = set()
    for i, ch in enumerate(raw_chunks):
        where = f"chunks[{i}]"
        _check_keys(ch, where, {"name", "host", "device", "layers", "weight", "memory_mb", "speed", "threads",
                                "max_cached_requests", "cache_idle_timeout_s", "standby"})
        name = _name(ch, "name", where, f"chunk_{i}")
        if name in names or name == "coordinator":
            raise ConfigError(f"{where}.name: {name!r} is used twice; node names must be unique")
        names.add(name)
        layers = _layers(ch, where)
        weight = _float(ch, "weight", where, None, positive=True)
        if layers is not None and weight is not None:
            raise ConfigError(f"{where}: give either layers or weight, not both")
        standby = ch.get("standby", False)
        if not isinstance(standby, bool):
            raise ConfigError(f"{where}.standby: expected true or false, got {standby!r}")
        if standby and layers is not None:
            raise ConfigError(f"{where}: a standby chunk holds no layers until a takeover gives it some; "
                              "remove its layers (or standby)")
        chunks.append(ChunkConfig(
            name=name, host=_name(ch, "host", where, "localhost"), device=_device(ch, where, "cpu"),
            layers=layers, weight=weight,
            memory_mb=_float(ch, "memory_mb", where, None, positive=True),
            speed=_float(ch, "speed", where, None, positive=True),
            threads=_int(ch, "threads", where, None, minimum=1),
            max_cached_requests=_int(ch, "max_cached_requests", where, 64, minimum=1),
            cache_idle_timeout_s=_float(ch, "cache_idle_timeout_s", where, 600.0, positive=True),
            standby=standby))

    if all(ch.standby for ch in chunks):
        raise ConfigError("chunks: every chunk is a standby; at least one must hold layers (standby: false)")
    where_of = {ch.name: f"chunks[{i}]" for i, ch in enumerate(chunks)}
    explicit = [ch.layers is not None for ch in chunks if not ch.standby]
    if any(explicit) and not all(explicit):
        missing = [where_of[ch.name] for ch in chunks if not ch.standby and ch.layers is None]
        raise ConfigError(
            f"{missing[0]}.layers: some chunks give explicit layers and others do not; "
            "give layers to every chunk, or use weight for all of them")
    if placement != "weight":
        key = "memory_mb" if placement == "memory" else "speed"
        for ch in chunks:
            if ch.layers is not None or ch.weight is not None:
                raise ConfigError(
                    f"{where_of[ch.name]}: cluster.placement is {placement!r}, so layers come from each chunk's "
                    f"{key}; remove its {'layers' if ch.layers is not None else 'weight'}")
            if getattr(ch, key) is None:
                raise ConfigError(
                    f"{where_of[ch.name]}.{key}: required when cluster.placement is {placement!r} "
                    f"(layers are split in proportion to it)")
    if all(explicit):
        expected = coordinator.layers[1] if coordinator.layers else 0
        for ch in chunks:
            if ch.standby:
                continue
            start, end = ch.layers  # type: ignore[misc]
            if start != expected:
                what = "overlaps the previous range" if start < expected else "leaves a gap"
                raise ConfigError(
                    f"{where_of[ch.name]}.layers: [{start}, {end}) {what}; ranges must be contiguous in ring "
                    f"order, so this chunk must start at layer {expected}")
            expected = end

    if kernels == "packed":
        for where, dev in [("coordinator", coordinator.device)] + [(f"chunks[{i}]", ch.device)
                                                                   for i, ch in enumerate(chunks)]:
            if dev != "cpu":
                raise ConfigError(f"{where}.device: {dev!r}, but model.kernels: packed runs on the CPU only; "
                                  "use device: cpu or model.kernels: exact")
    return ClusterConfig(namespace=namespace.strip("/"), model=model, coordinator=coordinator,
                         chunks=tuple(chunks), heartbeat_period_s=heartbeat, discovery=discovery,
                         placement=placement, source=source, secret_file=secret_file,
                         auth_max_age_s=auth_max_age, takeover_after_s=takeover_after)


def _standby_hosts(c: dict) -> tuple[str, ...]:
    hosts = c.get("standby_hosts", []) or []
    if not isinstance(hosts, list):
        raise ConfigError(f"coordinator.standby_hosts: expected a list of host names, got {hosts!r}")
    out = tuple(_name({"host": h}, "host", f"coordinator.standby_hosts[{i}]", None) for i, h in enumerate(hosts))
    if len(set(out)) != len(out):
        raise ConfigError("coordinator.standby_hosts: a host is listed twice")
    return out


def _discovery(cluster: dict) -> DiscoveryConfig:
    domain_id = _int(cluster, "domain_id", "cluster", None, minimum=0)
    if domain_id is not None and domain_id > 232:
        raise ConfigError(f"cluster.domain_id: {domain_id} is out of range; ROS 2 domain ids are 0..232 "
                          "(0..101 is safe on every Linux)")
    rng = cluster.get("discovery_range")
    if rng is not None and (not isinstance(rng, str) or rng.upper() not in DISCOVERY_RANGES):
        raise ConfigError(f"cluster.discovery_range: {rng!r} is not a range; use one of "
                          f"{', '.join(DISCOVERY_RANGES)} (or leave it out to inherit the environment)")
    peers = cluster.get("static_peers", []) or []
    if isinstance(peers, str):
        peers = [p for p in peers.replace(",", ";").split(";") if p.strip()]
    if not isinstance(peers, list) or not all(isinstance(p, str) and p.strip() and " " not in p.strip()
                                              for p in peers):
        raise ConfigError(f"cluster.static_peers: expected a list of addresses or host names, got {peers!r}")
    transport = cluster.get("transport", "default")
    if transport not in TRANSPORTS:
        raise ConfigError(f"cluster.transport: {transport!r} is not a transport; use one of "
                          f"{', '.join(TRANSPORTS)}")
    return DiscoveryConfig(domain_id=domain_id, discovery_range=rng.upper() if rng else None,
                           static_peers=tuple(p.strip() for p in peers), transport=transport)


def load_config(path: str | os.PathLike) -> ClusterConfig:
    """Read and validate a YAML cluster config file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; give the path of a cluster config YAML "
                          "(--config FILE for mdi-llm, config:=FILE for ros2 launch)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    return parse_config(data, source=str(p))


def default_config_path() -> Path:
    """Where the default config is: $MDI_LLM_CONFIG, ./config/cluster.yaml, or the installed share dir."""
    env = os.environ.get("MDI_LLM_CONFIG")
    if env:
        return Path(env)
    local = Path.cwd() / "config" / DEFAULT_CONFIG_NAME
    if local.is_file():
        return local
    import sys
    for prefix in [*os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep), sys.prefix]:
        candidate = Path(prefix) / "share" / "mdi_llm_ros" / "config" / DEFAULT_CONFIG_NAME
        if prefix and candidate.is_file():
            return candidate
    raise ConfigError("no cluster config found: pass --config FILE or set MDI_LLM_CONFIG")

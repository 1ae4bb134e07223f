"""Config validation: every invalid config is rejected with a message naming the key."""
import pytest

from mdi_llm_ros.core.config import load_config, parse_config
from mdi_llm_ros.core.errors import ConfigError


def base(**over):
    cfg = {"model": {"name": "m"}, "chunks": [{"name": "a"}, {"name": "b"}]}
    cfg.update(over)
    return cfg


INVALID = [
    ("unknown top key", {**base(), "chunk": []}, "config.chunk"),
    ("missing model", {"chunks": [{"name": "a"}]}, "config.model"),
    ("missing chunks", {"model": {"name": "m"}}, "config.chunks"),
    ("empty chunks", base(chunks=[]), "chunks"),
    ("bad dtype", base(model={"name": "m", "dtype": "int8"}), "model.dtype"),
    ("unknown model key", base(model={"name": "m", "quant": 4}), "model.quant"),
    ("unknown chunk key", base(chunks=[{"name": "a", "wieght": 2}]), "chunks[0].wieght"),
    ("duplicate names", base(chunks=[{"name": "a"}, {"name": "a"}]), "chunks[1].name"),
    ("bad node name", base(chunks=[{"name": "chunk-0"}]), "chunks[0].name"),
    ("layers and weight", base(chunks=[{"name": "a", "layers": [0, 2], "weight": 1}]), "chunks[0]"),
    ("empty range", base(chunks=[{"name": "a", "layers": [3, 3]}]), "chunks[0].layers"),
    ("range not a pair", base(chunks=[{"name": "a", "layers": [0, 2, 4]}]), "chunks[0].layers"),
    ("gap", base(chunks=[{"name": "a", "layers": [0, 2]}, {"name": "b", "layers": [3, 6]}]), "chunks[1].layers"),
    ("overlap", base(chunks=[{"name": "a", "layers": [0, 3]}, {"name": "b", "layers": [2, 6]}]), "chunks[1].layers"),
    ("mixed explicit", base(chunks=[{"name": "a", "layers": [0, 3]}, {"name": "b"}]), "chunks[1].layers"),
    ("negative weight", base(chunks=[{"name": "a", "weight": -1}]), "chunks[0].weight"),
    ("bad device", base(chunks=[{"name": "a", "device": "gpu0"}]), "chunks[0].device"),
    ("coordinator layers not at 0", base(coordinator={"layers": [1, 2]}), "coordinator.layers"),
    ("max_inflight zero", base(coordinator={"max_inflight": 0}), "coordinator.max_inflight"),
    ("unknown coordinator key", base(coordinator={"max_infligth": 4}), "coordinator.max_infligth"),
    ("bad default top_p", base(coordinator={"defaults": {"top_p": 2}}), "coordinator.defaults.top_p"),
    ("bad namespace", base(cluster={"namespace": "team a"}), "cluster.namespace"),
    ("string as number", base(coordinator={"queue_limit": "ten"}), "coordinator.queue_limit"),
    ("chunks first range not at 0", base(chunks=[{"name": "a", "layers": [1, 4]}]), "chunks[0].layers"),
    ("domain id out of range", base(cluster={"domain_id": 300}), "cluster.domain_id"),
    ("bad discovery range", base(cluster={"discovery_range": "LAN"}), "cluster.discovery_range"),
    ("bad static peers", base(cluster={"static_peers": [1, 2]}), "cluster.static_peers"),
    ("bad transport", base(cluster={"transport": "tcp"}), "cluster.transport"),
    ("bad placement", base(cluster={"placement": "random"}), "cluster.placement"),
    ("placement memory without memory_mb", base(cluster={"placement": "memory"},
                                                chunks=[{"name": "a", "memory_mb": 100}, {"name": "b"}]),
     "chunks[1].memory_mb"),
    ("placement speed with weight", base(cluster={"placement": "speed"},
                                         chunks=[{"name": "a", "speed": 1, "weight": 2}]), "chunks[0]"),
    ("negative speed", base(chunks=[{"name": "a", "speed": -3}]), "chunks[0].speed"),
]


@pytest.mark.parametrize("label,data,key", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_config_names_the_key(label, data, key):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert str(exc.value).startswith(key), f"{label}: {exc.value}"


def test_valid_config_defaults():
    cfg = parse_config(base())
    assert [c.name for c in cfg.chunks] == ["a", "b"]
    assert cfg.coordinator.max_inflight == 8 and cfg.model.dtype == "float32"
    assert cfg.namespace == ""


def test_discovery_settings_become_environment():
    from mdi_llm_ros.core.config import apply_discovery_env
    cfg = parse_config(base(cluster={"domain_id": 7, "discovery_range": "localhost", "transport": "udp",
                                     "static_peers": ["10.0.0.11", "robot_b.local"], "namespace": "team_a"}))
    assert cfg.discovery.env() == {"ROS_DOMAIN_ID": "7", "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
                                   "ROS_STATIC_PEERS": "10.0.0.11;robot_b.local",
                                   "FASTDDS_BUILTIN_TRANSPORTS": "UDPv4"}
    env = apply_discovery_env(cfg, {"ROS_DOMAIN_ID": "3", "PATH": "/bin"})
    assert env["ROS_DOMAIN_ID"] == "7" and env["PATH"] == "/bin"
    # unset keys inherit the environment: nothing is written for them
    assert parse_config(base()).discovery.env() == {}
    assert parse_config(base(cluster={"static_peers": "10.0.0.1;10.0.0.2"})).discovery.static_peers == \
        ("10.0.0.1", "10.0.0.2")


def test_default_config_file_is_valid(tmp_path):
    from pathlib import Path
    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "cluster.yaml")
    assert len(cfg.chunks) == 3 and all(c.host == "localhost" and c.device == "cpu" for c in cfg.chunks)
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.model.dtype == "float32"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)

"""Partition planning from config + model metadata (no weights needed)."""
import pytest

from mdi_llm_ros.core.config import parse_config
from mdi_llm_ros.core.errors import ConfigError
from mdi_llm_ros.core.models import load_model_info
from mdi_llm_ros.core.plan import format_plan, make_plan, split_by_weight


@pytest.mark.parametrize("n,weights,expected", [
    (30, [1, 1, 1], [(0, 10), (10, 20), (20, 30)]),
    (30, [2, 1], [(0, 20), (20, 30)]),
    (7, [1, 1, 1], [(0, 3), (3, 5), (5, 7)]),
    (3, [100, 1, 1], [(0, 1), (1, 2), (2, 3)]),
    (10, [100, 1, 1], [(0, 8), (8, 9), (9, 10)]),
    (10, [1, 3], [(0, 3), (3, 10)]),
])
def test_split_by_weight(n, weights, expected):
    ranges = split_by_weight(n, weights)
    assert ranges == expected
    assert ranges[0][0] == 0 and ranges[-1][1] == n and all(e > s for s, e in ranges)


def test_too_many_chunks():
    with pytest.raises(ConfigError, match="only 2 layers"):
        split_by_weight(2, [1, 1, 1])


def test_plan_ring_topology(smol_dir):
    info = load_model_info(smol_dir)
    cfg = parse_config({"model": {"name": str(smol_dir)}, "cluster": {"namespace": "team_a"},
                        "coordinator": {"layers": [0, 2], "host": "base"},
                        "chunks": [{"name": "a", "host": "r1"}, {"name": "b", "host": "r2", "weight": 3}]})
    plan = make_plan(cfg, info)
    coord, a, b = plan.nodes
    assert (coord.layer_start, coord.layer_end) == (0, 2)
    assert (a.layer_start, a.layer_end, b.layer_start, b.layer_end) == (2, 9, 9, 30)  # 28 layers 1:3
    assert coord.outbound_topic == a.inbound_topic == "/team_a/mdi/ring/hop_0"
    assert a.outbound_topic == b.inbound_topic == "/team_a/mdi/ring/hop_1"
    assert b.outbound_topic == coord.inbound_topic == "/team_a/mdi/ring/hop_2"
    assert (a.prev_node, a.next_node, b.next_node) == ("coordinator", "b", "coordinator")
    # weights: 30 identical layers of 14.16 MB in float32
    assert a.weight_bytes == 7 * info.layer_bytes(0, 4)
    assert coord.weight_bytes == info.head_bytes(4) + 2 * info.layer_bytes(0, 4)
    assert [n.name for n in plan.nodes_on_host("r2")] == ["b"]
    with pytest.raises(ConfigError, match="host 'r9'"):
        plan.nodes_on_host("r9")
    assert "hop_0" in format_plan(plan)
    assert "prompts over 256 tokens prefilled in pieces of 256" in format_plan(plan)


def test_plan_rejects_bad_explicit_end_and_memory(smol_dir):
    info = load_model_info(smol_dir)
    chunks = [{"name": "a", "layers": [0, 10]}, {"name": "b", "layers": [10, 20]}]
    cfg = parse_config({"model": {"name": "x"}, "chunks": chunks})
    with pytest.raises(ConfigError, match=r"chunks\[1\].layers: .*must end at 30"):
        make_plan(cfg, info)
    cfg = parse_config({"model": {"name": "x"},
                        "chunks": [{"name": "a", "host": "robot_a", "memory_mb": 100}, {"name": "b"}]})
    with pytest.raises(ConfigError, match=r"chunks\[0\].memory_mb: device 'robot_a' \(node 'a'\) needs 212.4 MB"
                                          r".*declares 100.0 MB, short by 112.4 MB"):
        make_plan(cfg, info)
    cfg = parse_config({"model": {"name": "x"}, "coordinator": {"host": "base", "memory_mb": 50},
                        "chunks": [{"name": "a"}]})
    with pytest.raises(ConfigError,
                       match=r"coordinator.memory_mb: device 'base' .*embedding \+ head.*short by 63.2 MB"):
        make_plan(cfg, info)


def test_placement_by_memory_and_speed(smol_dir):
    info = load_model_info(smol_dir)                    # 30 layers of 14.16 MB (float32)
    cfg = parse_config({"model": {"name": "x"}, "cluster": {"placement": "memory"},
                        "chunks": [{"name": "big", "host": "r1", "memory_mb": 300},
                                   {"name": "small", "host": "r2", "memory_mb": 150}]})
    plan = make_plan(cfg, info)
    assert [c.num_layers for c in plan.chunks] == [20, 10]          # 2:1, like the memory
    text = format_plan(plan)
    assert "memory per device" in text and "r1" in text and "283.2" in text   # 20 x 14.16 MB

    # Speed first, but never more layers than a device's memory holds: the fast robot has
    # room for 10 layers (150 MB), so the slower ones share the other 20 by speed.
    cfg = parse_config({"model": {"name": "x"}, "cluster": {"placement": "speed"},
                        "chunks": [{"name": "fast", "speed": 6, "memory_mb": 150},
                                   {"name": "mid", "speed": 2}, {"name": "slow", "speed": 2}]})
    assert [c.num_layers for c in make_plan(cfg, info).chunks] == [10, 10, 10]
    cfg = parse_config({"model": {"name": "x"}, "cluster": {"placement": "speed"},
                        "chunks": [{"name": "fast", "speed": 3}, {"name": "slow", "speed": 1}]})
    assert [c.num_layers for c in make_plan(cfg, info).chunks] == [23, 7]           # 22.5 : 7.5

    # Not enough memory on all devices together: refused, with what is missing.
    cfg = parse_config({"model": {"name": "x"}, "cluster": {"placement": "speed"},
                        "chunks": [{"name": "a", "speed": 1, "memory_mb": 150},
                                   {"name": "b", "speed": 1, "memory_mb": 150}]})
    with pytest.raises(ConfigError, match="holds 20 of the 30 layers"):
        make_plan(cfg, info)
    cfg = parse_config({"model": {"name": "x"}, "cluster": {"placement": "memory"},
                        "chunks": [{"name": "a", "host": "r1", "memory_mb": 200},
                                   {"name": "b", "host": "r2", "memory_mb": 200}]})
    with pytest.raises(ConfigError, match=r"device 'r1' .*short by 12.4 MB"):
        make_plan(cfg, info)


@pytest.mark.parametrize("name", ["robots.yaml", "netlab.yaml"])
def test_shipped_multi_device_configs_plan(smol_dir, name):
    from pathlib import Path

    from mdi_llm_ros.core.config import load_config
    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / name)
    plan = make_plan(cfg, load_model_info(smol_dir))
    assert plan.hosts == ["robot_a", "robot_b", "robot_c"]
    assert cfg.discovery.env()["ROS_DOMAIN_ID"] == "42"
    assert sum(n.num_layers for n in plan.chunks) == 30


def test_waves_default_to_devices_that_can_compute_at_once(smol_dir):
    info = load_model_info(smol_dir)

    def plan(hosts, **coordinator):
        return make_plan(parse_config({"model": {"name": "x"}, "coordinator": {"host": "a", **coordinator},
                                       "chunks": [{"name": f"c{i}", "host": h} for i, h in enumerate(hosts)]}), info)
    assert plan(["a", "a", "a"]).waves(local_cores=2) == 2      # three chunks share two cores
    assert plan(["a", "a", "a"]).waves(local_cores=8) == 3
    assert plan(["a", "b", "c"]).waves(local_cores=2) == 3      # one per device
    assert plan(["a"]).waves(local_cores=2) == 1
    assert plan(["a", "b"], waves=0).waves(local_cores=2) == 0  # off: every request on its own
    with pytest.raises(ConfigError, match="coordinator.waves"):
        parse_config({"model": {"name": "x"}, "coordinator": {"waves": -1}, "chunks": [{"name": "c"}]})


def test_plan_kv_cache_per_position_is_what_a_chunk_holds(tiny_dir):
    """The plan's KV bytes per position (what `mdi-llm plan` prints, and its 'at most' per device)
    are the bytes a chunk's cache really takes per position of a request."""
    import torch

    from mdi_llm_ros.core.chunk import ChunkExecutor
    from mdi_llm_ros.core.kvcache import BLOCK_TOKENS
    info = load_model_info(tiny_dir)
    cfg = parse_config({"model": {"name": str(tiny_dir), "max_context": 512},
                        "coordinator": {"host": "base", "max_inflight": 64, "queue_limit": 64},
                        "chunks": [{"name": "a", "host": "r1"}, {"name": "b", "host": "r2"}]})
    plan = make_plan(cfg, info)
    coord, a, b = plan.nodes
    assert coord.kv_bytes_per_position == 0 and a.kv_bytes_per_position > 0
    chunk = ChunkExecutor(info, a.layer_start, a.layer_end)
    chunk.forward(1, 0, 0, torch.randn(1, 3 * BLOCK_TOKENS, info.hidden_size))   # whole blocks: no empty tail
    assert chunk.kv_cache_bytes == 3 * BLOCK_TOKENS * a.kv_bytes_per_position
    text = format_plan(plan)
    r1 = next(line for line in text.splitlines() if line.startswith("r1 "))
    assert r1.split()[-1] == f"{a.kv_bytes_per_position * 64 * 512 / 1e6:.0f}" == "25"   # 3 layers of 256 B
    assert "at most 64 requests x 512 positions" in text

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
    assert a.weight_bytes == 7 * info.layer_bytes(0)
    assert coord.weight_bytes == info.head_bytes() + 2 * info.layer_bytes(0)
    assert [n.name for n in plan.nodes_on_host("r2")] == ["b"]
    with pytest.raises(ConfigError, match="host 'r9'"):
        plan.nodes_on_host("r9")
    assert "hop_0" in format_plan(plan)


def test_plan_rejects_bad_explicit_end_and_memory(smol_dir):
    info = load_model_info(smol_dir)
    cfg = parse_config({"model": {"name": "x"}, "chunks": [{"name": "a", "layers": [0, 10]},
                                                            {"name": "b", "layers": [10, 20]}]})
    with pytest.raises(ConfigError, match=r"chunks\[1\].layers: .*must end at 30"):
        make_plan(cfg, info)
    cfg = parse_config({"model": {"name": "x"}, "chunks": [{"name": "a", "memory_mb": 100}, {"name": "b"}]})
    with pytest.raises(ConfigError, match=r"chunks\[0\].memory_mb: node 'a' .*short by 112.4 MB"):
        make_plan(cfg, info)

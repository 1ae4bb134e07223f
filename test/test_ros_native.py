"""The nodes as ROS 2 users expect them, over real DDS: managed lifecycle, /diagnostics, the plan as
parameters, request priority."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import node_statuses, start_cluster, wait_for_status, wait_ring_ready, write_config
from test_reliability import reference

pytestmark = [pytest.mark.slow, pytest.mark.ros]


def _call(node, srv_type, name: str, request, timeout: float = 20.0):
    """One service call; a reply lost while the server matches this new client's reply reader
    (rmw_fastrtps drops those, see client.SETTLE_S) is asked again."""
    from mdi_llm_ros.client import SETTLE_S
    client = node.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=timeout), f"no {name}"
        time.sleep(SETTLE_S)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            future = client.call_async(request)
            wait_until = min(end, time.monotonic() + 5.0)
            while not future.done() and time.monotonic() < wait_until:
                time.sleep(0.02)
            if future.done():
                return future.result()
            client.remove_pending_request(future)
        raise AssertionError(f"{name} did not answer")
    finally:
        node.destroy_client(client)


def state_of(node, name: str) -> str:
    from lifecycle_msgs.srv import GetState
    return _call(node, GetState, f"/{name}/get_state", GetState.Request()).current_state.label


def change(node, name: str, transition: int) -> bool:
    from lifecycle_msgs.srv import ChangeState
    request = ChangeState.Request()
    request.transition.id = transition
    return _call(node, ChangeState, f"/{name}/change_state", request, timeout=60).success


def test_lifecycle_transitions_through_the_lifecycle_services(ros_env, tmp_path, tiny_dir, ros_node):
    """--no-autostart leaves the nodes unconfigured; configure and activate bring the ring up;
    deactivating a chunk node makes the coordinator report it gone at once; activating it again
    brings the ring back; cleanup frees its weights."""
    from lifecycle_msgs.msg import Transition

    from mdi_llm_ros.client import GenerateClient
    cfg = write_config(tmp_path / "c.yaml", tiny_dir, [{"name": "a"}, {"name": "b"}],
                       cluster={"takeover_after_s": 0.0})
    proc = start_cluster(ros_env, cfg, tmp_path / "cluster.log", "--no-autostart")
    try:
        names = ["coordinator", "a", "b"]
        deadline = time.monotonic() + 60
        states = {}
        while time.monotonic() < deadline and set(states) != set(names):
            try:
                states = {n: state_of(ros_node, n) for n in names}
            except AssertionError:
                time.sleep(0.5)
        assert states == {n: "unconfigured" for n in names}, (states, proc.output()[-2000:])
        for n in names:
            assert change(ros_node, n, Transition.TRANSITION_CONFIGURE), n
            assert state_of(ros_node, n) == "inactive"
        assert not node_statuses(ros_node, expect=3)["a"].ready
        for n in names:
            assert change(ros_node, n, Transition.TRANSITION_ACTIVATE), n
            assert state_of(ros_node, n) == "active"
        assert wait_ring_ready(ros_node, 30), proc.output()[-3000:]
        client = GenerateClient(ros_node)
        assert client.wait_for_service(30)
        r = client.generate("The robot", max_new_tokens=12)
        assert r.success and r.text == reference(tiny_dir, "The robot", 12)

        assert change(ros_node, "b", Transition.TRANSITION_DEACTIVATE)
        assert state_of(ros_node, "b") == "inactive"
        gone = wait_for_status(ros_node, lambda st: "coordinator" in st and "b" in st
                               and "b" in st["coordinator"].missing_nodes, 2.0)
        assert gone is not None and gone["b"].lifecycle_state == "inactive"
        r = client.generate("The robot", max_new_tokens=4, timeout_s=20)
        assert r.error_code == "NOT_READY" and "b" in r.error_message, r

        assert change(ros_node, "b", Transition.TRANSITION_ACTIVATE)
        assert wait_ring_ready(ros_node, 30)
        r = client.generate("Map the room", max_new_tokens=12)
        assert r.success and r.text == reference(tiny_dir, "Map the room", 12)

        assert change(ros_node, "b", Transition.TRANSITION_DEACTIVATE)
        assert change(ros_node, "b", Transition.TRANSITION_CLEANUP)
        assert state_of(ros_node, "b") == "unconfigured"
        st = wait_for_status(ros_node, lambda st: "b" in st and st["b"].lifecycle_state == "unconfigured", 5)
        assert st is not None and (st["b"].layer_start, st["b"].layer_end) == (0, 0)
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]


@pytest.fixture(scope="module")
def cluster(module_ros_env, module_ros_node, tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("native")
    cfg = write_config(tmp / "c.yaml", tiny_dir, [{"name": "a", "host": "robot_a"}, {"name": "b"}],
                       coordinator={"max_inflight": 2, "queue_limit": 8, "priority_slots": 1})
    proc = start_cluster(module_ros_env, cfg, tmp / "cluster.log", node=module_ros_node)
    yield proc
    assert proc.stop() == 0


DIAGNOSTIC_KEYS = {"chunk": {"state", "view", "layers", "device", "weights", "rss_bytes", "weight_bytes",
                             "kv_cache_bytes", "queue_depth", "requests_cached", "tokens_per_s", "missing_neighbours",
                             "drops_total"},
                   "coordinator": {"state", "role", "epoch", "view", "members", "device", "weights", "rss_bytes",
                                   "weight_bytes", "requests_in_flight", "queue_depth", "tokens_per_s",
                                   "missing_nodes", "drops_total"}}


def test_diagnostics_has_one_status_per_node(cluster, module_ros_node):
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    seen: dict[str, DiagnosticStatus] = {}
    sub = module_ros_node.create_subscription(
        DiagnosticArray, "/diagnostics", lambda m: seen.update({s.name: s for s in m.status}), 10)
    try:
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        module_ros_node.destroy_subscription(sub)
    assert set(seen) == {"mdi_llm_ros: coordinator", "mdi_llm_ros: a", "mdi_llm_ros: b"}, set(seen)
    for name, status in seen.items():
        role = "coordinator" if name.endswith("coordinator") else "chunk"
        values = {kv.key: kv.value for kv in status.values}
        assert DIAGNOSTIC_KEYS[role] <= set(values), (name, set(values))
        assert status.level == DiagnosticStatus.OK, (name, status.message)
        assert values["state"] == "active" and int(values["rss_bytes"]) > 100e6
    a = {kv.key: kv.value for kv in seen["mdi_llm_ros: a"].values}
    assert a["layers"] == "[0, 3)" and seen["mdi_llm_ros: a"].hardware_id == "robot_a"
    assert int(a["weight_bytes"]) > 0 and a["weights"] == "float32 weights, exact kernels"


def test_parameters_show_each_nodes_slice_of_the_plan(cluster, module_ros_node):
    from rcl_interfaces.srv import GetParameters, ListParameters
    listed = _call(module_ros_node, ListParameters, "/b/list_parameters", ListParameters.Request())
    assert {"plan.role", "plan.layer_start", "plan.layer_end", "plan.hop", "plan.inbound_topic", "plan.dtype",
            "plan.kernels", "plan.host", "plan.device", "plan.outbound_topic"} <= set(listed.result.names)
    req = GetParameters.Request()
    req.names = ["plan.role", "plan.layer_start", "plan.layer_end", "plan.hop", "plan.inbound_topic",
                 "plan.outbound_topic", "plan.host"]
    got = _call(module_ros_node, GetParameters, "/b/get_parameters", req).values
    assert [got[0].string_value, got[1].integer_value, got[2].integer_value, got[3].integer_value,
            got[4].string_value, got[5].string_value, got[6].string_value] == \
        ["chunk", 3, 6, 1, "/mdi/ring/hop_1", "/mdi/ring/hop_2", "localhost"]
    req.names = ["plan.role", "plan.outbound_topic"]
    got = _call(module_ros_node, GetParameters, "/coordinator/get_parameters", req).values
    assert [got[0].string_value, got[1].string_value] == ["coordinator", "/mdi/ring/hop_0"]
    from rcl_interfaces.msg import Parameter, ParameterValue
    from rcl_interfaces.srv import SetParameters
    change = SetParameters.Request()
    change.parameters = [Parameter(name="plan.layer_start", value=ParameterValue(type=2, integer_value=0))]
    result = _call(module_ros_node, SetParameters, "/b/set_parameters", change).results[0]
    assert not result.successful                             # read-only: the config is the one source


def test_priority_request_overtakes_the_queue(cluster, module_ros_node, tiny_dir):
    """Two long requests fill max_inflight, three more wait in the queue; a priority request sent
    last is admitted at once (a priority slot) and finishes first, with the right text."""
    from mdi_llm_ros.client import GenerateClient
    clients = [GenerateClient(module_ros_node) for _ in range(6)]
    for c in clients:
        assert c.wait_for_service(30)
        c.settle()
    done: list[tuple[str, float]] = []
    results = {}

    def run(i, prompt, n, priority=0):
        r = clients[i].generate(prompt, max_new_tokens=n, priority=priority, timeout_s=120)
        results[prompt] = r
        done.append((prompt, time.monotonic()))

    threads = [threading.Thread(target=run, args=(i, f"Long story {i}", 300)) for i in range(2)]
    threads += [threading.Thread(target=run, args=(2 + i, f"Queued {i}", 20)) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    st = wait_for_status(module_ros_node, lambda s: "coordinator" in s and s["coordinator"].queue_depth == 3, 20)
    assert st is not None
    urgent = threading.Thread(target=run, args=(5, "Obstacle ahead, stop?", 12, 5))
    urgent.start()
    for t in threads + [urgent]:
        t.join(180)
    order = [p for p, _ in sorted(done, key=lambda x: x[1])]
    assert order[0] == "Obstacle ahead, stop?", order
    assert results["Obstacle ahead, stop?"].success
    assert results["Obstacle ahead, stop?"].text == reference(tiny_dir, "Obstacle ahead, stop?", 12)
    assert all(results[f"Queued {i}"].success for i in range(3))

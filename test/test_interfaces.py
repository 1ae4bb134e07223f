"""The generated interfaces over real DDS between two processes."""
import hashlib
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import Proc

pytestmark = pytest.mark.ros


def test_interfaces_import():
    from mdi_llm_ros.action import Generate as GenerateAction  # noqa: F401  (import is the check)
    from mdi_llm_ros.msg import Activation, NodeStatus
    from mdi_llm_ros.srv import Generate  # noqa: F401  (import is the check)
    from mdi_llm_ros.core.message import KIND_PREFILL, KIND_RELEASE
    assert (Activation.KIND_PREFILL, Activation.KIND_RELEASE) == (KIND_PREFILL, KIND_RELEASE)
    assert "missing_nodes" in NodeStatus.get_fields_and_field_types()


def test_the_interfaces_carry_the_request_contract_and_its_defaults():
    """srv/Generate.srv and action/Generate.action hold every field of GenerateParams and
    GenerationResult, with the same defaults: the contract's defaults live in one place."""
    from mdi_llm_ros.action import Generate as GenerateAction
    from mdi_llm_ros.convert import fill_request, params_from
    from mdi_llm_ros.core.request import GenerationResult, defaults, field_names
    from mdi_llm_ros.srv import Generate
    contract = defaults()
    for request in (Generate.Request(), GenerateAction.Goal()):
        carried = params_from(request)
        assert carried == contract, (carried, contract)
        for name in field_names(type(contract)):
            assert hasattr(request, name), name
        assert params_from(fill_request(type(request)(), contract)) == contract
    for result in (Generate.Response(), GenerateAction.Result()):
        missing = [n for n in field_names(GenerationResult) if n != "token_ids" and not hasattr(result, n)]
        assert not missing, missing


@pytest.fixture
def peer(ros_env, tmp_path):
    p = Proc([sys.executable, str(Path(__file__).parent / "helpers" / "interface_peer.py"), "60"], ros_env,
             tmp_path / "peer.log")
    assert p.wait_for("peer ready", 30), p.output()
    yield p
    p.stop()


def test_activation_1mb_arrives_bit_identical(peer, ros_node):
    from mdi_llm_ros.core.message import HopMessage
    from mdi_llm_ros.msg import Activation
    from mdi_llm_ros.nodes.common import from_msg, to_msg
    from mdi_llm_ros.qos import RING_QOS
    got = []
    done = threading.Event()
    ros_node.create_subscription(Activation, "/itest/back", lambda m: (got.append(m), done.set()), RING_QOS)
    pub = ros_node.create_publisher(Activation, "/itest/out", RING_QOS)
    tensor = torch.randn(1, 455, 576)                       # 1,048,320 bytes of float32
    msg = to_msg(HopMessage.with_tensor(tensor, cluster="c", epoch=3, request_id=42, step=0,
                                        first_position=0, kind=0, hop=0))
    deadline = time.monotonic() + 30
    while not done.wait(0.5) and time.monotonic() < deadline:
        if pub.get_subscription_count():
            pub.publish(msg)
    assert got, "no echo within 30 s"
    back = from_msg(got[0])
    assert (back.request_id, back.epoch, back.shape) == (42, 3, [1, 455, 576])
    out = back.tensor()
    assert hashlib.sha256(bytes(memoryview(out.numpy()).cast("B"))).digest() == \
        hashlib.sha256(bytes(memoryview(tensor.numpy()).cast("B"))).digest()
    assert torch.equal(out, tensor)


def test_generate_service_round_trip(peer, ros_node):
    from mdi_llm_ros.client import GenerateClient
    client = GenerateClient(ros_node, "itest")
    assert client.wait_for_service(20)
    r = client.generate("one two three", max_new_tokens=2, timeout_s=20)
    assert r.success and r.text == "three two one" and r.generated_tokens == 2 and r.prompt_tokens == 3


def test_generate_action_feedback(peer, ros_node):
    from mdi_llm_ros.client import GenerateClient, StreamPiece
    client = GenerateClient(ros_node, "itest")
    assert client.wait_for_action(20)
    items = list(client.stream("robots share one model", timeout_s=20))
    pieces = [i for i in items if isinstance(i, StreamPiece)]
    result = items[-1]
    assert [p.token_count for p in pieces] == [1, 2, 3, 4]
    assert "".join(p.text for p in pieces) == result.text == "robots share one model"


def test_background_spin_survives_clients_made_while_it_spins(ros_env):
    """rclpy adds an ActionClient to its node before the constructor has finished, so a spinning
    executor can fail on it ('no attribute _lock'). A spin thread that died there left every reply
    of the process unread. Ours logs the error and spins on: after 30 rounds of 16 clients made
    while spinning, every spin thread is alive and its node's timer still fires."""
    import rclpy

    from mdi_llm_ros.client import GenerateClient
    from mdi_llm_ros.session import BackgroundSpin
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        for i in range(30):
            node = rclpy.create_node(f"race_{i}", context=context)
            spin = BackgroundSpin(node)
            for client in [GenerateClient(node) for _ in range(16)]:
                client._action()
            ticks = threading.Event()
            node.create_timer(0.01, ticks.set)
            assert ticks.wait(5.0) and spin.thread.is_alive(), f"round {i}: the spin thread stopped"
            spin.close()
    finally:
        rclpy.shutdown(context=context)

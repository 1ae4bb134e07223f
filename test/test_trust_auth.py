"""The authenticated mode over real DDS processes (cluster.secret_file): callers without the key get
UNAUTHORIZED, and forged, replayed or stale ring traffic and heartbeats are dropped, counted and
change no text."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import start_cluster, write_config

pytestmark = [pytest.mark.slow, pytest.mark.ros]

PROMPTS = ["The robot", "Map the room", "Battery low, return to", "Once upon a time"]
TOKENS = 60


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    from mdi_llm_ros.core.auth import new_key_file
    return new_key_file(tmp_path_factory.mktemp("keys") / "team.key")


@pytest.fixture(scope="module")
def key(key_file):
    from mdi_llm_ros.core.auth import load_key
    return load_key(key_file)


@pytest.fixture(scope="module")
def cluster(module_ros_env, module_ros_node, tmp_path_factory, tiny_dir, key_file):
    tmp = tmp_path_factory.mktemp("auth")
    cfg = write_config(tmp / "c.yaml", tiny_dir, [{"name": "a"}, {"name": "b"}, {"name": "c"}],
                       cluster={"secret_file": str(key_file)}, coordinator={"request_timeout_s": 30})
    proc = start_cluster(module_ros_env, cfg, tmp / "cluster.log", node=module_ros_node)
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]


@pytest.fixture(scope="module")
def references(tiny_dir):
    from test_reliability import reference
    return {p: reference(tiny_dir, p, TOKENS) for p in PROMPTS}


def statuses(node):
    from mdi_llm_ros.tools.status import StatusWatch
    watch = StatusWatch(node, "")
    try:
        return watch.fresh(1.5, expect=4)
    finally:
        watch.close()


def drops(st, *names):
    out: dict = {}
    for n in names:
        for cause, count in zip(st[n].drop_causes, st[n].drop_counts):
            out[cause] = out.get(cause, 0) + count
    return out


def test_callers_without_the_key_are_unauthorized(cluster, module_ros_node, key, references):
    from mdi_llm_ros.client import GenerateClient
    keyed = GenerateClient(module_ros_node, key=key)
    assert keyed.wait_for_service(30)
    r = keyed.generate(PROMPTS[0], max_new_tokens=TOKENS, timeout_s=60)
    assert r.success and r.text == references[PROMPTS[0]], r
    streamed = list(keyed.stream(PROMPTS[1], max_new_tokens=TOKENS, timeout_s=60))
    assert streamed[-1].success and "".join(p.text for p in streamed[:-1]) == references[PROMPTS[1]]
    for other in (None, b"w" * 32):
        c = GenerateClient(module_ros_node, key=other)
        t0 = time.monotonic()
        r = c.generate(PROMPTS[0], max_new_tokens=4, timeout_s=30)
        assert r.error_code == "UNAUTHORIZED" and time.monotonic() - t0 < 10, r
        items = list(c.stream(PROMPTS[0], max_new_tokens=4, timeout_s=30))
        assert len(items) == 1 and items[0].error_code == "UNAUTHORIZED", items


def test_a_replayed_request_is_unauthorized(cluster, module_ros_node, key):
    """A sealed request recorded off the wire and sent again is refused."""
    from mdi_llm_ros.client import _wait_future
    from mdi_llm_ros.convert import fill_request
    from mdi_llm_ros.core.request import GenerateParams
    from mdi_llm_ros.signing import is_sealed, seal_request
    from mdi_llm_ros.srv import Generate
    cli = module_ros_node.create_client(Generate, "/generate")
    assert cli.wait_for_service(timeout_sec=30)
    time.sleep(1.0)
    req = fill_request(Generate.Request(), GenerateParams("The robot", max_new_tokens=3))
    nonce = seal_request(req, key)
    answers = []
    for _ in range(2):
        future = cli.call_async(req)
        assert _wait_future(future, 60)
        answers.append(future.result())
    assert answers[0].success and is_sealed(answers[0], key, nonce)
    assert answers[1].error_code == "UNAUTHORIZED" and "sent before" in answers[1].error_message
    module_ros_node.destroy_client(cli)


def test_forged_replayed_and_stale_traffic_is_dropped_counted_and_changes_nothing(
        cluster, module_ros_node, key, references):
    """During four requests: forged activations, releases and a forged epoch heartbeat without the
    key, a sniffed ring message sent again, and one sealed with the key but a minute old."""
    from mdi_llm_ros.client import GenerateClient
    from mdi_llm_ros.core.message import KIND_DECODE, KIND_PREFILL, KIND_RELEASE, HopMessage
    from mdi_llm_ros.msg import ActivationBatch, NodeStatus
    from mdi_llm_ros.nodes.common import to_batch_msg
    from mdi_llm_ros.qos import RING_QOS, STATUS_QOS
    from mdi_llm_ros.signing import seal
    before = statuses(module_ros_node)
    epoch = before["coordinator"].epoch
    counted_before = drops(before, "a", "b", "c", "coordinator")
    pubs = [module_ros_node.create_publisher(ActivationBatch, f"/mdi/ring/hop_{h}", RING_QOS) for h in range(4)]
    status_pub = module_ros_node.create_publisher(NodeStatus, "/mdi/status", STATUS_QOS)
    sniffed: list = []
    sniff = module_ros_node.create_subscription(ActivationBatch, "/mdi/ring/hop_1",
                                                lambda b: sniffed.append(b) if len(sniffed) < 5 else None, RING_QOS)
    time.sleep(1.0)
    client = GenerateClient(module_ros_node, key=key)
    assert client.wait_for_service(30)
    results: list = [None] * len(PROMPTS)

    def call(i):
        results[i] = client.generate(PROMPTS[i], max_new_tokens=TOKENS, timeout_s=60)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    while len(sniffed) < 3:
        time.sleep(0.01)
    live = sorted({h.request_id for b in sniffed for h in b.hops})
    forged = 0
    for i in range(20):                                     # activations and releases without the key
        hop = i % 3
        kind = (KIND_PREFILL, KIND_DECODE, KIND_RELEASE)[i % 3]
        msg = HopMessage.with_tensor(torch.randn(1, 1, 64), cluster="", epoch=epoch, request_id=live[i % len(live)],
                                     step=1, first_position=0, kind=kind, hop=hop)
        pubs[hop].publish(to_batch_msg([msg]))
        forged += 1
    fake = NodeStatus()                                     # a forged epoch, with a wrong key
    fake.name, fake.role, fake.cluster, fake.epoch = "coordinator", "coordinator", "", epoch + 12345
    fake.started_at_ns, fake.counter, fake.stamp.sec = 1, 1, int(time.time())
    seal(fake, b"w" * 32)
    for _ in range(3):
        status_pub.publish(fake)
    for b in sniffed[:3]:                                   # sealed, but sent before: replayed
        pubs[1].publish(b)
    old = to_batch_msg([HopMessage(cluster="", epoch=epoch, request_id=live[0], step=1, first_position=0,
                                   kind=KIND_RELEASE, hop=0)])
    old.sender, old.counter, old.stamp_ns = 4242, 1, time.time_ns() - 60 * 10**9
    seal(old, key)                                          # the key, but a minute old: stale
    pubs[0].publish(old)
    for t in threads:
        t.join(90)
    for p in pubs:
        module_ros_node.destroy_publisher(p)
    module_ros_node.destroy_publisher(status_pub)
    module_ros_node.destroy_subscription(sniff)
    assert [r.text for r in results] == [references[p] for p in PROMPTS], results
    time.sleep(1.0)
    after = statuses(module_ros_node)
    assert all(after[n].epoch == epoch for n in "abc")
    counted = drops(after, "a", "b", "c", "coordinator")
    new = {c: counted.get(c, 0) - counted_before.get(c, 0) for c in ("unauthenticated", "replayed", "stale")}
    assert new["unauthenticated"] >= forged + 3 and new["replayed"] >= 3 and new["stale"] == 1, new

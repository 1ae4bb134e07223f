"""Trust over real DDS processes, on the real SmolLM2 weights: no valid request hurts another, bad
input is refused with its code, and forged or stray traffic leaves every text identical to
`transformers`. The authenticated mode (cluster.secret_file) is tested in test_trust_auth.py."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import Proc, hf_greedy_text, start_cluster, write_config

pytestmark = [pytest.mark.slow, pytest.mark.ros]

PROMPTS = ["The three laws of robotics are", "A warehouse robot moves boxes by", "Battery low, return to",
           "To navigate a building, a mobile robot"]
TOKENS = 32


@pytest.fixture(scope="module")
def references(smol_dir):
    return {p: hf_greedy_text(smol_dir, p, False, TOKENS)[0] for p in PROMPTS}


@pytest.fixture(scope="module")
def cluster(module_ros_env, module_ros_node, tmp_path_factory, smol_dir):
    """The default config (three chunk nodes, SmolLM2), with request_timeout_s 30 as in the issue."""
    tmp = tmp_path_factory.mktemp("trust")
    cfg = write_config(tmp / "cluster.yaml", "smollm2-135m-instruct",
                       [{"name": "chunk_0"}, {"name": "chunk_1"}, {"name": "chunk_2"}],
                       coordinator={"request_timeout_s": 30})
    proc = start_cluster(module_ros_env, cfg, tmp / "cluster.log", node=module_ros_node, timeout=120)
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]


@pytest.fixture(scope="module")
def client(cluster, module_ros_node):
    from mdi_llm_ros.client import GenerateClient
    c = GenerateClient(module_ros_node)
    assert c.wait_for_service(30)
    return c


def statuses(node, wait_s=1.5):
    from mdi_llm_ros.tools.status import StatusWatch
    watch = StatusWatch(node, "")
    try:
        return watch.fresh(wait_s, expect=4)
    finally:
        watch.close()


def four_greedy(client, during=None, **extra):
    """The four prompts at once (and `during()` while they run); returns their results."""
    results: list = [None] * len(PROMPTS)

    def call(i):
        results[i] = client.generate(PROMPTS[i], max_new_tokens=TOKENS, timeout_s=60, **extra)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join(90)
    return results


def assert_identical(results, references):
    assert all(r is not None and r.success for r in results), results
    assert [r.text for r in results] == [references[p] for p in PROMPTS]


def test_a_tiny_temperature_beside_four_greedy_requests(client, references):
    odd: dict = {}
    t = threading.Thread(target=lambda: odd.update(
        r=client.generate(PROMPTS[0], max_new_tokens=TOKENS, temperature=1e-38, seed=1, timeout_s=60)))
    results = four_greedy(client, during=t.start)
    t.join(90)
    assert_identical(results, references)
    assert odd["r"].success and odd["r"].text == references[PROMPTS[0]], odd


@pytest.mark.parametrize("args,code", [(["--max-new-tokens", "-1"], "INVALID_MAX_NEW_TOKENS"),
                                       (["--seed", "18446744073709551616"], "INVALID_SEED")])
def test_cli_refuses_values_the_wire_cannot_carry(cluster, module_ros_env, args, code):
    r = subprocess.run([sys.executable, "-m", "mdi_llm_ros.cli", "generate", "--config", str(cluster.config),
                        *args, "Hi"], env=module_ros_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "", r
    assert f"mdi-llm: error: {code}: " in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_nul_in_a_prompt_or_stop_string_is_refused(client):
    for kwargs in (dict(prompt="Hello\x00 world"), dict(prompt="Hello", stop=("a\x00",))):
        r = client.generate(kwargs.pop("prompt"), max_new_tokens=4, timeout_s=30, **kwargs)
        assert r.error_code == "INVALID_TEXT" and "NUL" in r.error_message, r
        items = list(client.stream("Hello\x00 world", max_new_tokens=4, timeout_s=30))
        assert len(items) == 1 and items[0].error_code == "INVALID_TEXT"


def _ring_publisher(node, hop):
    from mdi_llm_ros.msg import ActivationBatch
    from mdi_llm_ros.qos import RING_QOS
    pub = node.create_publisher(ActivationBatch, f"/mdi/ring/hop_{hop}", RING_QOS)
    time.sleep(1.0)                                  # matched before the first message
    return pub


def test_forged_prefills_never_lock_out_real_requests(client, module_ros_node, references):
    """70 forged prefills (ids the coordinator never gave, the right epoch read off /mdi/status) while
    four requests run: every chunk would hold 64 caches of them; real requests get their caches."""
    from mdi_llm_ros.core.message import KIND_PREFILL, HopMessage
    from mdi_llm_ros.nodes.common import to_batch_msg
    epoch = statuses(module_ros_node)["coordinator"].epoch
    pub = _ring_publisher(module_ros_node, 0)

    def forge():
        for i in range(70):
            msg = HopMessage.with_tensor(torch.randn(1, 5, 576), cluster="", epoch=epoch, request_id=10**6 + i,
                                         step=0, first_position=0, kind=KIND_PREFILL, hop=0)
            pub.publish(to_batch_msg([msg]))
    forge()
    time.sleep(2.0)
    assert statuses(module_ros_node)["chunk_0"].requests_cached == 64     # the forgeries landed: all places full
    results = four_greedy(client, during=forge)
    assert_identical(results, references)
    after = client.generate(PROMPTS[1], max_new_tokens=TOKENS, timeout_s=60)
    assert after.success and after.text == references[PROMPTS[1]]
    time.sleep(1.0)
    st = statuses(module_ros_node)
    assert all(st[f"chunk_{i}"].requests_cached <= 64 for i in range(3))
    module_ros_node.destroy_publisher(pub)


def test_a_forged_epoch_heartbeat_wipes_nothing(client, module_ros_node, references):
    from mdi_llm_ros.msg import NodeStatus
    from mdi_llm_ros.qos import STATUS_QOS
    before = statuses(module_ros_node)
    epoch = before["coordinator"].epoch
    pub = module_ros_node.create_publisher(NodeStatus, "/mdi/status", STATUS_QOS)
    time.sleep(1.0)

    def forge():
        time.sleep(0.5)
        s = NodeStatus()
        s.name, s.role, s.cluster, s.epoch = "coordinator", "coordinator", "", epoch + 12345
        pub.publish(s)
    results = four_greedy(client, during=forge)
    assert_identical(results, references)
    st = statuses(module_ros_node)
    assert all(st[f"chunk_{i}"].epoch == epoch for i in range(3)), st
    after = client.generate(PROMPTS[2], max_new_tokens=TOKENS, timeout_s=60)
    assert after.success and after.text == references[PROMPTS[2]]
    module_ros_node.destroy_publisher(pub)


def test_an_impostor_chunk_is_named_and_ignored(
        cluster, client, module_ros_env, module_ros_node, references, tmp_path):
    """A second process started as chunk_1 with the same config: both are named in the log, the ring
    keeps the first, and requests during and after it are served with identical text."""
    impostor = Proc([sys.executable, "-m", "mdi_llm_ros.nodes.chunk_node", "--ros-args", "-r", "__node:=chunk_1",
                     "-p", f"config_file:={cluster.config}", "-p", "node_name:=chunk_1"], module_ros_env,
                    tmp_path / "impostor.log")
    try:
        assert cluster.wait_for("two processes claim chunk node chunk_1", 60), cluster.output()[-3000:]
        assert impostor.wait_for("stays idle until that one is gone", 30), impostor.output()
        line = next(x for x in cluster.output().splitlines() if "two processes claim chunk node chunk_1" in x)
        assert f"pid {impostor.p.pid}" in line and line.count("pid ") == 2
        results = four_greedy(client)
        assert_identical(results, references)
    finally:
        impostor.stop()
    after = client.generate(PROMPTS[3], max_new_tokens=TOKENS, timeout_s=60)
    assert after.success and after.text == references[PROMPTS[3]]
    assert "restarted" not in cluster.output() and "replayed" not in cluster.output()


def test_a_forged_release_ends_its_request_at_once_and_slows_no_other(client, module_ros_node, references):
    """A forged release for a request in flight (its id sniffed off the ring) frees its caches: the
    request ends with RING_FAULT at once, and the requests of its wave finish in their usual time."""
    from mdi_llm_ros.core.message import KIND_DECODE, KIND_RELEASE, HopMessage
    from mdi_llm_ros.msg import ActivationBatch
    from mdi_llm_ros.nodes.common import to_batch_msg
    from mdi_llm_ros.qos import RING_QOS
    epoch = statuses(module_ros_node)["coordinator"].epoch
    pub = _ring_publisher(module_ros_node, 0)
    t0 = time.monotonic()
    undisturbed = four_greedy(client)
    usual = time.monotonic() - t0
    seen: dict = {}
    sniff = module_ros_node.create_subscription(       # request ids travel in the clear
        ActivationBatch, "/mdi/ring/hop_1",
        lambda b: [seen.setdefault(h.request_id, True) for h in b.hops if h.kind == KIND_DECODE], RING_QOS)

    def forge():
        while not seen:
            time.sleep(0.01)
        victim = max(seen)
        pub.publish(to_batch_msg([HopMessage(cluster="", epoch=epoch, request_id=victim, step=3,
                                             first_position=0, kind=KIND_RELEASE, hop=0)]))
    t0 = time.monotonic()
    results = four_greedy(client, during=forge)
    took = time.monotonic() - t0
    module_ros_node.destroy_subscription(sniff)
    module_ros_node.destroy_publisher(pub)
    faults = [r for r in results if r.error_code == "RING_FAULT"]
    assert len(faults) == 1 and "release" in faults[0].error_message, results
    ok = [(p, r) for p, r in zip(PROMPTS, results, strict=True) if r.success]
    assert len(ok) == 3 and all(r.text == references[p] for p, r in ok)
    assert all(r.success for r in undisturbed)
    assert took < usual * 2 + 3, (took, usual)

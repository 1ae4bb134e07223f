"""The ring on real ROS 2: separate node processes over DDS, real SmolLM2 weights."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import Proc, hf_greedy_text, node_statuses, wait_for_status, wait_ring_ready, write_config

pytestmark = [pytest.mark.slow, pytest.mark.ros]

PROMPTS = [("The three laws of robotics are", False), ("What is a robot?", True)]
# ~410 tokens: more than prefill_chunk_tokens (256), so it travels the ring in pieces
LONG_PROMPT = ("Robot log. The mobile robot started its patrol at the loading dock, checked the doors of hall A, "
               "B and C, measured the temperature in the server room and found it normal, then recharged. ") * 10 \
    + "Summary of the patrol:"


@pytest.fixture(scope="module")
def references(smol_dir):
    return {p: hf_greedy_text(smol_dir, p, chat, 24) for p, chat in PROMPTS + [(LONG_PROMPT, False)]}


@pytest.fixture
def cluster(ros_env, ros_node, tmp_path, smol_dir):
    cfg = write_config(tmp_path / "cluster.yaml", "smollm2-135m-instruct",
                       [{"name": "chunk_0"}, {"name": "chunk_1"}, {"name": "chunk_2"}],
                       coordinator={"max_inflight": 8, "request_timeout_s": 120})
    proc = Proc([sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config", str(cfg)], ros_env,
                tmp_path / "cluster.log")
    assert wait_ring_ready(ros_node, 90), proc.output()
    yield proc
    assert proc.stop() == 0, proc.output()[-3000:]


def chunk_status(node):
    """Latest NodeStatus of every chunk node."""
    return {k: v for k, v in node_statuses(node, expect=4).items() if v.role == "chunk"}


def test_ring_service_action_and_concurrency(cluster, ros_node, ros_env, references, tmp_path):
    from mdi_llm_ros.client import GenerateClient, StreamPiece
    client = GenerateClient(ros_node)
    assert client.wait_for_service(30)

    # 1. greedy /generate equals plain transformers generation
    for prompt, chat in PROMPTS:
        r = client.generate(prompt, use_chat_template=chat, max_new_tokens=24, timeout_s=120)
        text, n = references[prompt]
        assert r.success, r
        assert (r.text, r.generated_tokens) == (text, n)
        assert r.time_to_first_token > 0 and r.tokens_per_second > 0

    # 2. four robot client processes at once, all answered correctly, more than one in flight at once
    from mdi_llm_ros.msg import NodeStatus
    from mdi_llm_ros.qos import STATUS_QOS
    inflight = [0]
    watch = ros_node.create_subscription(NodeStatus, "/mdi/status", lambda s: inflight.__setitem__(
        0, max(inflight[0], s.requests_cached if s.role == "coordinator" else 0)), STATUS_QOS)
    procs = [subprocess.Popen([sys.executable, "-m", "mdi_llm_ros.robot_client", "--name", f"robot_{i}", "--json",
                               "--max-new-tokens", "24", *(["--chat"] if chat else []), prompt],
                              env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (prompt, chat) in enumerate(PROMPTS * 2)]
    for proc, (prompt, _) in zip(procs, PROMPTS * 2, strict=True):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        r = json.loads(out.strip().splitlines()[-1])
        assert r["success"] and r["text"] == references[prompt][0]
    ros_node.destroy_subscription(watch)
    assert inflight[0] > 1, "never more than one request in flight"

    # 3. the action streams pieces whose concatenation is the final text
    items = list(client.stream("The three laws of robotics are", max_new_tokens=24, timeout_s=120))
    pieces = [i for i in items if isinstance(i, StreamPiece)]
    assert len(pieces) >= 10 and "".join(p.text for p in pieces) == items[-1].text == references[PROMPTS[0][0]][0]

    # 4. a cancel stops generation and frees the caches on every chunk
    items = list(client.stream("Tell me a long story about a robot", max_new_tokens=200, cancel_after=3,
                               timeout_s=120))
    result = items[-1]
    assert result.finish_reason == "cancelled" and not result.success and result.generated_tokens < 200
    status = chunk_status(ros_node)
    assert set(status) == {"chunk_0", "chunk_1", "chunk_2"}
    assert all(s.requests_cached == 0 for s in status.values()), {k: s.requests_cached for k, s in status.items()}
    assert all(s.tokens_processed > 0 and s.resident_memory_bytes > 0 for s in status.values())
    # ... and their KV blocks: none held now, though the earlier requests held some
    assert all(s.kv_cache_bytes == 0 < s.kv_cache_peak_bytes < s.resident_memory_bytes for s in status.values()), \
        {k: (s.kv_cache_bytes, s.kv_cache_peak_bytes) for k, s in status.items()}

    # 5. a long prompt travels in prefill pieces while a short request decodes: both equal transformers
    import threading
    results = {}
    short = threading.Thread(target=lambda: results.__setitem__("short", GenerateClient(ros_node).generate(
        PROMPTS[0][0], max_new_tokens=24, timeout_s=120)))
    short.start()
    long = client.generate(LONG_PROMPT, max_new_tokens=24, timeout_s=120)
    short.join(130)
    assert long.success and long.prompt_tokens > 256, long
    assert (long.text, long.generated_tokens) == references[LONG_PROMPT]
    assert results["short"].success and results["short"].text == references[PROMPTS[0][0]][0]


def test_cluster_host_starts_only_its_nodes(ros_env, ros_node, tmp_path, tiny_dir):
    cfg = write_config(tmp_path / "hosts.yaml", tiny_dir,
                       [{"name": "arm", "host": "robot_a"}, {"name": "base", "host": "robot_b"},
                        {"name": "head", "host": "robot_a"}], coordinator={"host": "robot_b"})
    proc = Proc([sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config", str(cfg), "--host", "robot_a"],
                ros_env, tmp_path / "a.log")
    st = wait_for_status(ros_node, lambda st: {"arm", "head"} <= set(st), 60)
    assert st is not None, proc.output()
    time.sleep(1.0)
    assert set(node_statuses(ros_node)) == {"arm", "head"}
    # Alone, the chunk nodes say that they hear no coordinator, and what to check.
    assert proc.wait_for("no status from the coordinator on /mdi/status", 30), proc.output()
    assert f"ROS_DOMAIN_ID={ros_env['ROS_DOMAIN_ID']}" in proc.output()
    assert proc.stop() == 0
    # The other host alone: its coordinator says why each chunk node is missing.
    cfg_b = write_config(tmp_path / "hosts_b.yaml", tiny_dir,
                         [{"name": "arm", "host": "robot_a"}, {"name": "base", "host": "robot_b"},
                          {"name": "head", "host": "robot_a"}],
                         coordinator={"host": "robot_b", "heartbeat_timeout_s": 0.5})
    proc_b = Proc([sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config", str(cfg_b), "--host", "robot_b"],
                  ros_env, tmp_path / "b.log")
    assert proc_b.wait_for("chunk nodes still missing", 60), proc_b.output()
    report = proc_b.output().split("chunk nodes still missing: ", 1)[1].splitlines()[0]
    assert "arm (no heartbeat arrives from it)" in report and "head (no heartbeat arrives from it)" in report
    assert "base (its heartbeats arrive, but its ring topics have not matched both neighbours yet)" in report
    assert proc_b.stop() == 0
    bad = subprocess.run([sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config", str(cfg),
                          "--host", "robot_z"], env=ros_env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "host 'robot_z' runs no node" in bad.stderr


@pytest.mark.parametrize("mode", ["stop", "respawn", "takeover"])
def test_launcher_handles_a_dead_chunk_node(ros_env, ros_node, tmp_path, tiny_dir, mode):
    """A chunk node killed under `mdi-llm cluster`: with takeover off the launcher stops the
    others and says so; with `--respawn` a new process serves as b; with takeover on (the
    default) the launcher goes on and a serves the whole model."""
    import os
    import signal

    from test_reliability import reference

    from mdi_llm_ros.client import GenerateClient
    cfg = write_config(tmp_path / "c.yaml", tiny_dir, [{"name": "a"}, {"name": "b"}],
                       coordinator={"heartbeat_timeout_s": 1.0},
                       cluster={"takeover_after_s": 2.0 if mode == "takeover" else 0.0})
    proc = Proc([sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config", str(cfg),
                 *(["--respawn"] if mode == "respawn" else [])], ros_env, tmp_path / "cluster.log")
    assert wait_ring_ready(ros_node, 60), proc.output()
    b_pid = node_statuses(ros_node, expect=3)["b"].pid
    os.kill(b_pid, signal.SIGKILL)
    if mode == "respawn":
        # the coordinator sees b go missing, then a new process serve as b: the ring is complete again
        gone = wait_for_status(ros_node, lambda st: "coordinator" in st and "b" in st["coordinator"].missing_nodes, 30)
        back = gone and wait_for_status(ros_node, lambda st: "coordinator" in st and st["coordinator"].ready
                                        and "b" in st and st["b"].pid != b_pid, 60)
        if not back:
            proc.stop()     # first, so the log also holds what the nodes say on the way out
            pytest.fail("the respawned b did not rejoin the ring in 60 s:\n" + proc.output())
        assert proc.stop() == 0, proc.output()[-2000:]
    elif mode == "takeover":
        alone = wait_for_status(ros_node, lambda st: "coordinator" in st and st["coordinator"].ready
                                and list(st["coordinator"].members) == ["a"], 60)
        assert alone is not None and proc.p.poll() is None, proc.output()
        assert "b exited with code -9; the others take its layers over, the cluster goes on" in proc.output()
        r = GenerateClient(ros_node).generate("The robot", max_new_tokens=12, timeout_s=60)
        assert r.success and r.text == reference(tiny_dir, "The robot", 12), r
        proc.stop()
    else:
        proc.p.wait(30)
        assert proc.p.returncode == 1                              # the launcher stops the others and says so
        assert "b exited with code -9; stopping the other nodes" in proc.output()
        proc.stop()


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_quantized_ring_answers_over_dds_on_the_real_file(ros_env, ros_node, tmp_path, smol_gguf, quantization):
    """A quantized ring of three chunk processes serving the shipped SmolLM2 file: it answers the
    service and the action, its chunk nodes hold their integer weights (NodeStatus memory well
    under a float32 chunk's), and greedy text equals the same ring computed in one process."""
    from mdi_llm_ros.client import GenerateClient, StreamPiece
    from mdi_llm_ros.core.config import load_config
    from mdi_llm_ros.core.local import LocalRing
    from mdi_llm_ros.core.models import load_model_info
    from mdi_llm_ros.core.plan import make_plan
    from mdi_llm_ros.core.request import GenerateParams
    cfg = write_config(tmp_path / "q.yaml", "smollm2-135m-instruct",
                       [{"name": "chunk_0"}, {"name": "chunk_1"}, {"name": "chunk_2"}])
    cfg.write_text(cfg.read_text().replace("dtype: float32", f"dtype: float32\n  quantization: {quantization}"))
    info = load_model_info("smollm2-135m-instruct")
    local = LocalRing(make_plan(load_config(cfg), info), info)
    expected = local.generate(GenerateParams(PROMPTS[0][0], max_new_tokens=24)).text
    proc = Proc([sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config", str(cfg)], ros_env,
                tmp_path / "cluster.log")
    try:
        assert wait_ring_ready(ros_node, 90), proc.output()
        client = GenerateClient(ros_node)
        assert client.wait_for_service(30)
        r = client.generate(PROMPTS[0][0], max_new_tokens=24, timeout_s=120)
        assert r.success and r.generated_tokens == 24 and r.text == expected, (r, expected, proc.output()[-3000:])
        items = list(client.stream(PROMPTS[1][0], use_chat_template=True, max_new_tokens=16, timeout_s=120))
        assert items[-1].success, (items[-1], proc.output()[-3000:])
        assert "".join(i.text for i in items if isinstance(i, StreamPiece)) == items[-1].text
        st = chunk_status(ros_node)
        assert all(s.resident_memory_bytes < 420e6 for s in st.values()), {n: s.resident_memory_bytes for n, s in
                                                                           st.items()}
        made = "as is to int4" if quantization == "int4" else "re-quantized to int8"
        assert f"{quantization} weights (70 Q4_1 {made})" \
            in proc.output(), proc.output()[-3000:]
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]


def test_gemma3_end_to_end_over_dds(ros_env, ros_node, tmp_path):
    """The second real model: Gemma 3 270M served from its Q4_K_M GGUF by a coordinator and two
    chunk processes; greedy text equals float32 transformers on the same (de-quantized) weights."""
    from transformers import AutoTokenizer

    from mdi_llm_ros.client import GenerateClient
    from mdi_llm_ros.core.models import reference_dir
    ref_dir = reference_dir("gemma3-270m", log=lambda s: None)
    tok = AutoTokenizer.from_pretrained(ref_dir)
    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    prompt = "The three laws of robotics are"
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = tok.decode(hf.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:], skip_special_tokens=True)
    del hf
    cfg = write_config(tmp_path / "gemma.yaml", "gemma3-270m", [{"name": "chunk_0"}, {"name": "chunk_1"}])
    proc = Proc([sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config", str(cfg)], ros_env,
                tmp_path / "cluster.log")
    try:
        assert wait_ring_ready(ros_node, 120), proc.output()
        client = GenerateClient(ros_node)
        assert client.wait_for_service(30)
        r = client.generate(prompt, max_new_tokens=20, timeout_s=120)
        assert r.success and r.text == ref, (r.text, ref)
        chat = client.generate("Hi", use_chat_template=True, max_new_tokens=4, timeout_s=60)
        assert chat.error_code == "INVALID_TEXT" and "chat template" in chat.error_message   # a base model
    finally:
        assert proc.stop() == 0, proc.output()[-3000:]

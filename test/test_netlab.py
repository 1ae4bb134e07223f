"""Several devices on a real (emulated) network: one network namespace per robot.

Three robot namespaces and a client namespace on a bridge; each robot runs
`mdi-llm cluster --host <robot>` from one shared config; DDS discovers over
multicast on the lab's subnet and carries data as UDP over the veth links (shared
memory is switched off by the config's transport). Real SmolLM2 weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import Proc, hf_greedy_text, write_config

pytestmark = [pytest.mark.slow, pytest.mark.ros]

PROMPTS = [("The three laws of robotics are", False), ("What is a robot?", True)]
HOSTS = ["robot_a", "robot_b", "robot_c", "client"]
TOKENS = 24


def _probe():
    from mdi_llm_ros.tools.netlab import probe
    return probe()


@pytest.fixture
def lab():
    from mdi_llm_ros.tools.netlab import NetLab, describe_probe, lab_namespaces
    found = _probe()
    if not found["netns"]:
        pytest.skip(describe_probe(found))
    lab = NetLab(hosts=HOSTS, name=f"mditest{os.getpid() % 100000}").up()
    yield lab
    gone = lab.down()
    assert len(gone) == len(HOSTS) + 1                      # every robot, the client and the switch
    assert lab_namespaces(lab.name) == []
    assert not any(os.path.exists(f"/etc/netns/{ns}") for ns in gone)


def ask_from_client(lab, cfg, ros_env, prompt: str, chat: bool, name: str) -> subprocess.Popen:
    cmd = [*lab.exec_prefix("client"), sys.executable, "-m", "mdi_llm_ros.robot_client", "--config", str(cfg),
           "--name", name, "--json", "--max-new-tokens", str(TOKENS), *(["--chat"] if chat else []), prompt]
    return subprocess.Popen(cmd, env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ring_status(lab, cfg, ros_env, timeout: float) -> list[dict]:
    """`mdi-llm status --wait-ready` on the client device: every node's heartbeat once the ring is complete."""
    r = subprocess.run([*lab.exec_prefix("client"), sys.executable, "-m", "mdi_llm_ros.cli", "status", "--config",
                        str(cfg), "--wait-ready", str(timeout), "--json"], env=ros_env, capture_output=True, text=True,
                       timeout=timeout + 60)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def answer(proc: subprocess.Popen, timeout: float = 240) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
    return json.loads(out.strip().splitlines()[-1])


def test_three_robot_ring_over_veth_links(lab, ros_env, tmp_path, smol_dir):
    from mdi_llm_ros.tools.netlab import _pids
    references = {p: hf_greedy_text(smol_dir, p, chat, TOKENS) for p, chat in PROMPTS}
    cfg = write_config(
        tmp_path / "robots.yaml", "smollm2-135m-instruct",
        [{"name": "chunk_0", "host": "robot_a"}, {"name": "chunk_1", "host": "robot_b"},
         {"name": "chunk_2", "host": "robot_c"}],
        cluster={"domain_id": int(ros_env["ROS_DOMAIN_ID"]), "discovery_range": "SUBNET", "transport": "udp"},
        coordinator={"host": "robot_a", "request_timeout_s": 180})
    robots = {h: Proc([*lab.exec_prefix(h), sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config",
                       str(cfg), "--host", h], ros_env, tmp_path / f"{h}.log") for h in HOSTS[:3]}
    try:
        rows = ring_status(lab, cfg, ros_env, 120)
        assert {(r["name"], r["host"]) for r in rows} == {("coordinator", "robot_a"), ("chunk_0", "robot_a"),
                                                          ("chunk_1", "robot_b"), ("chunk_2", "robot_c")}, rows

        # 1. one greedy request from the client robot: identical to transformers
        before = lab.counters()
        prompt, chat = PROMPTS[0]
        r = answer(ask_from_client(lab, cfg, ros_env, prompt, chat, "client_robot"))
        after = lab.counters()
        assert (r["text"], r["generated_tokens"]) == references[prompt], r
        # The activations really crossed the links: robot_b (layers 10-20) received at least one
        # hidden vector per prompt token and generated token, as UDP over its veth.
        hidden_bytes = 576 * 4
        assert after["robot_b"]["rx_bytes"] - before["robot_b"]["rx_bytes"] >= \
            (r["prompt_tokens"] + TOKENS - 1) * hidden_bytes
        assert after["robot_c"]["tx_bytes"] - before["robot_c"]["tx_bytes"] >= (TOKENS - 1) * hidden_bytes

        # 2. every link rate-limited to a Wi-Fi-like 20 Mbit/s: 4 concurrent requests, all correct
        lab.shape("20mbit")
        qdiscs = subprocess.run([*lab.exec_prefix("robot_b"), "tc", "qdisc", "show", "dev", "eth0"],
                                capture_output=True, text=True).stdout
        assert "tbf" in qdiscs and "20Mbit" in qdiscs, qdiscs
        procs = [ask_from_client(lab, cfg, ros_env, p, chat, f"client_{i}") for i, (p, chat) in enumerate(PROMPTS * 2)]
        for proc, (p, chat) in zip(procs, PROMPTS * 2, strict=True):
            r = answer(proc)
            assert r["success"] and (r["text"], r["generated_tokens"]) == references[p], r
    finally:
        codes = {h: proc.stop() for h, proc in robots.items()}
    assert codes == {h: 0 for h in robots}, {h: robots[h].output()[-2000:] for h in robots}
    assert all(_pids([lab.ns(h)]) == [] for h in HOSTS), "processes left in the lab's namespaces"


def test_static_peers_without_multicast(lab, ros_env, tmp_path, tiny_dir):
    """Networks without multicast: discovery only through cluster.static_peers (unicast)."""
    # Multicast is removed from every namespace: without the static peers, nobody would meet.
    for h in HOSTS:
        subprocess.run([*lab.exec_prefix(h), "ip", "route", "del", "224.0.0.0/4"], check=True)
        subprocess.run([*lab.exec_prefix(h), "ip", "link", "set", "eth0", "multicast", "off"], check=True)
    cfg = write_config(
        tmp_path / "peers.yaml", str(tiny_dir),
        [{"name": "chunk_0", "host": "robot_b"}, {"name": "chunk_1", "host": "robot_c"}],
        cluster={"domain_id": int(ros_env["ROS_DOMAIN_ID"]), "discovery_range": "LOCALHOST", "transport": "udp",
                 "static_peers": [lab.addresses[h] for h in HOSTS]},
        coordinator={"host": "robot_a"})
    robots = {h: Proc([*lab.exec_prefix(h), sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config",
                       str(cfg), "--host", h], ros_env, tmp_path / f"{h}.log") for h in HOSTS[:3]}
    try:
        ring_status(lab, cfg, ros_env, 90)
        out = subprocess.run([*lab.exec_prefix("client"), sys.executable, "-m", "mdi_llm_ros.cli", "generate",
                              "--config", str(cfg), "--max-new-tokens", "8", "--wait", "30", "Hello robots"],
                             env=ros_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "8 generated tokens" in out.stderr
    finally:
        codes = {h: proc.stop() for h, proc in robots.items()}
    assert codes == {h: 0 for h in robots}

"""The ROS-user paths: `colcon build` of the repository, and launch/cluster.launch.py."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_config

VENV = Path(sys.prefix)


@pytest.mark.slow
def test_colcon_build(tmp_path):
    if shutil.which("colcon", path=str(VENV / "bin")) is None:
        pytest.fail("colcon is not installed in the venv: run scripts/bootstrap.sh")
    src = tmp_path / "ws" / "src" / "mdi_llm_ros"
    skip = shutil.ignore_patterns(".venv", "build", "install", "log", ".git", "__pycache__", "*.egg-info")
    shutil.copytree(REPO, src, ignore=skip)
    env = dict(os.environ, AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV),
               PATH=f"{VENV / 'bin'}:{os.environ['PATH']}")
    r = subprocess.run([str(VENV / "bin" / "colcon"), "build", "--base-paths", "src",
                        "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"],
                       cwd=tmp_path / "ws", env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    prefix = tmp_path / "ws" / "install" / "mdi_llm_ros"
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for rel in ("lib/mdi_llm_ros/chunk_node", "lib/mdi_llm_ros/coordinator_node", "bin/mdi-llm",
                "share/mdi_llm_ros/launch/cluster.launch.py", "share/mdi_llm_ros/config/cluster.yaml",
                "share/mdi_llm_ros/package.xml"):
        assert (prefix / rel).exists(), rel
    # The installed package imports: our code and the generated interfaces side by side.
    check = ("import mdi_llm_ros, mdi_llm_ros.core.plan; from mdi_llm_ros.msg import Activation; "
             "from mdi_llm_ros.srv import Generate; from mdi_llm_ros.action import Generate as G; "
             "print(mdi_llm_ros.core.plan.__file__)")
    env2 = dict(os.environ, PYTHONPATH=str(site),
                LD_LIBRARY_PATH=f"{prefix / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    r = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env2, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(site))


def test_node_specs_follow_the_plan(tmp_path, tiny_dir):
    from mdi_llm_ros.launcher import node_specs
    cfg = write_config(tmp_path / "c.yaml", tiny_dir, [{"name": "a", "host": "r1"}, {"name": "b", "host": "r2"}],
                       coordinator={"host": "r2"},
                       cluster={"domain_id": 12, "static_peers": ["10.1.0.1", "10.1.0.2"], "transport": "udp"})
    all_specs = node_specs(cfg)
    assert [(s.name, s.executable, s.host) for s in all_specs] == [
        ("coordinator", "coordinator_node", "r2"), ("a", "chunk_node", "r1"), ("b", "chunk_node", "r2")]
    assert all(s.parameters["config_file"] == str(cfg.resolve()) for s in all_specs)
    assert [s.parameters.get("node_name") for s in all_specs] == ["coordinator", "a", "b"]
    assert [s.name for s in node_specs(cfg, "r1")] == ["a"]
    cmd = all_specs[1].command("py")
    assert cmd[:3] == ["py", "-m", "mdi_llm_ros.nodes.chunk_node"] and "node_name:=a" in cmd
    assert "autostart:=false" in node_specs(cfg, autostart=False)[1].command("py")
    # standbys: a spare chunk node and a standby coordinator per standby host, on their hosts
    spares = write_config(tmp_path / "s.yaml", tiny_dir, [{"name": "a"}, {"name": "s", "standby": True, "host": "r3"}],
                          coordinator={"standby_hosts": ["r3"]})
    assert [(s.name, s.executable, s.host) for s in node_specs(spares, "r3")] == [
        ("s", "chunk_node", "r3"), ("coordinator_r3", "coordinator_node", "r3")]
    # every node on every device gets the config's discovery settings (the launch file passes
    # them as additional_env; the pip launcher merges them into each child's environment)
    assert all(s.env == {"ROS_DOMAIN_ID": "12", "ROS_STATIC_PEERS": "10.1.0.1;10.1.0.2",
                         "FASTDDS_BUILTIN_TRANSPORTS": "UDPv4"} for s in all_specs)


@pytest.mark.skipif(importlib.util.find_spec("launch_ros") is None,
                    reason="launch_ros is not installed (it is not on PyPI; it comes with a ROS 2 install)")
def test_launch_file_builds_nodes_from_the_plan(tmp_path, tiny_dir):
    from launch import LaunchContext
    from launch.actions import OpaqueFunction
    cfg = write_config(tmp_path / "c.yaml", tiny_dir, [{"name": "a", "host": "r1"}, {"name": "b", "host": "r2"}])
    spec = importlib.util.spec_from_file_location("cluster_launch", REPO / "launch" / "cluster.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ld = module.generate_launch_description()
    context = LaunchContext()
    context.launch_configurations.update({"config": str(cfg), "host": "r1", "respawn": "true"})
    opaque = [e for e in ld.entities if isinstance(e, OpaqueFunction)][0]
    nodes = opaque.execute(context)
    assert len(nodes) == 1 and nodes[0].node_executable == "chunk_node"
    context.launch_configurations.update({"autostart": "false"})
    assert opaque.execute(context)[0]._Node__parameters       # the autostart parameter goes to the node
    context.launch_configurations.update({"config": str(tmp_path / "missing.yaml")})
    with pytest.raises(RuntimeError, match="config:="):
        opaque.execute(context)

"""The pip launcher's supervision, with stand-in node processes (no ROS, no model): what it
does when a chunk node says that it hears no coordinator (restart it only when it was respawned)."""
import io
import os
import signal
import sys
import time

import pytest

from mdi_llm_ros.launcher import Cluster, NodeSpec

SAID = "(said it hears no coordinator)"
# A stand-in chunk node: counts its starts in a file and, on its first SILENT_STARTS, tells the
# launcher what a real one tells it when the coordinator stays silent (an event on the pipe in
# MDI_EVENTS_FD; its log says something else); then it waits to be stopped.
FAKE_CHUNK = f"""
import os, pathlib, signal, sys, time
from mdi_llm_ros.nodes.common import supervisor_event
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: sys.exit(0))
starts = pathlib.Path(sys.argv[0]).with_name("starts.txt")
n = int(starts.read_text() or 0) + 1 if starts.exists() else 1
starts.write_text(str(n))
print(f"start {{n}}", flush=True)
if n <= int(os.environ["SILENT_STARTS"]):
    time.sleep(0.3)
    supervisor_event("coordinator_silent", seconds=10.0)
    print("{SAID}", flush=True)
time.sleep(60)
"""
FAKE_COORDINATOR = """
import signal, sys, time
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: sys.exit(0))
time.sleep(60)
"""


def _spec(name: str, role: str, module: str) -> NodeSpec:
    return NodeSpec(name=name, role=role, host="h", executable=module, module=module, parameters={}, env={})


def _cluster(tmp_path, out: io.StringIO, respawn: bool, coordinator: bool = True,
             silent_starts: int = 2) -> Cluster:
    """A stand-in chunk node `b` (and coordinator, unless it runs on another host), started."""
    (tmp_path / "fake_chunk.py").write_text(FAKE_CHUNK)
    (tmp_path / "fake_coordinator.py").write_text(FAKE_COORDINATOR)
    specs = [_spec("coordinator", "coordinator", "fake_coordinator")] if coordinator else []
    cluster = Cluster([*specs, _spec("b", "chunk", "fake_chunk")], respawn=respawn,
                      env=dict(os.environ, PYTHONPATH=str(tmp_path), SILENT_STARTS=str(silent_starts)), out=out,
                      python=sys.executable)
    cluster.start()
    return cluster


def _run_until(cluster: Cluster, out: io.StringIO, text: str, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        cluster.supervise_once()
        if text in out.getvalue():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("respawn", [True, False])
def test_a_respawned_chunk_node_that_hears_no_coordinator_is_restarted(tmp_path, respawn):
    out = io.StringIO()
    cluster = _cluster(tmp_path, out, respawn=respawn)
    try:
        # A first start (the coordinator may still be loading) only logs that it hears none.
        assert _run_until(cluster, out, SAID), out.getvalue()
        time.sleep(0.5)
        assert cluster.supervise_once() is None
        assert "restarting it" not in out.getvalue() and "respawning" not in out.getvalue()
        if respawn:
            os.kill(cluster.procs["b"].pid, signal.SIGKILL)
            assert _run_until(cluster, out, "b exited with -9; respawning (restart 1)"), out.getvalue()
            # The respawned node hears no coordinator although it runs: stopped and started afresh.
            assert _run_until(cluster, out, "b hears no coordinator since it was respawned; restarting it"), \
                out.getvalue()
            assert _run_until(cluster, out, "respawning (restart 2)"), out.getvalue()
            assert _run_until(cluster, out, "start 3"), out.getvalue()
            time.sleep(0.6)                      # the third start is quiet: no further restart
            cluster.supervise_once()
            assert "restart 3" not in out.getvalue()
    finally:
        codes = cluster.stop()
    assert codes == {"coordinator": 0, "b": 0}, out.getvalue()


def test_with_the_coordinator_on_another_host_a_deaf_node_is_restarted_three_times_in_a_row(tmp_path):
    """The remote coordinator may be down: a respawned node that keeps hearing none is restarted
    MAX_DEAF_RESTARTS times, then left to wait (and to keep saying so)."""
    from mdi_llm_ros.launcher import MAX_DEAF_RESTARTS
    out = io.StringIO()
    cluster = _cluster(tmp_path, out, respawn=True, coordinator=False, silent_starts=100)
    try:
        assert _run_until(cluster, out, SAID), out.getvalue()
        os.kill(cluster.procs["b"].pid, signal.SIGKILL)
        last = f"respawning (restart {1 + MAX_DEAF_RESTARTS})"
        assert _run_until(cluster, out, last), out.getvalue()
        assert _run_until(cluster, out, f"start {2 + MAX_DEAF_RESTARTS}"), out.getvalue()
        time.sleep(1.0)                     # its silence is logged again, but it is not restarted
        cluster.supervise_once()
        assert out.getvalue().count("restarting it") == MAX_DEAF_RESTARTS, out.getvalue()
        assert f"restart {2 + MAX_DEAF_RESTARTS}" not in out.getvalue()
    finally:
        codes = cluster.stop()
    assert codes == {"b": 0}, out.getvalue()


def test_shm_cleanup_keeps_the_mutex_of_a_port_another_process_still_holds():
    """Removing a held port's mutex made Fast DDS leave the port file behind for good once
    its last holder let go (seen in CI after SIGTERM); the cleanup keeps a port's family."""
    import mmap

    from mdi_llm_ros.launcher import clean_fastdds_segments, fastdds_segments, shm_family
    assert shm_family("sem.fastdds_port7003_mutex") == shm_family("fastdds_port7003_el") == "fastdds_port7003"
    assert shm_family("fastdds_0f1e2d3c4b5a6978") == "fastdds_0f1e2d3c4b5a6978"
    port = f"fastdds_port_test{os.getpid()}"
    before = fastdds_segments()
    for name in (port, f"sem.{port}_mutex", f"{port}_el"):
        with open(f"/dev/shm/{name}", "wb") as f:
            f.write(b"\0" * 4096)
    held = open(f"/dev/shm/{port}", "r+b")
    view = mmap.mmap(held.fileno(), 4096)
    held.close()                                                  # mapped, not open: as a participant holds a port
    try:
        assert clean_fastdds_segments(before) == []
        assert {port, f"sem.{port}_mutex", f"{port}_el"} <= fastdds_segments()
    finally:
        view.close()
    assert sorted(clean_fastdds_segments(before)) == sorted([port, f"sem.{port}_mutex", f"{port}_el"])
    assert not {port, f"sem.{port}_mutex", f"{port}_el"} & fastdds_segments()


def test_dead_ports_are_held_but_never_a_port_that_is_opening_or_alive(tmp_path):
    """A node takes the lock of each dead port before it joins DDS, so no participant reopens a
    dead port (the deaf respawn); a port whose lock file is fresh may be opening in a process
    started beside it, and a live port is locked by its owner: both are left alone."""
    import subprocess

    from mdi_llm_ros import shm
    tag = f"fastdds_port9{os.getpid()}"
    dead, opening, alive = (f"/dev/shm/{tag}{i}_el" for i in range(3))
    for path in (dead, opening, alive):
        open(path, "wb").close()
    old = time.time() - 60
    os.utime(dead, (old, old))
    os.utime(alive, (old, old))
    owner = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({alive!r}, os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        held = [p for p in shm.hold_dead_ports() if p.startswith(tag)]
        assert held == [f"{tag}0"], held
        probe = subprocess.run([sys.executable, "-c", (
            "import fcntl, os\n"
            f"fd = os.open({dead!r}, os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
            "except OSError:\n    print('taken')")], capture_output=True, text=True, timeout=30)
        assert probe.stdout.strip() == "taken"                 # what Fast DDS in another process sees
        shm.release_held_ports()
    finally:
        owner.kill()
        owner.wait()
        for path in (dead, opening, alive):
            os.unlink(path)

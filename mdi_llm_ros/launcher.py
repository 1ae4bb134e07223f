"""Pip-side launcher (`mdi-llm cluster`) and the node list shared with launch/cluster.launch.py.

`node_specs` is the one function both launchers use: it turns the config's
plan into (executable, node name, parameters) per node of a host. The launcher
here starts each as a process, prefixes and forwards its log lines, forwards
SIGINT/SIGTERM, restarts dead chunk nodes when asked to (respawn), and
otherwise stops everything and exits non-zero when a node dies.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .core.config import ClusterConfig
from .core.liveness import EVENT_COORDINATOR_SILENT, EVENT_JOINED, EVENTS_FD_ENV
from .core.plan import load_plan
from .shm import (clean_fastdds_segments, fastdds_segments, hold_dead_ports, release_held_ports,  # noqa: F401
                  shm_family, stale_fastdds_segments)

EXECUTABLES = {"coordinator": "coordinator_node", "chunk": "chunk_node"}
MAX_DEAF_RESTARTS = 3   # in a row, for a respawned chunk node whose coordinator runs on another host


@dataclass(frozen=True)
class NodeSpec:
    name: str
    role: str
    host: str
    executable: str          # ros2 run mdi_llm_ros <executable>
    module: str              # python -m <module>
    parameters: dict
    env: dict                # discovery settings from the config (ROS_DOMAIN_ID, ...)
    prefix: tuple[str, ...] = ()   # e.g. ("ip", "netns", "exec", ns): where the process runs

    def command(self, python: str = sys.executable) -> list[str]:
        args = [*self.prefix, python, "-m", self.module, "--ros-args", "-r", f"__node:={self.name}"]
        for key, value in self.parameters.items():
            args += ["-p", f"{key}:={str(value).lower() if isinstance(value, bool) else value}"]
        return args


def node_specs(config_file: str | os.PathLike, host: str | None = None, autostart: bool = True) -> list[NodeSpec]:
    """The nodes to start for `host` (None: every host), coordinator first, then the chunk nodes,
    the standby chunk nodes and the standby coordinators (coordinator.standby_hosts).

    Each carries the environment the config's discovery settings mean, so every
    device started from the same file joins the same domain the same way. autostart=False
    leaves every node unconfigured, for a lifecycle manager to bring up.
    """
    config_file = str(Path(config_file).resolve())
    cfg, plan, _ = load_plan(config_file)
    specs = []
    for n in plan.nodes_on_host(host):
        params: dict = {"config_file": config_file, "node_name": n.name}
        if not autostart:
            params["autostart"] = False
        specs.append(NodeSpec(name=n.name, role=n.role, host=n.host, executable=EXECUTABLES[n.role],
                              module=f"mdi_llm_ros.nodes.{EXECUTABLES[n.role]}", parameters=params,
                              env=cfg.discovery.env()))
    return specs


# --- process supervision ----------------------------------------------------------

class LineBuffer:
    """Where a Cluster writes its nodes' log lines when they are only shown if something fails."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, s: str) -> None:
        self.lines.append(s)

    def flush(self) -> None:
        pass

    def tail(self, n: int) -> str:
        return "".join(self.lines[-n:])


class Cluster:
    """Node processes of one host, supervised."""

    def __init__(self, specs: list[NodeSpec], *, respawn: bool = False, env: dict | None = None,
                 out=sys.stderr, python: str = sys.executable, pin_cores: bool = False,
                 survivable: tuple[str, ...] = ()) -> None:
        """survivable: roles whose death the cluster outlives without a respawn ("chunk" with
        cluster.takeover_after_s > 0, "coordinator" with coordinator.standby_hosts).
        """
        self.specs = {s.name: s for s in specs}
        self.survivable = survivable
        self.gone: set[str] = set()            # died, survivable, not restarted
        # pin_cores: node i runs on core i mod cores, so K nodes emulate K devices honestly.
        cores = sorted(os.sched_getaffinity(0))
        self.affinity = {name: {cores[i % len(cores)]} for i, name in enumerate(self.specs)} if pin_cores else {}
        self.respawn = respawn
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # Nodes sharing a host share its cores: without this, every process would start
        # one torch thread per core and they would all fight over them.
        self.env.setdefault("MDI_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, len(specs)))))
        self.out = out
        self.python = python
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self.deaf_restarts: dict[str, int] = {}   # restarts for hearing no coordinator, since it last joined
        self._out_lock = threading.Lock()
        self._stopping = False
        self._shm_before = fastdds_segments()

    def _log(self, name: str, line: str) -> None:
        with self._out_lock:
            self.out.write(f"[{name}] {line}")
            if not line.endswith("\n"):
                self.out.write("\n")
            self.out.flush()

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:                       # type: ignore[union-attr]
            self._log(name, line)

    def _events(self, name: str, proc: subprocess.Popen, fd: int) -> None:
        """What the node tells us on its events pipe (JSON lines; see nodes.common.supervisor_event)."""
        with os.fdopen(fd, "r", errors="replace") as pipe:
            for line in pipe:
                try:
                    event = json.loads(line).get("event")
                except ValueError:
                    continue
                if event == EVENT_JOINED:
                    self.deaf_restarts[name] = 0
                elif event == EVENT_COORDINATOR_SILENT and self._deaf_after_respawn(name):
                    self._restart_deaf(name, proc)

    def _deaf_after_respawn(self, name: str) -> bool:
        """Whether to restart `name`, a chunk node that hears no coordinator: only a respawned one
        (a first start may simply be early), always while this launcher's own coordinator runs (then
        the node, not the coordinator, is at fault), else at most MAX_DEAF_RESTARTS times in a row
        (the coordinator on another host may be down: no endless reloading).
        """
        if not (self.respawn and self.specs[name].role == "chunk" and self.restarts.get(name, 0) > 0):
            return False
        coordinator = next((n for n, s in self.specs.items() if s.role == "coordinator"), None)
        if coordinator in self.procs and self.procs[coordinator].poll() is None:
            return True
        return self.deaf_restarts.get(name, 0) < MAX_DEAF_RESTARTS

    def _restart_deaf(self, name: str, proc: subprocess.Popen) -> None:
        """Stop a respawned chunk node that hears no coordinator; supervise_once starts it afresh.

        Seen once in CI: a chunk node respawned right after a SIGKILL never heard the coordinator,
        and nothing changed in 60 s, while a fresh process joins in a few seconds.
        """
        if self._stopping or proc.poll() is not None:
            return
        self.deaf_restarts[name] = self.deaf_restarts.get(name, 0) + 1
        self._log("launcher", f"{name} hears no coordinator since it was respawned; restarting it")
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def kill_if_stuck() -> None:
            try:
                proc.wait(10.0)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        threading.Thread(target=kill_if_stuck, daemon=True).start()

    def start_node(self, name: str) -> subprocess.Popen:
        spec = self.specs[name]
        cores = self.affinity.get(name)
        events_r, events_w = os.pipe()
        try:
            proc = subprocess.Popen(spec.command(self.python), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", start_new_session=True, pass_fds=(events_w,),
                                    env={**self.env, **spec.env, EVENTS_FD_ENV: str(events_w)},
                                    preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
        finally:
            os.close(events_w)
        self.procs[name] = proc
        threading.Thread(target=self._pump, args=(name, proc), daemon=True).start()
        threading.Thread(target=self._events, args=(name, proc, events_r), daemon=True).start()
        return proc

    def start(self) -> None:
        for name in self.specs:
            self.start_node(name)
        self._log("launcher", f"started {', '.join(f'{n} (pid {p.pid})' for n, p in self.procs.items())}")

    def peak_rss(self) -> dict[str, int]:
        """Peak resident memory (VmHWM) of every running node process, in bytes."""
        peaks = {}
        for name, proc in self.procs.items():
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peaks[name] = int(line.split()[1]) * 1024
            except OSError:
                pass
        return peaks

    def supervise_once(self) -> str | None:
        """Check the children; restart or report a dead one. Returns the name of a fatal death."""
        for name, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or self._stopping or name in self.gone:
                continue
            spec = self.specs[name]
            hold_dead_ports()           # its ports stay taken: no process of ours reopens them (shm.py)
            if self.respawn and spec.role == "chunk":
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._log("launcher", f"{name} exited with {code}; respawning (restart {self.restarts[name]})")
                self.start_node(name)
                continue
            if spec.role in self.survivable and code != 2:
                self.gone.add(name)
                what = ("the others take its layers over" if spec.role == "chunk"
                        else "a standby coordinator takes over")
                self._log("launcher", f"{name} exited with code {code}; {what}, the cluster goes on")
                continue
            self._log("launcher", f"{name} exited with code {code}; stopping the other nodes")
            return name
        return None

    def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """SIGINT every node, wait, then SIGKILL the stubborn ones; clean their shm segments.

        Returns each node's exit code (0 is a clean shutdown).
        """
        self._stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._log("launcher", f"{name} did not stop in {timeout:.0f} s; killing it")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        release_held_ports()
        removed = clean_fastdds_segments(self._shm_before)
        if removed:
            self._log("launcher", f"removed {len(removed)} stale Fast DDS shared-memory files")
        codes = {name: proc.returncode for name, proc in self.procs.items()}
        self._log("launcher", "stopped: " + ", ".join(f"{n} exit {c}" for n, c in codes.items()))
        return codes


def survivable_roles(cfg: ClusterConfig) -> tuple[str, ...]:
    """The roles a cluster outlives the loss of (see Cluster)."""
    return tuple(role for role, ok in (("chunk", cfg.takeover_after_s > 0),
                                       ("coordinator", bool(cfg.coordinator.standby_hosts))) if ok)


def run_cluster(cfg: ClusterConfig, host: str | None = None, respawn: bool = False,
                log_dir: str | None = None, autostart: bool = True) -> int:
    """`mdi-llm cluster`: start this host's nodes and supervise them until a signal."""
    env = dict(os.environ)
    if log_dir:
        env["ROS_LOG_DIR"] = log_dir
    specs = node_specs(cfg.source, host, autostart=autostart)
    cluster = Cluster(specs, respawn=respawn, env=env, survivable=survivable_roles(cfg))
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    net = ", ".join(f"{k}={v}" for k, v in cfg.discovery.env().items())
    cluster._log("launcher", f"host {host or '(all)'}: {len(specs)} nodes from {cfg.source}"
                 + (f" ({net})" if net else ""))
    cluster.start()
    failed = None
    while not stop.wait(0.25):
        failed = cluster.supervise_once()
        if failed:
            break
    codes = cluster.stop()
    if failed:
        return 1
    # -SIGINT: a node still importing when asked to stop (its handler was not installed yet)
    unclean = [n for n, c in codes.items() if c not in (0, -signal.SIGINT)]
    if unclean:
        cluster._log("launcher", f"unclean shutdown of {', '.join(unclean)}")
        return 1
    return 0

"""Fast DDS shared-memory files: which are stale, cleaning them, and never reusing a dead port.

A SIGKILLed DDS process leaves its files under /dev/shm. Its data segments (fastdds_<id>) are
never used again and are removed. Its ports (fastdds_port<N>) are the trap: a new process
that opens port N finds it dead ("zombie"), and Fast DDS then removes the segment and makes a
new one under the same name, while every live process that wrote to the old one keeps its
mapping of the removed segment and writes into it; the new process never hears them (Fast DDS
issue #5053; the fix proposed in PR #4728 marks the old port not OK first, and is not in the
wheels' Fast DDS 3.2). That is the "deaf respawn": a chunk node restarted after kill -9 heard
nothing from the coordinator, however often it was restarted, while the coordinator heard it.
`hold_dead_ports` closes the trap: a node about to start takes the lock of every dead port
(flock on its _el file, held for the life of the process), so Fast DDS in any process sees
those ports as taken and opens a fresh port number, which every writer opens anew.
"""
from __future__ import annotations

import fcntl
import os
import time

_HELD: list[int] = []        # lock file descriptors of dead ports, held for the life of the process


def fastdds_segments() -> set[str]:
    try:
        return {p for p in os.listdir("/dev/shm") if "fastdds" in p}
    except FileNotFoundError:
        return set()


def _mapped_shm_files() -> set[str]:
    """Names under /dev/shm that a live process has mapped or open."""
    used: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        used.add(line.rsplit("/dev/shm/", 1)[1].strip().replace(" (deleted)", ""))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    used.add(target[len("/dev/shm/"):])
        except OSError:
            continue
    return used


def shm_family(name: str) -> str:
    """The Fast DDS object a /dev/shm file belongs to: a port or data segment `fastdds_X`
    comes with its named mutex `sem.fastdds_X_mutex` and its lock files `fastdds_X_el` / `_sl`.
    """
    base = name.removeprefix("sem.")
    for suffix in ("_mutex", "_el", "_sl"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def stale_fastdds_segments(before: set[str]) -> list[str]:
    """Fast DDS files created since `before` that no live process uses (what a SIGKILLed node
    leaves behind).

    A file counts as used while any file of its family is: a port that a live participant
    outside this cluster still holds needs its mutex to remove itself when that participant
    lets go; without the mutex, Fast DDS leaves the port file behind for good.
    """
    in_use = {shm_family(name) for name in _mapped_shm_files()}
    return sorted(name for name in fastdds_segments() - before if shm_family(name) not in in_use)


def clean_fastdds_segments(before: set[str]) -> list[str]:
    """Remove the stale Fast DDS files (see stale_fastdds_segments); returns their names."""
    removed = []
    for name in stale_fastdds_segments(before):
        try:
            os.unlink(f"/dev/shm/{name}")
            removed.append(name)
        except OSError:
            pass
    return removed


def hold_dead_ports(min_age_s: float = 5.0) -> list[str]:
    """Take and keep the lock of every dead Fast DDS unicast port on this machine (see the module
    docstring); returns the ports held. Call before the process's first DDS participant exists.
    Data segments are left alone: one that nobody maps yet may belong to a participant being
    made beside us this moment, and removing it leaves that participant's readers deaf to it.

    A port is dead when nobody holds its exclusive lock: Fast DDS's own zombie test (a live
    writer may still map the dead segment, so mapping says nothing). A lock file younger than
    `min_age_s` is left alone: its port may be opening in a process started at the same time,
    which creates the file a moment before it takes the lock.
    """
    held = []
    try:
        names = sorted(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return held
    now = time.time()
    for name in names:
        if not (name.startswith("fastdds_port") and name.endswith("_el")):
            continue
        try:
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
        except OSError:
            continue
        try:
            young = now - os.fstat(fd).st_mtime < min_age_s
        except OSError:
            young = True
        if young:
            os.close(fd)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:              # its owner is alive, or another process holds it already
            os.close(fd)
            continue
        _HELD.append(fd)
        held.append(shm_family(name))
    return held


def release_held_ports() -> int:
    """Let go of the dead ports this process holds (once no process of ours runs: the files can go)."""
    n = len(_HELD)
    while _HELD:
        try:
            os.close(_HELD.pop())
        except OSError:
            pass
    return n

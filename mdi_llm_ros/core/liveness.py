"""Who is on the ring: heartbeats -> which chunk processes serve, which coordinator epoch counts.

Heartbeats (NodeStatus) come from anything on the network, so neither side believes a
single one: the coordinator accepts one process per chunk name and keeps it until it
falls silent (a second process that claims the name is reported, not followed), and a
chunk follows a new coordinator epoch only once the one it serves has gone silent and
the new one has been heard more than once (a stray heartbeat cannot wipe the caches).
Plain values in, decisions out: the ROS nodes only convert messages.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

EPOCH_CONFIRMATIONS = 2      # heartbeats of a new epoch before a chunk follows it
# What a node tells the launcher that started it: JSON lines on the pipe in MDI_EVENTS_FD.
EVENTS_FD_ENV = "MDI_EVENTS_FD"
EVENT_JOINED = "joined"                           # a chunk joined a coordinator's epoch
EVENT_COORDINATOR_SILENT = "coordinator_silent"   # a chunk has heard no coordinator for a while


@dataclass
class Instance:
    """One process that claims a node name."""

    started_at_ns: int
    pid: int
    host: str
    first_heard: float
    last_heard: float

    def describe(self) -> str:
        started = time.strftime("%H:%M:%S", time.localtime(self.started_at_ns / 1e9))
        return f"pid {self.pid} on host {self.host} (started {started})"


class EpochFollower:
    """The coordinator epoch a chunk serves.

    The first epoch is taken once it has been heard EPOCH_CONFIRMATIONS times. A different
    epoch replaces it only when the current coordinator has been silent for `silence_s`
    and the new one has been heard EPOCH_CONFIRMATIONS times since: a restarted coordinator
    (whose predecessor is gone) is followed within about silence_s plus one heartbeat, and a
    forged or stray heartbeat while the coordinator lives changes nothing.
    """

    def __init__(self, silence_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.silence_s = silence_s
        self.clock = clock
        self.epoch = 0
        self.last_heard = -1e18
        self._candidates: dict[int, int] = {}     # epoch -> heartbeats heard since it appeared

    def heard(self, epoch: int) -> bool:
        """Record a coordinator heartbeat of `epoch`; True when the chunk now serves it (a new epoch)."""
        now = self.clock()
        if epoch == self.epoch:
            self.last_heard = now
            self._candidates.clear()
            return False
        count = self._candidates.get(epoch, 0) + 1
        self._candidates = {epoch: count} if len(self._candidates) > 16 else {**self._candidates, epoch: count}
        if count < EPOCH_CONFIRMATIONS or (self.epoch and now - self.last_heard < self.silence_s):
            return False
        self.epoch, self.last_heard = epoch, now
        self._candidates.clear()
        return True

    def silent_for(self) -> float:
        return self.clock() - self.last_heard


@dataclass
class Heard:
    """What one chunk heartbeat meant to the coordinator."""

    counted: bool = False                  # the node serves this coordinator now
    replaced: Instance | None = None       # a new process took the name over from this silent one
    impostor: tuple[Instance, Instance] | None = None   # (accepted, newcomer) both alive: log it


@dataclass
class ChunkLiveness:
    """Which chunk processes serve the coordinator, and why a missing one does not.

    One process per name is accepted: the first heard, until it has been silent for
    `timeout_s`; then the next one that claims the name replaces it (a restart). Another
    process with the same name meanwhile is an impostor: reported, never counted.
    """

    names: list[str]
    timeout_s: float
    epoch: int
    clock: Callable[[], float] = time.monotonic
    view: int = 0
    owners: dict[str, Instance] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)        # last heartbeat that counted
    unready: dict[str, tuple[float, str]] = field(default_factory=dict)   # name -> (when, why) it did not count
    impostors: dict[str, Instance] = field(default_factory=dict)

    def heard(self, name: str, started_at_ns: int, pid: int, host: str, epoch: int, ready: bool,
              view: int = 0) -> Heard:
        """Record a heartbeat of a chunk node. Only the accepted process counts, and only once it
        has joined this coordinator's epoch and view and matched its ring neighbours (until then
        it would drop our activations).
        """
        out = Heard()
        if name not in self.names:
            return out
        now = self.clock()
        owner = self.owners.get(name)
        if owner is None or (owner.started_at_ns != started_at_ns and now - owner.last_heard > self.timeout_s):
            out.replaced = owner
            owner = self.owners[name] = Instance(started_at_ns, pid, host, now, now)
            self.impostors.pop(name, None)
        elif owner.started_at_ns != started_at_ns:
            other = self.impostors.get(name)
            if other is None or other.started_at_ns != started_at_ns:
                other = self.impostors[name] = Instance(started_at_ns, pid, host, now, now)
            other.last_heard = now
            if owner.last_heard >= other.first_heard:          # both alive, not a restart
                out.impostor = (owner, other)
            return out
        owner.last_heard = now
        why_not = ("it has not joined this coordinator's epoch: it does not hear the coordinator"
                   if epoch != self.epoch else
                   f"it computes in view {view}, not yet in view {self.view} (loading its layers)"
                   if view != self.view else
                   "its ring topics have not matched both neighbours yet" if not ready else None)
        if why_not:
            self.unready[name] = (now, f"its heartbeats arrive, but {why_not}")
            return out
        self.last_seen[name] = now
        out.counted = True
        return out

    def speaks_for(self, name: str, started_at_ns: int) -> bool:
        """Whether this process's heartbeat speaks for `name`: it is the accepted process, or none is,
        or the accepted one has been silent past the timeout (gone). An impostor's does not.
        """
        owner = self.owners.get(name)
        return owner is None or owner.started_at_ns == started_at_ns or \
            self.clock() - owner.last_heard > self.timeout_s

    def members(self) -> tuple[list[str], list[int]]:
        """(names, accepted process of each): announced in the coordinator's heartbeat, so that a
        second process with a node's name knows to stay idle.
        """
        names = [n for n in self.names if n in self.owners]
        return names, [self.owners[n].started_at_ns for n in names]

    def missing(self) -> list[str]:
        now = self.clock()
        return [n for n in self.names if now - self.last_seen.get(n, -1e18) > self.timeout_s]

    def why_missing(self, name: str) -> str:
        """What the coordinator last knew of a missing node, for the log."""
        when, why = self.unready.get(name, (-1e18, ""))
        if self.clock() - when <= self.timeout_s:
            return why
        return "no heartbeat arrives from it"


MISSING_REPORT_HEARTBEATS = 10   # while chunk nodes stay missing, say why every 10 heartbeat timeouts
IMPOSTOR_REPORT_S = 10.0         # two processes that claim one node name: said at most this often
RING_COMPLETE = "ring complete: all chunk nodes are up; ready"


@dataclass
class RingCheck:
    """What one check of the ring decided: lines to log (level, text), and whether the requests
    in flight must be replayed (a node that was missing is back: its caches are gone).
    """

    log: list[tuple[str, str]] = field(default_factory=list)
    replay_for: list[str] = field(default_factory=list)     # the nodes that came back


class RingWatch:
    """The coordinator's view of the ring's health, from heartbeats: which chunk nodes are
    missing and why, when to say so again, and when to replay the requests in flight.
    """

    def __init__(self, names: list[str], heartbeat_timeout_s: float, epoch: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.liveness = ChunkLiveness(list(names), heartbeat_timeout_s, epoch, clock)
        self.clock = clock
        self.missing: list[str] = list(names)
        self.was_missing: set[str] = set()
        self.reported_at = clock()
        self.impostor_reported: dict[str, float] = {}
        self.report_every_s = max(5.0, MISSING_REPORT_HEARTBEATS * heartbeat_timeout_s)

    @property
    def ready(self) -> bool:
        return not self.missing

    def set_view(self, names: list[str], view: int) -> None:
        """A new view: these members, none counted until each reports ready in it; the requests in
        flight are replayed once all are.
        """
        self.liveness.names = list(names)
        self.liveness.view = view
        self.liveness.last_seen.clear()
        self.missing = list(names)
        self.was_missing = set(names)

    def heard(self, name: str, started_at_ns: int, pid: int, host: str, epoch: int, ready: bool,
              requests_in_flight: bool, view: int = 0) -> list[tuple[str, str]]:
        """Record a chunk heartbeat; returns lines to log."""
        heard = self.liveness.heard(name, started_at_ns, pid, host, epoch, ready, view)
        log: list[tuple[str, str]] = []
        if heard.replaced is not None and requests_in_flight:
            self.was_missing.add(name)
            log.append(("warning", f"{name} restarted: its in-flight requests are replayed once it is ready"))
        if heard.impostor is not None:
            now = self.clock()
            if now - self.impostor_reported.get(name, -1e18) >= IMPOSTOR_REPORT_S:
                self.impostor_reported[name] = now
                kept, other = heard.impostor
                log.append(("error", f"two processes claim chunk node {name}: {kept.describe()} and "
                            f"{other.describe()}; the ring keeps the first and ignores the second until the "
                            "first is gone. Stop one of them, or give it another chunks[].name"))
        return log

    def check(self, requests_in_flight: bool) -> RingCheck:
        """Periodic check: report changes (and, while nodes stay missing, why, now and then)."""
        out = RingCheck()
        missing = self.liveness.missing()
        now = self.clock()
        if missing != self.missing:
            out.log.append(("warning", f"chunk nodes missing: {', '.join(missing)}") if missing
                           else ("info", RING_COMPLETE))
            self.was_missing.update(missing)
            self.missing = missing
            self.reported_at = now
        elif missing and now - self.reported_at >= self.report_every_s:
            self.reported_at = now
            out.log.append(("warning", "chunk nodes still missing: " + "; ".join(
                f"{n} ({self.liveness.why_missing(n)})" for n in missing)))
        if not missing:
            if self.was_missing and requests_in_flight:
                out.replay_for = sorted(self.was_missing)
            self.was_missing.clear()
        return out

    def forget(self, name: str) -> None:
        """A node that left (deactivated, stopped): missing now, not after its heartbeats time out."""
        self.liveness.last_seen.pop(name, None)

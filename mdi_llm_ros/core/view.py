"""Views of the ring: which chunk node holds which layers, and when the team changes it.

A view is the plan the ring runs now, numbered. View 0 of an epoch is the configured plan.
When a member falls silent for `cluster.takeover_after_s` (or says it is leaving), the
coordinator plans again over the chunk nodes still heard, standbys included, with the same
`plan.make_plan`; the new view is announced in its heartbeat (members in ring order and
their layers), every chunk node loads what it gains and frees what it loses, and the
requests in flight are replayed from their token history. When every configured chunk
node is heard again, the ring returns to the configured plan at once (with a replay).
Plain values in, decisions out: the ROS nodes only convert messages.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import ConfigError
from .plan import ClusterPlan, make_plan


@dataclass(frozen=True)
class RingView:
    """One numbered plan of the ring: members in ring order and the layers of each."""

    number: int
    members: tuple[str, ...]
    layers: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, number: int, plan: ClusterPlan) -> "RingView":
        return cls(number, plan.members, tuple((n.layer_start, n.layer_end) for n in plan.chunks))

    def hop_of(self, name: str) -> int | None:
        return self.members.index(name) if name in self.members else None

    def describe(self) -> str:
        return ", ".join(f"{m} [{a}, {b})" for m, (a, b) in zip(self.members, self.layers, strict=True))


@dataclass
class ViewChange:
    """What one check decided: a new view (and its plan), and lines to log (level, text)."""

    view: RingView | None = None
    plan: ClusterPlan | None = None
    log: list[tuple[str, str]] = field(default_factory=list)


class ViewKeeper:
    """The coordinator's side of takeovers: when to plan the ring anew, and over whom.

    `heard(name, leaving)` records a chunk heartbeat (any state, any view: a process that is
    alive); `check()` decides. Rules:

    * a member silent for `takeover_after_s`, or leaving, is dropped: the new view is the plan
      over every chunk node heard within `alive_s` (configured ones and standbys, config order);
    * while the ring runs without some configured node, it returns to the configured plan as
      soon as every configured node is heard again (at once: the requests in flight are replayed
      in either case, so waiting for an idle moment would only delay the return);
    * when no plan fits the nodes left (too few layers' worth of declared memory), the view stays
      and one line says what is short; requests then fail NODE_LOST as without takeover.
    """

    def __init__(self, plan: ClusterPlan, info, alive_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = plan.config
        self.info = info
        self.takeover_after_s = plan.config.takeover_after_s
        self.alive_s = alive_s
        self.clock = clock
        self.configured = plan
        self.plan = plan
        self.view = RingView.of(0, plan)
        self.last_heard: dict[str, float] = {}
        self.leaving: set[str] = set()
        self._started = clock()
        self._no_fit: tuple[str, ...] | None = None     # the member set no plan fitted (said once)

    @property
    def enabled(self) -> bool:
        return self.takeover_after_s > 0

    def heard(self, name: str, leaving: bool = False) -> None:
        if leaving:
            self.leaving.add(name)
        else:
            self.leaving.discard(name)
            self.last_heard[name] = self.clock()

    def takeover_expected(self, missing: list[str]) -> bool:
        """Whether one of the missing members is gone in a way a takeover will answer: heard once,
        and now silent or leaving. A member that still beats but is not ready (its neighbour is
        missing, say) or one never heard is no loss: new requests are refused NOT_READY then.
        """
        return self.enabled and self._no_fit is None and any(
            m in self.last_heard and not self._alive(m, self.alive_s) for m in missing)

    def _alive(self, name: str, within: float) -> bool:
        return name not in self.leaving and self.clock() - self.last_heard.get(name, self._started - 1e9) <= within

    def check(self) -> ViewChange:
        out = ViewChange()
        if not self.enabled:
            return out
        # a member never heard is still starting (the ring is NOT_READY), not lost
        lost = [m for m in self.view.members if m in self.leaving or (
            m in self.last_heard and not self._alive(m, max(self.takeover_after_s, self.alive_s)))]
        configured = list(self.configured.members)
        if lost:
            survivors = [c.name for c in self.config.chunks if c.name not in lost and self._alive(c.name, self.alive_s)]
            why = "; ".join(f"{m} {'is leaving' if m in self.leaving else 'is silent'}" for m in lost)
        elif self.view.members != tuple(configured) and all(self._alive(n, self.alive_s) for n in configured):
            survivors, why = configured, "every configured chunk node is back"
        else:
            return out
        if tuple(survivors) == self._no_fit:
            return out
        if not survivors and all(m in self.leaving for m in self.view.members):
            self._no_fit = ()                 # the whole team stops (a shutdown): nothing to take over
            return out
        try:
            plan = self.configured if survivors == configured else make_plan(self.config, self.info, survivors)
        except ConfigError as exc:
            self._no_fit = tuple(survivors)
            out.log.append(("error", f"takeover impossible ({why}): no plan over {', '.join(survivors) or 'nobody'} "
                                     f"fits: {exc}; requests fail NODE_LOST until a node comes back"))
            return out
        self._no_fit = None
        self.plan = plan
        self.view = RingView(self.view.number + 1, plan.members,
                             tuple((n.layer_start, n.layer_end) for n in plan.chunks))
        out.view, out.plan = self.view, plan
        out.log.append(("warning", f"view {self.view.number} ({why}): {self.view.describe()}; the requests in "
                                   "flight are replayed once every member is ready"))
        return out

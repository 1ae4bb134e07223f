"""Views (takeover of a lost chunk's layers), request priority and resumed requests, in process."""
from __future__ import annotations

from collections import deque
from types import SimpleNamespace as NS

import pytest

from mdi_llm_ros.core.chunk_handler import take_ring_work
from mdi_llm_ros.core.config import parse_config
from mdi_llm_ros.core.errors import ConfigError
from mdi_llm_ros.core.local import LocalRing
from mdi_llm_ros.core.message import KIND_DECODE, KIND_PREFILL
from mdi_llm_ros.core.models import load_model_info
from mdi_llm_ros.core.plan import format_loss_plans, loss_plans, make_plan
from mdi_llm_ros.core.request import GenerateParams
from mdi_llm_ros.core.view import ViewKeeper

PROMPT = "The robot walked into the room and"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def config(model_dir, chunks=None, **cluster):
    return parse_config({"model": {"name": str(model_dir), "max_context": 256},
                         "cluster": {"takeover_after_s": 5.0, **cluster},
                         "chunks": chunks or [{"name": f"c{i}"} for i in range(3)]})


def test_plan_over_survivors_uses_the_same_rules(tiny_dir):
    info = load_model_info(tiny_dir)
    cfg = config(tiny_dir, [{"name": "a"}, {"name": "b"}, {"name": "s", "standby": True}])
    plan = make_plan(cfg, info)
    assert plan.members == ("a", "b") and [n.name for n in plan.spares] == ["s"]
    after = dict(loss_plans(cfg, info))
    assert after["a"].members == ("b", "s") and after["b"].members == ("a", "s")
    assert [(n.layer_start, n.layer_end) for n in after["a"].chunks] == [(0, 3), (3, 6)]
    room = info.layer_bytes(0, 4) * 3.5 / 1e6          # each holds half the model, not all of it
    tight = config(tiny_dir, [{"name": "a", "memory_mb": room}, {"name": "b", "memory_mb": room}])
    lost = dict(loss_plans(tight, info))
    assert isinstance(lost["a"], ConfigError) and "memory_mb" in str(lost["a"])
    assert "cannot be survived" in format_loss_plans(make_plan(tight, info), info)
    with pytest.raises(ConfigError, match="standby"):
        config(tiny_dir, [{"name": "a", "standby": True}])


def test_view_keeper_replans_on_loss_and_returns_when_the_node_is_back(tiny_dir):
    info = load_model_info(tiny_dir)
    clock = Clock()
    keeper = ViewKeeper(make_plan(config(tiny_dir), info), info, alive_s=3.0, clock=clock)
    assert keeper.check().view is None                    # nobody heard yet: starting, not lost
    assert not keeper.takeover_expected(["c0", "c1", "c2"])
    for name in ("c0", "c1", "c2"):
        keeper.heard(name)
    clock.t += 4.0
    keeper.heard("c0")
    keeper.heard("c2")
    assert keeper.check().view is None                    # c1 silent 4 s < takeover_after_s 5 s
    assert keeper.takeover_expected(["c1"])               # its requests wait for the takeover
    assert not keeper.takeover_expected(["c0", "c2"])     # beating but not ready: no loss, NOT_READY
    clock.t += 2.0
    keeper.heard("c0")
    keeper.heard("c2")
    change = keeper.check()
    assert change.view.number == 1 and change.view.members == ("c0", "c2")
    assert change.view.layers == ((0, 3), (3, 6)) and "c1 is silent" in change.log[0][1]
    assert keeper.check().view is None                    # decided once
    keeper.heard("c1")                                    # back: the configured plan at once
    change = keeper.check()
    assert change.view.number == 2 and change.view.members == ("c0", "c1", "c2")
    keeper.heard("c2", leaving=True)                      # a graceful leave needs no silence
    assert keeper.check().view.members == ("c0", "c1")


def test_view_keeper_says_once_when_no_plan_fits(tiny_dir):
    info = load_model_info(tiny_dir)
    half = info.layer_bytes(0, 4) * 3.5 / 1e6
    cfg = config(tiny_dir, [{"name": "a", "memory_mb": half}, {"name": "b", "memory_mb": half}])
    clock = Clock()
    keeper = ViewKeeper(make_plan(cfg, info), info, alive_s=3.0, clock=clock)
    keeper.heard("a")
    keeper.heard("b")
    clock.t += 10
    keeper.heard("a")
    change = keeper.check()
    assert change.view is None and change.log[0][0] == "error" and "no plan over a fits" in change.log[0][1]
    assert keeper.check().log == []                       # said once
    off = ViewKeeper(make_plan(config(tiny_dir, takeover_after_s=0.0), info), info, alive_s=3.0, clock=clock)
    assert not off.enabled and off.check().view is None


def test_takeover_mid_generation_gives_the_same_greedy_text(tiny_dir):
    """A ring of 3 loses c1 half-way: c0 and c2 take its layers over, the requests in flight are
    replayed, and the text equals an undisturbed run's; back to 3 nodes, the same again."""
    info = load_model_info(tiny_dir)
    cfg = config(tiny_dir)
    params = [GenerateParams(PROMPT, max_new_tokens=24), GenerateParams("A drone is", max_new_tokens=20)]
    undisturbed = LocalRing(make_plan(cfg, info), info)
    reference = [undisturbed.generate(p).token_ids for p in params]
    ring = LocalRing(make_plan(cfg, info), info, waves=2)
    handles = [ring.submit(p) for p in params]
    for _ in range(12):
        ring.pump(1)
    two = make_plan(cfg, info, ["c0", "c2"])
    assert ring.move_to(two, view=1) == 2
    assert [h.executor.start for h in ring.handlers] == [0, 3]
    for _ in range(20):
        ring.pump(1)
    ring.move_to(make_plan(cfg, info), view=2)
    results = ring.run(handles)
    assert [r.token_ids for r in results] == reference
    assert all(r.success for r in results)


def test_priority_request_is_admitted_first_and_old_requests_are_not_starved(tiny_dir):
    info = load_model_info(tiny_dir)
    cfg = parse_config({"model": {"name": str(tiny_dir), "max_context": 256},
                        "coordinator": {"max_inflight": 1, "priority_slots": 0, "priority_aging_s": 10.0},
                        "chunks": [{"name": "a"}]})
    ring = LocalRing(make_plan(cfg, info), info)
    clock = Clock()
    ring.scheduler.clock = clock
    admitted = []
    admit = ring.scheduler._admit
    ring.scheduler._admit = lambda req: (admitted.append(req.rid), admit(req))[1]
    first = ring.submit(GenerateParams(PROMPT, max_new_tokens=4))
    normal = ring.submit(GenerateParams("normal", max_new_tokens=4))
    clock.t += 1
    urgent = ring.submit(GenerateParams("urgent", max_new_tokens=4, priority=5))
    ring.run([first, normal, urgent])
    assert admitted == [first.request_id, urgent.request_id, normal.request_id]
    # aging: a normal request that waited 30 s outranks a priority-2 request that just came
    admitted.clear()
    busy = ring.submit(GenerateParams(PROMPT, max_new_tokens=4))
    old = ring.submit(GenerateParams("old", max_new_tokens=4))
    clock.t += 30
    new = ring.submit(GenerateParams("new", max_new_tokens=4, priority=2))
    ring.run([busy, old, new])
    assert admitted == [busy.request_id, old.request_id, new.request_id]


def test_priority_slots_and_priority_messages_go_first(tiny_dir):
    info = load_model_info(tiny_dir)
    cfg = parse_config({"model": {"name": str(tiny_dir), "max_context": 256},
                        "coordinator": {"max_inflight": 1, "priority_slots": 1, "queue_limit": 0},
                        "chunks": [{"name": "a"}]})
    ring = LocalRing(make_plan(cfg, info), info, waves=1)
    a = ring.submit(GenerateParams(PROMPT, max_new_tokens=6))
    b = ring.submit(GenerateParams("urgent", max_new_tokens=6, priority=1))     # a slot beyond max_inflight
    assert ring.scheduler.inflight == 2
    results = ring.run([a, b])
    assert all(r.success for r in results)
    assert LocalRing(make_plan(cfg, info), info).generate(GenerateParams("urgent", max_new_tokens=6)).text \
        == results[1].text

    def msg(rid, kind, priority=0):
        return NS(hops=[NS(request_id=rid, kind=kind, priority=priority, shape=[1, 1, 8])])
    q = deque([msg(1, KIND_DECODE), msg(2, KIND_PREFILL), msg(3, KIND_DECODE, 4)])
    assert [h.request_id for h in take_ring_work(q, 8)[0].hops] == [3]
    q = deque([msg(3, KIND_PREFILL), msg(3, KIND_DECODE, 4)])       # never before its own earlier message
    assert [h.request_id for h in take_ring_work(q, 8)[0].hops] == [3] and len(q) == 1


def test_the_waves_wait_while_a_priority_request_runs_and_texts_stay_the_same(tiny_dir):
    """A priority request goes at an idle ring's pace: the waves' decode steps wait until it is
    done (each at most priority_aging_s), then go on; every text equals an undisturbed run."""
    info = load_model_info(tiny_dir)
    cfg = parse_config({"model": {"name": str(tiny_dir), "max_context": 256},
                        "coordinator": {"max_inflight": 4, "priority_slots": 1},
                        "chunks": [{"name": "a"}, {"name": "b"}]})
    ring = LocalRing(make_plan(cfg, info), info, waves=1)
    background = [ring.submit(GenerateParams(p, max_new_tokens=10)) for p in (PROMPT, "The robot")]
    ring.pump(12)                                         # the wave is decoding
    reqs = ring.scheduler._inflight
    urgent = ring.submit(GenerateParams("urgent", max_new_tokens=6, priority=3))
    at_submit = [len(reqs[h.request_id].tokens) for h in background]
    seen = {}
    complete = ring.scheduler._complete

    def spy(req, reason, error=None):
        if req.rid == urgent.request_id:
            seen["background"] = [len(reqs[h.request_id].tokens) for h in background]
        return complete(req, reason, error=error)
    ring.scheduler._complete = spy
    results = ring.run(background + [urgent])
    assert all(r.success for r in results)
    assert all(n - m <= 1 for n, m in zip(seen["background"], at_submit, strict=True)), (seen, at_submit)
    solo = LocalRing(make_plan(cfg, info), info)
    for (p, n), r in zip(((PROMPT, 10), ("The robot", 10), ("urgent", 6)), results, strict=True):
        assert r.text == solo.generate(GenerateParams(p, max_new_tokens=n)).text


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 40, "seed": 7}])
def test_a_resumed_request_continues_as_an_undisturbed_one(tiny_dir, sampling):
    """resume_token_ids (a request resubmitted after a coordinator failover): the coordinator
    prefills prompt + those tokens and goes on; greedy and seeded text equal the undisturbed run."""
    info = load_model_info(tiny_dir)
    ring = LocalRing(make_plan(config(tiny_dir), info), info)
    full = ring.generate(GenerateParams(PROMPT, max_new_tokens=20, **sampling))
    pieces = []
    resumed = ring.generate(GenerateParams(PROMPT, max_new_tokens=20, resume_token_ids=tuple(full.token_ids[:9]),
                                           **sampling), on_piece=lambda p, t, n: pieces.extend(t))
    assert resumed.token_ids == full.token_ids and resumed.text == full.text
    assert pieces == full.token_ids[9:len(pieces) + 9] and len(pieces) >= 10   # every new token, once
    assert resumed.time_to_first_token >= 0


def test_a_chunk_serves_until_the_coordinator_names_another_process(tiny_dir):
    """The coordinator's heartbeat lists every member of its view, with 0 for a member it has
    not heard yet: that is no verdict, and the chunk keeps serving; another process named is."""
    from mdi_llm_ros.core.chunk import ChunkExecutor
    from mdi_llm_ros.core.chunk_handler import ChunkHandler
    info = load_model_info(tiny_dir)
    h = ChunkHandler(ChunkExecutor(info, 0, 2), cluster="c", hop=0, name="a", instance=111)
    beat = dict(inflight_ids=[], next_request_id=1, members=["a", "b"], view=0, layer_starts=[0, 2],
                layer_ends=[2, 4])
    h.on_coordinator(7, instances=[0, 0], **beat)
    news = h.on_coordinator(7, instances=[0, 0], **beat)
    assert h.serving and news.serving is None
    news = h.on_coordinator(7, instances=[222, 0], **beat)
    assert not h.serving and news.serving is False
    news = h.on_coordinator(7, instances=[111, 0], **beat)
    assert h.serving and news.serving is True

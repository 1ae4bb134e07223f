"""Chunk execution and the recurrent pipeline against plain transformers (tiny random models)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mdi_llm_ros.core.chunk import ChunkExecutor
from mdi_llm_ros.core.config import parse_config
from mdi_llm_ros.core.request import GenerateParams
from mdi_llm_ros.core.errors import ErrorCode, RequestError
from mdi_llm_ros.core.local import LocalRing
from mdi_llm_ros.core.models import load_model_info
from mdi_llm_ros.core.weights import TensorReader
from mdi_llm_ros.core.plan import make_plan
from mdi_llm_ros.core.chunk_handler import ChunkHandler
from mdi_llm_ros.core.message import KIND_DECODE, KIND_PREFILL, HopMessage

PARTITIONS = {
    "one chunk": ({}, [{"name": "a", "layers": [0, 6]}]),
    "two uneven": ({}, [{"name": "a", "layers": [0, 1]}, {"name": "b", "layers": [1, 6]}]),
    "one per layer": ({}, [{"name": f"c{i}", "layers": [i, i + 1]} for i in range(6)]),
    "coordinator holds layers": ({"layers": [0, 2]},
                                 [{"name": "a", "layers": [2, 4]}, {"name": "b", "layers": [4, 6]}]),
}


def ring_for(model_dir, coordinator, chunks, waves=0, **coord_extra):
    cfg = parse_config({"model": {"name": str(model_dir), "max_context": 256},
                        "coordinator": {**coordinator, **coord_extra}, "chunks": chunks})
    info = load_model_info(model_dir)
    return LocalRing(make_plan(cfg, info), info, waves=waves)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("partition", list(PARTITIONS))
def test_ring_logits_match_unsplit_model(tiny_dirs, arch, partition):
    """Prefill + 20 decode steps: the ring's logits equal the unsplit model's (float32 tolerance)."""
    model_dir = tiny_dirs[arch]
    coordinator, chunks = PARTITIONS[partition]
    ring = ring_for(model_dir, coordinator, chunks)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = torch.randint(3, 49152, (1, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = hf(prompt, use_cache=True)
    ref_logits, cache = out.logits[0, -1], out.past_key_values if hasattr(out, "past_key_values") else out.cache

    ids = prompt[0].tolist()
    position, step, rid = 0, 0, 7
    x = ring.model.embed_tokens(ids)
    kind = KIND_PREFILL
    for _ in range(21):
        if ring.model.local_layers is not None:
            x = ring.model.local_layers.forward(rid, step, position, x, prefill=kind == KIND_PREFILL)
        msg = HopMessage.with_tensor(x, cluster="", epoch=1, request_id=rid, step=step,
                                     first_position=position, kind=kind, hop=0)
        for h in ring.handlers:
            msg = h.handle(msg)
            assert msg is not None, getattr(h, "last_drop", None)
        logits = ring.model.logits(msg.tensor())
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        token = int(torch.argmax(ref_logits))
        position += x.shape[1]
        step += 1
        kind = KIND_DECODE
        x = ring.model.embed_tokens([token])
        with torch.no_grad():
            out = hf(torch.tensor([[token]]), cache=cache, use_cache=True)
        ref_logits = out.logits[0, -1]


def test_greedy_generation_token_identical(tiny_dir):
    ring = ring_for(tiny_dir, {}, [{"name": "a", "layers": [0, 2]}, {"name": "b", "layers": [2, 6]}])
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    r = ring.generate(GenerateParams("Robots in the kitchen", max_new_tokens=24))
    ids = ring.model.encode_prompt("Robots in the kitchen", False)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert r.token_ids == ref
    assert r.success and r.generated_tokens == len(ref)


def test_chunk_loads_only_its_layers(tiny_dir):
    info = load_model_info(tiny_dir)
    reader = TensorReader(info)
    ex = ChunkExecutor(info, 2, 4, reader=reader)
    own = {n for n in info.tensor_files if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert set(reader.names_read) == own                     # nothing else was read
    measured = sum(p.numel() * p.element_size() for p in ex.layers.parameters())
    assert measured == ex.parameter_bytes == info.layer_bytes(2, 4) + info.layer_bytes(3, 4)
    # and the whole model's layers add up to the sum over a partition
    total = sum(ChunkExecutor(info, s, e).parameter_bytes for s, e in [(0, 1), (1, 4), (4, 6)])
    assert total == sum(info.layer_bytes(i, 4) for i in range(6))


def test_smollm2_chunk_memory_share(smol_dir):
    """Real weights: a 10-layer chunk holds exactly a third of the layers' bytes."""
    info = load_model_info(smol_dir)
    reader = TensorReader(info)
    ex = ChunkExecutor(info, 10, 20, reader=reader)
    all_layers = sum(info.layer_bytes(i, 4) for i in range(30))
    assert ex.parameter_bytes * 3 == all_layers
    assert all(n.startswith(tuple(f"model.layers.{i}." for i in range(10, 20))) for n in reader.names_read)


@pytest.mark.parametrize("waves", [0, 3])
def test_concurrent_requests_match_solo_runs(tiny_dir, waves):
    """8 requests with different lengths/sampling/seeds in flight at once == each run alone;
    with waves, they travel in 3 groups, each one micro-batch at every chunk."""
    chunks = [{"name": "a", "layers": [0, 2]}, {"name": "b", "layers": [2, 4]}, {"name": "c", "layers": [4, 6]}]
    prompts = ["Hello robot", "The kitchen is", "Move forward two meters and then", "A",
               "Battery low, return to", "Sensors report an obstacle at", "Map the room", "Once upon a time"]
    params = [GenerateParams(p, max_new_tokens=6 + 3 * i, temperature=0.0 if i % 3 == 0 else 0.7 + 0.1 * i,
                             top_k=0 if i % 2 else 40, top_p=1.0 if i % 4 else 0.9, seed=100 + i)
              for i, p in enumerate(prompts)]
    ring = ring_for(tiny_dir, {}, chunks, waves=waves, max_inflight=8)
    handles = [ring.submit(p) for p in params]
    assert ring.scheduler.inflight == 8
    together = ring.run(handles)
    assert ring.scheduler.max_inflight_seen == 8
    stats = ring.handlers[1].executor.stats
    if waves:   # 8 requests of different lengths in 3 waves: decode steps meet in micro-batches
        assert stats.decode_tokens / stats.decode_forwards > 1.5
    else:       # one message per request: no two decode steps meet at a chunk
        assert stats.decode_forwards == stats.decode_tokens
    solo_ring = ring_for(tiny_dir, {}, chunks)
    for p, r in zip(params, together, strict=True):
        alone = solo_ring.generate(p)
        assert r.token_ids == alone.token_ids and r.text == alone.text
    # every cache was released on every chunk
    assert all(h.executor.num_cached == 0 for h in ring.handlers)


def test_queue_busy_and_cancel(tiny_dir):
    ring = ring_for(tiny_dir, {}, [{"name": "a"}], max_inflight=1, queue_limit=1)
    h1 = ring.submit(GenerateParams("first", max_new_tokens=5))
    h2 = ring.submit(GenerateParams("second", max_new_tokens=5))
    assert ring.scheduler.inflight == 1 and ring.scheduler.queued == 1
    with pytest.raises(RequestError) as exc:
        ring.submit(GenerateParams("third", max_new_tokens=5))
    assert exc.value.code == ErrorCode.BUSY
    ring.pump(max_messages=3)
    h1.cancel()
    r1, r2 = ring.run([h1, h2])
    assert r1.finish_reason == "cancelled" and not r1.success and r1.error_code == ErrorCode.CANCELLED
    assert r2.success and r2.generated_tokens == 5
    assert ring.handlers[0].executor.num_cached == 0


@pytest.mark.parametrize("params,code", [
    (dict(prompt=""), ErrorCode.EMPTY_PROMPT),
    (dict(prompt="hi", max_new_tokens=0), ErrorCode.INVALID_MAX_NEW_TOKENS),
    (dict(prompt="hi", max_new_tokens=100000), ErrorCode.INVALID_MAX_NEW_TOKENS),
    (dict(prompt="hi", temperature=float("nan")), ErrorCode.INVALID_TEMPERATURE),
    (dict(prompt="hi", temperature=-0.5), ErrorCode.INVALID_TEMPERATURE),
    (dict(prompt="hi", top_p=0.0), ErrorCode.INVALID_TOP_P),
    (dict(prompt="hi", top_k=-1), ErrorCode.INVALID_TOP_K),
    (dict(prompt="hi", seed=-5), ErrorCode.INVALID_SEED),
    (dict(prompt="hi", stop=("x" * 100,)), ErrorCode.INVALID_STOP),
    (dict(prompt="hi\x00there"), ErrorCode.INVALID_TEXT),
    (dict(prompt="word " * 400), ErrorCode.PROMPT_TOO_LONG),
])
def test_bad_requests_refused_with_code(tiny_dir, params, code):
    ring = ring_for(tiny_dir, {}, [{"name": "a"}])
    with pytest.raises(RequestError) as exc:
        ring.submit(GenerateParams(**params))
    assert exc.value.code == code


def test_stop_strings_and_streaming_pieces(tiny_dir):
    ring = ring_for(tiny_dir, {}, [{"name": "a"}, {"name": "b"}])
    free = ring.generate(GenerateParams("Hello", max_new_tokens=20))
    # the greedy text of the fixed tiny model is fixed: its first three-character piece without a
    # space past the middle is the stop string
    middle = len(free.text) // 2
    stop = next(free.text[i:i + 3] for i in range(middle, len(free.text) - 3) if " " not in free.text[i:i + 3])
    assert free.text.find(stop) > 0
    pieces = []
    r = ring.generate(GenerateParams("Hello", max_new_tokens=20, stop=(stop,)),
                      on_piece=lambda p, t, n: pieces.append(p))
    assert r.finish_reason == "stop"
    assert r.text == free.text[:free.text.find(stop)]
    assert "".join(pieces) == r.text


def test_bad_activations_dropped_and_counted(tiny_dir):
    info = load_model_info(tiny_dir)
    h = ChunkHandler(ChunkExecutor(info, 0, 3), cluster="c", hop=0, max_payload_bytes=64 * 64 * 4)
    h.adopt_epoch(5)
    good = HopMessage.with_tensor(torch.randn(1, 4, 64), cluster="c", epoch=5, request_id=1, step=0,
                                  first_position=0, kind=KIND_PREFILL, hop=0)
    assert h.handle(good) is not None
    cases = {
        "foreign_cluster": dict(cluster="other"),
        "wrong_hop": dict(hop=1),
        "stale_epoch": dict(epoch=4),
        "foreign_epoch": dict(epoch=7, request_id=3),
        "oversized": dict(request_id=4, shape=[1, 65, 64], data=bytes(65 * 64 * 4)),
        "bad_tensor": dict(dtype="float64"),
        "unknown_request": dict(request_id=99, kind=KIND_DECODE, step=1, first_position=4,
                                shape=[1, 1, 64], data=bytes(256)),
        "duplicate_step": dict(kind=KIND_DECODE, step=0, first_position=4, shape=[1, 1, 64], data=bytes(256)),
        "out_of_order": dict(kind=KIND_DECODE, step=3, first_position=4, shape=[1, 1, 64], data=bytes(256)),
        "bad_position": dict(kind=KIND_DECODE, step=1, first_position=9, shape=[1, 1, 64], data=bytes(256)),
        "bad_kind": dict(kind=9),
    }
    for cause, change in cases.items():
        bad = HopMessage(**{**good.__dict__, **change})
        assert h.handle(bad) is None, cause
        assert h.stats.drops.get(cause) == 1, (cause, h.stats.drops)
    # the valid request's cache is intact: its next step is still accepted
    nxt = HopMessage.with_tensor(torch.randn(1, 1, 64), cluster="c", epoch=5, request_id=1, step=1,
                                 first_position=4, kind=KIND_DECODE, hop=0)
    assert h.handle(nxt) is not None
    assert set(h.executor.caches) == {1}             # no drop touched the live cache
    # a new coordinator epoch (announced by its heartbeat) drops the old epoch's caches
    assert h.adopt_epoch(6) == 1 and h.executor.num_cached == 0
    fresh = HopMessage(**{**good.__dict__, "epoch": 6, "request_id": 2})
    assert h.handle(fresh) is not None and set(h.executor.caches) == {2}


def test_cache_limit_and_idle_eviction(tiny_dir):
    info = load_model_info(tiny_dir)
    ex = ChunkExecutor(info, 0, 1, max_cached_requests=2, cache_idle_timeout_s=10)
    for rid in (1, 2):
        ex.forward(rid, 0, 0, torch.randn(1, 3, 64))
    from mdi_llm_ros.core.errors import ActivationRejected
    assert ex.note_coordinator([1, 2], 3) == []          # both in flight: nothing to free
    with pytest.raises(ActivationRejected, match="max_cached_requests"):
        ex.forward(3, 0, 0, torch.randn(1, 3, 64))
    import time
    assert ex.evict_idle(time.monotonic() + 11) == [1, 2] and ex.num_cached == 0


def test_caches_the_coordinator_does_not_serve_never_lock_out_its_requests(tiny_dir):
    """Forged prefills (ids the coordinator never gave) fill every cache place; real requests still
    get theirs, and a cache the coordinator has in flight is never the one evicted."""
    info = load_model_info(tiny_dir)
    ex = ChunkExecutor(info, 0, 1, max_cached_requests=4, plausible_ids=100)
    ex.forward(1, 0, 0, torch.randn(1, 3, 64))
    ex.note_coordinator([1], 2)                           # request 1 in flight, the next one gets id 2
    for forged in range(10**6, 10**6 + 3):
        ex.forward(forged, 0, 0, torch.randn(1, 3, 64))
    for rid in (2, 3, 4, 5):                              # four new real requests, before any heartbeat
        ex.forward(rid, 0, 0, torch.randn(1, 3, 64))
    assert set(ex.caches) == {1, 2, 3, 4} or set(ex.caches) == {1, 3, 4, 5}
    assert 1 in ex.caches and not any(r >= 10**6 for r in ex.caches) and ex.stats.evictions == 4
    # a heartbeat: 1 and 5 in flight, ids below 6 given out; finished ones are freed at once
    ex.note_coordinator([1, 5], 6)
    assert set(ex.caches) == {1, 5}
    # order of eviction: finished ids, then ids far past the next one, then the least recently used
    for rid in (7, 10**6):
        ex.forward(rid, 0, 0, torch.randn(1, 3, 64))
    ex.forward(6, 0, 0, torch.randn(1, 3, 64))            # full: {1, 5, 7, 10**6} -> 10**6 goes
    assert set(ex.caches) == {1, 5, 6, 7}
    ex.forward(8, 0, 0, torch.randn(1, 3, 64))            # full again: 7 is the least recently used
    assert set(ex.caches) == {1, 5, 6, 8}


def test_micro_batched_decode_matches_one_by_one(tiny_dir):
    """Several requests' decode steps in one forward equal running them one at a time."""
    info = load_model_info(tiny_dir)
    one, many = ChunkExecutor(info, 0, 6), ChunkExecutor(info, 0, 6)
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 9, 2, 7]
    for rid, n in enumerate(lengths):
        prompt = torch.randn(1, n, 64, generator=gen)
        torch.testing.assert_close(one.forward(rid, 0, 0, prompt), many.forward(rid, 0, 0, prompt))
    for step in range(1, 6):
        items = [(rid, step, n + step - 1, torch.randn(1, 1, 64, generator=gen)) for rid, n in enumerate(lengths)]
        batched = many.forward_decode_batch(items)
        for (rid, st, pos, h), b in zip(items, batched, strict=True):
            torch.testing.assert_close(b, one.forward(rid, st, pos, h), rtol=1e-4, atol=1e-4)
    # a bad item is rejected alone
    from mdi_llm_ros.core.errors import ActivationRejected
    res = many.forward_decode_batch([(0, 6, lengths[0] + 5, torch.randn(1, 1, 64)), (99, 1, 3, torch.randn(1, 1, 64))])
    assert isinstance(res[1], ActivationRejected) and res[1].cause == "unknown_request"
    assert isinstance(res[0], torch.Tensor) and many.caches[0].length == lengths[0] + 6


def test_wave_waits_for_its_members_then_gives_up_on_a_straggler(tiny_dir):
    """A wave's next step leaves only when all its members are back; a member that does not come
    back within wave_hold_s no longer holds the others (poll sends them)."""
    chunks = [{"name": "a", "layers": [0, 3]}, {"name": "b", "layers": [3, 6]}]
    ring = ring_for(tiny_dir, {}, chunks, waves=1, max_inflight=4)
    now = [100.0]
    ring.scheduler.clock = lambda: now[0]
    params = [GenerateParams("Hello robot", max_new_tokens=5), GenerateParams("The kitchen is", max_new_tokens=5)]
    handles = [ring.submit(p) for p in params]
    straggler = ring._queue.pop()                 # B's prefill is held back (a slow or lost hop)
    ring.pump()                                   # A comes back, samples its first token ...
    assert not ring._queue                        # ... and waits for B
    ring.scheduler.poll()
    assert not ring._queue                        # not yet: within wave_hold_s
    now[0] += ring.scheduler.wave_hold_s + 0.01
    ring.scheduler.poll()
    assert len(ring._queue) == 1                  # A went on alone
    ring._queue.append(straggler)                 # B arrives late and rejoins the wave
    results = ring.run(handles)
    solo = ring_for(tiny_dir, {}, chunks)
    assert [r.token_ids for r in results] == [solo.generate(p).token_ids for p in params]

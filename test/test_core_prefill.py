"""Chunked prefill: long prompts travel the ring in pieces that extend each chunk's cache."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from mdi_llm_ros.core.chunk import ChunkExecutor
from mdi_llm_ros.core.config import ConfigError, parse_config
from mdi_llm_ros.core.request import GenerateParams
from mdi_llm_ros.core.errors import ActivationRejected
from mdi_llm_ros.core.local import LocalRing
from mdi_llm_ros.core.models import load_model_info
from mdi_llm_ros.core.plan import make_plan
from mdi_llm_ros.core.message import KIND_PREFILL

LONG_PROMPT = ("A delivery robot leaves the charging dock, crosses the warehouse floor, avoids two forklifts "
               "and a pallet left in the aisle, waits at the fire door for a person to pass, takes the lift "
               "to the second floor and hands a parcel to the front desk. Afterwards it")


def ring_for(model_dir, chunks, coordinator=None, **coord):
    cfg = parse_config({"model": {"name": str(model_dir), "max_context": 256},
                        "coordinator": {**(coordinator or {}), **coord}, "chunks": chunks})
    info = load_model_info(model_dir)
    return LocalRing(make_plan(cfg, info), info, waves=0)


def pieces(ex: ChunkExecutor, rid: int, x: torch.Tensor, size: int, step: int = 0) -> torch.Tensor:
    """Prefill x (1, seq, hidden) through `ex` in pieces of `size` positions."""
    out = [ex.forward(rid, step, start, x[:, start:start + size], prefill=True)
           for start in range(0, x.shape[1], size)]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("size", [1, 7, 16])
def test_prefill_in_pieces_matches_whole_prefill(tiny_dir, size):
    """Pieces that extend a cache give the whole prompt's hidden states, and later decode steps
    see the same cache."""
    info = load_model_info(tiny_dir)
    whole, split = ChunkExecutor(info, 0, 6), ChunkExecutor(info, 0, 6)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 40, 64, generator=gen)
    torch.testing.assert_close(pieces(split, 1, x, size), whole.forward(1, 0, 0, x), rtol=1e-4, atol=1e-4)
    assert split.caches[1].length == 40 and split.caches[1].last_step == 0
    for step in range(1, 4):
        token = torch.randn(1, 1, 64, generator=gen)
        torch.testing.assert_close(split.forward(1, step, 39 + step, token), whole.forward(1, step, 39 + step, token),
                                   rtol=1e-4, atol=1e-4)


def test_prefill_pieces_under_a_sliding_window(tmp_path, smol_dir):
    """Pieces of a prompt longer than the model's window attend within the window, as transformers."""
    model_dir = make_tiny_model(tmp_path / "m", "mistral", smol_dir, num_layers=2, sliding_window=6)
    info = load_model_info(model_dir)
    ex = ChunkExecutor(info, 0, 2)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 49152, (1, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states[2]          # after both layers, before the norm
        x = hf.model.embed_tokens(ids)
    got = pieces(ex, 1, x, 5)
    # hidden_states[-1] is normed in transformers; compare through the final norm
    torch.testing.assert_close(hf.model.norm(got), ref, rtol=1e-4, atol=1e-4)


def test_batched_prefill_mixes_new_prompts_and_later_pieces(tiny_dir):
    """One padded forward may hold new prompts and later pieces of others (different start
    positions): each row equals running it alone."""
    info = load_model_info(tiny_dir)
    alone, batched = ChunkExecutor(info, 0, 6), ChunkExecutor(info, 0, 6)
    gen = torch.Generator().manual_seed(4)
    first = torch.randn(1, 9, 64, generator=gen)
    for ex in (alone, batched):
        ex.forward(1, 0, 0, first)
    items = [(1, 0, 9, torch.randn(1, 6, 64, generator=gen)), (2, 0, 0, torch.randn(1, 11, 64, generator=gen)),
             (3, 0, 0, torch.randn(1, 3, 64, generator=gen))]
    expected = [alone.forward(*item, prefill=True) for item in items]
    for e, g in zip(expected, batched.forward_prefill_batch(items), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    assert [batched.caches[r].length for r in (1, 2, 3)] == [15, 11, 3]


def test_prefill_piece_rejections(tiny_dir):
    ex = ChunkExecutor(load_model_info(tiny_dir), 0, 2)
    ex.forward(1, 0, 0, torch.randn(1, 8, 64))
    cases = {"unknown_request": (2, 0, 8), "bad_position": (1, 0, 5), "out_of_order": (1, 1, 8)}
    for cause, (rid, step, position) in cases.items():
        with pytest.raises(ActivationRejected) as err:
            ex.forward(rid, step, position, torch.randn(1, 4, 64), prefill=True)
        assert err.value.cause == cause
    assert ex.caches[1].length == 8          # the rejected pieces left the cache as it was


@pytest.mark.parametrize("coordinator", [{}, {"layers": [0, 2]}])
def test_chunked_prefill_ring_is_token_identical_to_transformers(tiny_dir, coordinator):
    chunks = [{"name": "a", "layers": [coordinator.get("layers", [0, 0])[1], 4]}, {"name": "b", "layers": [4, 6]}]
    ring = ring_for(tiny_dir, chunks, coordinator, prefill_chunk_tokens=8)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = ring.model.encode_prompt(LONG_PROMPT, False)
    assert len(ids) > 40
    sent = []
    ring.scheduler._send = lambda msg, send=ring.scheduler._send: (sent.append(msg), send(msg))
    r = ring.generate(GenerateParams(LONG_PROMPT, max_new_tokens=16))
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert r.token_ids == ref
    prefills = [m for m in sent if m.kind == KIND_PREFILL]
    assert [m.first_position for m in prefills] == list(range(0, len(ids), 8))
    assert all(m.shape[1] <= 8 for m in prefills)
    assert all(h.executor.num_cached == 0 for h in ring.handlers)


def test_chunked_prefill_lets_other_requests_decode_meanwhile(tiny_dir):
    """A long prompt in pieces and short requests at once: every result equals its solo run,
    and the short requests' decode steps ran between the long prompt's pieces."""
    chunks = [{"name": "a", "layers": [0, 3]}, {"name": "b", "layers": [3, 6]}]
    ring = ring_for(tiny_dir, chunks, prefill_chunk_tokens=4, max_inflight=4)
    order = []
    handler = ring.handlers[0]
    handle_many = handler.handle_many
    handler.handle_many = lambda msgs: (order.extend((m.request_id, m.kind) for m in msgs), handle_many(msgs))[1]
    params = [GenerateParams(LONG_PROMPT, max_new_tokens=5), GenerateParams("Hello robot", max_new_tokens=12),
              GenerateParams("The kitchen is", max_new_tokens=12, temperature=0.8, seed=3)]
    results = ring.run([ring.submit(p) for p in params])
    solo = ring_for(tiny_dir, chunks, prefill_chunk_tokens=0)
    assert [r.token_ids for r in results] == [solo.generate(p).token_ids for p in params]
    long_id = 1
    pieces_at = [i for i, (rid, kind) in enumerate(order) if rid == long_id and kind == KIND_PREFILL]
    others_between = [rid for rid, _ in order[pieces_at[0]:pieces_at[-1]] if rid != long_id]
    assert len(pieces_at) > 10 and others_between
    assert all(h.executor.num_cached == 0 for h in ring.handlers)


def test_last_chunk_returns_only_a_prefills_last_position(tiny_dir):
    ring = ring_for(tiny_dir, [{"name": "a", "layers": [0, 3]}, {"name": "b", "layers": [3, 6]}],
                    prefill_chunk_tokens=0)
    assert [h.last for h in ring.handlers] == [False, True]
    ids = ring.model.encode_prompt(LONG_PROMPT, False)
    back = []
    on_outputs = ring.scheduler.on_ring_outputs
    ring.scheduler.on_ring_outputs = lambda msgs: (back.extend(msgs), on_outputs(msgs))[1]
    ring.generate(GenerateParams(LONG_PROMPT, max_new_tokens=2))
    prefill = [m for m in back if m.kind == KIND_PREFILL]
    assert len(prefill) == 1 and prefill[0].shape == [1, 1, 64] and len(ids) > 1


def test_prefill_chunk_tokens_config():
    base = {"model": {"name": "x"}, "chunks": [{"name": "a"}]}
    assert parse_config(base).coordinator.prefill_chunk_tokens == 256
    assert parse_config({**base, "coordinator": {"prefill_chunk_tokens": 0}}).coordinator.prefill_chunk_tokens == 0
    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        parse_config({**base, "coordinator": {"prefill_chunk_tokens": -1}})


def test_chunk_takes_decode_steps_first_and_merges_bursts_of_prompts():
    from collections import deque
    from types import SimpleNamespace as NS

    from mdi_llm_ros.core.chunk_handler import take_ring_work
    from mdi_llm_ros.core.message import KIND_DECODE, KIND_RELEASE

    def msg(*hops, tokens=8):
        return NS(hops=[NS(request_id=r, kind=k, shape=[1, tokens if k == KIND_PREFILL else 1, 64])
                        for r, k in hops])

    def run(queued, limit=64, max_tokens=64):
        q = deque(queued)
        got = take_ring_work(q, limit, max_tokens)
        return [[h.request_id for h in m.hops] for m in got], [[h.request_id for h in m.hops] for m in q]

    p, d = KIND_PREFILL, KIND_DECODE
    # new prompts queued together are merged
    assert run([msg((1, p)), msg((2, p)), msg((3, p))]) == ([[1], [2], [3]], [])
    # a decode wave queued behind prompts goes first; the prompts follow
    assert run([msg((1, p)), msg((2, p)), msg((4, d), (5, d)), msg((6, p))]) == ([[4, 5]], [[1], [2], [6]])
    # ... but never before a prompt (or piece) of its own request, nor does a release
    assert run([msg((1, p)), msg((4, d), (1, d))]) == ([[1]], [[4, 1]])
    assert run([msg((1, p)), msg((1, KIND_RELEASE)), msg((4, d))]) == ([[1]], [[1], [4]])
    # the next piece of prompt 1 waits: piece 0 leaves for the next node first
    assert run([msg((1, p)), msg((2, p)), msg((1, p)), msg((3, p))]) == ([[1], [2]], [[1], [3]])
    # decode waves are never merged with anything
    assert run([msg((4, d)), msg((5, d))]) == ([[4]], [[5]])
    assert run([msg((1, p)), msg((2, p)), msg((3, p))], limit=2) == ([[1], [2]], [[3]])
    # a burst is cut into batches of about max_tokens prompt tokens: 8 prompts of 8 tokens
    assert run([msg((i, p)) for i in range(1, 17)])[0] == [[i] for i in range(1, 9)]
    assert run([msg((1, p), tokens=300), msg((2, p))])[0] == [[1]]       # a long prompt goes alone
    assert run([]) == ([], [])


def test_replay_in_pieces_ignores_an_output_from_before_it(tiny_dir):
    """A chunk restarts while a decode step is on its way back; the replayed history goes out
    in pieces. The late decode output must not start the next step before the replay's last
    pieces (the chunks would drop it, and the request would hang): the result equals a run
    without the restart."""
    chunks = [{"name": "a", "layers": [0, 3]}, {"name": "b", "layers": [3, 6]}]
    ring = ring_for(tiny_dir, chunks, prefill_chunk_tokens=4)
    params = GenerateParams("Battery low, return to the dock", max_new_tokens=12)
    handle = ring.submit(params)
    sched = ring.scheduler
    real = sched.on_ring_outputs
    held = []
    sched.on_ring_outputs = lambda msgs: held.extend(msgs) if sched.tokens_generated >= 3 else real(msgs)
    while not held:
        ring.pump()
    sched.on_ring_outputs = real
    ring.handlers[1].executor.release_all()        # chunk b restarted: its caches are gone
    assert sched.replay_inflight() == 1
    assert len(ring._queue) == 2                   # two pieces out (one per chunk), more to follow
    stale = sched.drops["stale_output"]
    sched.on_ring_outputs(held)                    # the decode output computed before the restart
    assert sched.drops["stale_output"] == stale + 1 and len(ring._queue) == 2
    result = ring.run([handle])[0]
    assert result.success and result.token_ids == ring_for(tiny_dir, chunks).generate(params).token_ids


def test_a_prompt_in_pieces_does_not_hold_its_wave(tiny_dir):
    """A request decoding in the same wave as a long prompt being prefilled in pieces goes on at
    once after each step (it does not wait wave_hold_s for the prompt); a short prompt's prefill
    still holds its wave (so a burst of new requests forms full waves)."""
    chunks = [{"name": "a", "layers": [0, 3]}, {"name": "b", "layers": [3, 6]}]
    cfg = parse_config({"model": {"name": str(tiny_dir), "max_context": 256},
                        "coordinator": {"prefill_chunk_tokens": 4, "max_inflight": 2}, "chunks": chunks})
    info = load_model_info(tiny_dir)
    ring = LocalRing(make_plan(cfg, info), info, waves=1)
    now = [100.0]
    ring.scheduler.clock = lambda: now[0]         # frozen: poll() never forces a wave out
    short = GenerateParams("Hello robot", max_new_tokens=6)
    handles = [ring.submit(short)]
    ring.pump(max_messages=1)                     # the short request's prompt is through: it decodes
    handles.append(ring.submit(GenerateParams(LONG_PROMPT, max_new_tokens=3)))   # same wave, 15 pieces
    while not handles[0].done:
        ring.pump(max_messages=1)
    # the short request finished while the long prompt was still going out in pieces
    assert ring.scheduler._inflight[handles[1].request_id].in_pieces
    results = ring.run(handles)
    solo = ring_for(tiny_dir, chunks, prefill_chunk_tokens=0)
    assert [r.token_ids for r in results] == [solo.generate(p).token_ids
                                              for p in (short, GenerateParams(LONG_PROMPT, max_new_tokens=3))]

"""Our own decoder layers and the paged KV cache: exact against transformers, no transformers import."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from mdi_llm_ros.core import chunk as chunk_module
from mdi_llm_ros.core.chunk import ChunkExecutor
from mdi_llm_ros.core.decoder import DecoderSpec
from mdi_llm_ros.core.kvcache import BLOCK_TOKENS, KVPool
from mdi_llm_ros.core.errors import ModelError
from mdi_llm_ros.core.models import load_model_info

ROOT = Path(__file__).resolve().parents[1]


def transformers_chunk(info, start, end, monkeypatch) -> ChunkExecutor:
    """The same chunk built from transformers' own layers (the fallback path)."""
    with monkeypatch.context() as m:
        m.setattr(chunk_module.DecoderSpec, "support", classmethod(lambda cls, cfg: (None, "test")))
        ex = ChunkExecutor(info, start, end)
    assert ex.native is None
    return ex


@pytest.fixture(scope="module")
def llama_bias_dir(tmp_path_factory, smol_dir):
    return make_tiny_model(tmp_path_factory.mktemp("bias") / "llama", "llama", smol_dir,
                           attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "llama_bias"])
def test_native_layers_are_bit_identical_to_transformers_layers(arch, tiny_dirs, llama_bias_dir, monkeypatch):
    """Prefill and single-request decode give the very same floats as transformers' layers;
    micro-batched decode agrees to float tolerance."""
    info = load_model_info(llama_bias_dir if arch == "llama_bias" else tiny_dirs[arch])
    native, reference = ChunkExecutor(info, 1, 5), transformers_chunk(info, 1, 5, monkeypatch)
    assert native.native is not None, native.fallback_reason
    gen = torch.Generator().manual_seed(7)
    lengths = [11, 3, 20]
    for rid, n in enumerate(lengths):
        prompt = torch.randn(1, n, 64, generator=gen)
        assert torch.equal(native.forward(rid, 0, 0, prompt), reference.forward(rid, 0, 0, prompt))
    for step in range(1, 4):      # request 0 alone: the batch-1 path
        h = torch.randn(1, 1, 64, generator=gen)
        pos = lengths[0] + step - 1
        assert torch.equal(native.forward(0, step, pos, h), reference.forward(0, step, pos, h))
    lengths[0] += 3
    for step in range(1, 4):      # all three in one micro-batch, positions differ per row
        items = [(rid, step + (3 if rid == 0 else 0), n + step - 1, torch.randn(1, 1, 64, generator=gen))
                 for rid, n in enumerate(lengths)]
        for a, b in zip(native.forward_decode_batch(items), reference.forward_decode_batch(items), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_smollm2_prefill_bit_identical_to_transformers(smol_dir):
    """All 30 real SmolLM2 layers as one native chunk == transformers' model before its final norm."""
    from transformers import AutoModelForCausalLM
    info = load_model_info(smol_dir)
    ex = ChunkExecutor(info, 0, info.num_layers)
    hf = AutoModelForCausalLM.from_pretrained(smol_dir, attn_implementation="sdpa").eval()
    captured = {}
    hf.model.norm.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    ids = torch.randint(0, info.vocab_size, (1, 29), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hf(ids)
        mine = ex.forward(1, 0, 0, hf.model.embed_tokens(ids))
    assert torch.equal(mine, captured["x"])


def test_configs_the_native_layers_do_not_cover_fall_back_with_a_reason(tiny_dirs):
    base = json.loads((tiny_dirs["llama"] / "config.json").read_text())
    assert DecoderSpec.from_config(base) is not None
    cases = {"RoPE type 'llama3'": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
             "hidden_act 'gelu'": {"hidden_act": "gelu"},
             "model_type 'gemma'": {"model_type": "gemma"}}
    for why, change in cases.items():
        spec, reason = DecoderSpec.support({**base, **change})
        assert spec is None and why in reason, (why, reason)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_models_match_transformers(arch, tmp_path, smol_dir, monkeypatch):
    """A window shorter than the prompt: prefill and decode (alone and micro-batched) follow
    transformers' windowed attention; on transformers' own layers such a model is refused."""
    from transformers import AutoModelForCausalLM
    extra = {"sliding_window": 5} | ({"use_sliding_window": True, "max_window_layers": 2} if arch == "qwen2" else {})
    d = make_tiny_model(tmp_path / arch, arch, smol_dir, **extra)
    info = load_model_info(d)
    ex = ChunkExecutor(info, 0, info.num_layers)
    assert ex.native is not None and any(ex.native.spec.windows)
    hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    captured = []
    hf.model.norm.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (1, n), generator=gen) for n in (12, 7)]
    with torch.inference_mode():
        nexts = []
        for rid, ids in enumerate(prompts):
            out = hf(ids, use_cache=True)
            torch.testing.assert_close(ex.forward(rid, 0, 0, hf.model.embed_tokens(ids)), captured[-1])
            nexts.append((out.logits[:, -1:].argmax(-1), out.past_key_values))
        for step in range(1, 9):      # past the window: alone for request 0 on odd steps, batched on even
            refs, items = [], []
            for rid, (tok, past) in enumerate(nexts):
                out = hf(tok, cache=past, use_cache=True)
                refs.append(captured[-1])
                items.append((rid, step, prompts[rid].shape[1] + step - 1, hf.model.embed_tokens(tok)))
                nexts[rid] = (out.logits[:, -1:].argmax(-1), out.past_key_values)
            got = ex.forward_decode_batch(items) if step % 2 == 0 else [ex.forward(*it) for it in items]
            for g, r in zip(got, refs, strict=True):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(chunk_module.DecoderSpec, "support", classmethod(lambda cls, cfg: (None, "test")))
    with pytest.raises(ModelError, match="sliding-window attention"):
        ChunkExecutor(info, 0, 2)


def test_chunk_process_never_imports_transformers(smol_dir):
    """A chunk node's imports plus a loaded SmolLM2 chunk leave transformers unloaded (~95 MB saved)."""
    code = ("import sys\n"
            "import mdi_llm_ros.nodes.chunk_node\n"
            "from mdi_llm_ros.core.models import load_model_info\n"
            "from mdi_llm_ros.core.chunk import ChunkExecutor\n"
            f"ex = ChunkExecutor(load_model_info(__import__('pathlib').Path({str(smol_dir)!r})), 0, 3)\n"
            "import torch\n"
            "ex.forward(0, 0, 0, torch.randn(1, 5, 576))\n"
            "print(ex.native is not None, sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True []", out.stdout


def test_paged_cache_reuses_released_blocks_and_grows(tiny_dir):
    """Blocks come back on release and are reused; the pool doubles when full; results stay right."""
    info = load_model_info(tiny_dir)
    paged, fresh = ChunkExecutor(info, 0, 2), ChunkExecutor(info, 0, 2)
    # a CPU chunk starts with room for 256 positions per request: start this one small
    assert paged.pool.num_blocks == 64 * 256 // BLOCK_TOKENS
    paged.pool = KVPool(0, 2, device=paged.device, dtype=paged.dtype, blocks=64)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randn(1, 40, 64, generator=gen)
    paged.forward(1, 0, 0, prompt)
    assert paged.pool.blocks_in_use == -(-40 // BLOCK_TOKENS)
    assert paged.release(1) and paged.pool.blocks_in_use == 0
    start_blocks = paged.pool.num_blocks
    prompts = {rid: torch.randn(1, 100, 64, generator=gen) for rid in range(12)}   # 12 x 13 blocks > pool
    for rid, p in prompts.items():
        out = paged.forward(rid, 0, 0, p)
        torch.testing.assert_close(out, fresh.forward(rid, 0, 0, p))   # every request on a fresh chunk too
        fresh.release(rid)
    assert paged.pool.num_blocks > start_blocks
    assert paged.pool.blocks_in_use == 12 * -(-100 // BLOCK_TOKENS)
    # decode of all twelve in one batch after growth == one by one on a fresh chunk rebuilt from the prompts
    items = [(rid, 1, 100, torch.randn(1, 1, 64, generator=gen)) for rid in prompts]
    batched = paged.forward_decode_batch(items)
    for (rid, step, pos, h), b in zip(items, batched, strict=True):
        fresh.forward(rid, 0, 0, prompts[rid])
        torch.testing.assert_close(b, fresh.forward(rid, step, pos, h), rtol=1e-5, atol=1e-5)
    assert paged.release_all() == 12 and paged.pool.blocks_in_use == 0


def test_chunk_counts_the_kv_cache_bytes_its_requests_hold(tiny_dir):
    """The KV bytes a chunk reports (in its NodeStatus, and in the benchmark's memory table) are
    its live requests' blocks: they fall on release and reach 0; the peak keeps the most held."""
    info = load_model_info(tiny_dir)
    cfg = info.raw_config
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_block = 2 * 2 * BLOCK_TOKENS * heads * head_dim * 4        # keys and values, 2 layers, float32
    chunk = ChunkExecutor(info, 0, 2)
    assert chunk.kv_cache_bytes == chunk.kv_cache_peak_bytes == 0
    gen = torch.Generator().manual_seed(3)
    chunk.forward(1, 0, 0, torch.randn(1, 40, 64, generator=gen))
    chunk.forward(2, 0, 0, torch.randn(1, 100, 64, generator=gen))
    both = (-(-40 // BLOCK_TOKENS) + -(-100 // BLOCK_TOKENS)) * per_block
    assert chunk.kv_cache_bytes == chunk.kv_cache_peak_bytes == both
    chunk.release(2)
    assert chunk.kv_cache_bytes == -(-40 // BLOCK_TOKENS) * per_block and chunk.kv_cache_peak_bytes == both
    chunk.forward(1, 1, 40, torch.randn(1, 1, 64, generator=gen))      # a decode step within its last block
    assert chunk.kv_cache_bytes == -(-41 // BLOCK_TOKENS) * per_block
    chunk.release_all()
    assert chunk.kv_cache_bytes == 0 and chunk.kv_cache_peak_bytes == both

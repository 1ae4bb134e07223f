"""The real models, served from their GGUF files: SmolLM2-135M-Instruct (Q4_1) and Gemma 3 270M
(Q4_K_M). Tensors read from the files equal the gguf package's de-quantization, `quantization:
none` rings are token-identical to float32 transformers on the same weights, and the
quantized rings keep the file's own 4-bit blocks where they map exactly."""
from collections import Counter
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mdi_llm_ros.core.config import parse_config
from mdi_llm_ros.core.local import LocalRing
from mdi_llm_ros.core.message import KIND_PREFILL
from mdi_llm_ros.core.models import MARKER, gguf_metadata_dir, load_model_info, prepare_model
from mdi_llm_ros.core.plan import make_plan
from mdi_llm_ros.core.request import GenerateParams

pytestmark = pytest.mark.slow

PROMPTS = [("The three laws of robotics are", False),
           ("def fibonacci(n):", False),
           ("What should a robot do when its battery is low?", True)]


@pytest.fixture(scope="module")
def hf_model(smol_dir):
    return AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()


def ring_for(name, quantization="none", chunks=3, **model):
    cfg = parse_config({"model": {"name": str(name), "quantization": quantization, **model},
                        "chunks": [{"name": f"c{i}"} for i in range(chunks)]})
    info = load_model_info(str(name))
    return LocalRing(make_plan(cfg, info), info)


def test_reference_loads_and_generates(smol_dir, hf_model):
    assert (smol_dir / MARKER).is_file() and (smol_dir / "model.safetensors").is_file()
    assert hf_model.config.num_hidden_layers == 30 and hf_model.config.hidden_size == 576
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smol_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = hf_model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_prepare_writes_config_and_tokenizer_only_once(smol_gguf):
    logs = []
    assert prepare_model(log=logs.append) == smol_gguf and smol_gguf.suffix == ".gguf"
    meta = gguf_metadata_dir(smol_gguf)
    assert {"config.json", "tokenizer.json", MARKER} <= {p.name for p in meta.iterdir()}
    assert sum(p.stat().st_size for p in meta.iterdir()) < 10e6             # no weights were converted
    assert not any("reading the config" in line for line in logs)


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma3-270m"])
def test_every_tensor_type_reads_as_the_gguf_package_dequantizes_it(model):
    """Each tensor type in the two real files, read by offset: float values equal gguf's own
    de-quantization (rows in the Hugging Face order), and the blocks that map onto the integer
    kernels (Q4_0, Q4_1, Q4_K, Q8_0) give exactly those values."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    from mdi_llm_ros.core.gguf import GGUFData, unpermute_rows
    from mdi_llm_ros.core.quant import from_blocks
    info = load_model_info(model)
    data = GGUFData(info.gguf_layout, info.text_config)
    reader = GGUFReader(info.gguf)
    by_gguf_name = {t.name: t for t in reader.tensors}
    seen = {}
    for name, kind in info.tensor_kinds.items():
        if kind in seen:
            continue
        t = by_gguf_name[info.tensor_files[name]]
        expected = dequantize(np.array(t.data), GGMLQuantizationType[kind]).reshape(info.tensor_shapes[name])
        if info.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = info.text_config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            expected = unpermute_rows(expected, heads)
        if info.model_type == "gemma3_text" and name.endswith("norm.weight"):
            expected = expected - np.float32(1)           # transformers' Gemma norms: the file holds 1 + w
        got = data.floats(name)
        assert np.array_equal(got, expected), (name, kind)
        blocks = data.int_blocks(name)
        if blocks is not None:
            assert torch.equal(from_blocks(*blocks).dequantize(), torch.from_numpy(got)), (name, kind)
        seen[kind] = name
    expected_kinds = {"smollm2-135m-instruct": {"F32", "Q4_1", "Q8_0"},
                      "gemma3-270m": {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}}[model]
    assert set(seen) == expected_kinds


@pytest.mark.parametrize("kernels", ["exact", "packed"])
def test_ring_served_from_the_gguf_matches_transformers_greedy(smol_gguf, hf_model, kernels):
    ring = ring_for("smollm2-135m-instruct", kernels=kernels)
    assert ring.model.info.gguf == smol_gguf
    for prompt, chat in PROMPTS:
        result = ring.generate(GenerateParams(prompt, use_chat_template=chat, max_new_tokens=32))
        ids = ring.model.encode_prompt(prompt, chat)
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert result.token_ids == ref, (prompt, result.text)
        assert result.generated_tokens == len(ref) > 0


def test_int4_ring_runs_the_files_own_blocks(smol_gguf):
    """int4 from the Q4_1 file: every layer matrix is the file's own blocks (no re-quantization),
    weights take 0.16x their float32 share, and the head stays 8-bit (the file's Q8_0)."""
    ring = ring_for("smollm2-135m-instruct", "int4")
    fp32 = ring_for("smollm2-135m-instruct", "none", chunks=1)
    sources = Counter()
    for h in ring.handlers:
        sources += h.executor.weight_sources
    assert dict(sources) == {"Q4_1 as is to int4": 210}
    ratio = sum(h.executor.parameter_bytes for h in ring.handlers) / fp32.handlers[0].executor.parameter_bytes
    assert ratio <= 0.17, ratio
    assert ring.model.head.exact and ring.model.parameter_bytes < 0.35 * fp32.model.parameter_bytes
    r = ring.generate(GenerateParams("The three laws of robotics are", max_new_tokens=24))
    assert r.success and r.generated_tokens == 24


def test_long_prompt_in_prefill_pieces_matches_transformers_greedy(smol_gguf, hf_model):
    """A prompt longer than prefill_chunk_tokens (default 256) travels in pieces; greedy tokens
    still equal transformers' (the pieces differ from one whole prefill only in the last bits)."""
    ring = ring_for("smollm2-135m-instruct", chunks=2)
    assert ring.plan.config.coordinator.prefill_chunk_tokens == 256
    report = ("Robot log. The mobile robot started its patrol at the loading dock, checked the doors of "
              "hall A, B and C, measured the temperature in the server room and found it normal, then "
              "recharged for ten minutes. ")
    prompt = report * 24 + "Summary of the patrol:"
    ids = ring.model.encode_prompt(prompt, False)
    assert 256 < len(ids) < 2048
    sent = []
    ring.scheduler._send = lambda msg, send=ring.scheduler._send: (sent.append(msg), send(msg))
    result = ring.generate(GenerateParams(prompt, max_new_tokens=16))
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert result.token_ids == ref, result.text
    assert sum(m.kind == KIND_PREFILL for m in sent) == -(-len(ids) // 256)


@pytest.mark.parametrize("quantization,at_least", [("none", 1.0), ("int4", 0.98)])
def test_eval_on_the_shipped_text(quantization, at_least):
    """`mdi-llm eval`: the ring's perplexity and top-1 agreement with float32 transformers on the
    shipped text (none: the same arithmetic, so every position agrees)."""
    r = subprocess.run([sys.executable, "-m", "mdi_llm_ros.cli", "eval", "--quantization", quantization],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.removeprefix("eval: ").split())
    assert fields["quantization"] == quantization and int(fields["tokens"]) >= 4000, last
    assert float(fields["top1_agreement"]) >= at_least, last
    assert abs(float(fields["ppl"]) / float(fields["ref_ppl"]) - 1) < 0.01, last

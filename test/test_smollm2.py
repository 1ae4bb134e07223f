"""The real default model: prepared offline, loadable by transformers, and the ring matches it."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from mdi_llm_ros.core.config import parse_config
from mdi_llm_ros.core.request import GenerateParams
from mdi_llm_ros.core.local import LocalRing
from mdi_llm_ros.core.models import MARKER, load_model_info, prepare_model
from mdi_llm_ros.core.plan import make_plan
from mdi_llm_ros.core.message import KIND_PREFILL

pytestmark = pytest.mark.slow

PROMPTS = [("The three laws of robotics are", False),
           ("def fibonacci(n):", False),
           ("What should a robot do when its battery is low?", True)]


@pytest.fixture(scope="module")
def hf_model(smol_dir):
    return AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()


def test_prepared_model_loads_and_generates(smol_dir, hf_model):
    assert (smol_dir / MARKER).is_file() and (smol_dir / "model.safetensors").is_file()
    assert hf_model.config.num_hidden_layers == 30 and hf_model.config.hidden_size == 576
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smol_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = hf_model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_prepare_is_idempotent(smol_dir):
    logs = []
    assert prepare_model(log=logs.append) == smol_dir
    assert any("already prepared" in line for line in logs)


@pytest.mark.parametrize("kernels", ["exact", "packed"])
def test_three_chunk_ring_matches_transformers_greedy(smol_dir, hf_model, kernels):
    cfg = parse_config({"model": {"name": str(smol_dir), "kernels": kernels},
                        "chunks": [{"name": "a"}, {"name": "b"}, {"name": "c"}]})
    info = load_model_info(smol_dir)
    ring = LocalRing(make_plan(cfg, info), info)
    for prompt, chat in PROMPTS:
        result = ring.generate(GenerateParams(prompt, use_chat_template=chat, max_new_tokens=32))
        ids = ring.model.encode_prompt(prompt, chat)
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert result.token_ids == ref, (prompt, result.text)
        assert result.generated_tokens == len(ref) > 0


def test_long_prompt_in_prefill_pieces_matches_transformers_greedy(smol_dir, hf_model):
    """A prompt longer than prefill_chunk_tokens (default 256) travels in pieces; greedy tokens
    still equal transformers' (the pieces differ from one whole prefill only in the last bits)."""
    cfg = parse_config({"model": {"name": str(smol_dir)}, "chunks": [{"name": "a"}, {"name": "b"}]})
    assert cfg.coordinator.prefill_chunk_tokens == 256
    info = load_model_info(smol_dir)
    ring = LocalRing(make_plan(cfg, info), info)
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

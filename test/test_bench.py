"""The benchmark's report of a greedy divergence: which token, and how close a call it was."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mdi_llm_ros.bench import first_divergence, markdown


def test_first_divergence_names_the_token_and_its_margin(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompt = "The robot"
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    same = first_divergence(model, tok, prompt, tok.decode(ref, skip_special_tokens=True), 12)
    assert same == {"position": None, "margin": None, "token": None}
    d = first_divergence(model, tok, prompt, tok.decode(ref[:5], skip_special_tokens=True) + "\u2603\u2603", 12)
    assert d["position"] == 5 and d["token"] == tok.decode([ref[5]])
    with torch.no_grad():
        logits = model(torch.tensor([ids[0].tolist() + ref[:5]])).logits[0, -1]
    top = logits.topk(2).values
    assert abs(d["margin"] - float(top[0] - top[1])) < 1e-5 and d["margin"] >= 0


def test_table_shows_the_diverging_token():
    scenario = {"n": 4, "k": 2, "kernels": "packed", "network": "localhost", "tokens_per_s": 40.0,
                "ttft_p50": 0.1, "ttft_p95": 0.2, "per_token_ms": None, "wire_bytes_per_token": 7000,
                "greedy_identical": False, "first_diverging_char": 31,
                "divergence": {"position": 7, "margin": 3.2e-5, "token": " arm"}}
    res = {"model": "m", "tokens": 24, "pin": False, "threads": None,
           "baselines": [{"mode": "sequential", "n": 4, "tokens_per_s": 20.0, "peak_rss": 9e8},
                         {"mode": "batched", "n": 4, "tokens_per_s": 40.0, "peak_rss": 9e8}],
           "rings": [{"k": 2, "kernels": "packed", "scenarios": [scenario], "peak_rss": {"chunk_0": 5e8}}]}
    table = markdown(res)
    assert "| ring K=2 packed | 4 | 40.0 | 2.00 | 1.00 |" in table
    assert "NO (token 7, margin 3.2e-05) |" in table
    del scenario["divergence"]
    assert "NO (char 31) |" in markdown(res)

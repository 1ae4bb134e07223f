"""The command-line contract: plan table, generate --local output and argument errors."""
import re
import subprocess
import sys

import pytest

from conftest import write_config

MDI = [sys.executable, "-m", "mdi_llm_ros.cli"]


def run(args, **kw):
    return subprocess.run(MDI + args, capture_output=True, text=True, timeout=300, **kw)


def test_plan_default_config():
    r = run(["plan"], cwd=str(__import__("conftest").REPO))
    assert r.returncode == 0, r.stderr
    for name in ("coordinator", "chunk_0", "chunk_1", "chunk_2", "[0, 10)", "[20, 30)", "/mdi/ring/hop_3"):
        assert name in r.stdout


def test_plan_reports_config_errors(tmp_path, tiny_dir):
    cfg = write_config(tmp_path / "c.yaml", tiny_dir, [{"name": "a", "layers": [0, 4]}])
    r = run(["plan", "--config", str(cfg)])
    assert r.returncode == 2 and "chunks[0].layers" in r.stderr and "must end at 6" in r.stderr


def test_plan_per_device_memory_and_rejection(tmp_path, smol_dir):
    cfg = write_config(tmp_path / "c.yaml", "smollm2-135m-instruct",
                       [{"name": "a", "host": "robot_a", "memory_mb": 400},
                        {"name": "b", "host": "robot_b", "memory_mb": 200}],
                       cluster={"placement": "memory"}, coordinator={"host": "robot_a"})
    r = run(["plan", "--config", str(cfg)])
    assert r.returncode == 0, r.stderr
    assert "placement memory" in r.stdout and "[0, 20)" in r.stdout and "[20, 30)" in r.stdout
    device_rows = r.stdout.split("memory per device:")[1]
    assert "robot_a" in device_rows and "396.5" in device_rows    # head 113.2 + 20 layers 283.2
    assert "robot_b" in device_rows and "141.6" in device_rows and "58.4" in device_rows  # headroom
    # the most KV cache each device can hold: every request in flight at full context, 1536 B per
    # position and layer (SmolLM2: 3 KV heads of 64 floats, keys and values)
    requests, positions = map(int, re.search(r"at most (\d+) requests x (\d+) positions", r.stdout).groups())
    assert device_rows.split("robot_b")[1].split("\n")[0].split()[-1] == f"{10 * 1536 * requests * positions / 1e6:.0f}"

    cfg = write_config(tmp_path / "d.yaml", "smollm2-135m-instruct",
                       [{"name": "a", "host": "robot_a"}, {"name": "b", "host": "robot_b", "memory_mb": 120}])
    r = run(["plan", "--config", str(cfg)])
    assert r.returncode == 2 and r.stdout == ""
    assert "device 'robot_b'" in r.stderr and "short by 92.4 MB" in r.stderr, r.stderr


def test_generate_local_prints_only_the_continuation(tmp_path, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = write_config(tmp_path / "c.yaml", tiny_dir, [{"name": "a"}, {"name": "b"}])
    r = run(["generate", "--local", "--config", str(cfg), "--max-new-tokens", "12", "--temperature", "0",
             "Robots are"])
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = tok("Robots are", return_tensors="pt").input_ids
    ref = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:],
                     skip_special_tokens=True)
    assert r.stdout == ref + "\n"
    assert "generated tokens" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "-1"], "INVALID_TEMPERATURE"),
    (["--temperature", "nan"], "INVALID_TEMPERATURE: temperature must be a finite number"),
    (["--temperature", "1e39"], "INVALID_TEMPERATURE: temperature must be a finite number"),
    (["--top-p", "1.5"], "INVALID_TOP_P"),
    (["--max-new-tokens", "0"], "INVALID_MAX_NEW_TOKENS"),
    (["--max-new-tokens", "-1"], "INVALID_MAX_NEW_TOKENS: max_new_tokens must be in 1..4294967295, got -1"),
    (["--max-new-tokens", str(2**32 + 4)],
     "INVALID_MAX_NEW_TOKENS: max_new_tokens must be in 1..4294967295, got 4294967300"),
    (["--seed", "18446744073709551616"], "INVALID_SEED: seed must be >= 0"),
    (["--top-k", str(2**64 + 3)], "INVALID_TOP_K: top_k must be in 0..2147483647"),
    (["--stop", "a\tb", "--stop", ""], "INVALID_STOP"),
    (["--top-k", "x"], "invalid int value"),
])
@pytest.mark.parametrize("local", [True, False])
def test_generate_rejects_bad_arguments(tmp_path, tiny_dir, args, needle, local):
    """Both the in-process ring and the ROS client refuse what the wire cannot carry before
    anything is loaded or sent: exit 1 (argparse's own errors 2), `CODE: message`, no traceback."""
    cfg = write_config(tmp_path / "c.yaml", tiny_dir, [{"name": "a"}])
    r = run(["generate", *(["--local"] if local else ["--wait", "1"]), "--config", str(cfg), *args, "hello"])
    assert r.returncode == (2 if "invalid int" in needle else 1), r.stderr
    assert needle in r.stderr and r.stdout == "" and "Traceback" not in r.stderr, r.stderr

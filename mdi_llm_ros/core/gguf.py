"""GGUF files served as they are: metadata, tensor names, and a node's own tensors read by offset.

A GGUF file holds the model's weights in llama.cpp's block formats. A node reads only the
tensors it needs (plain reads at their offsets, never the whole file) and turns each into
what it computes with: float32 values for `quantization: none` (the same values
`transformers` de-quantizes, permutations and offsets included, so the ring stays
token-identical to it), or the file's own 4-bit and 8-bit blocks mapped onto torch's
integer kernels where they map exactly (Q4_0, Q4_1, Q8_0), else de-quantized and
re-quantized. Names are translated to the Hugging Face names the rest of the code uses.
No torch here: numpy in, numpy out.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError

# GGUF architectures this project computes, and the model_type they stand for.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "gemma3": "gemma3_text"}
BLOCK = 32      # weights per block of Q4_0, Q4_1, Q8_0 (and the int4 group of the kernels)

_LAYER_TENSORS = {          # GGUF name within blk.N -> Hugging Face name within model.layers.N
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str, architecture: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None: not one we use)."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if not m:
        return None
    part = m.group(2)
    if part == "ffn_norm":      # the norm before the MLP: Gemma 3 has a norm after it as well
        part_hf = "pre_feedforward_layernorm" if architecture == "gemma3" else "post_attention_layernorm"
    else:
        part_hf = _LAYER_TENSORS.get(part)
    return None if part_hf is None else f"model.layers.{m.group(1)}.{part_hf}.{kind}"


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lies in the file and how it is stored."""

    gguf_name: str
    kind: str                    # GGML type name: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, ...
    shape: tuple[int, ...]       # as the Hugging Face tensor: (rows, columns) for a matrix
    offset: int                  # absolute offset in the file
    nbytes: int

    @property
    def elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class GGUFLayout:
    """A GGUF file's architecture, metadata and tensors (by Hugging Face name), without their data."""

    path: Path
    architecture: str
    metadata: dict
    tensors: dict[str, GGUFTensor]

    @classmethod
    def read(cls, path: str | os.PathLike) -> "GGUFLayout":
        path = Path(path)
        try:
            with open(path, "rb") as f:
                header = _Header(f).parse()
        except (OSError, ValueError, struct.error) as exc:
            raise ModelError(f"{path} is not a readable GGUF file: {exc}; get the file again") from exc
        metadata, infos, data_start = header
        architecture = str(metadata.get("general.architecture", ""))
        if architecture not in ARCHITECTURES:
            raise ModelError(f"{path}: GGUF architecture {architecture!r} cannot be served; supported: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        tensors = {}
        for gguf_name, dims, type_id, offset in infos:
            name = hf_name(gguf_name, architecture)
            if name is None:
                continue
            kind = GGMLQuantizationType(type_id)
            block, block_bytes = GGML_QUANT_SIZES[kind]
            shape = tuple(reversed(dims))                   # GGUF lists the fastest-moving dimension first
            elements = 1
            for d in dims:
                elements *= d
            tensors[name] = GGUFTensor(gguf_name, kind.name, shape, data_start + offset,
                                       elements // block * block_bytes)
        return cls(path, architecture, metadata, tensors)

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]


class GGUFData:
    """Reads tensors of one GGUF file by offset, a node's own only."""

    def __init__(self, layout: GGUFLayout, config: dict) -> None:
        self.layout = layout
        self.config = config
        self.fd = os.open(layout.path, os.O_RDONLY)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def raw(self, name: str, start: int = 0, end: int | None = None) -> np.ndarray:
        """The stored bytes of a tensor's rows [start, end), (rows, bytes per row) uint8."""
        t = self.layout.tensors[name]
        if len(t.shape) < 2:
            buf = np.empty(t.nbytes, dtype=np.uint8)
            self._pread(buf, t.offset, t.gguf_name)
            return buf.reshape(1, -1)
        end = t.shape[0] if end is None else end
        row_bytes = t.nbytes // t.shape[0]
        buf = np.empty((end - start) * row_bytes, dtype=np.uint8)
        self._pread(buf, t.offset + start * row_bytes, t.gguf_name)
        return buf.reshape(end - start, row_bytes)

    def float_rows_at(self, name: str, ids: list[int]) -> np.ndarray:
        """float32 rows `ids` of a matrix (len(ids), cols): one read per row, one de-quantization."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
        t = self.layout.tensors[name]
        row_bytes = t.nbytes // t.shape[0]
        buf = np.empty((len(ids), row_bytes), dtype=np.uint8)
        for k, i in enumerate(ids):
            self._pread(buf[k], t.offset + i * row_bytes, t.gguf_name)
        values = dequantize(buf, GGMLQuantizationType[t.kind]).astype(np.float32, copy=False)
        return self._as_hf(name, values.reshape(len(ids), t.shape[1]))

    def float_rows(self, name: str, start: int, end: int) -> np.ndarray:
        """float32 rows [start, end) of a matrix, read and de-quantized alone (an embedding's rows)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
        t = self.layout.tensors[name]
        values = dequantize(self.raw(name, start, end), GGMLQuantizationType[t.kind])
        return self._as_hf(name, values.astype(np.float32, copy=False).reshape(end - start, t.shape[1]))

    def _pread(self, buf: np.ndarray, offset: int, what: str) -> None:
        view, got = memoryview(buf), 0
        while got < buf.nbytes:
            k = os.preadv(self.fd, [view[got:]], offset + got)
            if not k:
                raise ModelError(f"{self.layout.path} is truncated (tensor {what}); get the file again")
            got += k

    def floats(self, name: str) -> np.ndarray:
        """float32 values of a tensor in the Hugging Face layout, as `transformers` loads the GGUF."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
        t = self.layout.tensors[name]
        values = dequantize(self.raw(name), GGMLQuantizationType[t.kind]).astype(np.float32, copy=False)
        return self._as_hf(name, values.reshape(t.shape))

    def _as_hf(self, name: str, values: np.ndarray) -> np.ndarray:
        """Undo what llama.cpp's converter did to a tensor: row order of q/k (llama) and +1 on norms (gemma)."""
        arch = self.layout.architecture
        if arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name):
            heads = int(self.config["num_attention_heads"])
            if ".k_proj." in name:
                heads = int(self.config.get("num_key_value_heads") or heads)
            values = unpermute_rows(values, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            values = values - np.float32(1.0)
        return values

    def int_blocks(self, name: str, start: int = 0,
                   end: int | None = None) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None] | None:
        """The file's own blocks of a matrix whose groups of 32 map exactly onto the integer
        kernels, rows in the Hugging Face order: (form, q, d, m), q (rows, cols), d and m float32
        (rows, cols / 32):

        * "q4_sym" (Q4_0): q uint8 0..15, w = (q - 8) * d;
        * "q4_affine" (Q4_1, and Q4_K's sub-blocks of 32): q uint8 0..15, w = q * d + m;
        * "q8" (Q8_0): q int8, w = q * d.

        None for any other type (it is de-quantized and re-quantized). Rows [start, end) only, if
        given: a large table is converted a slice at a time.
        """
        t = self.layout.tensors[name]
        if t.kind not in ("Q4_0", "Q4_1", "Q8_0", "Q4_K") or len(t.shape) != 2:
            return None
        end = t.shape[0] if end is None else end
        rows, cols = end - start, t.shape[1]
        permuted = self.layout.architecture in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name)
        if permuted and rows != t.shape[0]:
            raise ValueError(f"{name}: its rows are permuted per head; read it whole")
        if t.kind == "Q4_K":
            form, (q, d, m) = "q4_affine", _q4_k_groups(self.raw(name, start, end), rows, cols)
        else:
            blocks = self.raw(name, start, end).reshape(rows, cols // BLOCK, -1)   # (rows, blocks, bytes per block)
            d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
            m = None
            if t.kind == "Q8_0":
                form, q = "q8", blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
            else:
                start = 4 if t.kind == "Q4_1" else 2
                form = "q4_affine" if t.kind == "Q4_1" else "q4_sym"
                if t.kind == "Q4_1":
                    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
                packed = blocks[..., start:start + 16]                      # (rows, blocks, 16)
                q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, cols)
        if permuted:
            heads = int(self.config["num_attention_heads"])
            if ".k_proj." in name:
                heads = int(self.config.get("num_key_value_heads") or heads)
            q, d = unpermute_rows(q, heads), unpermute_rows(d, heads)
            m = None if m is None else unpermute_rows(m, heads)
        return form, q, d, m


def _q4_k_groups(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks of 256 as 8 groups of 32 each: w = q * (d * sc) - dmin * m (q 0..15), the
    same arithmetic as gguf's de-quantization; returns q (rows, cols), d and m (rows, cols / 32).
    """
    from gguf.quants import Q4_K
    blocks = raw.reshape(-1, raw.shape[-1] // (cols // 256))                # (super-blocks, 144)
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)          # (n, 1)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:4 + Q4_K.K_SCALE_SIZE].copy())
    scale = d * sc.astype(np.float32)                                       # (n, 8)
    minus = dmin * mn.astype(np.float32)
    qs = blocks[:, 4 + Q4_K.K_SCALE_SIZE:].reshape(n, -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & np.uint8(0x0F)).reshape(rows, cols)
    return q, scale.reshape(rows, cols // 32), (-minus).reshape(rows, cols // 32)


class _Header:
    """A GGUF header read field by field: metadata values (vocabularies skipped, not decoded:
    the prepared tokenizer.json holds them, and decoding 50k strings costs ~100 MB at its peak)
    and each tensor's name, dimensions, type and offset.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, f) -> None:
        self.f = f

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise ValueError("the file ends inside its header")
        return struct.unpack(fmt, raw)[0]

    def _string(self) -> str:
        n = self._unpack("<Q")
        return self.f.read(n).decode("utf-8", errors="replace")

    def _value(self, kind: int, keep: bool):
        if kind in self._SCALARS:
            return self._unpack(self._SCALARS[kind])
        if kind == self._STRING:
            if keep:
                return self._string()
            self.f.seek(self._unpack("<Q"), os.SEEK_CUR)
            return None
        if kind == self._ARRAY:
            item, count = self._unpack("<I"), self._unpack("<Q")
            if item in self._SCALARS and not keep:
                self.f.seek(count * struct.calcsize(self._SCALARS[item]), os.SEEK_CUR)
                return None
            values = [self._value(item, keep) for _ in range(count)]
            return values if keep else None
        raise ValueError(f"unknown GGUF value type {kind}")

    def parse(self) -> tuple[dict, list[tuple[str, list[int], int, int]], int]:
        if self.f.read(4) != b"GGUF":
            raise ValueError("no GGUF magic number")
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not read here (2 and 3 are)")
        n_tensors, n_fields = self._unpack("<Q"), self._unpack("<Q")
        metadata = {}
        for _ in range(n_fields):
            key = self._string()
            keep = not key.startswith("tokenizer.ggml.") or key in ("tokenizer.ggml.bos_token_id",
                                                                    "tokenizer.ggml.eos_token_id")
            value = self._value(self._unpack("<I"), keep)
            if keep:
                metadata[key] = value
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        align = int(metadata.get("general.alignment", 32))
        start = self.f.tell()
        return metadata, infos, (start + align - 1) // align * align


def unpermute_rows(values: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp interleaves the two halves of each head's rows for its rotary layout; put them back."""
    dim = values.shape[0] // heads // 2
    return values.reshape(heads, dim, 2, *values.shape[1:]).swapaxes(2, 1).reshape(values.shape)

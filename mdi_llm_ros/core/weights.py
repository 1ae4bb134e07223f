"""Reading a model's weights: only the tensors a node needs, into memory of its own.

Nodes read their own layers' tensors (and the coordinator its embedding and head) with
plain file reads, so a node's weight memory is its share of the model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from .errors import ModelError
from .models import SAFETENSORS_DTYPES, ModelInfo, safetensors_layout


def _torch_dtype(code: str) -> torch.dtype | None:
    """A safetensors dtype code as a torch dtype (None: not one we read)."""
    entry = SAFETENSORS_DTYPES.get(code)
    return getattr(torch, entry[0]) if entry else None


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
            header, data_start = safetensors_layout(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                for n in sorted(group, key=lambda n: header[n]["data_offsets"][0]):
                    meta = header[n]
                    stored = _torch_dtype(meta["dtype"])
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
                headers[fname] = safetensors_layout(self.info.path / fname)[0]
            start, end = headers[fname][n]["data_offsets"]
            total += _aligned(end - start)
        return total

    def linear_source(self, name: str) -> torch.Tensor:
        """A matrix for a quantized node: its float32 values, to be quantized."""
        return self.read([name], torch.float32)[name]

    def linear_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of a matrix for a quantized node (a large head, a slice at a time)."""
        return self.rows(name, torch.float32).block(start, end)

    def rows(self, name: str, dtype: torch.dtype) -> "TensorRows":
        """A 2-D tensor whose rows are read from its file when looked up, never held whole."""
        path = self.info.path / self._file_of(name)
        header, data_start = safetensors_layout(path)
        meta = header[name]
        stored = _torch_dtype(meta["dtype"])
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
        `buffer` (a former result with at least as many rows) where the dtypes allow.
        """
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


def meta_model(config) -> torch.nn.Module:
    """The full model's module tree on the meta device: structure, no memory."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


class GGUFWeights:
    """Reads named tensors of a GGUF model, and only those (same interface as TensorReader).

    Each tensor is read by offset and turned into what the node computes with: float values
    (`read`, the same numbers `transformers` de-quantizes), or the file's own integer blocks
    where they map exactly onto the kernels (`linear_source`).
    """

    def __init__(self, info: ModelInfo) -> None:
        from .gguf import GGUFData
        self.info = info
        self.names_read: list[str] = []
        self.data = GGUFData(info.gguf_layout, info.text_config)

    def read(self, names: Iterable[str], dtype: torch.dtype, device: str = "cpu",
             buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            self._check(n)
            out[n] = torch.from_numpy(self.data.floats(n)).to(device=device, dtype=dtype)
            self.names_read.append(n)
        return out

    def _check(self, name: str) -> None:
        if name not in self.info.tensor_files:
            raise ModelError(f"tensor {name!r} is not in {self.info.gguf}; is this a Llama-family model?")

    def stored_bytes(self, names: Iterable[str]) -> int:
        """Bytes the named tensors take as float32 (what `read` returns for a buffer)."""
        return sum(_aligned(4 * _elements(self.info.tensor_shapes[n])) for n in names)

    def linear_source(self, name: str):
        """A matrix for a quantized node: the file's own Q4_0/Q4_1/Q8_0 blocks (core.quant weights),
        else its float32 values, to be re-quantized.
        """
        from .quant import from_blocks
        self._check(name)
        self.names_read.append(name)
        blocks = self.data.int_blocks(name)
        if blocks is not None:
            return from_blocks(*blocks)
        return torch.from_numpy(self.data.floats(name))

    def linear_rows(self, name: str, start: int, end: int):
        """Rows [start, end) of a matrix, as linear_source gives the whole (a large head, a slice at a time)."""
        from .quant import from_blocks
        self._check(name)
        blocks = self.data.int_blocks(name, start, end)
        if blocks is not None:
            return from_blocks(*blocks)
        return torch.from_numpy(self.data.float_rows(name, start, end))

    def rows(self, name: str, dtype: torch.dtype) -> "GGUFRows":
        self._check(name)
        self.names_read.append(name)
        return GGUFRows(self.data, name, dtype)


def _elements(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class GGUFRows:
    """Rows of a GGUF table read and de-quantized when looked up (see TensorRows)."""

    def __init__(self, data, name: str, dtype: torch.dtype) -> None:
        self.data, self.name, self.dtype = data, name, dtype
        self.shape = data.layout.tensors[name].shape

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def block(self, start: int, end: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, end) as a (end - start, width) tensor in `dtype`."""
        if not 0 <= start <= end <= self.shape[0]:
            raise IndexError(f"rows [{start}, {end}) are outside the table's {self.shape[0]} rows")
        return torch.from_numpy(self.data.float_rows(self.name, start, end)).to(self.dtype)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).tolist()
        bad = [i for i in flat if not 0 <= i < self.shape[0]]
        if bad:
            raise IndexError(f"row {bad[0]} is outside the table's {self.shape[0]} rows")
        if not flat:
            return torch.empty((*ids.shape, self.shape[1]), dtype=self.dtype)
        out = torch.from_numpy(self.data.float_rows_at(self.name, flat)).to(self.dtype)
        return out.view(*ids.shape, self.shape[1])


def open_weights(info: ModelInfo):
    """The reader of a model's weights: GGUF blocks or safetensors."""
    return GGUFWeights(info) if info.gguf is not None else TensorReader(info)

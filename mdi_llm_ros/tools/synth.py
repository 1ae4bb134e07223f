"""`mdi-llm model synth tinyllama-1b`: a seeded random-weight model of a realistic size.

SmolLM2-135M is small enough that a node's runtime (torch, DDS) weighs more than its weights;
a model in TinyLlama-1.1B's shape is where the weights dominate memory and time. Its weights
are random (normal, std 0.02, seeded), so quality is not measured on it. It is written twice:
as GGUF Q4_0 (the gguf package's writer and quantizer, the tokenizer of the shipped SmolLM2 file
cut to the model's 32000 tokens) for the ring and for llama.cpp, and as a float32 safetensors
folder holding the same (de-quantized) values, for `quantization: none` and transformers.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    context: int = 2048
    rope_theta: float = 10000.0
    eps: float = 1e-5


SHAPES = {"tinyllama-1b": Shape(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000)}
SEED = 1234


def synth_dir(name: str) -> Path:
    from ..core.models import cache_dir
    return cache_dir() / "synth" / name


def _log(msg: str) -> None:
    print(f"[synth] {msg}", file=sys.stderr, flush=True)


def _tensors(shape: Shape):
    """(GGUF name, (rows, cols) or (n,)) of every tensor, in the order llama.cpp writes them."""
    head_dim = shape.hidden // shape.heads
    yield "token_embd.weight", (shape.vocab, shape.hidden)
    for i in range(shape.layers):
        yield f"blk.{i}.attn_norm.weight", (shape.hidden,)
        yield f"blk.{i}.attn_q.weight", (shape.heads * head_dim, shape.hidden)
        yield f"blk.{i}.attn_k.weight", (shape.kv_heads * head_dim, shape.hidden)
        yield f"blk.{i}.attn_v.weight", (shape.kv_heads * head_dim, shape.hidden)
        yield f"blk.{i}.attn_output.weight", (shape.hidden, shape.heads * head_dim)
        yield f"blk.{i}.ffn_norm.weight", (shape.hidden,)
        yield f"blk.{i}.ffn_gate.weight", (shape.intermediate, shape.hidden)
        yield f"blk.{i}.ffn_up.weight", (shape.intermediate, shape.hidden)
        yield f"blk.{i}.ffn_down.weight", (shape.hidden, shape.intermediate)
    yield "output_norm.weight", (shape.hidden,)
    yield "output.weight", (shape.vocab, shape.hidden)


def _tokenizer_fields(vocab: int) -> dict:
    """The shipped SmolLM2 file's GPT-2-style tokenizer, cut to `vocab` tokens (merges whose
    pieces and result all survive), so that prompts encode and decode.
    """
    from gguf import GGUFReader

    from ..core.models import PACKAGED_MODELS, packaged_gguf
    reader = GGUFReader(packaged_gguf(PACKAGED_MODELS["smollm2-135m-instruct"]))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    types = reader.fields["tokenizer.ggml.token_type"].contents()[:vocab]
    kept = set(tokens)
    merges = [m for m in reader.fields["tokenizer.ggml.merges"].contents()
              if all(p in kept for p in m.split(" ")) and m.replace(" ", "") in kept]
    return {"tokens": tokens, "types": types, "merges": merges,
            "pre": reader.fields["tokenizer.ggml.pre"].contents(),
            "bos": reader.fields["tokenizer.ggml.bos_token_id"].contents(),
            "eos": reader.fields["tokenizer.ggml.eos_token_id"].contents()}


def synthesize(name: str = "tinyllama-1b", force: bool = False) -> Path:
    """Write the model (once); returns the GGUF file's path."""
    import gguf
    shape = SHAPES[name]
    out = synth_dir(name)
    path = out / f"{name}.Q4_0.gguf"
    done = out / "done.json"
    if done.is_file() and not force:
        _log(f"{name} is already written ({out})")
        return path
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    head_dim = shape.hidden // shape.heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"synthetic {name} (random weights, seed {SEED})")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(shape.eps)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    tok = _tokenizer_fields(shape.vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    writer.add_bos_token_id(tok["bos"])
    writer.add_eos_token_id(tok["eos"])
    rng = np.random.default_rng(SEED)
    tensors = list(_tensors(shape))
    for i, (tname, dims) in enumerate(tensors):
        if len(dims) == 1:
            writer.add_tensor(tname, np.ones(dims, dtype=np.float32))
            continue
        values = rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
        blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_0)
        writer.add_tensor(tname, blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        if (i + 1) % 18 == 0 or i + 1 == len(tensors):
            _log(f"quantized {i + 1}/{len(tensors)} tensors to Q4_0 ({time.monotonic() - t0:.0f} s)")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    _log(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")
    _write_safetensors(path, out / "safetensors")
    done.write_text(json.dumps({"name": name, "seed": SEED, "gguf": str(path), "written_at": time.time()}))
    _log(f"{name} ready in {time.monotonic() - t0:.0f} s ({out})")
    return path


def _write_safetensors(gguf_path: Path, folder: Path) -> None:
    """The GGUF's own values (de-quantized as transformers reads them) as a float32 folder."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from ..core.gguf import GGUFData
    from ..core.models import load_model_info
    info = load_model_info(str(gguf_path))
    folder.mkdir(parents=True, exist_ok=True)
    for f in info.path.iterdir():                 # config.json and the tokenizer
        if f.is_file():
            shutil.copy(f, folder / f.name)
    data = GGUFData(info.gguf_layout, info.text_config)
    shard, size, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            index.update({k: fname for k in shard})
            shard, size = {}, 0

    for name in info.tensor_files:
        shard[name] = torch.from_numpy(data.floats(name))
        size += shard[name].nbytes
        if size > 1e9:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    _log(f"wrote the float32 safetensors copy to {folder}")

"""Integer kernels (core.quant) against float matmul, and the GGUF reading they are fed from."""
import numpy as np
import pytest
import torch

from mdi_llm_ros.core.coordinator_model import quantized_head
from mdi_llm_ros.core.gguf import GGUFData, GGUFLayout, hf_name
from mdi_llm_ros.core.models import load_model_info
from mdi_llm_ros.core.quant import (GROUP, Int4Linear, Int4Weight, Int8Linear, RefinedHead, from_blocks,
                                    join_linears, quantize_int4, quantize_int8, to_int8)
from mdi_llm_ros.core.weights import open_weights

CPU = torch.device("cpu")


def _weight(out: int = 192, inp: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rows", [1, 4, 16])
def test_int4_kernel_matches_float_matmul_of_its_own_values(rows):
    """The kernel computes x @ dequantize(w).T up to bfloat16 activations (~0.4%), for any batch."""
    w = quantize_int4(_weight())
    x = torch.randn(rows, 256)
    ref = x @ w.dequantize().T
    got = Int4Linear(w, None, CPU)(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 192)
    assert _rel(got, ref) < 0.01


def test_int4_quantization_error_is_small_and_clipping_helps():
    """Groupwise 4-bit with the clip search: relative weight error well under plain min/max's."""
    w = _weight()
    w[0, 3] = 1.0                                        # one outlier in a group
    err = _rel(quantize_int4(w).dequantize(), w)
    assert err < 0.12, err


@pytest.mark.parametrize("group", [None, GROUP])
def test_int8_kernels_match_float_matmul(group):
    """Per row: torch's int8 kernel; per group of 32: two int4 halves that add up to the 8-bit weight."""
    w = quantize_int8(_weight(), group)
    assert _rel(w.dequantize(), _weight()) < 0.01
    x = torch.randn(5, 256)
    lin = Int8Linear(w, None, CPU)
    assert bool(lin.halves) == (group == GROUP)
    assert _rel(lin(x), x @ w.dequantize().T) < 0.01


def test_row_slices_pack_as_the_whole():
    """A head made a slice of rows at a time packs to the very bytes of the whole (CPU layout is row-wise)."""
    w = quantize_int4(_weight(out=320))
    whole = Int4Linear(w, None, CPU)
    parts = Int4Linear((Int4Weight(w.q[i:i + 64], w.scale[i:i + 64], w.zero[i:i + 64]) for i in range(0, 320, 64)),
                       None, CPU, rows=320)
    assert torch.equal(whole.packed, parts.packed) and torch.equal(whole.scales_and_zeros, parts.scales_and_zeros)
    w8 = quantize_int8(_weight(out=320), GROUP)
    a = Int8Linear(w8, None, CPU)
    b = Int8Linear((type(w8)(w8.q[i:i + 64], w8.scale[i:i + 64], GROUP) for i in range(0, 320, 64)), None, CPU,
                   rows=320)
    x = torch.randn(3, 256)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("kind", ["int4", "int8_row", "int8_group"])
def test_joined_linears_equal_the_separate_ones(kind):
    """q, k, v (gate, up) joined from their packed forms give each part's own output, side by side."""
    def make(w):
        if kind == "int4":
            return Int4Linear(quantize_int4(w), None, CPU)
        return Int8Linear(quantize_int8(w, None if kind == "int8_row" else GROUP), None, CPU)
    ws = [_weight(out=o, seed=s) for s, o in enumerate((128, 64, 64))]
    x = torch.randn(4, 256)
    separate = torch.cat([make(w)(x) for w in ws], dim=-1)
    joined = join_linears([make(w) for w in ws])
    assert joined is not None and joined.out_features == 256
    assert torch.equal(joined(x), separate)
    assert join_linears([make(ws[0]), Int8Linear(quantize_int8(ws[1], GROUP if kind == "int8_row" else None),
                                                 None, CPU)]) is None


def test_refined_head_decides_its_top_logits_in_float32():
    """The head's largest logits are recomputed exactly from the stored rows (read when needed)."""
    w = _weight(out=512)
    w8 = quantize_int8(w, GROUP)
    rows = w8.dequantize()
    head = RefinedHead(Int8Linear(w8, None, CPU), lambda ids: rows[ids], refine=8)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    exact = x @ rows.T
    got = head(x)
    refined = head.linear(x).topk(8, dim=-1).indices         # the ones the head recomputed
    assert torch.allclose(got.gather(-1, refined), exact.gather(-1, refined), atol=1e-5)
    assert not torch.allclose(head.linear(x).gather(-1, refined), exact.gather(-1, refined), atol=1e-5)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))


def test_gguf_header_reader_agrees_with_the_gguf_package(smol_gguf):
    """Our own header parser (which skips the vocabularies) finds every tensor where gguf does."""
    from gguf import GGUFReader
    layout = GGUFLayout.read(smol_gguf)
    reader = GGUFReader(smol_gguf)
    for t in reader.tensors:
        mine = layout.tensors[hf_name(t.name, layout.architecture)]
        assert (mine.offset, mine.nbytes, mine.kind) == (int(t.data_offset), int(t.n_bytes), t.tensor_type.name)
    assert layout.metadata["llama.block_count"] == reader.fields["llama.block_count"].contents()


def test_gguf_rows_and_row_ranges_equal_the_whole_tensor(smol_gguf):
    info = load_model_info("smollm2-135m-instruct")
    data = GGUFData(info.gguf_layout, info.text_config)
    name = "model.embed_tokens.weight"                   # Q8_0
    whole = data.floats(name)
    assert np.array_equal(data.float_rows_at(name, [5, 0, 49151, 5]), whole[[5, 0, 49151, 5]])
    assert np.array_equal(data.float_rows(name, 100, 164), whole[100:164])
    part = from_blocks(*data.int_blocks(name, 4096, 8192))
    assert torch.equal(part.dequantize(), torch.from_numpy(whole[4096:8192]))
    with pytest.raises(ValueError, match="permuted"):
        data.int_blocks("model.layers.0.self_attn.q_proj.weight", 0, 64)


def test_quantized_head_from_the_file_matches_its_values_and_the_plan(smol_gguf):
    """The shipped file's Q8_0 head, made a slice at a time: its outputs are the 8-bit head's, and
    it takes the bytes the plan says."""
    info = load_model_info("smollm2-135m-instruct")
    reader = open_weights(info)
    name = "model.embed_tokens.weight"
    head = quantized_head(reader, name, info, CPU)
    assert head.exact and head.nbytes == info.tensor_weight_bytes(name, 4, "int4")
    w = to_int8(reader.linear_source(name), group=GROUP)
    x = torch.randn(2, info.hidden_size)
    assert _rel(head(x), x @ w.dequantize().T) < 0.01

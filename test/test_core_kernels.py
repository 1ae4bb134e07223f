"""Packed (oneDNN) kernels and batched prefill: same results to float tolerance, same memory."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mdi_llm_ros.core.chunk import ChunkExecutor
from mdi_llm_ros.core.config import parse_config
from mdi_llm_ros.core.coordinator_model import CoordinatorModel
from mdi_llm_ros.core.errors import ActivationRejected, ConfigError
from mdi_llm_ros.core.kernels import PackedHead, PackedLinear, packed_unsupported
from mdi_llm_ros.core.errors import ModelError
from mdi_llm_ros.core.models import load_model_info
from mdi_llm_ros.core.weights import TensorReader
from mdi_llm_ros.core.chunk_handler import PREFILL_BATCH_TOKENS, ChunkHandler
from mdi_llm_ros.core.message import KIND_PREFILL, HopMessage

ROOT = Path(__file__).resolve().parents[1]


def test_packed_linear_matches_linear_and_rows_do_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 160, bias=True)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(16, 96, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        alone = [packed(x[i:i + 1]) for i in range(16)]
        for rows in (2, 5, 8, 16):
            batch = packed(x[:rows])
            assert all(torch.equal(batch[i:i + 1], alone[i]) for i in range(rows)), rows
        assert packed(x.view(4, 4, 96)).shape == (4, 4, 160)


def test_packed_head_in_blocks_equals_one_packed_matmul(monkeypatch):
    monkeypatch.setattr(PackedHead, "BLOCK_ROWS", 48)
    weight = torch.randn(200, 32)
    reads = []

    def read(start, end, buffer):
        reads.append((start, end, buffer is not None))
        return weight[start:end].clone()
    head = PackedHead(read, 200)
    assert reads == [(0, 48, False), (48, 96, True), (96, 144, True), (144, 192, True), (192, 200, True)]
    x = torch.randn(3, 1, 32)
    assert torch.equal(head(x), PackedLinear(weight)(x))


def test_packed_support_is_checked():
    assert packed_unsupported("cpu", torch.float32) is None
    assert "float32 only" in packed_unsupported("cpu", torch.bfloat16)
    assert "CPU only" in packed_unsupported("cuda", torch.float32)


def test_config_validates_kernels():
    base = {"model": {"name": "m"}, "chunks": [{"name": "a"}, {"name": "b", "device": "cuda:0"}]}
    assert parse_config({"model": {"name": "m"}, "chunks": [{"name": "a"}]}).model.kernels == "exact"
    with pytest.raises(ConfigError, match=r"model.kernels: 'fast' is not a choice; use one of exact, packed"):
        parse_config({"model": {"name": "m", "kernels": "fast"}, "chunks": [{"name": "a"}]})
    with pytest.raises(ConfigError, match=r"model.kernels: packed computes float32 only"):
        parse_config({"model": {"name": "m", "kernels": "packed", "dtype": "bfloat16"}, "chunks": [{"name": "a"}]})
    with pytest.raises(ConfigError, match=r"chunks\[1\].device: 'cuda:0', but model.kernels: packed runs on the CPU"):
        parse_config({**base, "model": {"name": "m", "kernels": "packed"}})
    parse_config(base)       # exact kernels run anywhere


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_packed_chunk_matches_exact_chunk(arch, tiny_dirs):
    info = load_model_info(tiny_dirs[arch])
    exact, packed = ChunkExecutor(info, 0, 4), ChunkExecutor(info, 0, 4, kernels="packed")
    assert packed.parameter_bytes == exact.parameter_bytes
    assert not any(isinstance(m, nn.Linear) for m in packed.layers.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.layers.modules()) == 4 * 7
    gen = torch.Generator().manual_seed(3)
    for rid, n in enumerate([9, 4]):
        x = torch.randn(1, n, 64, generator=gen)
        torch.testing.assert_close(packed.forward(rid, 0, 0, x), exact.forward(rid, 0, 0, x), rtol=1e-4, atol=1e-4)
    for step in range(1, 4):
        items = [(rid, step, n + step - 1, torch.randn(1, 1, 64, generator=gen)) for rid, n in enumerate([9, 4])]
        for a, b in zip(packed.forward_decode_batch(items), exact.forward_decode_batch(items), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_packed_chunk_refuses_what_it_cannot_compute(tiny_dir):
    info = load_model_info(tiny_dir)
    with pytest.raises(ModelError, match="model.kernels is packed, but packed kernels compute float32 only"):
        ChunkExecutor(info, 0, 1, dtype="bfloat16", kernels="packed")
    with pytest.raises(ValueError, match="kernels 'fast'"):
        ChunkExecutor(info, 0, 1, kernels="fast")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])     # untied and tied LM head
def test_packed_coordinator_matches_exact(arch, tiny_dirs):
    info = load_model_info(tiny_dirs[arch])
    exact, packed = CoordinatorModel(info), CoordinatorModel(info, kernels="packed")
    assert packed.parameter_bytes == exact.parameter_bytes
    ids = [0, 7, 49151, 7, 300]
    assert torch.equal(packed.embed_tokens(ids), exact.embed_tokens(ids))
    assert torch.equal(packed.embed_tokens_batch(ids), exact.embed_tokens_batch(ids))
    last = torch.randn(4, 1, 64)
    torch.testing.assert_close(packed.logits_batch(last), exact.logits_batch(last), rtol=1e-4, atol=1e-4)
    with pytest.raises(IndexError, match="row 49152 is outside the table's 49152 rows"):
        packed.embed_tokens([49152])


def test_table_rows_read_from_the_file_equal_the_tensor(tiny_dir):
    info = load_model_info(tiny_dir)
    reader = TensorReader(info)
    full = reader.read(["model.embed_tokens.weight"], torch.float32)["model.embed_tokens.weight"]
    rows = reader.rows("model.embed_tokens.weight", torch.float32)
    assert rows.shape == tuple(full.shape) and rows.nbytes == full.numel() * 4
    assert torch.equal(rows(torch.tensor([[3, 1], [2, 49151]])), full[torch.tensor([[3, 1], [2, 49151]])])
    block = rows.block(100, 164)
    assert torch.equal(block, full[100:164])
    again = rows.block(10, 20, buffer=block)
    assert again.data_ptr() == block.data_ptr() and torch.equal(again, full[10:20])
    with pytest.raises(IndexError):
        rows.block(49150, 49153)


@pytest.mark.slow
def test_packed_coordinator_does_not_hold_the_plain_head(smol_dir):
    """Peak resident memory of the coordinator's model parts: packed costs at most one block
    of plain rows more than exact (it held the whole plain head next to the packed one)."""
    code = ("import sys; from pathlib import Path\n"
            "from mdi_llm_ros.core.models import load_model_info\n"
            "from mdi_llm_ros.core.coordinator_model import CoordinatorModel\n"
            f"m = CoordinatorModel(load_model_info(Path({str(smol_dir)!r})), kernels=sys.argv[1])\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n")
    peak = {k: int(subprocess.run([sys.executable, "-c", code, k], capture_output=True, text=True, check=True,
                                  cwd=ROOT).stdout) / 1024 for k in ("exact", "packed")}
    block_mb = PackedHead.BLOCK_ROWS * 576 * 4 / 2**20
    assert peak["packed"] < peak["exact"] + block_mb + 15, peak


# --- batched prefill ---------------------------------------------------------------------

def test_batched_prefill_matches_one_by_one_and_decode_goes_on(tiny_dirs):
    info = load_model_info(tiny_dirs["qwen2"])
    alone, batched = ChunkExecutor(info, 0, 4), ChunkExecutor(info, 0, 4)
    gen = torch.Generator().manual_seed(5)
    lengths = [7, 1, 19, 12]
    prompts = [torch.randn(1, n, 64, generator=gen) for n in lengths]
    expected = [alone.forward(rid, 0, 0, x) for rid, x in enumerate(prompts)]
    got = batched.forward_prefill_batch([(rid, 0, 0, x) for rid, x in enumerate(prompts)])
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    assert [batched.caches[rid].length for rid in range(4)] == lengths
    for step in range(1, 20):    # positions follow each prompt's own length; padding never shows
        items = [(rid, step, n + step - 1, torch.randn(1, 1, 64, generator=gen)) for rid, n in enumerate(lengths)]
        for e, g in zip([alone.forward(*it) for it in items], batched.forward_decode_batch(items), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_batched_prefill_under_a_sliding_window(tmp_path, smol_dir):
    from conftest import make_tiny_model
    info = load_model_info(make_tiny_model(tmp_path / "m", "mistral", smol_dir, num_layers=2, sliding_window=6))
    alone, batched = ChunkExecutor(info, 0, 2), ChunkExecutor(info, 0, 2)
    prompts = [torch.randn(1, n, 64) for n in (15, 4, 9)]
    expected = [alone.forward(rid, 0, 0, x) for rid, x in enumerate(prompts)]
    got = batched.forward_prefill_batch([(rid, 0, 0, x) for rid, x in enumerate(prompts)])
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_batched_prefill_rejects_one_item_and_runs_the_rest(tiny_dir):
    ex = ChunkExecutor(load_model_info(tiny_dir), 0, 2)
    out = ex.forward_prefill_batch([(1, 0, 0, torch.randn(1, 5, 64)), (2, 0, 3, torch.randn(1, 5, 64)),
                                    (3, 0, 0, torch.randn(1, 2, 64))])
    assert out[0].shape == (1, 5, 64) and out[2].shape == (1, 2, 64)
    assert isinstance(out[1], ActivationRejected) and out[1].cause == "unknown_request"
    assert set(ex.caches) == {1, 3}


def test_handler_prefills_prompts_that_arrive_together_in_one_forward(tiny_dir, monkeypatch):
    info = load_model_info(tiny_dir)
    handler = ChunkHandler(ChunkExecutor(info, 0, 2), cluster="c", hop=0)
    handler.adopt_epoch(1)
    calls = []
    real = handler.executor.forward_prefill_batch
    monkeypatch.setattr(handler.executor, "forward_prefill_batch",
                        lambda items: calls.append([len(i[3][0]) for i in items]) or real(items))

    def prefill(rid, n):
        return HopMessage.with_tensor(torch.randn(1, n, 64), cluster="c", epoch=1, request_id=rid, step=0,
                                      first_position=0, kind=KIND_PREFILL, hop=0)
    out = handler.handle_many([prefill(1, 5), prefill(2, 9), prefill(3, 2)])
    assert calls == [[5, 9, 2]]
    assert [(m.request_id, m.tensor().shape[1], m.hop) for m in out] == [(1, 5, 1), (2, 9, 1), (3, 2, 1)]
    calls.clear()
    half = PREFILL_BATCH_TOKENS // 2
    handler.handle_many([prefill(4, half), prefill(5, half), prefill(6, 3)])   # padded positions are bounded
    assert calls == [[half, half], [3]]

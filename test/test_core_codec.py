import array

import pytest
import torch

from mdi_llm_ros.core import codec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_bit_identical(dtype):
    t = torch.randn(1, 7, 576).to(dtype)
    name, shape, data = codec.encode(t)
    back = codec.decode(name, shape, array.array("B", bytes(data)))
    assert back.dtype == dtype and list(back.shape) == [1, 7, 576]
    assert torch.equal(back.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       t.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_encode_is_zero_copy_and_decode_shares_buffer():
    t = torch.arange(12, dtype=torch.float32).view(1, 3, 4)
    _, _, data = codec.encode(t)
    t[0, 0, 0] = 42.0
    assert memoryview(data).cast("f")[0] == 42.0            # view over the tensor's storage
    buf = bytearray(bytes(data))
    out = codec.decode("float32", [1, 3, 4], buf)
    buf[0:4] = bytes(4)
    assert out[0, 0, 0].item() == 0.0                        # tensor over the given buffer


@pytest.mark.parametrize("dtype,shape,nbytes,match", [
    ("float64", [1, 2], 16, "unknown dtype"),
    ("float32", [1, 2, 3], 20, "need 24"),
    ("float32", [1, 0, 3], 0, "positive"),
    ("float32", [], 0, "positive"),
    ("float16", [2], 8, "need 4"),
])
def test_inconsistent_triples_rejected(dtype, shape, nbytes, match):
    with pytest.raises(codec.CodecError, match=match):
        codec.decode(dtype, shape, bytes(nbytes))


def test_size_limit():
    with pytest.raises(codec.CodecError, match="exceeds the limit"):
        codec.decode("float32", [1, 4], bytes(16), max_bytes=8)

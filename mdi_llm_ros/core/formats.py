"""The number formats and kernels a config can name, without importing torch.

The one table of activation/weight dtypes (name -> bytes per element) that the config
checks, the plan sizes memory with and the codec maps to torch dtypes.
"""
from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KERNELS = ("exact", "packed")      # model.kernels (core.kernels computes them)
QUANTIZATIONS = ("none", "int8", "int4")   # model.quantization (core.quant computes them)
# GGUF types with more than 4 bits per weight: an int4 node keeps these 8-bit rather than lose the
# precision the file chose for them (as llama.cpp's own Q4_K_M keeps some tensors at Q6_K).
FINER_THAN_4_BIT = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K")


def linear_format(quantization: str, stored: str) -> str:
    """int4 or int8: what a matrix stored as `stored` (a GGUF type, or F32/F16/BF16) becomes."""
    return "int8" if quantization == "int8" or stored in FINER_THAN_4_BIT else "int4"


# GGUF types whose blocks map exactly onto the int4 kernels' groups (core.gguf.GGUFData.int_blocks).
EXACT_4_BIT = ("Q4_0", "Q4_1", "Q4_K")


def head_format(stored: str) -> str:
    """What a quantized node's LM head becomes: the file's own 4-bit blocks where it has them, else
    8-bit by groups of 32 (a head re-quantized to 4 bits changed greedy text after a few tokens).
    """
    return "int4" if stored in EXACT_4_BIT else "int8"

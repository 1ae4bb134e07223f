"""The number formats and kernels a config can name, without importing torch.

The one table of activation/weight dtypes (name -> bytes per element) that the config
checks, the plan sizes memory with and the codec maps to torch dtypes.
"""
from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KERNELS = ("exact", "packed")      # model.kernels (core.kernels computes them)

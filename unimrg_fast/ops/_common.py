"""Helpers shared by the Triton ops: how a kernel's dtypes change when it runs in the
Triton interpreter (TRITON_INTERPRET=1, the CPU lane; DESIGN.md section 4)."""
from __future__ import annotations

import torch


def interpreted_bf16(dtype: torch.dtype, interpreted: bool) -> bool:
    """True where a kernel must not compute or round in bf16: the interpreter treats
    bf16 as raw bits (Triton issue 11584), so bf16 tiles are upcast right after loading.
    fp16 keeps its real dtype, so the CPU lane runs the GPU's casts."""
    return interpreted and dtype == torch.bfloat16


def store_dtype(dtype: torch.dtype, interpreted: bool) -> torch.dtype:
    """The dtype of a buffer a kernel writes for an output of `dtype`.

    The interpreter converts fp32 to bf16 by truncating the low mantissa bits, where a
    GPU rounds to nearest even: interpreted bf16 outputs are stored in fp32 and cast
    (with torch's rounding) outside the kernel.
    """
    return torch.float32 if interpreted_bf16(dtype, interpreted) else dtype

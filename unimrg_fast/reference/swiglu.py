"""Plain PyTorch SwiGLU: the gated MLP activation of Qwen2 / Llama decoders.

    y = silu(gate) * up = gate * sigmoid(gate) * up      (elementwise)

where gate = gate_proj(x) and up = up_proj(x); the MLP then computes down_proj(y).
This is Hugging Face transformers' eager formula, `act_fn(gate_proj(x)) * up_proj(x)`
with act_fn = SiLU, and it rounds twice: F.silu(gate) is rounded to gate's dtype
before the product is rounded again (in bf16 that is one extra rounding of ~2^-9 per
element). The fused kernel computes in fp32 and rounds once, so the two agree to the
output dtype's rounding, not bit for bit.

Float64 inputs are accepted here only (never by the kernel): with either input in
float64 both are computed in float64, so the twin can serve as an oracle.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from unimrg_fast._validation import FLOAT_DTYPES, check_out_dtype, check_tensor


def check_swiglu_args(gate, up, *, out_dtype: Optional[torch.dtype] = None,
                      allow_float64: bool = False) -> torch.dtype:
    """Every argument check of swiglu, shared by all its implementations.

    gate and up: tensors of the same shape [..., I] (rank >= 1, any size, zero included)
    on the same device, each float32 / float16 / bfloat16. Their dtypes may differ.
    allow_float64: the reference computes in float64 when given it; the kernel does not.
    out_dtype: None, or one of those dtypes.

    Returns the output dtype: out_dtype, or what eager broadcasting gives,
    torch.promote_types(gate.dtype, up.dtype).
    """
    dtypes = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor(gate, "gate", dtypes=dtypes)
    check_tensor(up, "up", dtypes=dtypes, device=gate.device)
    if gate.dim() < 1:
        raise ValueError("gate must have at least 1 dimension [..., I], got a scalar")
    if up.shape != gate.shape:
        raise ValueError(f"up must have the same shape as gate [..., I] = {tuple(gate.shape)}, "
                         f"got {tuple(up.shape)}")
    return check_out_dtype(out_dtype, torch.promote_types(gate.dtype, up.dtype), dtypes)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *,
           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = silu(gate) * up, Hugging Face's eager way: `(F.silu(gate) * up).to(out_dtype)`.

    Args:
        gate, up: [..., I], float32 / float16 / bfloat16 / float64, same shape and device;
            the dtypes may differ (the product promotes, as eager broadcasting does).
        out_dtype: None (torch.promote_types(gate.dtype, up.dtype)) or a float dtype.

    Returns:
        [..., I] in out_dtype. Gradients reach gate and up through autograd.
    """
    out_dtype = check_swiglu_args(gate, up, out_dtype=out_dtype, allow_float64=True)
    if torch.float64 in (gate.dtype, up.dtype):
        # oracle mode: no rounding of silu(gate) to a narrower gate dtype
        gate, up = gate.double(), up.double()
    return (F.silu(gate) * up).to(out_dtype)

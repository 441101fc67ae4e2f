"""Plain PyTorch RMSNorm, the way Hugging Face's Qwen2 / Llama decoders compute it.

    y = weight * (x / sqrt(mean(x^2) + eps))

Qwen2RMSNorm upcasts x to fp32, normalises, rounds the normalised rows back to x's dtype
and only then multiplies by the weight (so the product promotes to the weight's dtype).
This twin does the same, computing in float64 instead when an input is float64 (it then
also serves as an oracle), and finally casts to `out_dtype`.
"""
from __future__ import annotations

from typing import Optional

import torch

from unimrg_fast._validation import FLOAT_DTYPES, check_out_dtype, check_shape, check_tensor


def check_rms_norm_args(x, weight, *, eps, out_dtype, dtypes=FLOAT_DTYPES) -> torch.dtype:
    """Every argument check of rms_norm, shared by its implementations; returns the output
    dtype (`out_dtype`, else what eager broadcasting of x and weight gives)."""
    check_tensor(x, "x", dtypes=dtypes)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., H], got a scalar")
    check_tensor(weight, "weight", ndim=1, dtypes=dtypes, device=x.device)
    check_shape(weight, "weight", (x.shape[-1],), "[H] = x.shape[-1]")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return check_out_dtype(out_dtype, torch.promote_types(x.dtype, weight.dtype), dtypes)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """RMSNorm over the last dimension.

    Args:
        x: [..., H] float32 / float16 / bfloat16 (float64 here too).
        weight: [H], on x's device.
        eps: added to the mean square before the reciprocal square root (>= 0).
        out_dtype: the result's dtype; None: torch.promote_types(x.dtype, weight.dtype).

    Returns:
        [..., H] in out_dtype; gradients reach x and weight.
    """
    dtypes = FLOAT_DTYPES + (torch.float64,)
    out = check_rms_norm_args(x, weight, eps=eps, out_dtype=out_dtype, dtypes=dtypes)
    compute = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    xc = x.to(compute)
    normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(out)

"""Plain PyTorch rotary position embedding, the way Hugging Face Qwen2 / Llama apply it.

For one tensor x (q or k) in HF's [B, H, T, D] layout and cos, sin of shape [B, T, D]
(or [T, D], or [1, T, D] for positions shared by the batch), broadcast over the heads:

    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
    y = x * cos + rotate_half(x) * sin

which is `transformers.models.qwen2.modeling_qwen2.apply_rotary_pos_emb` for one of its
two tensors, followed by `.to(out_dtype)`. HF builds cos = cat(c, c) and sin = cat(s, s)
along D, but nothing here assumes the two halves are equal.
"""
from __future__ import annotations

from typing import Optional

import torch

from unimrg_fast._validation import FLOAT_DTYPES, check_out_dtype, check_tensor


def check_rotary_args(x, cos, sin, *, out_dtype: Optional[torch.dtype] = None,
                      allow_float64: bool = False) -> torch.dtype:
    """Every argument check of rotary_embedding, shared by all its implementations.

    allow_float64: the reference computes in float64 when given it; the kernels do not.
    Returns the output dtype: `out_dtype`, or torch.promote_types(x.dtype, cos.dtype)
    (what eager PyTorch gives, e.g. fp32 for bf16 q with autocast's fp32 cos).
    """
    dtypes = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor(x, "x", ndim=4, dtypes=dtypes)
    b, _, t, d = x.shape
    if d % 2:
        raise ValueError(f"x's last dimension (the head dim D) must be even: rotate_half pairs "
                         f"d with d + D/2; got x of shape {tuple(x.shape)}")
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(table, name, dtypes=dtypes, device=x.device)
        _check_table_shape(table, name, b, t, d)
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin must have the same dtype as cos ({cos.dtype}), got {sin.dtype}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have the same shape as cos {tuple(cos.shape)}, "
                         f"got {tuple(sin.shape)}")
    return check_out_dtype(out_dtype, torch.promote_types(x.dtype, cos.dtype), dtypes)


def _check_table_shape(table: torch.Tensor, name: str, b: int, t: int, d: int) -> None:
    """cos / sin: [T, D], [B, T, D] or [1, T, D] (HF's position_ids of shape [1, T])."""
    ok = (table.dim() == 2 and tuple(table.shape) == (t, d)) or (
        table.dim() == 3 and tuple(table.shape[1:]) == (t, d) and table.shape[0] in (1, b))
    if not ok:
        raise ValueError(f"{name} must have shape [B, T, D] = {(b, t, d)}, [1, T, D] or "
                         f"[T, D] = {(t, d)} (from x's [B, H, T, D]), got {tuple(table.shape)}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) for x = cat(x1, x2) along the last dimension (HF's rotate_half)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = x * cos + rotate_half(x) * sin, cos / sin broadcast over the heads.

    Args:
        x: [B, H, T, D] (any strides), float32 / float16 / bfloat16 / float64; D even.
        cos, sin: [B, T, D], [1, T, D] or [T, D], one dtype, on x's device.
        out_dtype: None for torch.promote_types(x.dtype, cos.dtype), else the output dtype.

    Returns:
        [B, H, T, D] in out_dtype. Computed in eager's promoted dtype (each product and
        the sum rounded there), then cast. Gradients reach x, cos and sin (plain autograd).
    """
    out_dtype = check_rotary_args(x, cos, sin, out_dtype=out_dtype, allow_float64=True)
    # [T, D] -> [1, T, D] -> [1, 1, T, D]; [B, T, D] -> [B, 1, T, D]: HF's unsqueeze_dim=1
    cos = cos.unsqueeze(-3)
    sin = sin.unsqueeze(-3)
    return (x * cos + rotate_half(x) * sin).to(out_dtype)

"""Plain PyTorch linear cross-entropy (DESIGN.md section 3.1): the oracle and the baseline.

This is the way UMM codebases compute the loss today: materialise the [N, V] logits
with `F.linear`, upcast them to fp32, and call `F.cross_entropy(reduction="none")`.
It therefore costs N * V * 4 bytes (plus the same again for the gradient) that the
fused path never allocates; that is the point of the comparison.

Where torch and the contract differ, the contract wins: every-row-ignored "mean" is
0 with zero gradient (torch gives NaN), and per-token weights are folded in with
`torch.where` so that an ignored row can never leak a NaN or inf into a sum.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from unimrg_fast._validation import (check_index_range, check_linear_head, check_reduction,
                                     check_tensor, check_token_weight, flatten_rows)


def check_ce_options(ignore_index, label_smoothing, z_loss, softcap) -> None:
    """Validates the scalar options of a cross-entropy call (shared with joint_loss)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"ignore_index must fit in int64 (target's dtype), got {ignore_index}")
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or isinstance(z_loss, bool) \
            or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")


def _common_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def masked_weighted_reduce(per_row: torch.Tensor, valid: Optional[torch.Tensor],
                           weight: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """w_i * l_i with zeros where not valid, reduced; "mean" divides by sum of valid w
    and is 0 (zero gradient, no NaN) when that sum is exactly 0 (a NaN sum stays NaN).
    All fp32, no host sync."""
    n = per_row.shape[0]
    w = (torch.ones_like(per_row) if weight is None
         else weight.reshape(n).to(device=per_row.device, dtype=torch.float32))
    zero = torch.zeros((), dtype=torch.float32, device=per_row.device)
    if valid is None:
        weighted = w * per_row
        w_valid = w
    else:
        weighted = torch.where(valid, w * per_row, zero)
        w_valid = torch.where(valid, w, zero)
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    den = w_valid.sum()
    # Only an exact 0 means "nothing scored": a NaN sum (a NaN weight on a scored row) must
    # give a NaN loss, matching the NaN gradients it gives, not a loss that reads 0.
    empty = den == 0
    return torch.where(empty, zero, total / torch.where(empty, torch.ones_like(den), den))


def check_ce_args(hidden, weight, target, *, bias, ignore_index, reduction, label_smoothing,
                  z_loss, softcap, token_weight):
    """Every argument check of linear_cross_entropy, shared by all its implementations.

    Returns (h [N, H], y [N]): hidden with leading dims flattened, target as a vector.
    """
    check_reduction(reduction)
    check_ce_options(ignore_index, label_smoothing, z_loss, softcap)
    check_tensor(hidden, "hidden")
    h = flatten_rows(hidden)
    check_linear_head(h, weight, bias, "V")
    n = h.shape[0]
    check_tensor(target, "target", dtypes=(torch.int64,), device=h.device)
    if target.numel() != n:
        raise ValueError(f"target must hold one class id per row of hidden ({n} rows = "
                         f"hidden.shape[:-1] {tuple(hidden.shape[:-1])}), got shape "
                         f"{tuple(target.shape)}")
    y = target.reshape(n)
    check_index_range(y, "target", 0, weight.shape[0], allowed_extra=ignore_index)
    check_token_weight(token_weight, n, h.device)
    return h, y


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         token_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of the logits cap(hidden @ weight.T + bias), materialised.

    Args:
        hidden: [..., H] fp32 / fp16 / bf16; leading dimensions are flattened to N rows.
        weight: [V, H] fp32 / fp16 / bf16, same device. bias: [V] or None.
        target: int64 with N elements (e.g. [N] or hidden's leading dims); values in
            [0, V) or `ignore_index`. Ignored rows contribute nothing, get zero gradient.
        reduction: "mean" (sum_i w_i l_i / sum_i w_i over non-ignored rows, 0 when none),
            "sum" (sum_i w_i l_i) or "none" ([N], zeros at ignored rows).
        label_smoothing: e in [0, 1], torch's definition:
            l_i = (1 - e)(lse_i - z_iy) + e(lse_i - mean_j z_ij) + z_loss * lse_i^2.
        z_loss: coefficient >= 0 of lse_i^2 (PaLM's auxiliary loss).
        softcap: c > 0 applies z -> c * tanh(z / c) to the logits (Gemma 2), or None.
        token_weight: [N] non-negative per-row weights w_i, or None for 1.

    Returns:
        fp32 scalar, or fp32 [N] for reduction="none". Gradients reach hidden, weight
        and bias in their own dtypes. Mixed input dtypes are promoted for the matmul.
    """
    h, y = check_ce_args(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                         softcap=softcap, token_weight=token_weight)

    valid = y != ignore_index
    # An ignored row must contribute nothing whatever its hidden state: a non-finite one
    # would reach dW as 0 * nan through the matmul. Zeroing it is a mask, not a sync.
    h = torch.where(valid[:, None], h, 0)
    dtype = _common_dtype(h, weight, bias)
    logits = F.linear(h.to(dtype), weight.to(dtype),
                      None if bias is None else bias.to(dtype)).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    # F.cross_entropy already gives 0 (and zero gradient) at ignored rows.
    per_row = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none",
                              label_smoothing=float(label_smoothing))
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        per_row = per_row + torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    return masked_weighted_reduce(per_row, valid, token_weight, reduction)

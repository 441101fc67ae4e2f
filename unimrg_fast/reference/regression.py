"""Plain PyTorch linear regression head + squared error (DESIGN.md section 3.2).

p = hidden @ weight.T + bias in fp32 math, l_i = w_i * mean_c (p_ic - t_ic)^2. The
target is the caller's choice (see unimrg_fast.targets: latent MSE, DDPM epsilon,
flow matching).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from unimrg_fast._validation import (FLOAT_DTYPES, check_linear_head, check_reduction,
                                     check_tensor, check_token_weight, flatten_rows)
from unimrg_fast.reference.cross_entropy import masked_weighted_reduce


def check_regression_args(hidden, weight, target, *, bias, token_weight, reduction):
    """Every argument check of regression_loss, shared by all its implementations.

    Returns (h [N, H], t [N, C]): hidden and target with leading dims flattened.
    """
    check_reduction(reduction)
    check_tensor(hidden, "hidden")
    h = flatten_rows(hidden)
    check_linear_head(h, weight, bias, "C")
    n, channels = h.shape[0], weight.shape[0]
    check_tensor(target, "target", dtypes=FLOAT_DTYPES + (torch.float64,), device=h.device)
    leading = tuple(hidden.shape[:-1])
    if tuple(target.shape) not in ((n, channels), leading + (channels,)):
        raise ValueError(f"target must have shape [N, C] = {(n, channels)} (N rows of hidden, "
                         f"C = weight.shape[0]), got {tuple(target.shape)}")
    check_token_weight(token_weight, n, h.device)
    return h, target.reshape(n, channels)


def regression_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None,
                    token_weight: Optional[torch.Tensor] = None,
                    reduction: str = "mean") -> torch.Tensor:
    """Per-row loss l_i = w_i * mean_c (p_ic - t_ic)^2 with p = hidden @ weight.T + bias.

    Args:
        hidden: [..., H] fp32 / fp16 / bf16, flattened to N rows.
        weight: [C, H]; bias: [C] or None (same device).
        target: [N, C] or [..., C] with hidden's leading dims; fp32 / fp16 / bf16 / fp64.
            Not differentiated through by design, but gradients reach it if it asks.
        token_weight: [N] non-negative per-row weights (timestep weightings), or None.
        reduction: "mean" (sum_i l_i / sum_i w_i; 0 when N = 0 or the weights sum to
            0), "sum" or "none" ([N]).

    Returns:
        fp32 scalar, or [N] fp32 for reduction="none".
    """
    h, t = check_regression_args(hidden, weight, target, bias=bias, token_weight=token_weight,
                                 reduction=reduction)
    n, channels = t.shape

    pred = F.linear(h.float(), weight.float(), None if bias is None else bias.float())
    diff = pred - t.float()
    # mean over zero channels cannot happen: check_linear_head asks for C >= 1.
    per_row = (diff * diff).mean(dim=-1)
    return masked_weighted_reduce(per_row, None, token_weight, reduction)

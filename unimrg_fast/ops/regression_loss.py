"""Fused linear regression head + squared error (DESIGN.md section 3.2).

p = h W^T + b is a thin projection (C = 4-64 latent channels against H = 1536-3584), so
the op is bound by reading `hidden` once in the forward and once more, plus writing dh,
in the backward. The forward keeps a row block's whole [BLOCK_N, C] prediction tile in
registers while it streams H, and writes only the per-row mse and the fp32 residual
r = p - t ([N, C]: 64 bytes a row at C = 16, against 3 KiB of bf16 hidden at H = 1536).
Saving r rather than recomputing p is what lets the backward split H across programs:
recomputing p would need every program to read its rows' full hidden vectors again.

    forward: grid (row block)            backward: grid (row group g, H block k, C block c)
    ┌──── H ────┐ ┌ C ┐                  ┌───── H ─────┐
    │ ────────► │→│ p │ r, mse           │ k=0 │ k=1 │..│  group g walks row blocks
    └───────────┘ └───┘                  │  dh = dp W  │  g, g+G, g+2G, ...: dh tile per
                                         │  dW_g += dp^T h  (registers, per program)
    dp = (2 g_i / C) r_i                 └─────────────┘  dW = sum_g dW_g (fixed order)

The weighting and reduction (w_i, sum, mean with its w-sum = 0 rule) are plain torch
ops on the [N] mse vector, shared with the reference, so token weights may even
receive a gradient. No host synchronisation anywhere: shapes alone steer the launches.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from unimrg_fast import backends
from unimrg_fast.ops._common import check_kernel_device, multiprocessors, store_dtype
from unimrg_fast.reference.cross_entropy import masked_weighted_reduce
from unimrg_fast.reference.regression import check_regression_args

_MAX_BLOCK_C = 64  # C above this loops over channel blocks (a fallback: latents have <= 64)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _regression_fwd_kernel(h_ptr, stride_hn, stride_hh, w_ptr, stride_wc, stride_wh,
                           b_ptr, stride_b, t_ptr, stride_tn, stride_tc,
                           mse_ptr, r_ptr, stride_rn, stride_rc,
                           N, H, C,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                           HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                           PRECISION: tl.constexpr):
    """mse [N] = mean_c r^2 and r [N, C] = h W^T + b - t, both fp32, for one row block."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # rows * stride overflows int32 beyond 2^31 elements
    offs_h = tl.arange(0, BLOCK_H)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):  # one iteration unless C > BLOCK_C
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        h_ptrs = h_ptr + rows64[:, None] * stride_hn + offs_h[None, :] * stride_hh
        w_ptrs = w_ptr + cols[None, :] * stride_wc + offs_h[:, None] * stride_wh  # W^T tile
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for k in range(0, tl.cdiv(H, BLOCK_H)):
            h_ok = offs_h < H - k * BLOCK_H
            h = tl.load(h_ptrs, mask=row_ok[:, None] & h_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=h_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # interpreter (bf16 is raw bits there) or mixed input dtypes
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
            h_ptrs += BLOCK_H * stride_hh
            w_ptrs += BLOCK_H * stride_wh
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        t = tl.load(t_ptr + rows64[:, None] * stride_tn + cols[None, :] * stride_tc,
                    mask=ok, other=0.0).to(tl.float32)
        r = tl.where(ok, acc - t, 0.0)
        tl.store(r_ptr + rows64[:, None] * stride_rn + cols[None, :] * stride_rc, r, mask=ok)
        sq += tl.sum(r * r, 1)
    tl.store(mse_ptr + rows64, sq / C, mask=row_ok)


@triton.jit
def _regression_bwd_kernel(h_ptr, stride_hn, stride_hh, w_ptr, stride_wc, stride_wh,
                           r_ptr, stride_rn, stride_rc, g_ptr, stride_g,
                           dh_ptr, stride_dhn, stride_dhh, dwp_ptr, dbp_ptr,
                           dt_ptr, stride_dtn, stride_dtc,
                           N, H, C, num_groups,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                           COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
                           COMPUTE_DB: tl.constexpr, COMPUTE_DT: tl.constexpr,
                           PRECISION: tl.constexpr):
    """dp = (2 g_i / C) r_i over the row blocks of group `pid_g`, for H block `pid_h`:

    dh[rows, k-block]        = dp[rows, :] @ W[:, k-block]      (all C blocks, by pid_c == 0)
    dW_part[g, c-block, k-block] = sum_rows dp[rows, c-block]^T h[rows, k-block]
    db_part[g, c-block]      = sum_rows dp[rows, c-block]        (by pid_h == 0)
    dt[rows, c-block]        = -dp                                (by pid_h == 0)

    Each program owns its dW_part tile and sums it in registers; the host adds the
    groups in a fixed order, so the gradients are deterministic and need no atomics or
    zeroed buffers. The dots run on fp32 operands: dp keeps its fp32 mantissa (tf32x3
    splits it; 16-bit h and W are exact in tf32) and never underflows the way an fp16
    copy of (2 / (C N)) r would under a mean over many rows.
    """
    pid_g = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale = 2.0 / C
    dw_acc = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for rb in range(pid_g, tl.cdiv(N, BLOCK_N), num_groups):
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        # masked rows read g = 0 and r = 0, so they add exact zeros everywhere below
        g = tl.load(g_ptr + rows64 * stride_g, mask=row_ok, other=0.0).to(tl.float32) * scale
        if COMPUTE_DH:
            if pid_c == 0:
                dh = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + tl.arange(0, BLOCK_C)
                    cc_ok = cc < C
                    r = tl.load(r_ptr + rows64[:, None] * stride_rn + cc[None, :] * stride_rc,
                                mask=row_ok[:, None] & cc_ok[None, :], other=0.0)
                    w = tl.load(w_ptr + cc[:, None] * stride_wc + offs_h[None, :] * stride_wh,
                                mask=cc_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
                    dh = tl.dot(r * g[:, None], w, dh, input_precision=PRECISION)
                tl.store(dh_ptr + rows64[:, None] * stride_dhn + offs_h[None, :] * stride_dhh,
                         dh.to(dh_ptr.dtype.element_ty), mask=row_ok[:, None] & h_ok[None, :])
        if COMPUTE_DW or COMPUTE_DB or COMPUTE_DT:
            ok = row_ok[:, None] & col_ok[None, :]
            r = tl.load(r_ptr + rows64[:, None] * stride_rn + cols[None, :] * stride_rc,
                        mask=ok, other=0.0)
            dp = r * g[:, None]
            if COMPUTE_DW:
                h = tl.load(h_ptr + rows64[:, None] * stride_hn + offs_h[None, :] * stride_hh,
                            mask=row_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
                dw_acc = tl.dot(tl.trans(dp), h, dw_acc, input_precision=PRECISION)
            if COMPUTE_DB or COMPUTE_DT:
                if pid_h == 0:
                    if COMPUTE_DB:
                        db_acc += tl.sum(dp, 0)
                    if COMPUTE_DT:
                        tl.store(dt_ptr + rows64[:, None] * stride_dtn + cols[None, :] * stride_dtc,
                                 (-dp).to(dt_ptr.dtype.element_ty), mask=ok)
    part = pid_g.to(tl.int64) * C
    if COMPUTE_DW:
        tl.store(dwp_ptr + (part + cols[:, None]) * H + offs_h[None, :], dw_acc,
                 mask=col_ok[:, None] & h_ok[None, :])
    if COMPUTE_DB:
        if pid_h == 0:
            tl.store(dbp_ptr + part + cols, db_acc, mask=col_ok)


# ------------------------------------------------------------------------ launchers
@dataclasses.dataclass(frozen=True)
class _Config:
    """Tile sizes of one call. Not autotuned: a thin head is memory bound, and these
    shapes keep several waves of programs in flight at N = 16k."""

    block_n: int
    block_h: int
    block_c: int
    bwd_block_n: int
    bwd_block_h: int
    num_warps: int = 4
    num_stages: int = 3
    bwd_num_warps: int = 8
    bwd_num_stages: int = 2
    bwd_programs: int = 528  # backward grid target: ~4 waves of an H100/H200's 132 SMs


# Calls with at least this many rows run with big tiles in the interpreter.
INTERPRETER_BIG_TILES_FROM = 256


def _pick_config(hidden: torch.Tensor, weight: torch.Tensor, channels: int,
                 interpreted: bool) -> _Config:
    block_c = min(_MAX_BLOCK_C, max(16, triton.next_power_of_2(channels)))  # tl.dot needs >= 16
    if interpreted:
        # The interpreter's cost is per tile operation, not per element: tests use tiny
        # odd shapes, where 16-wide tiles exercise several blocks, the C loop (C > 16)
        # and ragged edges; real calls (the trainer's CPU default) take big row tiles.
        if hidden.shape[0] >= INTERPRETER_BIG_TILES_FROM:
            return _Config(128, 64, block_c, 128, 64, num_warps=4, num_stages=1,
                           bwd_num_warps=4, bwd_num_stages=1, bwd_programs=1)
        return _Config(16, 16, 16, 16, 16, num_warps=4, num_stages=1, bwd_num_warps=4,
                       bwd_num_stages=1, bwd_programs=8)
    # Both kernels stay within 48 KiB of shared memory on sm_75 / sm_80 / sm_90 (41 KiB at
    # most, compiled offline; tests/test_kernel_resources.py checks): every GPU runs them.
    programs = 4 * multiprocessors(hidden.device)
    if torch.float32 in (hidden.dtype, weight.dtype):
        # exact fp32 ("ieee") dots run on CUDA cores: smaller tiles, fewer registers
        return _Config(64, 64, block_c, 64, 64, bwd_num_warps=4, bwd_programs=programs)
    return _Config(64, 128, block_c, 64, 128, bwd_programs=programs)


def _precision(hidden: torch.Tensor, weight: torch.Tensor) -> Tuple[str, str]:
    """(forward, backward) tl.dot input precision.

    fp32 data get exact fp32 dots (tf32 would cost ~1e-3 relative error). 16-bit data
    are exact in tf32, so a 16-bit dot (or a mixed fp16 / bf16 one, upcast) is exact
    products with fp32 accumulation; the backward's fp32 dp needs tf32x3 (split into
    high and low tf32 parts) to keep its mantissa.
    """
    if torch.float32 in (hidden.dtype, weight.dtype):
        return "ieee", "ieee"
    return "tf32", "tf32x3"


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _forward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
             bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mse [N] fp32, residual [N, C] fp32) for hidden [N, H], weight [C, H], target [N, C]."""
    n, h_dim = hidden.shape
    channels = weight.shape[0]
    assert target.shape == (n, channels) and weight.shape[1] == h_dim
    mse = _empty((n,), torch.float32, hidden.device)
    residual = _empty((n, channels), torch.float32, hidden.device)
    if n == 0:
        return mse, residual
    interpreted = backends.triton_interpreted()
    cfg = _pick_config(hidden, weight, channels, interpreted)
    has_bias = bias is not None
    _regression_fwd_kernel[(triton.cdiv(n, cfg.block_n),)](
        hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1),
        bias if has_bias else hidden, bias.stride(0) if has_bias else 0,
        target, target.stride(0), target.stride(1),
        mse, residual, residual.stride(0), residual.stride(1),
        n, h_dim, channels,
        BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_H=cfg.block_h, HAS_BIAS=has_bias,
        UPCAST=interpreted or hidden.dtype != weight.dtype,
        PRECISION=_precision(hidden, weight)[0],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return mse, residual


def _backward(grad_mse: torch.Tensor, residual: torch.Tensor, hidden: torch.Tensor,
              weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
              compute_dh: bool, compute_dw: bool, compute_db: bool, compute_dt: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW, db, dt) in the dtypes of hidden, weight, bias, target; [0] when not asked."""
    n, h_dim = hidden.shape
    channels = weight.shape[0]
    dev = hidden.device
    compute_db = compute_db and bias is not None
    interpreted = backends.triton_interpreted()
    # interpreted bf16 dh / dt are written in fp32 and rounded to nearest outside
    dh = _empty((n, h_dim) if compute_dh else (0,), store_dtype(hidden.dtype, interpreted), dev)
    dt = _empty((n, channels) if compute_dt else (0,), store_dtype(target.dtype, interpreted), dev)
    if n == 0 or not (compute_dh or compute_dw or compute_db or compute_dt):
        # no rows: nothing to write into dh / dt, and the sums over rows are zero
        dw = torch.zeros((channels, h_dim) if compute_dw else (0,), dtype=weight.dtype, device=dev)
        db = torch.zeros((channels,) if compute_db else (0,),
                         dtype=bias.dtype if bias is not None else torch.float32, device=dev)
        return dh.to(hidden.dtype), dw, db, dt.to(target.dtype)

    cfg = _pick_config(hidden, weight, channels, interpreted)
    # at least one H block: with H = 0 the programs still write db and dt
    h_blocks = max(1, triton.cdiv(h_dim, cfg.bwd_block_h)) if (compute_dh or compute_dw) else 1
    c_blocks = triton.cdiv(channels, cfg.block_c) if (compute_dw or compute_db or compute_dt) else 1
    row_blocks = triton.cdiv(n, cfg.bwd_block_n)
    groups = max(1, min(row_blocks, triton.cdiv(cfg.bwd_programs, h_blocks * c_blocks)))
    # per-group fp32 partial sums: [G, C, H] is ~4 MB at G = 44, C = 16, H = 1536
    dwp = _empty((groups, channels, h_dim) if compute_dw else (0,), torch.float32, dev)
    dbp = _empty((groups, channels) if compute_db else (0,), torch.float32, dev)
    _regression_bwd_kernel[(groups, h_blocks, c_blocks)](
        hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1),
        residual, residual.stride(0), residual.stride(1), grad_mse, grad_mse.stride(0),
        dh, dh.stride(0) if compute_dh else 0, dh.stride(1) if compute_dh else 0, dwp, dbp,
        dt, dt.stride(0) if compute_dt else 0, dt.stride(1) if compute_dt else 0,
        n, h_dim, channels, groups,
        BLOCK_N=cfg.bwd_block_n, BLOCK_C=cfg.block_c, BLOCK_H=cfg.bwd_block_h,
        COMPUTE_DH=compute_dh, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
        COMPUTE_DT=compute_dt, PRECISION=_precision(hidden, weight)[1],
        num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages)
    dw = dwp.sum(0).to(weight.dtype) if compute_dw else dwp
    db = dbp.sum(0).to(bias.dtype) if compute_db else dbp
    return dh.to(hidden.dtype), dw, db, dt.to(target.dtype)


# -------------------------------------------------------- custom ops and autograd
# torch.library custom ops (rather than a bare autograd.Function) so that torch.compile
# traces through the loss without graph breaks: the fake kernels give it the output
# shapes, register_autograd wires the backward op.
@torch.library.custom_op("unimrg_fast::regression_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
            bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (mse [N] fp32 = mean_c (p - t)^2, residual [N, C] fp32 = p - t)."""
    return _forward(hidden, weight, target, bias)


@_fwd_op.register_fake
def _(hidden, weight, target, bias):
    n, channels = hidden.shape[0], weight.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty((n, channels), dtype=torch.float32))


@torch.library.custom_op("unimrg_fast::regression_bwd", mutates_args=())
def _bwd_op(grad_mse: torch.Tensor, residual: torch.Tensor, hidden: torch.Tensor,
            weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
            compute_dh: bool, compute_dw: bool, compute_db: bool, compute_dt: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dh, dW, db, dt) in the inputs' dtypes; a gradient not asked for is empty [0]."""
    return _backward(grad_mse, residual, hidden, weight, bias, target,
                     compute_dh, compute_dw, compute_db, compute_dt)


@_bwd_op.register_fake
def _(grad_mse, residual, hidden, weight, bias, target, compute_dh, compute_dw, compute_db,
      compute_dt):
    compute_db = compute_db and bias is not None
    channels = weight.shape[0]
    return (hidden.new_empty(hidden.shape if compute_dh else (0,)),
            weight.new_empty(weight.shape if compute_dw else (0,)),
            weight.new_empty((channels,) if compute_db else (0,),
                             dtype=bias.dtype if bias is not None else torch.float32),
            target.new_empty((hidden.shape[0], channels) if compute_dt else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias = inputs
    _, residual = output
    ctx.mark_non_differentiable(residual)  # bookkeeping for the backward, not a result
    ctx.save_for_backward(hidden, weight, target, bias, residual)


def _backward_rule(ctx, grad_mse, grad_residual):
    hidden, weight, target, bias, residual = ctx.saved_tensors
    need_dh, need_dw, need_dt, need_db = ctx.needs_input_grad[:4]
    need_db = need_db and bias is not None
    if grad_mse is None or not (need_dh or need_dw or need_db or need_dt):
        return None, None, None, None
    dh, dw, db, dt = _bwd_op(grad_mse, residual, hidden, weight, bias, target,
                             need_dh, need_dw, need_db, need_dt)
    return (dh if need_dh else None, dw if need_dw else None, dt if need_dt else None,
            db if need_db else None)


torch.library.register_autograd(_fwd_op, _backward_rule, setup_context=_setup_context)


# ------------------------------------------------------------------ entry points
def _triton(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
            bias: Optional[torch.Tensor] = None,
            token_weight: Optional[torch.Tensor] = None,
            reduction: str = "mean") -> torch.Tensor:
    """The fused implementation behind `regression_loss(..., impl="triton")`.

    Same contract as `unimrg_fast.reference.regression_loss`, including gradients for
    `target` (dt = -dp) and `token_weight` when they ask for them. Mixed input dtypes
    are computed in fp32 inside the kernel; under autocast the inputs are cast to the
    autocast dtype first, as F.linear would.
    """

    h, t = check_regression_args(hidden, weight, target, bias=bias, token_weight=token_weight,
                                 reduction=reduction)
    check_kernel_device(h, "hidden")

    w, b = weight, bias
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, w = h.to(dtype), w.to(dtype)
        b = b.to(dtype) if b is not None else None
    mse, _ = _fwd_op(h, w, t, b)
    return masked_weighted_reduce(mse, None, token_weight, reduction)


def regression_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                    bias: Optional[torch.Tensor] = None,
                    token_weight: Optional[torch.Tensor] = None,
                    reduction: str = "mean", impl: str = "auto") -> torch.Tensor:
    """Per-row loss l_i = w_i * mean_c (p_ic - t_ic)^2 with p = hidden @ weight.T + bias.

    Args:
        hidden: [..., H] fp32 / fp16 / bf16, flattened to N rows.
        weight: [C, H]; bias: [C] or None; target: [..., C] matching hidden's rows.
        token_weight: [N] non-negative per-row weights (timestep weightings) or None.
        reduction: "mean" (sum_i l_i / sum_i w_i; 0 for N = 0), "sum" or "none" ([N]).

    Returns:
        fp32 scalar, or [N] fp32 for reduction="none".
    """
    _, fn = backends.resolve("regression_loss", impl, device=hidden.device
                             if isinstance(hidden, torch.Tensor) else None,
                             tensors=(hidden, weight, bias, target))
    return fn(hidden, weight, target, bias=bias, token_weight=token_weight,
              reduction=reduction)

"""Fused RMSNorm: y = weight * x * rsqrt(mean(x^2) + eps), forward and backward.

Hugging Face's Qwen2RMSNorm is six elementwise kernels in the forward (upcast, square,
mean, rsqrt, multiply, round, weight multiply) and more in autograd's backward, each a
full pass over the [T, H] rows: at a 16k-token pack of a 1.5B decoder the 57 norms of a
step cost ~50 ms of an H200's time, most of it memory traffic. Here each direction is one
pass: the forward reads x once and writes y (and an fp32 1 / rms per row), the backward
reads x, dy and rstd once and writes dx.

    forward: grid (row block)                 backward: grid (G programs)
    ┌──── H ────┐                             program g walks row blocks g, g+G, ...:
    │ x rows    │─> rstd = rsqrt(mean x^2+eps)   x_hat = x rstd, wdy = w dy
    └───────────┘─> y = w x rstd  (one round)   dx = rstd (wdy - x_hat mean(wdy x_hat))
                                               dw_g += sum_rows dy x_hat  (fp32, registers)
                                               dw = sum_g dw_g on the host, in a fixed order

A whole row lives in registers (H <= 65,536; a decoder's hidden size is 896-8,192), so
the row statistics need no second read. dw is reduced without atomics: each of the G
programs writes its own fp32 partial row and the partials are summed in a fixed order,
so the result is bitwise reproducible. G is a function of the device alone.

Under autocast a decoder's residual stream is fp32 while the projections that read the
norm's output run in bf16: the trainer asks for out_dtype=bf16, which rounds once in the
kernel where the eager path writes fp32 and the next Linear casts it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from unimrg_fast import backends
from unimrg_fast.ops._common import as_rows, check_kernel_device, multiprocessors, store_dtype
from unimrg_fast.reference.rms_norm import check_rms_norm_args

MAX_FUSED_HIDDEN = 65_536   # a whole row is kept in registers

_TILE_ELEMENTS = 8192   # rows per program: as many as fit this many elements (>= 1)
_INTERPRETER_TILE_ELEMENTS = 65536
_INTERPRETER_BIG_CALL = 16384   # elements; the tests' small odd shapes keep GPU tiles


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write (tests replace it with NaN-filled ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_fwd_kernel(x_ptr, stride_xn, w_ptr, y_ptr, stride_yn, rstd_ptr, N, H, eps,
                         BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    # Every tile is upcast to fp32 as it is loaded, which also keeps the interpreter's
    # raw-bits bf16 out of the arithmetic (ops/_common.py).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_H)
    row_ok, col_ok = rows < N, cols < H
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xn + cols[None, :], mask=ok, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / H + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_yn + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + rows64, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, stride_xn, w_ptr, dy_ptr, stride_dyn, rstd_ptr,
                         dx_ptr, stride_dxn, dw_ptr, N, H, programs,
                         BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                         NEED_DX: tl.constexpr, NEED_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for block in range(pid, tl.cdiv(N, BLOCK_N), programs):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xn + cols[None, :], mask=ok, other=0.0)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dyn + cols[None, :], mask=ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows64, mask=row_ok, other=0.0)
        x_hat = x.to(tl.float32) * rstd[:, None]
        dy = dy.to(tl.float32)
        if NEED_DX:   # else dx_ptr is a placeholder: nothing is written
            wdy = dy * w[None, :]
            mean = tl.sum(wdy * x_hat, 1) / H
            dx = rstd[:, None] * (wdy - x_hat * mean[:, None])
            tl.store(dx_ptr + rows64[:, None] * stride_dxn + cols[None, :],
                     dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if NEED_DW:
            dw += tl.sum(dy * x_hat, 0)
    if NEED_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=col_ok)


# -------------------------------------------------------------------------- launchers
def _tiles(hidden: int, rows: int = 0, interpreted: bool = False):
    """(BLOCK_N, BLOCK_H, num_warps): a whole row per tile, as many rows as fit
    _TILE_ELEMENTS. The interpreter's cost is per program, so there a big call (the
    trainer's CPU default) takes up to _INTERPRETER_TILE_ELEMENTS."""
    block_h = triton.next_power_of_2(max(hidden, 1))
    block_n = max(1, min(64, _TILE_ELEMENTS // block_h))
    if interpreted and rows * hidden >= _INTERPRETER_BIG_CALL:
        block_n = max(1, min(triton.next_power_of_2(rows), _INTERPRETER_TILE_ELEMENTS // block_h))
    num_warps = 4 if block_n * block_h <= 4096 else 8
    return block_n, block_h, num_warps


def _backward_programs(blocks: int, device: torch.device) -> int:
    """G, the number of dw partial rows: a function of the device only (bitwise
    reproducible results on one GPU), capped by the work."""
    # the interpreter: few programs, each a Python loop
    per_device = 2 * multiprocessors(device) if device.type == "cuda" else 4
    return max(1, min(blocks, per_device))


def triton_accepts(hidden: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                   **_) -> Optional[str]:
    """The backends predicate: "auto" takes the reference for rows too wide for registers,
    and for float64."""
    if hidden is not None and hidden > MAX_FUSED_HIDDEN:
        return (f"x.shape[-1] = {hidden} > {MAX_FUSED_HIDDEN} (a row must fit in "
                f"registers)")
    return backends.kernel_dtype(dtype=dtype)


def _forward(rows: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [N, H] in out_dtype, rstd [N] fp32) for rows [N, H] with unit column stride."""
    interpreted = backends.triton_interpreted()
    n, h = rows.shape
    block_n, block_h, warps = _tiles(h, n, interpreted)
    y = _empty((n, h), store_dtype(out_dtype, interpreted), rows.device)
    rstd = _empty((n,), torch.float32, rows.device)
    if n and h:
        _rms_norm_fwd_kernel[(triton.cdiv(n, block_n),)](
            rows, rows.stride(0), weight, y, y.stride(0), rstd, n, h, float(eps),
            BLOCK_N=block_n, BLOCK_H=block_h, num_warps=warps)
    return y.to(out_dtype), rstd


def _backward(dy: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
              need_dx: bool, need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx [N, H] in rows' dtype, dw [H] in weight's); one not asked for is empty [0]."""
    interpreted = backends.triton_interpreted()
    n, h = rows.shape
    dy = as_rows(dy)
    block_n, block_h, warps = _tiles(h, n, interpreted)
    programs = _backward_programs(triton.cdiv(n, block_n), rows.device)
    # a gradient not asked for gets a placeholder pointer (rstd), never written
    dx = _empty((n, h), store_dtype(rows.dtype, interpreted), rows.device) if need_dx else rstd
    dw_partial = _empty((programs, h), torch.float32, rows.device) if need_dw else rstd
    if n and h and (need_dx or need_dw):
        _rms_norm_bwd_kernel[(programs,)](
            rows, rows.stride(0), weight, dy, dy.stride(0), rstd, dx, dx.stride(0),
            dw_partial, n, h, programs, BLOCK_N=block_n, BLOCK_H=block_h,
            NEED_DX=need_dx, NEED_DW=need_dw, num_warps=warps)
    dw = rows.new_empty((0,), dtype=weight.dtype)
    if need_dw:   # the fixed-order sum of the programs' partials: bitwise reproducible
        dw = (dw_partial.sum(0) if n else torch.zeros(h, device=rows.device)).to(weight.dtype)
    return (dx.to(rows.dtype) if need_dx else rows.new_empty((0,))), dw


# torch.library custom ops, so that torch.compile traces the op (a trainer compiles its
# step); register_fake gives the output shapes, register_autograd wires the backward op.
@torch.library.custom_op("unimrg_fast::rms_norm_fwd", mutates_args=())
def _fwd_op(rows: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (y [N, H] in out_dtype, rstd [N] fp32 = 1 / rms of each row)."""
    return _forward(rows, weight, eps, out_dtype)


@_fwd_op.register_fake
def _(rows, weight, eps, out_dtype):
    return (rows.new_empty(rows.shape, dtype=out_dtype),
            rows.new_empty((rows.shape[0],), dtype=torch.float32))


@torch.library.custom_op("unimrg_fast::rms_norm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
            need_dx: bool, need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (dx, dw) in rows' / weight's dtypes; a gradient not asked for is empty [0]."""
    return _backward(dy, rows, weight, rstd, need_dx, need_dw)


@_bwd_op.register_fake
def _(dy, rows, weight, rstd, need_dx, need_dw):
    return (rows.new_empty(rows.shape if need_dx else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)))


def _setup_context(ctx, inputs, output):
    rows, weight, _, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)   # bookkeeping for the backward, not a result
    ctx.save_for_backward(rows, weight, rstd)


def _backward_rule(ctx, dy, grad_rstd):
    rows, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    if dy is None or not (need_dx or need_dw):
        return None, None, None, None
    dx, dw = _bwd_op(dy, rows, weight, rstd, need_dx, need_dw)
    return dx if need_dx else None, dw if need_dw else None, None, None


torch.library.register_autograd(_fwd_op, _backward_rule, setup_context=_setup_context)


def _triton(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    out = check_rms_norm_args(x, weight, eps=eps, out_dtype=out_dtype)
    too_wide = triton_accepts(x.shape[-1])
    if too_wide:
        raise ValueError(f"rms_norm(impl='triton'): {too_wide}; use impl='reference'")
    check_kernel_device(x, "x")
    # the kernels read the weight at unit stride: a column of a stacked [H, L] tensor or
    # an expanded scalar would be read wrongly (or past its end); a no-op when contiguous
    y, _ = _fwd_op(as_rows(x), weight.contiguous(), float(eps), out)
    return y.view(x.shape)


# ------------------------------------------------------------------------- public op
def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6,
             out_dtype: Optional[torch.dtype] = None, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension: weight * x * rsqrt(mean(x^2) + eps).

    Args:
        x: [..., H] float32 / float16 / bfloat16 (any leading dims; rows need unit column
            stride to be read in place, else they are copied once).
        weight: [H] float32 / float16 / bfloat16 on x's device.
        eps: >= 0.
        out_dtype: the result's dtype; None: torch.promote_types(x.dtype, weight.dtype),
            what the eager formula gives. The fused kernel computes in fp32 and rounds once.
        impl: "auto" | "triton" | "reference" (unimrg_fast.backends).

    Returns:
        [..., H] in out_dtype; gradients reach x (in x's dtype) and weight (in its dtype).
    """
    tensor = isinstance(x, torch.Tensor)
    hidden = x.shape[-1] if tensor and x.dim() else None
    _, fn = backends.resolve("rms_norm", impl, device=x.device if tensor else None,
                             hidden=hidden, dtype=x.dtype if tensor else None,
                             tensors=(x, weight))
    return fn(x, weight, eps=eps, out_dtype=out_dtype)

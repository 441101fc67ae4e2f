"""Fused rotary position embedding (Hugging Face Qwen2 / Llama `apply_rotary_pos_emb`,
the rotate-half convention), for one tensor (q or k) per call.

For x [B, H, T, D] and cos, sin [B, T, D] (or [1, T, D] / [T, D]) broadcast over heads,
with halves x = (x1, x2), cos = (c1, c2), sin = (s1, s2) along D:

    y1 = x1 c1 - x2 s1          dx1 = dy1 c1 + dy2 s2
    y2 = x2 c2 + x1 s2          dx2 = dy2 c2 - dy1 s1

Every position d keeps its own cos / sin (HF's tables repeat one half, cat(c, c), but
nothing here relies on it). The backward is the same kernel with the cross terms swapped
(the transpose of the rotation), so one kernel serves both passes.

The op is memory bound: eager PyTorch runs five elementwise kernels (x * cos, -x2, the
cat, its product with sin, the sum) through about four x-sized temporaries; the kernel
reads x once and writes y once. One program owns (batch b, BLOCK_T tokens): it loads that block's
cos / sin halves once, in fp32, and loops over the H heads, which share them:

    program (b, token block)             x [B, H, T, D] (any strides, stride(-1) = 1)
    ┌ c1 | c2 ┐ ┌ s1 | s2 ┐  loaded once  head 0: [x1 | x2] -> [y1 | y2]
    └─────────┘ └─────────┘  [BLOCK_T,    head 1: [x1 | x2] -> [y1 | y2]
                              BLOCK_D2]   ...     (pointers step by stride(1))

Tiles are [BLOCK_T, BLOCK_D2] with BLOCK_D2 = next_power_of_2(D / 2), masked, so any
even D works. Arithmetic is fp32 (every tile is upcast right after its load, which is
also what keeps bf16 exact in the Triton interpreter) and rounds once, on the store.

Layout: HF's q / k are [B, H, T, D] views of a [B, T, H, D] projection output. Strides
go to the kernel as they are (no copy), and the output is allocated with
torch.empty_like semantics: a permuted dense x gives an output with the same strides
(a [B, H, T, D] view of a fresh [B, T, H, D] buffer), and a non-dense x (a slice of a
fused qkv buffer) gives the dense layout with x's dimension order. So the attention
that follows still reads [T, H, D] rows without a copy. dx gets x's dtype and layout
the same way. No host synchronisation, no atomics: shapes alone steer the launch.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from unimrg_fast import backends
from unimrg_fast.ops._common import check_kernel_device, multiprocessors, store_dtype, unit_last
from unimrg_fast.reference.rotary import check_rotary_args

# Calls with at least this many (batch, token) rows run with big tiles in the interpreter.
INTERPRETER_BIG_TILES_FROM = 256


# --------------------------------------------------------------------------- kernel
@triton.jit
def _rotary_kernel(x_ptr, stride_xb, stride_xh, stride_xt,
                   cos_ptr, stride_cb, stride_ct, sin_ptr, stride_sb, stride_st,
                   y_ptr, stride_yb, stride_yh, stride_yt,
                   H, T, HALF, t_blocks,
                   BLOCK_T: tl.constexpr, BLOCK_D2: tl.constexpr, BACKWARD: tl.constexpr):
    """y = rotation of x for one (batch, token block), every head; the last dim of x,
    y, cos and sin is unit-stride. BACKWARD: x is dy and y is dx (the transpose)."""
    pid = tl.program_id(0)
    b = (pid // t_blocks).to(tl.int64)  # b * stride and t * stride overflow int32 on big tensors
    tok = (pid % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D2)
    mask = (tok < T)[:, None] & (d < HALF)[None, :]
    tok = tok.to(tl.int64)

    c_ptrs = cos_ptr + b * stride_cb + tok[:, None] * stride_ct + d[None, :]
    s_ptrs = sin_ptr + b * stride_sb + tok[:, None] * stride_st + d[None, :]
    c1 = tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    # y1 = x1 c1 + x2 k1, y2 = x2 c2 + x1 k2: the cross coefficients are the only
    # difference between the rotation and its transpose
    if BACKWARD:
        k1 = s2
        k2 = -s1
    else:
        k1 = -s1
        k2 = s2

    x_ptrs = x_ptr + b * stride_xb + tok[:, None] * stride_xt + d[None, :]
    y_ptrs = y_ptr + b * stride_yb + tok[:, None] * stride_yt + d[None, :]
    for _ in range(0, H):
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1 + x2 * k1
        y2 = x2 * c2 + x1 * k2
        tl.store(y_ptrs, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptrs + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)
        # pointer steps rather than h * stride: no int32 product to overflow
        x_ptrs += stride_xh
        y_ptrs += stride_yh


# ------------------------------------------------------------------------ launcher
def _pick_tiles(batch: int, tokens: int, half: int, device: torch.device,
                interpreted: bool) -> Tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D2, num_warps). Not autotuned: the kernel is memory bound.

    On a GPU a program's half tile holds ~1024 elements (8 per thread at 4 warps: 16-byte
    vectors in 16-bit dtypes), shrunk down to 256 while the grid has fewer than ~4 waves
    of programs (B = 1, T = 4096, D = 128 gets 4-token blocks: 1024 programs)."""
    block_d2 = triton.next_power_of_2(max(half, 1))
    if interpreted:
        # the interpreter's cost is per tile operation: tests use tiny odd shapes, where
        # 4-token blocks exercise several blocks and a ragged last one; big calls (the
        # trainer's CPU default) take big blocks
        if batch * tokens < INTERPRETER_BIG_TILES_FROM:
            return 4, block_d2, 1
        return min(triton.next_power_of_2(tokens), max(4, 32768 // block_d2)), block_d2, 1
    block_t = max(1, min(triton.next_power_of_2(max(tokens, 1)), 1024 // block_d2))
    target = 4 * multiprocessors(device)
    while (block_t > 1 and block_t * block_d2 > 256
           and batch * triton.cdiv(tokens, block_t) < target):
        block_t //= 2
    num_warps = max(1, min(4, block_t * block_d2 // 256))
    return block_t, block_d2, num_warps


def _empty(shape, stride, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernel writes comes from here (tests poison them with NaN)."""
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _layout_of(x: torch.Tensor) -> Tuple[int, ...]:
    """The strides of the output (and of dx): x's own when x is dense and
    non-overlapping with a unit-stride last dim (HF's q / k: [B, H, T, D] views of the
    projections' [B, T, H, D] rows, so the attention reads [T, H, D] rows in place), else
    dense strides with D innermost (the kernel stores unit-stride rows) and the other
    dims in the order of x's strides (largest outermost; ties keep the dimension order).

    Computed from x's shape and strides alone, so that the fake kernels under
    torch.compile give the same strides as the real ones."""
    shape, stride = tuple(x.shape), tuple(x.stride())
    if _dense_and_non_overlapping(shape, stride) and (stride[-1] == 1 or shape[-1] <= 1):
        return stride
    outer = sorted(range(len(shape) - 1), key=lambda d: stride[d], reverse=True)   # stable
    out, step = [0] * len(shape), 1
    for dim in reversed(outer + [len(shape) - 1]):
        out[dim] = step
        step *= max(shape[dim], 1)
    return tuple(out)


def _dense_and_non_overlapping(shape, stride) -> bool:
    """Every element of the storage span is used exactly once: sorted by stride, each
    dim of size >= 2 steps over exactly the dims inside it (size-1 dims never step)."""
    if any(size == 0 for size in shape):
        return True
    need = 1
    for dim in sorted((d for d in range(len(shape)) if shape[d] >= 2), key=lambda d: stride[d]):
        if stride[dim] != need:
            return False
        need *= shape[dim]
    return True


def _table_strides(table: torch.Tensor) -> Tuple[int, int]:
    """(batch, token) strides of cos / sin; batch stride 0 for [T, D] and [1, T, D]
    tables, which every batch element shares."""
    if table.dim() == 2:
        return 0, table.stride(0)
    return (table.stride(0) if table.shape[0] > 1 else 0), table.stride(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype,
            stride: Tuple[int, ...], backward: bool) -> torch.Tensor:
    """The rotation (backward=False) or its transpose of x [B, H, T, D], written into a
    fresh [B, H, T, D] tensor of `out_dtype` with the given strides."""
    x, cos, sin = unit_last(x), unit_last(cos), unit_last(sin)
    interpreted = backends.triton_interpreted()
    # interpreted bf16 outputs are written in fp32 and rounded to nearest outside
    out = _empty(x.shape, stride, store_dtype(out_dtype, interpreted), x.device)
    if x.numel() == 0:
        return out.to(out_dtype)
    b, h, t, d = x.shape
    block_t, block_d2, num_warps = _pick_tiles(b, t, d // 2, x.device, interpreted)
    t_blocks = triton.cdiv(t, block_t)
    _rotary_kernel[(b * t_blocks,)](
        x, x.stride(0), x.stride(1), x.stride(2),
        cos, *_table_strides(cos), sin, *_table_strides(sin),
        out, out.stride(0), out.stride(1), out.stride(2),
        h, t, d // 2, t_blocks,
        BLOCK_T=block_t, BLOCK_D2=block_d2, BACKWARD=backward, num_warps=num_warps)
    return out.to(out_dtype)


# -------------------------------------------------------- custom ops and autograd
# torch.library custom ops (rather than a bare autograd.Function) so that torch.compile
# traces through the rotation without graph breaks: the fake kernels give it the output
# shapes, dtypes and strides (x's memory layout), register_autograd wires the backward op.
# Gradient for x only: cos and sin are constants (HF computes them under no_grad);
# `_triton` refuses tables that ask for a gradient.
@torch.library.custom_op("unimrg_fast::rotary_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            out_dtype: torch.dtype) -> torch.Tensor:
    """-> y [B, H, T, D] in out_dtype, laid out like torch.empty_like(x)."""
    return _rotate(x, cos, sin, out_dtype, _layout_of(x), backward=False)


@_fwd_op.register_fake
def _(x, cos, sin, out_dtype):
    return x.new_empty_strided(x.shape, _layout_of(x), dtype=out_dtype)


@torch.library.custom_op("unimrg_fast::rotary_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            x_dtype: torch.dtype, x_stride: List[int]) -> torch.Tensor:
    """-> dx [B, H, T, D] = the transposed rotation of grad_out, in x's dtype and with
    x's layout (x_stride, the strides of the forward's output)."""
    return _rotate(grad_out, cos, sin, x_dtype, tuple(x_stride), backward=True)


@_bwd_op.register_fake
def _(grad_out, cos, sin, x_dtype, x_stride):
    return grad_out.new_empty_strided(grad_out.shape, x_stride, dtype=x_dtype)


def _setup_context(ctx, inputs, output):
    x, cos, sin, _ = inputs
    # only what dx needs: the tables, and x's dtype and layout (not x itself, which
    # would keep the projection output alive until the backward)
    ctx.save_for_backward(cos, sin)
    ctx.x_dtype, ctx.x_stride = x.dtype, output.stride()   # _layout_of(x)


def _backward_rule(ctx, grad_out):
    if grad_out is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    cos, sin = ctx.saved_tensors
    return _bwd_op(grad_out, cos, sin, ctx.x_dtype, list(ctx.x_stride)), None, None, None


torch.library.register_autograd(_fwd_op, _backward_rule, setup_context=_setup_context)


# ------------------------------------------------------------------ entry points
def _triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The fused implementation behind `rotary_embedding(..., impl="triton")`.

    Same contract as `unimrg_fast.reference.rotary_embedding`, except: float64 is not
    accepted, and cos / sin may not require a gradient while grad mode is on (the
    kernel has no dcos / dsin; a ValueError rather than a silently missing gradient).
    """
    out_dtype = check_rotary_args(x, cos, sin, out_dtype=out_dtype)
    check_kernel_device(x, "x")
    if torch.is_grad_enabled():
        wanting = [name for name, t in (("cos", cos), ("sin", sin)) if t.requires_grad]
        if wanting:
            verb = "requires" if len(wanting) == 1 else "require"
            raise ValueError(f"{' and '.join(wanting)} {verb} grad, but the Triton rotary "
                             "embedding differentiates x only (cos / sin are constants); "
                             "detach them, or use impl='reference'")
    return _fwd_op(x, cos, sin, out_dtype)


def triton_accepts(dtype: Optional[torch.dtype] = None, tables_need_grad: bool = False,
                   **_) -> Optional[str]:
    """Why "auto" must not pick the kernel for this call, or None: a float64 call, or
    cos / sin that want a gradient (the kernel has none for them; the reference does)."""
    if tables_need_grad:
        return ("cos / sin require grad, and the kernel differentiates x only (detach "
                "them, or use impl='reference')")
    return backends.kernel_dtype(dtype)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     out_dtype: Optional[torch.dtype] = None, impl: str = "auto") -> torch.Tensor:
    """y = x * cos + rotate_half(x) * sin (HF's apply_rotary_pos_emb for one of q / k).

    Args:
        x: [B, H, T, D] float32 / float16 / bfloat16, D even; any strides (HF's transposed
            view of a [B, T, H, D] buffer is read in place).
        cos, sin: [B, T, D], [1, T, D] or [T, D], one dtype, on x's device; broadcast
            over the heads, read at every position d (the halves may differ).
        out_dtype: None for torch.promote_types(x.dtype, cos.dtype) (eager's result:
            fp32 for bf16 q with autocast's fp32 tables), else float32 / float16 /
            bfloat16. Computed in fp32, rounded once.
        impl: "auto", "triton" or "reference" (see unimrg_fast.backends).

    Returns:
        [B, H, T, D] in out_dtype, laid out like torch.empty_like(x): a [B, H, T, D] view
        of a [B, T, H, D] buffer in gives one out. Differentiable in x (dx: x's dtype
        and layout); cos and sin are constants in the Triton path, so "auto" takes the
        reference when they require grad (impl="triton" refuses them).
    """
    tensor = isinstance(x, torch.Tensor)
    tables_need_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (cos, sin))
    _, fn = backends.resolve("rotary_embedding", impl, device=x.device if tensor else None,
                             dtype=x.dtype if tensor else None,
                             tables_need_grad=tables_need_grad, tensors=(x, cos, sin))
    return fn(x, cos, sin, out_dtype=out_dtype)

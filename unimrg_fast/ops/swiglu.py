"""Fused SwiGLU: y = silu(gate) * up, the gated activation of Qwen2 / Llama MLPs.

The decoder MLP computes down_proj(act_fn(gate_proj(x)) * up_proj(x)). Eagerly the
activation is two kernels with an [N, I] intermediate (silu(gate), rounded to gate's
dtype) written and read back, and autograd saves that intermediate too. The op is
purely memory bound, so the fused version moves the minimum:

    forward:  read gate, up          -> write y                (3 passes over [N, I])
    backward: read gate, up, dy      -> write dgate, dup       (5 passes)

    s = sigmoid(gate)                  dgate = dy * up * s * (1 + gate * (1 - s))
    y = gate * s * up                  dup   = dy * gate * s

Only gate and up are saved for the backward, which recomputes the sigmoid (an exp
per element is free next to the memory traffic). Everything is computed in fp32 and
rounded once to the output dtype (the eager formula rounds silu(gate) first).

Layout: [..., I] is flattened to rows [N, I]. The kernels take one row stride per
tensor and need unit column stride, so a row-strided view (e.g. the gate half of a
fused gate_up projection, `gu.chunk(2, -1)[0]`) is read in place; any other layout
is copied to contiguous first. Each program owns a [BLOCK_N, BLOCK_I] tile of a 2-D
grid (row block, column block): BLOCK_I covers up to 1024 columns, and narrow rows
stack several per program so that each moves ~2K elements. There is no reduction,
hence no atomics, no autotuning and no host synchronisation.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from unimrg_fast import backends
from unimrg_fast.ops._common import as_rows, check_kernel_device, store_dtype
from unimrg_fast.reference.swiglu import check_swiglu_args


# --------------------------------------------------------------------------- kernels
@triton.jit
def _swiglu_fwd_kernel(g_ptr, stride_g, u_ptr, stride_u, y_ptr, stride_y, N, I,
                       BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
    """y[rows, cols] = silu(g) * u in fp32, for one [BLOCK_N, BLOCK_I] tile."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # row * stride overflows int32 beyond 2^31 elements
    # Upcast right after loading: the math is fp32 for every dtype, and the interpreter
    # would treat bf16 tiles as raw bits otherwise.
    g = tl.load(g_ptr + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, stride_g, u_ptr, stride_u, dy_ptr, stride_dy,
                       dg_ptr, stride_dg, du_ptr, stride_du, N, I,
                       BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
                       COMPUTE_DG: tl.constexpr, COMPUTE_DU: tl.constexpr):
    """dgate = dy * u * s * (1 + g (1 - s)) and dup = dy * g * s, s = sigmoid(g), in fp32.

    The sigmoid is recomputed from g rather than saved: one more read of an [N, I]
    tensor would cost more than the exp. A gradient not asked for is neither computed
    nor written (its pointer is a placeholder then)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < N)[:, None] & (cols < I)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    if COMPUTE_DG:
        u = tl.load(u_ptr + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dg = dy * u * s * (1.0 + g * (1.0 - s))
        tl.store(dg_ptr + rows64 * stride_dg + cols[None, :], dg.to(dg_ptr.dtype.element_ty),
                 mask=mask)
    if COMPUTE_DU:
        du = dy * g * s
        tl.store(du_ptr + rows64 * stride_du + cols[None, :], du.to(du_ptr.dtype.element_ty),
                 mask=mask)


# ------------------------------------------------------------------------ launchers
@dataclasses.dataclass(frozen=True)
class _Config:
    """Tile of one call. Not autotuned: an elementwise op only needs tiles big enough to
    keep the memory system busy, and fixed choices compile once per (dtype, tile)."""

    block_n: int
    block_i: int
    num_warps: int


_MAX_BLOCK_I = 1024
_TILE_ELEMENTS = 2048  # per program: 16 per thread at 4 warps, i.e. 16-byte vector accesses
_INTERPRETER_TILE_ELEMENTS = 65536

# Calls with at least this many elements run with the GPU's tiles in the interpreter.
INTERPRETER_BIG_TILES_FROM = 4096


def _pick_config(n: int, width: int, interpreted: bool) -> _Config:
    """The tile for an [n, width] call (n, width >= 1)."""
    if interpreted and n * width < INTERPRETER_BIG_TILES_FROM:
        # The interpreter's cost is per tile operation, not per element: tests use tiny
        # odd shapes, where 4 x 32 tiles exercise several row and column blocks and
        # ragged edges in both directions.
        return _Config(min(4, triton.next_power_of_2(n)), min(32, triton.next_power_of_2(width)),
                       num_warps=1)
    block_i = min(_MAX_BLOCK_I, max(16, triton.next_power_of_2(width)))
    # the interpreter's cost is per program: big calls (the trainer's CPU default) take
    # 64K-element tiles there, a GPU's would be 128 programs for a [1024, 256] call
    tile = _INTERPRETER_TILE_ELEMENTS if interpreted else _TILE_ELEMENTS
    block_n = min(max(1, tile // block_i), triton.next_power_of_2(n))
    num_warps = min(4, max(1, block_n * block_i // 256))
    return _Config(block_n, block_i, num_warps)


def _grid(n: int, width: int, cfg: _Config) -> Tuple[int, int]:
    # Rows on axis 0 (up to 2^31 - 1 programs); column blocks on axis 1 (at most 65535,
    # i.e. I up to 64M at 1024 columns a block).
    return triton.cdiv(n, cfg.block_n), triton.cdiv(width, cfg.block_i)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _forward(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """y [N, I] in out_dtype for gate, up [N, I] with unit column stride."""
    n, width = gate.shape
    interpreted = backends.triton_interpreted()
    # interpreted bf16 is written in fp32 and rounded to nearest outside the kernel
    y = _empty((n, width), store_dtype(out_dtype, interpreted), gate.device)
    if n > 0 and width > 0:
        cfg = _pick_config(n, width, interpreted)
        _swiglu_fwd_kernel[_grid(n, width, cfg)](
            gate, gate.stride(0), up, up.stride(0), y, y.stride(0), n, width,
            BLOCK_N=cfg.block_n, BLOCK_I=cfg.block_i, num_warps=cfg.num_warps)
    return y.to(out_dtype)


def _backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, compute_dg: bool,
              compute_du: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) [N, I] in gate's / up's dtype; empty [0] for a gradient not asked for."""
    n, width = gate.shape
    dev = gate.device
    interpreted = backends.triton_interpreted()
    dy = as_rows(dy)  # e.g. a stride-0 gradient expanded from a sum: copied
    dg = _empty((n, width) if compute_dg else (0,), store_dtype(gate.dtype, interpreted), dev)
    du = _empty((n, width) if compute_du else (0,), store_dtype(up.dtype, interpreted), dev)
    if n > 0 and width > 0 and (compute_dg or compute_du):
        cfg = _pick_config(n, width, interpreted)
        dg_arg = dg if compute_dg else gate  # placeholders: the kernel never touches them
        du_arg = du if compute_du else gate
        _swiglu_bwd_kernel[_grid(n, width, cfg)](
            gate, gate.stride(0), up, up.stride(0), dy, dy.stride(0),
            dg_arg, dg_arg.stride(0), du_arg, du_arg.stride(0), n, width,
            BLOCK_N=cfg.block_n, BLOCK_I=cfg.block_i,
            COMPUTE_DG=compute_dg, COMPUTE_DU=compute_du, num_warps=cfg.num_warps)
    return dg.to(gate.dtype), du.to(up.dtype)


# -------------------------------------------------------- custom ops and autograd
# torch.library custom ops (rather than a bare autograd.Function) so that torch.compile
# traces through the activation without graph breaks: the fake kernels give it the
# output shapes, register_autograd wires the backward op. The ops take [N, I] rows with
# unit column stride (the entry point's `as_rows`: a view for row-strided inputs, so that
# autograd saves that view or the one copy), as rms_norm's do. Their outputs are [N, I]
# and always new tensors.
@torch.library.custom_op("unimrg_fast::swiglu_fwd", mutates_args=())
def _fwd_op(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """-> y [N, I] contiguous in out_dtype, = silu(gate) * up."""
    return _forward(gate, up, out_dtype)


@_fwd_op.register_fake
def _(gate, up, out_dtype):
    return gate.new_empty(gate.shape, dtype=out_dtype)


@torch.library.custom_op("unimrg_fast::swiglu_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, compute_dg: bool,
            compute_du: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (dgate, dup) [N, I] contiguous in gate's / up's dtypes; a gradient not asked for
    is empty [0]."""
    return _backward(dy, gate, up, compute_dg, compute_du)


@_bwd_op.register_fake
def _(dy, gate, up, compute_dg, compute_du):
    return (gate.new_empty(gate.shape if compute_dg else (0,)),
            up.new_empty(up.shape if compute_du else (0,)))


def _setup_context(ctx, inputs, output):
    gate, up, _ = inputs
    ctx.save_for_backward(gate, up)  # the sigmoid is recomputed, not saved


def _backward_rule(ctx, dy):
    gate, up = ctx.saved_tensors
    need_dg, need_du = ctx.needs_input_grad[:2]
    if dy is None or not (need_dg or need_du):
        return None, None, None
    dg, du = _bwd_op(dy, gate, up, need_dg, need_du)
    return (dg if need_dg else None, du if need_du else None, None)


torch.library.register_autograd(_fwd_op, _backward_rule, setup_context=_setup_context)


# ------------------------------------------------------------------ entry points
def _triton(gate: torch.Tensor, up: torch.Tensor, *,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The fused implementation behind `swiglu(..., impl="triton")`.

    Same contract as `unimrg_fast.reference.swiglu`, except that float64 inputs are
    refused (TypeError) and the result is rounded once from fp32. Autocast does not
    apply: like F.silu and `*`, the op computes in its inputs' dtypes.
    """
    out_dtype = check_swiglu_args(gate, up, out_dtype=out_dtype)
    check_kernel_device(gate, "gate")
    y = _fwd_op(as_rows(gate), as_rows(up), out_dtype)
    return y.view(gate.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, out_dtype: Optional[torch.dtype] = None,
           impl: str = "auto") -> torch.Tensor:
    """y = silu(gate) * up = gate * sigmoid(gate) * up, elementwise (Qwen2 / Llama MLP).

    Args:
        gate, up: [..., I] (rank >= 1, N = 0 or I = 0 allowed), float32 / float16 /
            bfloat16, same shape and device; the dtypes may differ.
        out_dtype: None (torch.promote_types(gate.dtype, up.dtype), as eager
            broadcasting gives) or float32 / float16 / bfloat16.
        impl: "auto", "triton" or "reference" (see unimrg_fast.backends).

    Returns:
        [..., I] in out_dtype. The fused kernel computes in fp32 and rounds once;
        gradients (fp32 math) come back in gate's and up's dtypes.
    """
    tensor = isinstance(gate, torch.Tensor)
    _, fn = backends.resolve("swiglu", impl, device=gate.device if tensor else None,
                             dtype=gate.dtype if tensor else None, tensors=(gate, up))
    return fn(gate, up, out_dtype=out_dtype)

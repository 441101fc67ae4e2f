"""Fused linear cross-entropy (DESIGN.md section 3.1).

The fp32 logits z = cap(h W^T + b) are never stored: the forward streams W in vocab
tiles and keeps an online logsumexp per row; the backward recomputes them a chunk of
rows at a time and turns each tile into dz on the spot.

    forward                                      backward, per chunk of sorted rows
    grid (row block m, vocab split s)            grid (row block m, vocab block v), swizzled
    ┌──────────── V ────────────┐                ┌──────────── V ────────────┐
    │ s=0   │ s=1   │ s=2   │...│  m=0           │ v0 │ v1 │ v2 │ ...       │  m=0
    │ ──►   │ ──►   │ ──►   │   │  m=1           │    │    │    │           │  m=1
    └───────────────────────────┘                └───────────────────────────┘
    each program walks its split's tiles,        each program: logits tile -> dz tile
    writes (max, sumexp, z_y, sum z, argmax);    (16-bit, <= DZ_CHUNK_BYTES a chunk), then
    a small combine kernel merges the splits.    cuBLAS: dh = dz W, dW += dz^T h (fp32)

Ignored rows cost no logits work: a device-side stable sort puts the non-ignored rows
first and a device-side count tells every kernel where they end; programs whose rows
all lie beyond the count exit at once (the backward's write zeros, which its products
still multiply: the host cannot know the count without a sync). Nothing here
synchronises with the host.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from unimrg_fast import backends
from unimrg_fast._validation import flatten_rows
from unimrg_fast.ops._common import check_kernel_device, interpreted_bf16, store_dtype
# The option checks and the weighted reduction are the reference's own, so the two
# paths cannot drift apart on validation or on the "mean" / all-ignored rules.
from unimrg_fast.reference.cross_entropy import check_ce_args, masked_weighted_reduce

_NEG_INF = tl.constexpr(float("-inf"))  # a constexpr: jit code may read only those globals


# --------------------------------------------------------------------------- kernels
@triton.jit
def _tanh(x):
    # libdevice's tanh does not run in the interpreter. For |x| >= 0.5, (1 - e) / (1 + e)
    # with e = exp(-2|x|) <= 0.37: no cancellation, and exp of a non-positive argument
    # never overflows. Below, 1 - e cancels: tanh lost ~2^-24 ABSOLUTELY, so a softcap c
    # gave logits c * 2^-24 off however small they were (past the fp32 budget from c ~ 1e3,
    # and in the gradients of small logits at c = 30). There the Taylor series in x^2,
    # 8 terms (Horner): within 1.5 ulp of tanh on [0, 0.5].
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    a2 = a * a
    p = 6404582.0 / 10854718875.0
    p = p * a2 - 929569.0 / 638512875.0
    p = p * a2 + 21844.0 / 6081075.0
    p = p * a2 - 1382.0 / 155925.0
    p = p * a2 + 62.0 / 2835.0
    p = p * a2 - 17.0 / 315.0
    p = p * a2 + 2.0 / 15.0
    p = p * a2 - 1.0 / 3.0
    near = a + a * (a2 * p)
    t = tl.where(a < 0.5, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(h_ptr, stride_hn, stride_hh, w_ptr, stride_wv, stride_wh, b_ptr, stride_b,
                 rows, row_ok, cols, col_ok, H, softcap,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """cap(h[rows] @ W[cols]^T + b[cols]) as an fp32 [BLOCK_M, BLOCK_V] tile."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh
    w_ptrs = w_ptr + cols[None, :] * stride_wv + offs_h[:, None] * stride_wh
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_H)):
        h_ok = offs_h < H - k * BLOCK_H
        h = tl.load(h_ptrs, mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter treats bf16 as raw bits: compute in fp32 there
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_H * stride_hh
        w_ptrs += BLOCK_H * stride_wh
    if HAS_BIAS:
        b = tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0).to(tl.float32)
        acc += b[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _lce_fwd_kernel(h_ptr, stride_hn, stride_hh, w_ptr, stride_wv, stride_wh, b_ptr, stride_b,
                    y_ptr, order_ptr, count_ptr, part_ptr, idx_ptr,
                    N, V, H, tiles_per_split, softcap,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_SMOOTHING: tl.constexpr, TRACK_ARGMAX: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Partial statistics of one row block over one vocab split.

    part [4, S, N] fp32 at sorted positions: running max, sum exp(z - max), z at the
    target, sum of z; idx [S, N] int32: first column reaching the split's max.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_m * BLOCK_M >= count:
        return
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = pos < count
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)

    m = tl.full((BLOCK_M,), _NEG_INF, dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best = tl.zeros((BLOCK_M,), dtype=tl.int32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(h_ptr, stride_hn, stride_hh, w_ptr, stride_wv, stride_wh, b_ptr,
                         stride_b, rows, row_ok, cols.to(tl.int64), col_ok, H, softcap,
                         BLOCK_M, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION)
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
        z = tl.where(col_ok[None, :], z, _NEG_INF)
        tile_max = tl.max(z, 1)
        if TRACK_ARGMAX:
            first = tl.min(tl.where(z == tile_max[:, None], cols[None, :], V), 1)
            best = tl.where(tile_max > m, first, best)  # strict: earlier tiles win ties
        m_new = tl.maximum(m, tile_max)
        # every tile holds >= 1 real column, so m_new is finite and exp(m - m_new) is 0 at first
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new

    out = split * N + pos
    plane = tl.num_programs(1) * N
    tl.store(part_ptr + out, m, mask=row_ok)
    tl.store(part_ptr + plane + out, s, mask=row_ok)
    tl.store(part_ptr + 2 * plane + out, z_y, mask=row_ok)
    if HAS_SMOOTHING:
        tl.store(part_ptr + 3 * plane + out, z_sum, mask=row_ok)
    if TRACK_ARGMAX:
        tl.store(idx_ptr + out, best, mask=row_ok)


@triton.jit
def _lce_combine_kernel(part_ptr, idx_ptr, y_ptr, order_ptr, count_ptr,
                        loss_ptr, lse_ptr, correct_ptr,
                        N, V, num_splits, label_smoothing, z_loss,
                        BLOCK: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                        TRACK_ARGMAX: tl.constexpr):
    """Merges the splits; writes every row (zeros at ignored rows, NaN at bad targets)."""
    pos = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = pos < N
    count = tl.load(count_ptr)
    row_ok = pos < count
    rows = tl.load(order_ptr + pos, mask=in_range, other=0).to(tl.int64)
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)

    m = tl.full((BLOCK,), _NEG_INF, dtype=tl.float32)
    for sp in range(0, num_splits):
        m = tl.maximum(m, tl.load(part_ptr + sp * N + pos, mask=row_ok, other=0.0))
    plane = num_splits * N
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    z_y = tl.zeros((BLOCK,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    best = tl.full((BLOCK,), -1, dtype=tl.int32)
    for sp in range(0, num_splits):
        off = sp * N + pos
        m_sp = tl.load(part_ptr + off, mask=row_ok, other=0.0)
        s += tl.load(part_ptr + plane + off, mask=row_ok, other=0.0) * tl.exp(m_sp - m)
        z_y += tl.load(part_ptr + 2 * plane + off, mask=row_ok, other=0.0)
        if HAS_SMOOTHING:
            z_sum += tl.load(part_ptr + 3 * plane + off, mask=row_ok, other=0.0)
        if TRACK_ARGMAX:
            idx = tl.load(idx_ptr + off, mask=row_ok, other=0)
            best = tl.where((best < 0) & (m_sp == m), idx, best)
    s = tl.where(row_ok, s, 1.0)  # lanes past the count hold nothing: keep them finite
    lse = m + tl.log(s)
    loss = lse - z_y
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / V)
    loss += z_loss * lse * lse
    bad = (y < 0) | (y >= V)  # not ignored, not a class: poison rather than guess
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + rows, tl.where(row_ok, loss, 0.0), mask=in_range)
    tl.store(lse_ptr + rows, tl.where(row_ok, lse, 0.0), mask=in_range)
    if TRACK_ARGMAX:
        tl.store(correct_ptr + rows, (row_ok & (best == y)).to(tl.int32), mask=in_range)


@triton.jit
def _lce_dz_kernel(h_ptr, stride_hn, stride_hh, w_ptr, stride_wv, stride_wh, b_ptr, stride_b,
                   y_ptr, order_ptr, count_ptr, lse_ptr, g_ptr, dz_ptr, stride_dzn, db_ptr,
                   first, num_pos, V, H, softcap, label_smoothing, z_loss,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   COMPUTE_DB: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dz = dl/dz for one (row block, vocab block) tile of the sorted positions
    [first, first + num_pos), stored at dz[pos - first]; db[v] += sum over rows of dz.

    Every element of the chunk is written (exact zeros at ignored rows and at the
    positions past the valid count): the dz chunk is the operand of the two cuBLAS
    products that follow, dh = dz W and dW += dz^T h.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(num_pos, BLOCK_M)
    num_v = tl.cdiv(V, BLOCK_V)
    # GROUP_M row blocks sweep the vocabulary together so the W tiles they share stay in L2
    per_group = GROUP_M * num_v
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_chunk = local < num_pos
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    count = tl.load(count_ptr)
    if first + pid_m * BLOCK_M >= count:  # only ignored rows: no matrix work, zeros
        tl.store(dz_ptr + local[:, None].to(tl.int64) * stride_dzn + cols[None, :],
                 tl.zeros((BLOCK_M, BLOCK_V), dtype=dz_ptr.dtype.element_ty),
                 mask=in_chunk[:, None] & col_ok[None, :])
        return
    pos = first + local
    row_ok = in_chunk & (pos < count)
    rows = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)

    z = _logits_tile(h_ptr, stride_hn, stride_hh, w_ptr, stride_wv, stride_wh, b_ptr, stride_b,
                     rows, row_ok, cols.to(tl.int64), col_ok, H, softcap,
                     BLOCK_M, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION)
    # dl/dz = p - (1 - e) [j = y] - e / V + 2 z_loss lse p. The z-loss term is added on
    # its own: folded into p's factor, (1 + 2 z_loss lse) p - 1 cancels most of its digits
    # where p rounds to 1 (a one-class head, a very confident row).
    p = tl.exp(z - lse[:, None])
    is_y = cols[None, :] == y[:, None]
    q = p - tl.where(is_y, 1.0 - label_smoothing, 0.0) - label_smoothing / V
    dz = g[:, None] * q + (g * (2.0 * z_loss) * lse)[:, None] * p
    if HAS_SOFTCAP:
        t = z / softcap  # = tanh(x / c)
        dz *= 1.0 - t * t
    bad = (y < 0) | (y >= V)
    dz = tl.where(bad[:, None], float("nan"), dz)
    # masked rows / columns may hold exp(garbage); they must add exact zeros
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, 0), mask=col_ok, sem="relaxed")
    # the [BLOCK_M, BLOCK_V] tile of 64-bit pointers made here, not before the dot loop,
    # where it stayed live through it (~128 registers a thread at 128 x 128 with 8 warps:
    # 616 bytes spilled on sm_90, ~350 now). Block pointers, which need none, are gone
    # from Triton >= 3.7.
    dz_ptrs = dz_ptr + local[:, None].to(tl.int64) * stride_dzn + cols[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=in_chunk[:, None] & col_ok[None, :])


# ------------------------------------------------------------------------ launchers
@dataclasses.dataclass(frozen=True)
class _Config:
    """Tile sizes of one call, shared by the forward and the backward's dz kernel (both
    walk logits tiles the same way)."""

    block_m: int
    block_v: int
    block_h: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    combine_block: int = 256
    min_programs: int = 528  # forward grid: at least ~4 waves of an H100/H200's 132 SMs
    split_tiles: int = 32  # and at most this many vocab tiles per forward program


# Calls with at least this many rows run with big tiles in the interpreter.
INTERPRETER_BIG_TILES_FROM = 256

# The backward's dz chunk: at most this many bytes of [rows, V] dz (in the dots' dtype)
# at a time. Bigger chunks feed cuBLAS bigger products; 1 GiB is ~3.4k rows of a
# Qwen2.5 vocabulary in bf16, where the products already run near the matrix peak.
DZ_CHUNK_BYTES = 1 << 30


def _pick_config(dtype: torch.dtype, interpreted: bool, num_rows: int) -> _Config:
    """Tile sizes of a call. On a GPU they need at most 32 KiB of shared memory (compiled
    offline for sm_75 / sm_90 by tests/test_kernel_resources.py): they fit every GPU."""
    if interpreted:
        # The interpreter's cost is per tile operation, not per element: tests use tiny
        # odd shapes, where 16-wide tiles exercise several blocks and every ragged edge;
        # real calls (the trainer's CPU default) take big tiles, ~10x faster.
        if num_rows >= INTERPRETER_BIG_TILES_FROM:
            return _Config(64, 128, 64, group_m=1, num_warps=4, num_stages=1,
                           combine_block=128, min_programs=1, split_tiles=64)
        return _Config(16, 16, 16, group_m=2, num_warps=4, num_stages=1, combine_block=16,
                       min_programs=8, split_tiles=2)
    if dtype == torch.float32:
        # exact fp32 ("ieee") dots run on CUDA cores: smaller tiles (4 warps spill)
        return _Config(64, 64, 32)
    # the forward runs at ~390 TFLOP/s on an H200 with these (benchmarks/gpu_probe.py)
    return _Config(128, 128, 64)


def _upcast(dtype: torch.dtype, interpreted: bool) -> bool:
    return interpreted_bf16(dtype, interpreted)


def _precision(dtype: torch.dtype, interpreted: bool) -> str:
    # fp32 inputs get exact fp32 dots (tf32 would cost ~1e-3 relative error); fp16/bf16
    # dots are exact products with fp32 accumulation whatever this says.
    return "ieee" if (interpreted or dtype == torch.float32) else "tf32"


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Every buffer a kernel must fill comes from here, so that tests can poison them.
    return torch.empty(shape, dtype=dtype, device=device)


def _sort_valid_first(target: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order [N] int64 with the non-ignored rows first, count [1] int32), on device."""
    ignored = (target == ignore_index).to(torch.uint8)
    order = torch.argsort(ignored, stable=True)
    count = (target.numel() - ignored.sum(dtype=torch.int32)).reshape(1)
    return order, count.to(torch.int32)


def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
             softcap: Optional[float], track_argmax: bool):
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    loss = _empty((n,), torch.float32, dev)
    lse = _empty((n,), torch.float32, dev)
    correct = _empty((n if track_argmax else 0,), torch.int32, dev)
    order, count = _sort_valid_first(target, ignore_index)
    if n == 0:
        return loss, lse, correct, order, count

    interpreted = backends.triton_interpreted()
    cfg = _pick_config(hidden.dtype, interpreted, n)
    row_blocks = triton.cdiv(n, cfg.block_m)
    tiles = triton.cdiv(vocab, cfg.block_v)
    # Split the vocabulary so that the grid fills the GPU even for few rows, and into
    # short programs so it still does when most row blocks turn out to be ignored (the
    # host cannot know how many). Every split holds >= 1 tile: a finite running max.
    splits = max(triton.cdiv(cfg.min_programs, row_blocks), triton.cdiv(tiles, cfg.split_tiles))
    splits = max(1, min(tiles, splits))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    smoothing = label_smoothing > 0.0
    part = _empty((4 if smoothing else 3, splits, n), torch.float32, dev)
    idx = _empty((splits, n) if track_argmax else (0,), torch.int32, dev)
    has_bias = bias is not None
    b = bias if has_bias else hidden  # never read when HAS_BIAS is False
    _lce_fwd_kernel[(row_blocks, splits)](
        hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0), weight.stride(1),
        b, bias.stride(0) if has_bias else 0,
        target, order, count, part, idx,
        n, vocab, h_dim, tiles_per_split, float(softcap or 1.0),
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=smoothing,
        TRACK_ARGMAX=track_argmax, UPCAST=_upcast(hidden.dtype, interpreted),
        PRECISION=_precision(hidden.dtype, interpreted),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _lce_combine_kernel[(triton.cdiv(n, cfg.combine_block),)](
        part, idx, target, order, count, loss, lse, correct,
        n, vocab, splits, float(label_smoothing), float(z_loss),
        BLOCK=cfg.combine_block, HAS_SMOOTHING=smoothing, TRACK_ARGMAX=track_argmax,
        num_warps=4)
    return loss, lse, correct, order, count


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32, accumulated in fp32. cuBLAS takes 16-bit operands as they are and
    writes fp32 (torch.mm's out_dtype); elsewhere the operands are upcast, which gives
    the same exact products. A torch whose mm has no out_dtype rounds each chunk's
    product to 16 bits once before the fp32 sum over chunks."""
    # a backward called inside an autocast region must not have its products recast
    with torch.autocast(a.device.type, enabled=False):
        if a.dtype == torch.float32 or not a.is_cuda:
            return a.float() @ b.float()
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:
            return torch.mm(a, b).float()


def _addmm_f32_out(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with 16-bit a, b and fp32 acc, by cuBLAS in one call (beta = 1, the
    output aliasing acc): torch's addmm.dtype_out, CUDA only, torch >= 2.8."""
    torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)


_ADDMM_F32_WORKS: dict = {}  # (device, dtype) -> bool, filled by _addmm_f32_works


def _addmm_f32_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `_addmm_f32_out` runs for this device and dtype, tried once on a 2 x 3
    product (column-major a, as dz.t() is). No such overload or no kernel for the device
    raises at dispatch, so the answer needs no host sync; that its sums are right is the
    GPU lane's test_gpu_dw_chunks_add_in_place."""
    key = (device, dtype)
    if key not in _ADDMM_F32_WORKS:
        acc = torch.zeros(2, 3, device=device)
        a = torch.ones(4, 2, dtype=dtype, device=device).t()
        try:
            _addmm_f32_out(acc, a, torch.ones(4, 3, dtype=dtype, device=device))
            _ADDMM_F32_WORKS[key] = True
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            _ADDMM_F32_WORKS[key] = False
    return _ADDMM_F32_WORKS[key]


def _add_mm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place, acc fp32, the products accumulated in fp32. The point is
    what is NOT allocated: dW's chunks would each make an fp32 [V, H] product (0.9 GB at
    the 1.5B recipe's V = 151,936, H = 1,536) only to add it and throw it away."""
    with torch.autocast(a.device.type, enabled=False):
        if a.dtype != torch.float32 and _addmm_f32_works(a.device, a.dtype):
            _addmm_f32_out(acc, a, b)
        elif a.dtype == torch.float32 or not a.is_cuda:
            acc.addmm_(a.float(), b.float())
        else:  # a CUDA torch without addmm.dtype_out: a separate product, as before
            acc.add_(_mm_f32(a, b))
    return acc


def _dz_chunk_rows(num_rows: int, vocab: int, itemsize: int, block_m: int) -> int:
    """Rows per dz chunk: within DZ_CHUNK_BYTES, a whole number of row blocks."""
    rows = DZ_CHUNK_BYTES // max(1, vocab * itemsize) // block_m * block_m
    return max(block_m, min(rows, triton.cdiv(num_rows, block_m) * block_m))


def _backward(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor], target: torch.Tensor, lse: torch.Tensor,
              order: torch.Tensor, count: torch.Tensor, label_smoothing: float, z_loss: float,
              softcap: Optional[float], compute_dh: bool, compute_dw: bool, compute_db: bool):
    """Chunks of the sorted rows: a Triton kernel recomputes each logits tile and writes
    dz in the inputs' dtype, then cuBLAS forms dh = dz W and dW += dz^T h. An earlier
    version scattered both products from the tile kernel with fp32 atomics: on an H200
    at the 1.5B benchmark shape its backward took ~145 ms against ~45 ms for the plain
    path's three products (atomic traffic of N H V / BLOCK fp32 adds each). No atomics
    now (but for db), so dh and dW are bitwise reproducible."""
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    # fp32 results (the outputs themselves when the inputs are fp32). Every row of dh is
    # written by its chunk (order is a permutation of the rows); ignored rows get dz = 0,
    # hence exact zeros.
    dh = _empty((n, h_dim) if compute_dh else (0,), torch.float32, dev)
    dw = torch.zeros((vocab, h_dim) if compute_dw and n == 0 else (0,), dtype=torch.float32,
                     device=dev)
    db = torch.zeros((vocab,) if compute_db else (0,), dtype=torch.float32, device=dev)
    if n > 0 and (compute_dh or compute_dw or compute_db):
        interpreted = backends.triton_interpreted()
        cfg = _pick_config(hidden.dtype, interpreted, n)
        has_bias = bias is not None
        g = grad_loss.float().contiguous()
        # The products take dz in the inputs' dtype. dz carries g = upstream grad x
        # weight / sum of weights, which for a mean over 16k rows sits near 1e-5 and
        # would flush to zero in fp16 (smallest subnormal 6e-8). Normalise g by its max
        # on the device (no sync) and scale the fp32 results back afterwards. bf16 has
        # fp32's exponent range and fp32 products take dz as is, so only fp16 pays.
        g_scale = None
        if hidden.dtype == torch.float16:
            # over the counted rows only: an ignored row's g can be 0 * inf = NaN (a token
            # weight of 1 / 0 for a sample without labels); the kernel never reads it, but
            # a NaN scale would reach every gradient. Row r is counted iff its position
            # in `order` is below the count (a scatter, no host sync).
            counted = torch.empty(n, dtype=torch.bool, device=dev)
            counted[order.long()] = torch.arange(n, device=dev) < count
            g_scale = torch.where(counted, g.abs(), 0.0).amax()
            g_scale = g_scale.clamp_min(torch.finfo(torch.float32).tiny)
            g = g / g_scale
        dz_dtype = store_dtype(hidden.dtype, interpreted)
        chunk = _dz_chunk_rows(n, vocab, dz_dtype.itemsize, cfg.block_m)
        dz_buffer = _empty((min(chunk, n), vocab), dz_dtype, dev)
        for first in range(0, n, chunk):
            rows = min(chunk, n - first)
            dz = dz_buffer[:rows]
            grid = (triton.cdiv(rows, cfg.block_m) * triton.cdiv(vocab, cfg.block_v),)
            _lce_dz_kernel[grid](
                hidden, hidden.stride(0), hidden.stride(1), weight, weight.stride(0),
                weight.stride(1), bias if has_bias else hidden, bias.stride(0) if has_bias else 0,
                target, order, count, lse, g, dz, dz.stride(0), db,
                first, rows, vocab, h_dim, float(softcap or 1.0), float(label_smoothing),
                float(z_loss),
                BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                GROUP_M=cfg.group_m, HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None,
                COMPUTE_DB=compute_db, UPCAST=_upcast(hidden.dtype, interpreted),
                PRECISION=_precision(hidden.dtype, interpreted),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            dz = dz.to(hidden.dtype)  # a no-op but for bf16 in the interpreter
            at = order[first:first + rows]
            if compute_dh:
                dh.index_copy_(0, at, _mm_f32(dz, weight))
            if compute_dw:
                # rows past the count are ignored: zero, not read (0 * NaN = NaN in dW)
                valid = torch.arange(first, first + rows, device=dev) < count
                h_rows = hidden.index_select(0, at).masked_fill_(~valid[:, None], 0.0)
                if first == 0:
                    dw = _mm_f32(dz.t(), h_rows)
                else:
                    _add_mm_f32_(dw, dz.t(), h_rows)
        if g_scale is not None:
            for acc in (dh, dw, db):
                acc.mul_(g_scale)
    return (dh.to(hidden.dtype), dw.to(weight.dtype),
            db.to(bias.dtype) if bias is not None else db)


# -------------------------------------------------------- custom ops and autograd
# torch.library custom ops (rather than a bare autograd.Function) so that
# torch.compile traces through the loss without graph breaks: the fake kernels below
# give it the output shapes, register_autograd wires the backward op.
@torch.library.custom_op("unimrg_fast::linear_cross_entropy_fwd", mutates_args=())
def _fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
            softcap: Optional[float], track_argmax: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss [N] fp32 unweighted, lse [N] fp32, correct [N] int32 or [0],
    order [N] int64, count [1] int32); zeros at ignored rows, NaN at bad targets."""
    return _forward(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                    softcap, track_argmax)


@_fwd_op.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, track_argmax):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (hidden.new_empty(n, **f32), hidden.new_empty(n, **f32),
            hidden.new_empty(n if track_argmax else 0, dtype=torch.int32),
            hidden.new_empty(n, dtype=torch.int64), hidden.new_empty(1, dtype=torch.int32))


@torch.library.custom_op("unimrg_fast::linear_cross_entropy_bwd", mutates_args=())
def _bwd_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor], target: torch.Tensor, lse: torch.Tensor,
            order: torch.Tensor, count: torch.Tensor, label_smoothing: float, z_loss: float,
            softcap: Optional[float], compute_dh: bool, compute_dw: bool, compute_db: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dh, dW, db) in the inputs' dtypes; a gradient not asked for is empty [0]."""
    return _backward(grad_loss, hidden, weight, bias, target, lse, order, count,
                     label_smoothing, z_loss, softcap, compute_dh, compute_dw, compute_db)


@_bwd_op.register_fake
def _(grad_loss, hidden, weight, bias, target, lse, order, count, label_smoothing, z_loss,
      softcap, compute_dh, compute_dw, compute_db):
    db_dtype = bias.dtype if bias is not None else torch.float32
    return (hidden.new_empty(hidden.shape if compute_dh else (0,)),
            weight.new_empty(weight.shape if compute_dw else (0,)),
            weight.new_empty((weight.shape[0],) if compute_db else (0,), dtype=db_dtype))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, _ = inputs
    _, lse, _, order, count = output
    ctx.save_for_backward(hidden, weight, bias, target, lse, order, count)
    ctx.options = (label_smoothing, z_loss, softcap)


def _backward_rule(ctx, grad_loss, grad_lse, grad_correct, grad_order, grad_count):
    # Only the per-row loss is differentiable; lse and the rest are bookkeeping.
    hidden, weight, bias, target, lse, order, count = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and bias is not None
    if grad_loss is None or not (need_dh or need_dw or need_db):
        return None, None, None, None, None, None, None, None, None
    dh, dw, db = _bwd_op(grad_loss, hidden, weight, bias, target, lse, order, count,
                         *ctx.options, need_dh, need_dw, need_db)
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
            None, None, None, None, None, None)


torch.library.register_autograd(_fwd_op, _backward_rule, setup_context=_setup_context)


# ------------------------------------------------------------------ entry points
def _compute_dtype(device: torch.device, *tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The autocast dtype inside an autocast region (what F.linear would use), else the
    promoted dtype of the inputs (what the reference does)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _fused(hidden, weight, target, *, bias, ignore_index, reduction, label_smoothing, z_loss,
           softcap, token_weight, track_argmax):
    h, y = check_ce_args(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                         softcap=softcap, token_weight=token_weight)
    check_kernel_device(h, "hidden")
    y = y.contiguous()

    dtype = _compute_dtype(h.device, h, weight, bias)
    h, w = h.to(dtype), weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    loss, _, correct, _, _ = _fwd_op(h, w, b, y, int(ignore_index), float(label_smoothing),
                                     float(z_loss), None if softcap is None else float(softcap),
                                     track_argmax)
    out = masked_weighted_reduce(loss, y != ignore_index, token_weight, reduction)
    return out, (correct.sum() if track_argmax else None)


def _triton(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
            bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
            reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
            softcap: Optional[float] = None,
            token_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused implementation behind `linear_cross_entropy(..., impl="triton")`."""
    loss, _ = _fused(hidden, weight, target, bias=bias, ignore_index=ignore_index,
                     reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                     softcap=softcap, token_weight=token_weight, track_argmax=False)
    return loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         token_weight: Optional[torch.Tensor] = None,
                         impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T + bias` without storing them.

    Args:
        hidden: [..., H] fp32 / fp16 / bf16; leading dimensions are flattened to N rows.
        weight: [V, H], same device. bias: [V] or None.
        target: [...] int64 matching hidden's leading dims; `ignore_index` rows
            contribute nothing and get zero gradient.
        reduction: "mean" (sum_i w_i l_i / sum_i w_i over non-ignored rows; 0 when all
            are ignored), "sum", or "none" ([N], zeros at ignored rows).
        label_smoothing, z_loss, softcap, token_weight: see DESIGN.md section 3.1.
        impl: "auto", "triton", "reference" (see unimrg_fast.backends).

    Returns:
        fp32 scalar, or [N] fp32 for reduction="none".
    """
    _, fn = backends.resolve("linear_cross_entropy", impl, device=hidden.device
                             if isinstance(hidden, torch.Tensor) else None,
                             tensors=(hidden, weight, bias))
    return fn(hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction=reduction,
              label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
              token_weight=token_weight)


def linear_cross_entropy_with_stats(hidden: torch.Tensor, weight: torch.Tensor,
                                    target: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                                    ignore_index: int = -100, reduction: str = "mean",
                                    label_smoothing: float = 0.0, z_loss: float = 0.0,
                                    softcap: Optional[float] = None,
                                    token_weight: Optional[torch.Tensor] = None,
                                    impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy` plus token accuracy for logging.

    Returns (loss, num_correct): num_correct is an int64 scalar tensor on hidden's
    device (no host sync) counting non-ignored rows whose first argmax of the logits
    (capped when softcap is set) equals the target. The Triton path tracks the argmax
    inside its forward loop; other implementations recompute the logits without
    gradient, in row chunks. Each takes the argmax of the logits it computes: the kernel's
    are accumulated in fp32, the others' are rounded to the compute dtype (as the plain
    path's loss sees them), so in fp16 / bf16 a row whose top two logits lie within one
    rounding step may count differently. A logged metric only; loss and gradients agree.
    """
    name, fn = backends.resolve("linear_cross_entropy", impl, device=hidden.device
                                if isinstance(hidden, torch.Tensor) else None,
                                tensors=(hidden, weight, bias))
    kwargs = dict(bias=bias, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                  token_weight=token_weight)
    if name == "triton":
        return _fused(hidden, weight, target, track_argmax=True, **kwargs)
    loss = fn(hidden, weight, target, **kwargs)
    with torch.no_grad():
        h = flatten_rows(hidden)
        y = target.reshape(h.shape[0])
        dtype = _compute_dtype(h.device, h, weight, bias)
        num_correct = torch.zeros((), dtype=torch.int64, device=h.device)
        for start in range(0, h.shape[0], 4096):
            z = torch.nn.functional.linear(h[start:start + 4096].to(dtype), weight.to(dtype),
                                           None if bias is None else bias.to(dtype)).float()
            if softcap is not None:
                # monotonic, but it saturates: far-apart logits tie at the cap in fp32,
                # and the first of them counts, as in the kernel
                z = softcap * torch.tanh(z / softcap)
            yc = y[start:start + 4096]
            num_correct += ((z.argmax(-1) == yc) & (yc != ignore_index)).sum()
    return loss, num_correct

"""Task-interleaved packed attention (DESIGN.md sections 3.4 and 3.5).

Block-sparse FlashAttention-2 over a pack. The layout's tile metadata lists, for each
query tile, the key tiles holding at least one visible pair (a CSR row), and flags
the tiles in which every pair is visible; the kernels visit only those tiles, and
build a per-element mask from the per-token sample / span ids only in the partial
ones. A pack of short samples therefore costs what its samples cost, not T^2.

    forward, dq: grid (query tile i, q head h)    dk, dv: grid (key tile j, q head h)
          keys ->                                       queries ->
       ┌───────────────────────┐                     ┌───────────────────────┐
     i │ F F P . . . . . . . . │  walk the CSR     j │ . . P F F F P . . . . │  walk the
       └───────────────────────┘  row of tile i      └───────────────────────┘  transpose
       F full: no mask   P partial: mask from ids
       . never visited (other sample, or masked)

Forward: online softmax in fp32 in the log2 domain (exp2 of fma(s, scale * log2(e),
-max)), out [T, Hq, D] in q's dtype, lse [Hq, T] fp32 (natural log). Backward
recomputes the probabilities from lse, p = exp(fma(s, scale, -lse)); delta =
rowsum(dO * O) - dlse (so lse is differentiable too); one kernel for dk / dv over
(key tile, q head), and one for dq over (query tile, q head). Under GQA each q head's
dk / dv is an fp32 partial, and the host sums the group's partials. Each gradient
element (or partial) is written by exactly one program that adds its terms in a fixed
order, and the group sum is one fixed-shape torch reduction: no atomics, so the
backward is deterministic (bitwise run to run) by construction.

Nothing depends on the layout at compile time: the CSR arrays, token ids and T are
runtime arguments, and neither T nor the layout's pointers are specialised on, so a
new pack with other lengths reuses the compiled kernels.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from unimrg_fast import backends
from unimrg_fast.layout import CAUSAL, NOISE, PackedLayout
from unimrg_fast.ops._common import (check_kernel_device, effective_limit, first_that_fits,
                                     interpreted_bf16, smem_needed, smem_per_block as _smem_limit,
                                     store_dtype as _store_dtype, unit_last)
# The argument checks are the reference's own, so the two paths cannot drift apart.
from unimrg_fast.reference.attention import _check_inputs as check_attention_args

_NEG_INF = tl.constexpr(float("-inf"))
_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_CAUSAL = tl.constexpr(CAUSAL)
_NOISE = tl.constexpr(NOISE)
MAX_HEAD_DIM = 256

# Arguments whose values change from pack to pack: T, and the layout's int32 arrays
# (views into one transfer buffer, so their 16-byte alignment depends on the lengths).
# Specialising on them would compile a new kernel per T % 16 class and per alignment.
_LAYOUT_ARGS = ["T", "q_tile_ptr", "k_tile_idx", "k_tile_full", "k_tile_ptr", "q_tile_idx",
                "q_tile_full", "token_sample", "token_span", "span_modes"]


def _jit(**kwargs):
    """triton.jit without specialisation on the layout's arguments (where supported)."""
    params = inspect.signature(triton.jit).parameters
    kw = {}
    if "do_not_specialize" in params:
        kw["do_not_specialize"] = ["T"]
    if "do_not_specialize_on_alignment" in params:
        kw["do_not_specialize_on_alignment"] = _LAYOUT_ARGS
    kw.update(kwargs)
    return triton.jit(**kw)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _token_ids(token_sample, token_span, span_modes, pos, ok, OUTSIDE: tl.constexpr):
    """(sample, span, mode) of tokens `pos`; tokens past T get sample OUTSIDE, which
    differs between query (-1) and key (-2) side so they never see each other."""
    sample = tl.load(token_sample + pos, mask=ok, other=OUTSIDE)
    span = tl.load(token_span + pos, mask=ok, other=OUTSIDE)
    mode = tl.load(span_modes + span, mask=ok, other=_NOISE)
    return sample, span, mode


@triton.jit
def _visible(q_pos, q_sample, q_span, q_mode, k_pos, k_sample, k_span, k_mode):
    """The rule of DESIGN.md 3.4, elementwise over broadcast query / key operands."""
    same_span = q_span == k_span
    ordered = (k_pos <= q_pos) | (same_span & (q_mode != _CAUSAL))
    return (q_sample == k_sample) & ordered & ((k_mode != _NOISE) | same_span)


@triton.jit
def _key_tile(q, k_base, v_base, stride_kt, stride_vt, k_tile_idx, k_tile_full, idx, T,
              token_sample, token_span, span_modes, offs_m, q_sample, q_span, q_mode, d_ok,
              BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Entry `idx` of a query tile's CSR row: its K and V tiles and the raw scores Q K^T,
    invisible pairs at -inf. A tile flagged full builds no mask at all (the common case
    inside big image spans), which is what the layout's full flags are for."""
    k_tile = tl.load(k_tile_idx + idx)
    full = tl.load(k_tile_full + idx)
    offs_n = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    cols = offs_n.to(tl.int64)
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kt, mask=kv_ok, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vt, mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if full == 0:
        k_sample, k_span, k_mode = _token_ids(token_sample, token_span, span_modes,
                                              offs_n, n_ok, -2)
        vis = _visible(offs_m[:, None], q_sample[:, None], q_span[:, None], q_mode[:, None],
                       offs_n[None, :], k_sample[None, :], k_span[None, :], k_mode[None, :])
        s = tl.where(vis, s, _NEG_INF)
    return k, v, s


@_jit()
def _attn_fwd_kernel(q_ptr, stride_qt, stride_qh, k_ptr, stride_kt, stride_kh,
                     v_ptr, stride_vt, stride_vh, o_ptr, stride_ot, stride_oh, lse_ptr,
                     q_tile_ptr, k_tile_idx, k_tile_full, token_sample, token_span, span_modes,
                     T, num_heads, group, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One (query tile, q head): out = softmax(q k^T * scale) v over the tile's CSR row.

    qk_scale = scale * log2(e); lse is stored as natural log, [Hq, T] contiguous.
    """
    pid = tl.program_id(0)
    head = pid % num_heads  # heads fastest: a GQA group's programs share K / V in L2
    tile = pid // num_heads
    kv_head = head // group
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows = offs_m.to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter treats bf16 as raw bits: compute in fp32 there
        q = q.to(tl.float32)
    q_sample, q_span, q_mode = _token_ids(token_sample, token_span, span_modes, offs_m, m_ok, -1)
    k_base = k_ptr + kv_head * stride_kh + offs_d[None, :]
    v_base = v_ptr + kv_head * stride_vh + offs_d[None, :]

    m_i = tl.full((BLOCK_M,), _NEG_INF, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start = tl.load(q_tile_ptr + tile)
    end = tl.load(q_tile_ptr + tile + 1)
    for idx in range(start, end):
        k, v, s = _key_tile(q, k_base, v_base, stride_kt, stride_vt, k_tile_idx, k_tile_full,
                            idx, T, token_sample, token_span, span_modes, offs_m, q_sample,
                            q_span, q_mode, d_ok, BLOCK_N, UPCAST, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        # A row may see nothing yet (a partial tile, or a row past T): keep it finite.
        m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        # One rounding of the small difference, not of the large scaled score.
        p = tl.exp2(tl.fma(s, qk_scale, -m_use[:, None]))
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Every token sees itself, so l_i > 0 on every row inside the pack.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) * _LN2
    tl.store(lse_ptr + head.to(tl.int64) * T + rows, lse, mask=m_ok)


@_jit()
def _attn_bwd_preprocess_kernel(o_ptr, stride_ot, stride_oh, do_ptr, stride_dot, stride_doh,
                                dlse_ptr, delta_ptr, T,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr,
                                UPCAST: tl.constexpr):
    """delta [Hq, T] = rowsum(dO * O) - dlse (dlse: the gradient reaching lse, if any).

    d lse_i / d s_ij = p_ij, so an lse gradient only shifts delta: ds = p (dp - delta).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    m_ok = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    ok = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)
    o = tl.load(o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                mask=ok, other=0.0)
    do = tl.load(do_ptr + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                 mask=ok, other=0.0)
    if UPCAST:
        o = o.to(tl.float32)
        do = do.to(tl.float32)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    at = head.to(tl.int64) * T + rows
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + at, mask=m_ok, other=0.0)
    tl.store(delta_ptr + at, delta, mask=m_ok)


@_jit()
def _attn_bwd_dkdv_kernel(q_ptr, stride_qt, stride_qh, k_ptr, stride_kt, stride_kh,
                          v_ptr, stride_vt, stride_vh, do_ptr, stride_dot, stride_doh,
                          dk_ptr, dv_ptr, lse_ptr, delta_ptr,
                          k_tile_ptr, q_tile_idx, q_tile_full, token_sample, token_span,
                          span_modes, T, num_heads, group, sm_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr):
    """One (key tile, q head): q head h's share of dk, dv (those of kv head h // group),
    summed over the query tiles of the transposed CSR row in one fixed order.

    dk, dv are [T, Hq, D] contiguous: the gradients themselves when group == 1, else
    fp32 partials that the host sums over each group. Computed transposed (keys as
    rows): p^T = exp(k q^T * scale - lse), dv += p^T dO, ds^T = p^T (v dO^T - delta),
    dk += ds^T q * scale.
    """
    # Not one program per (key tile, kv head) looping over the group's q heads: that
    # gave group x fewer, group x longer programs (256 for 132 SMs at 16k tokens, Hq 12,
    # Hkv 2), and dk / dv took 3x dq's time.
    pid = tl.program_id(0)
    head = pid % num_heads  # heads fastest: a GQA group's programs share K / V in L2
    tile = pid // num_heads
    kv_head = head // group
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    cols = offs_n.to(tl.int64)
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + cols[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(v_ptr + cols[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    k_sample, k_span, k_mode = _token_ids(token_sample, token_span, span_modes, offs_n, n_ok, -2)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    start = tl.load(k_tile_ptr + tile)
    end = tl.load(k_tile_ptr + tile + 1)
    for idx in range(start, end):  # one flat loop, for the software pipeliner
        q_tile = tl.load(q_tile_idx + idx)
        full = tl.load(q_tile_full + idx)
        offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T
        rows = offs_m.to(tl.int64)
        q_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=q_ok, other=0.0)
        do = tl.load(do_ptr + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                     mask=q_ok, other=0.0)
        at = head.to(tl.int64) * T + rows
        lse = tl.load(lse_ptr + at, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + at, mask=m_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if full == 0:  # masked before exp2: a hidden pair's score may exceed lse
            q_sample, q_span, q_mode = _token_ids(token_sample, token_span, span_modes,
                                                  offs_m, m_ok, -1)
            vis = _visible(offs_m[None, :], q_sample[None, :], q_span[None, :], q_mode[None, :],
                           offs_n[:, None], k_sample[:, None], k_span[:, None], k_mode[:, None])
            s_t = tl.where(vis, s_t, _NEG_INF)
        # Natural units and one fma: large scores lose no more than one rounding of
        # s * scale - lse (the scaled score itself is never rounded).
        p_t = tl.exp(tl.fma(s_t, sm_scale, -lse[None, :]))
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    out = cols[:, None] * (num_heads * HEAD_DIM) + head * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@_jit()
def _attn_bwd_dq_kernel(q_ptr, stride_qt, stride_qh, k_ptr, stride_kt, stride_kh,
                        v_ptr, stride_vt, stride_vh, do_ptr, stride_dot, stride_doh,
                        dq_ptr, lse_ptr, delta_ptr,
                        q_tile_ptr, k_tile_idx, k_tile_full, token_sample, token_span,
                        span_modes, T, num_heads, group, sm_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr):
    """One (query tile, q head): dq = scale * sum_j ds_j k_j over the tile's CSR row.

    dq is [T, Hq, D] contiguous.
    """
    pid = tl.program_id(0)
    head = pid % num_heads
    tile = pid // num_heads
    kv_head = head // group
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows = offs_m.to(tl.int64)
    q_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=q_ok, other=0.0)
    do = tl.load(do_ptr + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                 mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    at = head.to(tl.int64) * T + rows
    lse = tl.load(lse_ptr + at, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + at, mask=m_ok, other=0.0)
    q_sample, q_span, q_mode = _token_ids(token_sample, token_span, span_modes, offs_m, m_ok, -1)
    k_base = k_ptr + kv_head * stride_kh + offs_d[None, :]
    v_base = v_ptr + kv_head * stride_vh + offs_d[None, :]

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    start = tl.load(q_tile_ptr + tile)
    end = tl.load(q_tile_ptr + tile + 1)
    for idx in range(start, end):
        k, v, s = _key_tile(q, k_base, v_base, stride_kt, stride_vt, k_tile_idx, k_tile_full,
                            idx, T, token_sample, token_span, span_modes, offs_m, q_sample,
                            q_span, q_mode, d_ok, BLOCK_N, UPCAST, PRECISION)
        p = tl.exp(tl.fma(s, sm_scale, -lse[:, None]))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    out = rows[:, None] * (num_heads * HEAD_DIM) + head * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptr + out, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=q_ok)


# ------------------------------------------------------------------------ launchers
@dataclasses.dataclass(frozen=True)
class _Config:
    """Tile sizes and launch options of the three passes.

    The forward and dq share one tile metadata (query tiles of fwd_block_m rows, key
    tiles of fwd_block_n); dk / dv uses its own (kv_block_m x kv_block_n), whose
    transpose it walks. Not autotuned: the tile size also selects the layout metadata.
    """

    fwd_block_m: int
    fwd_block_n: int
    kv_block_m: int
    kv_block_n: int
    fwd_warps: int = 4
    fwd_stages: int = 2
    dq_warps: int = 4
    dq_stages: int = 2
    kv_warps: int = 4
    kv_stages: int = 2


# Packs at least this long run with big tiles in the interpreter (see _pick_config).
INTERPRETER_BIG_TILES_FROM = 256

# Tile configurations per (fp32 inputs?, BLOCK_D rounded up to at least 64), fastest
# first, each with the most shared memory any of its three kernels needs, in bytes, in
# two columns: the larger of the sizes Triton 3.9 compiles them to for sm_80 and sm_90
# (sm_86 gives sm_80's), then the size for sm_75 (see _common.smem_needed).
# _pick_config takes the first that fits the device, so an H100 runs the first entry, an
# A100, an sm_86 / sm_89 card or a T4 may run a smaller one; tests/
# test_kernel_resources.py recompiles the H100 and T4 choices and checks these numbers.
# Untimed: the first entries at D <= 128 were checked offline for sm_90a (no register
# spills except the fp32 backward at D = 128: tf32x3 triples the dots, and fp32 is the
# correctness path, not the fast one); the others are only sized to fit. In half
# precision dk / dv takes 128-key tiles and short query tiles, as FlashAttention-2's
# Triton tutorial does: its accumulators are [BLOCK_N, D] fp32. Field order:
# fwd_block_m, fwd_block_n, kv_block_m, kv_block_n, then (warps, stages) of the forward,
# dq and dk / dv.
_LADDERS = {
    (True, 64): ((_Config(64, 32, 16, 64, 8, 2, 8, 2, 8, 2), 98308, 49152),
                 (_Config(32, 32, 32, 32, 4, 1, 4, 1, 4, 1), 49152, 36864)),
    (True, 128): ((_Config(64, 32, 64, 32, 8, 2, 8, 2, 8, 2), 196612, 106496),
                  (_Config(32, 32, 32, 32, 8, 2, 8, 2, 8, 2), 98580, 69632),
                  (_Config(16, 16, 16, 16, 4, 1, 4, 1, 4, 1), 49152, 33792)),
    # (64, 32) tiles need 278,532 B (forward) and 393,220 B (dq) at fp32 D = 256
    (True, 256): ((_Config(32, 32, 32, 32, 8, 2, 8, 2, 8, 2), 196884, 135168),
                  (_Config(32, 32, 32, 16, 4, 1, 4, 1, 4, 1), 163840, 131072),
                  (_Config(16, 16, 16, 16, 4, 1, 4, 1, 4, 1), 98304, 66560)),
    (False, 64): ((_Config(128, 64, 64, 128, 8, 3, 8, 2, 8, 2), 66068, 98304),
                  (_Config(32, 32, 32, 32, 4, 1, 4, 1, 4, 1), 20480, 24576)),
    (False, 128): ((_Config(128, 64, 32, 128, 8, 3, 8, 2, 8, 2), 98324, 163840),
                   (_Config(32, 32, 32, 32, 4, 1, 4, 1, 4, 1), 40960, 49152)),
    (False, 256): ((_Config(64, 32, 64, 32, 8, 2, 8, 2, 8, 2), 131604, 163840),
                   (_Config(32, 32, 32, 32, 8, 2, 8, 2, 8, 2), 82196, 98304),
                   (_Config(16, 16, 16, 16, 4, 1, 4, 1, 4, 1), 36864, 49152)),
}


def _pick_config(dtype: torch.dtype, block_d: int, interpreted: bool, num_tokens: int,
                 smem_limit: Optional[int] = None, head_dim: Optional[int] = None) -> _Config:
    """Tile sizes for q's dtype and padded head dim; `smem_limit`: the device's shared
    memory per block (None: an H100's). Raises ValueError when no configuration fits."""
    if interpreted:
        # The interpreter's cost is per tile operation, not per element: 16-wide tiles
        # give the tiny test packs several tiles, partial and full ones, and ragged
        # ends; real packs (the trainer's CPU default) take 128-wide tiles, ~10x faster.
        if num_tokens >= INTERPRETER_BIG_TILES_FROM:
            return _Config(128, 128, 128, 128, 4, 1, 4, 1, 4, 1)
        return _Config(16, 16, 16, 16, 4, 1, 4, 1, 4, 1)
    ladder = _LADDERS[(dtype == torch.float32, max(64, block_d))]
    cfg = first_that_fits(ladder, smem_limit)
    if cfg is not None:
        return cfg
    limit = effective_limit(smem_limit)
    dims = head_dim if head_dim is not None else f"<= {block_d}"
    raise ValueError(
        f"packed_attention: no tile configuration of the Triton kernels fits {dtype} q/k/v "
        f"at head dim {dims} in this GPU's {limit} bytes of shared memory per block (the "
        f"smallest needs {smem_needed(ladder[-1], limit)}); use impl='reference', or a "
        f"16-bit dtype")


def _config_for(q: torch.Tensor, interpreted: bool) -> Tuple[int, _Config]:
    """(BLOCK_D, config) of a call: the forward, the backward and the tile metadata
    must agree, so all three take it from here."""
    return _config_of(q.dtype, q.shape[2], q.shape[0], q.device, interpreted)


def _config_of(dtype: torch.dtype, head_dim: int, num_tokens: int, device: torch.device,
               interpreted: bool) -> Tuple[int, _Config]:
    """_config_for from the call's description alone (what triton_accepts knows)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return block_d, _pick_config(dtype, block_d, interpreted, num_tokens, _smem_limit(device),
                                 head_dim=head_dim)


def _tile_keys(cfg: _Config) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The (block_q, block_k) of the two tile sets a call builds with `layout.tiles`: the
    forward / dq one and the dk / dv one (both, even for a forward-only call)."""
    return (cfg.fwd_block_m, cfg.fwd_block_n), (cfg.kv_block_m, cfg.kv_block_n)


def tile_sizes(dtype: torch.dtype, head_dim: int, num_tokens: int,
               device: Optional[torch.device] = None) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """`_tile_keys` of a GPU call on each new layout. `device`: the GPU whose shared
    memory picks the tiles (None: an H100's). For benchmarks that time the per-pack
    metadata."""
    device = device if device is not None else torch.device("cpu")   # cpu: no smem limit
    return _tile_keys(_config_of(dtype, head_dim, num_tokens, device, False)[1])


def _upcast(dtype: torch.dtype, interpreted: bool) -> bool:
    return interpreted_bf16(dtype, interpreted)


def _precision(dtype: torch.dtype, interpreted: bool) -> str:
    # fp32 inputs: "tf32x3" on a GPU (three tf32 tensor-core products, ~fp32 accuracy;
    # plain tf32 would cost ~1e-3 relative error, and "ieee" CUDA-core dots spill
    # registers heavily at these tile sizes); exact "ieee" in the interpreter.
    # fp16/bf16 dots are exact products with fp32 accumulation whatever this says.
    if interpreted:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Every buffer a kernel must fill comes from here, so that tests can poison them.
    return torch.empty(shape, dtype=dtype, device=device)


def _forward(q, k, v, token_sample, token_span, span_modes, q_tile_ptr, k_tile_idx,
             k_tile_full, scale: float, block_m: int, block_n: int):
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    interpreted = backends.triton_interpreted()
    block_d, cfg = _config_for(q, interpreted)
    out = _empty((num_tokens, num_heads, head_dim), _store_dtype(q.dtype, interpreted), q.device)
    lse = _empty((num_heads, num_tokens), torch.float32, q.device)
    num_q_tiles = q_tile_ptr.shape[0] - 1
    _attn_fwd_kernel[(num_q_tiles * num_heads,)](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        out, out.stride(0), out.stride(1), lse,
        q_tile_ptr, k_tile_idx, k_tile_full, token_sample, token_span, span_modes,
        num_tokens, num_heads, group, scale * _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HEAD_DIM=head_dim,
        UPCAST=_upcast(q.dtype, interpreted), PRECISION=_precision(q.dtype, interpreted),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
    return out.to(q.dtype), lse


def _backward(grad_out, grad_lse, q, k, v, out, lse, token_sample, token_span, span_modes,
              q_tile_ptr, k_tile_idx, k_tile_full, k_tile_ptr, q_tile_idx, q_tile_full,
              scale: float, fwd_block_m: int, fwd_block_n: int, kv_block_m: int,
              kv_block_n: int, compute_dq: bool, compute_dkv: bool):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    dev = q.device
    interpreted = backends.triton_interpreted()
    block_d, cfg = _config_for(q, interpreted)
    upcast, precision = _upcast(q.dtype, interpreted), _precision(q.dtype, interpreted)
    store = _store_dtype(q.dtype, interpreted)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()

    delta = _empty((num_heads, num_tokens), torch.float32, dev)
    pre_block = 64 if not interpreted else 16
    has_dlse = grad_lse is not None
    if has_dlse:
        grad_lse = grad_lse.float().contiguous()
    _attn_bwd_preprocess_kernel[(triton.cdiv(num_tokens, pre_block), num_heads)](
        out, out.stride(0), out.stride(1), grad_out, grad_out.stride(0), grad_out.stride(1),
        grad_lse if has_dlse else delta, delta, num_tokens,
        BLOCK_M=pre_block, BLOCK_D=block_d, HEAD_DIM=head_dim, HAS_DLSE=has_dlse,
        UPCAST=upcast, num_warps=4)

    dk = dv = dq = None
    if compute_dkv:
        # One program per (key tile, q head). Without GQA it writes dk, dv themselves;
        # with it, fp32 per-q-head partials, summed below over each group in a fixed
        # order (no atomics: deterministic).
        part = store if group == 1 else torch.float32
        dk = _empty((num_tokens, num_heads, head_dim), part, dev)
        dv = _empty((num_tokens, num_heads, head_dim), part, dev)
        num_k_tiles = k_tile_ptr.shape[0] - 1
        _attn_bwd_dkdv_kernel[(num_k_tiles * num_heads,)](
            q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
            grad_out, grad_out.stride(0), grad_out.stride(1), dk, dv, lse, delta,
            k_tile_ptr, q_tile_idx, q_tile_full, token_sample, token_span, span_modes,
            num_tokens, num_heads, group, scale,
            BLOCK_M=kv_block_m, BLOCK_N=kv_block_n, BLOCK_D=block_d, HEAD_DIM=head_dim,
            UPCAST=upcast, PRECISION=precision, num_warps=cfg.kv_warps,
            num_stages=cfg.kv_stages)
        if group > 1:
            shape = (num_tokens, num_kv_heads, group, head_dim)
            dk = dk.view(shape).sum(2)   # rounded once, to k's dtype, below
            dv = dv.view(shape).sum(2)
    if compute_dq:
        dq = _empty((num_tokens, num_heads, head_dim), store, dev)
        num_q_tiles = q_tile_ptr.shape[0] - 1
        _attn_bwd_dq_kernel[(num_q_tiles * num_heads,)](
            q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
            grad_out, grad_out.stride(0), grad_out.stride(1), dq, lse, delta,
            q_tile_ptr, k_tile_idx, k_tile_full, token_sample, token_span, span_modes,
            num_tokens, num_heads, group, scale,
            BLOCK_M=fwd_block_m, BLOCK_N=fwd_block_n, BLOCK_D=block_d, HEAD_DIM=head_dim,
            UPCAST=upcast, PRECISION=precision, num_warps=cfg.dq_warps,
            num_stages=cfg.dq_stages)
    return (dq.to(q.dtype) if dq is not None else q.new_empty((0,)),
            dk.to(k.dtype) if dk is not None else k.new_empty((0,)),
            dv.to(v.dtype) if dv is not None else v.new_empty((0,)))


# -------------------------------------------------------- custom ops and autograd
# torch.library custom ops (rather than a bare autograd.Function) so that
# torch.compile traces through attention without graph breaks. The layout is not a
# tensor: the ops take the tensors it carries. fwd tiles: the query-tile CSR at
# (fwd_block_m, fwd_block_n), used by the forward and by dq; kv tiles: the key-tile
# CSR (transpose) at (kv_block_m, kv_block_n), used by dk / dv.
@torch.library.custom_op("unimrg_fast::packed_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_sample: torch.Tensor,
            token_span: torch.Tensor, span_modes: torch.Tensor, q_tile_ptr: torch.Tensor,
            k_tile_idx: torch.Tensor, k_tile_full: torch.Tensor, k_tile_ptr: torch.Tensor,
            q_tile_idx: torch.Tensor, q_tile_full: torch.Tensor, scale: float,
            fwd_block_m: int, fwd_block_n: int, kv_block_m: int, kv_block_n: int
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (out [T, Hq, D] in q's dtype, lse [Hq, T] fp32). The kv tiles are not read
    here; they are inputs so that the backward finds them."""
    return _forward(q, k, v, token_sample, token_span, span_modes, q_tile_ptr, k_tile_idx,
                    k_tile_full, scale, fwd_block_m, fwd_block_n)


@_fwd_op.register_fake
def _(q, k, v, token_sample, token_span, span_modes, q_tile_ptr, k_tile_idx, k_tile_full,
      k_tile_ptr, q_tile_idx, q_tile_full, scale, fwd_block_m, fwd_block_n, kv_block_m,
      kv_block_n):
    num_tokens, num_heads, head_dim = q.shape
    return (q.new_empty((num_tokens, num_heads, head_dim)),
            q.new_empty((num_heads, num_tokens), dtype=torch.float32))


@torch.library.custom_op("unimrg_fast::packed_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor,
            k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            token_sample: torch.Tensor, token_span: torch.Tensor, span_modes: torch.Tensor,
            q_tile_ptr: torch.Tensor, k_tile_idx: torch.Tensor, k_tile_full: torch.Tensor,
            k_tile_ptr: torch.Tensor, q_tile_idx: torch.Tensor, q_tile_full: torch.Tensor,
            scale: float, fwd_block_m: int, fwd_block_n: int, kv_block_m: int,
            kv_block_n: int, compute_dq: bool, compute_dkv: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) in the inputs' dtypes, contiguous; one not asked for is empty [0]."""
    return _backward(grad_out, grad_lse, q, k, v, out, lse, token_sample, token_span,
                     span_modes, q_tile_ptr, k_tile_idx, k_tile_full, k_tile_ptr, q_tile_idx,
                     q_tile_full, scale, fwd_block_m, fwd_block_n, kv_block_m, kv_block_n,
                     compute_dq, compute_dkv)


@_bwd_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, token_sample, token_span, span_modes, q_tile_ptr,
      k_tile_idx, k_tile_full, k_tile_ptr, q_tile_idx, q_tile_full, scale, fwd_block_m,
      fwd_block_n, kv_block_m, kv_block_n, compute_dq, compute_dkv):
    return (q.new_empty(q.shape if compute_dq else (0,)),
            k.new_empty(k.shape if compute_dkv else (0,)),
            v.new_empty(v.shape if compute_dkv else (0,)))


def _setup_context(ctx, inputs, output):
    q, k, v, *layout_tensors, scale, fb_m, fb_n, kb_m, kb_n = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *layout_tensors)
    ctx.options = (scale, fb_m, fb_n, kb_m, kb_n)


def _backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *layout_tensors = ctx.saved_tensors
    need_dq = ctx.needs_input_grad[0]
    need_dkv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    none = (None,) * 14
    if not (need_dq or need_dkv) or (grad_out is None and grad_lse is None):
        return (None, None, None) + none
    if grad_out is None:  # only lse was used
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(grad_out, grad_lse, q, k, v, out, lse, *layout_tensors,
                         *ctx.options, need_dq, need_dkv)
    return ((dq if need_dq else None), (dk if need_dkv else None),
            (dv if need_dkv else None)) + none


torch.library.register_autograd(_fwd_op, _backward_rule, setup_context=_setup_context)


# ------------------------------------------------------------------ entry points
def _unsupported_head_dim(head_dim: int) -> Optional[str]:
    if head_dim > MAX_HEAD_DIM:
        return (f"q's head dim D = {head_dim} is not supported by the Triton kernel "
                f"(D <= {MAX_HEAD_DIM}); use impl='reference'")
    return None


def triton_accepts(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                   head_dim: Optional[int] = None, **_) -> Optional[str]:
    """None when the Triton kernels can run a call with q of `dtype` and head dim
    `head_dim` on `device`, else why not (what `_triton` would raise): a head dim above
    MAX_HEAD_DIM, or one whose smallest tiles do not fit the GPU's shared memory per
    block. backends.resolve asks before choosing, so "auto" falls back instead of
    failing. Cheap: a table lookup and the device's cached properties, no compilation,
    no sync. What the call leaves out (None) is not held against it."""
    if head_dim is None:
        return None
    why = _unsupported_head_dim(head_dim)
    if why is not None or dtype is None or device is None or backends.triton_interpreted():
        return why   # the interpreter takes any tile size (see _pick_config)
    device = torch.device(device)
    if torch.is_autocast_enabled(device.type):   # _triton casts to it before picking tiles
        dtype = torch.get_autocast_dtype(device.type)
    try:
        _config_of(dtype, head_dim, 0, device, False)
    except ValueError as exc:   # resolve() prefixes the op and impl itself
        return str(exc).removeprefix("packed_attention: ")
    return None


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *,
            scale: Optional[float] = None, return_lse: bool = False,
            deterministic: bool = False):
    """The fused implementation behind `packed_attention(..., impl="triton")`.

    `deterministic` is accepted for the shared signature: this backward is always
    deterministic (no atomics). lse is differentiable.
    """
    check_attention_args(q, k, v, layout, scale)
    check_kernel_device(q, "q")
    head_dim = q.shape[2]
    why = _unsupported_head_dim(head_dim)
    if why is not None:
        raise ValueError(why)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if torch.is_autocast_enabled(q.device.type):  # what SDPA does in the reference
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # Any token / head strides are fine; the head dim must be contiguous.
    q, k, v = (unit_last(x) for x in (q, k, v))

    _, cfg = _config_for(q, backends.triton_interpreted())
    fwd, kv = (layout.tiles(*key) for key in _tile_keys(cfg))
    out, lse = _fwd_op(q, k, v, layout.token_sample, layout.token_span, layout.span_modes,
                       fwd.q_tile_ptr, fwd.k_tile_idx, fwd.k_tile_full,
                       kv.k_tile_ptr, kv.q_tile_idx, kv.q_tile_full, scale,
                       cfg.fwd_block_m, cfg.fwd_block_n, cfg.kv_block_m, cfg.kv_block_n)
    return (out, lse) if return_lse else out


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, *,
                     scale: Optional[float] = None, impl: str = "auto", return_lse: bool = False,
                     deterministic: bool = False):
    """Softmax attention over a pack of samples under the rule of DESIGN.md 3.4.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (MHA, GQA, MQA).
        layout: the pack's PackedLayout (T tokens), on the same device.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the log-sum-exp [Hq, T] in fp32.
        deterministic: ask for a deterministic backward.

    Returns:
        out [T, Hq, D] (dtype of q), or (out, lse) when return_lse.

    Mask of one sample [image (full) | text (causal) | target (noise)], 1 = visible::

        q\\k  I I T T N N
        I    1 1 . . . .
        I    1 1 . . . .
        T    1 1 1 . . .
        T    1 1 1 1 . .
        N    1 1 1 1 1 1
        N    1 1 1 1 1 1

    impl="triton" (the block-sparse FlashAttention-2 kernels of this module):
    q, k, v fp32 / fp16 / bf16 of one dtype, head dim D <= 256 (any D; powers of two
    waste no work), any token and head strides (a head dim that is not contiguous is
    copied). Tile sizes shrink to fit the GPU's shared memory per block; where even
    the smallest do not fit (fp32 at D > 128 below ~96 KiB) it raises ValueError, and
    impl="auto" takes the next implementation instead (see `triton_accepts`).
    Query head h reads kv head h // (Hq // Hkv). Its backward is always
    deterministic (no atomics: each gradient element is summed in a fixed order),
    whatever `deterministic` says, and lse is differentiable. The tile metadata is
    built once per layout and tile size (`layout.tiles`), then shared by every layer;
    a new pack does not recompile the kernels.
    """
    # dtype, head dim and deterministic let "auto" skip implementations that cannot
    # honour them (flash-attn has no fp32, xformers no deterministic backward, Triton's
    # tiles may not fit the GPU's shared memory) instead of failing in the call.
    is_tensor = isinstance(q, torch.Tensor)
    # lse_grad: flash-attn's and xformers' lse carry no gradient; a loss on it would
    # silently lose that term
    lse_grad = bool(return_lse and torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v)))
    _, fn = backends.resolve("packed_attention", impl, device=q.device if is_tensor else None,
                             layout=layout, dtype=q.dtype if is_tensor else None,
                             head_dim=q.shape[-1] if is_tensor and q.dim() == 3 else None,
                             deterministic=deterministic, lse_grad=lse_grad,
                             tensors=(q, k, v))
    return fn(q, k, v, layout, scale=scale, return_lse=return_lse, deterministic=deterministic)

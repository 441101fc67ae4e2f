"""The block-sparse Triton packed attention against float64 math and the reference.

CPU lane: the kernels run on the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) with 16 x 16 tiles, so packs of < 100 tokens already hold full,
partial and never-visited tiles and ragged ends (T is never a multiple of 16 here).
GPU lane (`-m gpu`): realistic packs in fp16 / bf16 held to the FlashAttention rule
(kernel error to fp64 <= 2x the same-dtype reference's error + a floor), fp32, and no
host synchronisation.

The fp64 oracle builds its mask with `layout.dense_mask()` (tested on its own in
test_layout.py) and computes softmax(Q K^T * scale + mask) V explicitly.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect

import numpy as np
import pytest
import torch

import unimrg_fast as uf
from unimrg_fast import backends
from unimrg_fast.layout import PackedLayout
from unimrg_fast.reference.attention import packed_attention as ref_attention
from numerics import assert_rel, rel_err
from stand_ins import absent

pa = importlib.import_module("unimrg_fast.ops.packed_attention")
_common = importlib.import_module("unimrg_fast.ops._common")

ON_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_CUDA else "cpu")
pytestmark = pytest.mark.skipif(not backends.triton().available,
                                reason=f"Triton cannot run here: {backends.triton().detail}")

MODES = ("causal", "full", "noise")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
HEADS = [pytest.param(2, 2, id="mha"), pytest.param(4, 2, id="gqa"), pytest.param(2, 1, id="mqa")]


# ------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels must fill (out, lse, delta, dq, dk, dv) starts as NaN."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(pa, "_empty", poisoned)


def random_layout(rng, max_tokens=96, device=DEV):
    """Random samples of 1-6 spans of every mode, many length-1 spans and samples, long
    full / noise spans (full 16 x 16 tiles), a padding sample; T never a multiple of 16."""
    long_span = (int(rng.integers(33, 41)), MODES[int(rng.integers(1, 3))])  # full tiles
    samples = [[(int(rng.integers(1, 4)), "causal"), long_span]]
    total = sum(length for length, _ in samples[0])
    while True:
        spans = []
        for _ in range(int(rng.integers(1, 7))):
            r = rng.random()
            length = 1 if r < 0.3 else int(rng.integers(2, 8)) if r < 0.8 else int(rng.integers(16, 34))
            spans.append((length, MODES[int(rng.integers(0, 3))]))
        n = sum(length for length, _ in spans)
        if samples and total + n > max_tokens - 6:
            break
        samples.append(spans)
        total += n
    samples = [samples[i] for i in rng.permutation(len(samples))]
    samples.append([(1, MODES[int(rng.integers(0, 3))])])  # a length-1 sample
    total += 1
    pad_to = total + int(rng.integers(1, 5))
    if pad_to % 16 == 0:
        pad_to += 1
    return PackedLayout.from_spans(samples, pad_to=pad_to, device=device)


UMM = [[(21, "full"), (6, "causal"), (18, "noise")], [(1, "noise")],
       [(9, "full"), (1, "causal"), (1, "noise"), (17, "full"), (3, "causal")]]


def make_qkv(t, hq, hkv, d, dtype, device=DEV, scale=1.0):
    q = (torch.randn(t, hq, d, device=device) * scale).to(dtype)
    k = torch.randn(t, hkv, d, device=device).to(dtype)
    v = torch.randn(t, hkv, d, device=device).to(dtype)
    return q, k, v


def attention64(q, k, v, layout, scale):
    """(out [T, Hq, D], lse [Hq, T]) in float64, explicit softmax over the dense mask."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~layout.dense_mask(q.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v), torch.logsumexp(scores, -1)


def run(fn, q, k, v, layout, g_out, g_lse, **kw):
    """(out, lse, dq, dk, dv) of fn; the loss uses both out and lse."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*leaves, layout, return_lse=True, **kw)
    torch.autograd.backward([out, lse], [g_out.to(out.dtype), g_lse.to(lse.dtype)])
    return (out.detach(), lse.detach()) + tuple(x.grad for x in leaves)


def f64(*tensors):
    # The oracle's leaves are float64 too: autograd rounds a gradient to its leaf's dtype.
    return [x.double() for x in tensors]


def fused(q, k, v, layout, **kw):
    return uf.packed_attention(q, k, v, layout, impl="triton", **kw)


def oracle(q, k, v, layout, **kw):
    scale = kw.get("scale") or q.shape[-1] ** -0.5
    return attention64(q, k, v, layout, scale)


NAMES = ("out", "lse", "dq", "dk", "dv")


def check_case(layout, hq, hkv, d, dtype, what, scale=None, q_scale=1.0):
    t = layout.num_tokens
    q, k, v = make_qkv(t, hq, hkv, d, dtype, scale=q_scale)
    g_out, g_lse = torch.randn(t, hq, d, device=DEV), torch.randn(hq, t, device=DEV)
    kw = {} if scale is None else {"scale": scale}
    got = run(fused, q, k, v, layout, g_out, g_lse, **kw)
    want = run(oracle, *f64(q, k, v), layout, g_out, g_lse, **kw)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert got[0].shape == (t, hq, d) and got[1].shape == (hq, t)
    for x, ref in zip(got[2:], (q, k, v)):
        assert x.dtype == dtype and x.shape == ref.shape
    errs = [assert_rel(a, b, TOL[dtype], f"{what} {name} vs fp64")
            for name, a, b in zip(NAMES, got, want)]
    return q, k, v, g_out, g_lse, got, want, errs


# ---------------------------------------------------------------------- CPU lane
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("d", [16, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_fp64_and_reference(dtype, d, hq, hkv, seed):
    layout = random_layout(np.random.default_rng(seed))
    what = f"[T={layout.num_tokens} spans={layout.spans}]"
    q, k, v, g_out, g_lse, got, want, errs = check_case(layout, hq, hkv, d, dtype, what)
    ref = run(ref_attention, q, k, v, layout, g_out, g_lse)
    for name, a, b, b64, err in zip(NAMES, got, ref, want, errs):
        assert_rel(a, b, 2 * TOL[dtype], f"{what} {name} vs reference")
        ref_err = rel_err(b, b64)
        assert err <= 2 * ref_err + FLOOR[dtype], (
            f"{what} {name}: kernel error to fp64 {err:.3e} > 2 x reference error "
            f"{ref_err:.3e} + {FLOOR[dtype]:.0e}")


@pytest.mark.parametrize("name,samples", [
    ("umm", UMM),
    ("length_one_samples", [[(1, m)] for m in MODES * 3]),
    ("length_one_spans", [[(1, "full"), (1, "noise"), (1, "causal"), (1, "noise")],
                          [(1, "causal"), (1, "full")]]),
    ("one_token", [[(1, "noise")]]),
    ("one_long_noise", [[(37, "noise")]]),
])
def test_corner_layouts_fp32(name, samples, seed):
    check_case(PackedLayout.from_spans(samples, device=DEV), 2, 1, 16, torch.float32, name)


@pytest.mark.parametrize("hq,hkv", [pytest.param(6, 2, id="gqa3"), pytest.param(3, 3, id="mha")])
def test_dkdv_of_each_q_head_summed_over_the_group(hq, hkv, seed):
    """dk / dv run one program per (key tile, q head): a group of 3 q heads (not a power
    of two) sums three fp32 partials per kv head; without GQA each program writes dk,
    dv itself. T = 77 (odd)."""
    layout = PackedLayout.from_spans(UMM, device=DEV)
    assert layout.num_tokens % 2 == 1
    check_case(layout, hq, hkv, 16, torch.float32, f"Hq={hq} Hkv={hkv}")


def test_bf16_upcast_in_the_interpreter(seed):
    layout = random_layout(np.random.default_rng(seed))
    check_case(layout, 4, 2, 32, torch.bfloat16, "bf16")


# ------------------------------------------------------------------ GPU tile configs
def test_tile_configs_fit_the_device_shared_memory():
    # fp32 at D = 256 with (64, 32) tiles needs 278,532 B (forward) and 393,220 B (dq)
    # on sm_90, over an H100's 232,448: the launch would fail with OutOfResources.
    assert pa._pick_config(torch.float32, 256, False, 32768) == \
        pa._Config(32, 32, 32, 32, 8, 2, 8, 2, 8, 2)
    needed = _common.smem_needed
    for limit in (_common.SMEM_SM90, _common.SMEM_SM80, _common.SMEM_SM86, _common.SMEM_SM75):
        for (is_fp32, block_d), ladder in pa._LADDERS.items():
            for bd in [b for b in (16, 32, 64, 128, 256) if max(64, b) == block_d]:
                dtype = torch.float32 if is_fp32 else torch.bfloat16
                try:
                    cfg = pa._pick_config(dtype, bd, False, 32768, limit)
                except ValueError:  # fp32 at D = 256 on a T4: nothing fits
                    assert all(needed(e, limit) > limit for e in ladder), (dtype, bd, limit)
                    continue
                rank = [entry[0] for entry in ladder].index(cfg)
                # the fastest entry that fits: every faster one is over the limit
                assert needed(ladder[rank], limit) <= limit, (dtype, bd, limit, cfg)
                assert all(needed(e, limit) > limit for e in ladder[:rank]), (dtype, bd, limit)
    # a T4 (sm_75) compiles the same tiles bigger: 16-bit D = 64's first entry needs
    # 66,068 B on sm_80 / sm_90 but 98,304 B there
    assert pa._pick_config(torch.bfloat16, 64, False, 32768, _common.SMEM_SM75) == \
        pa._LADDERS[(False, 64)][1][0]
    assert pa._pick_config(torch.float32, 256, False, 32768, _common.SMEM_SM80) != \
        pa._pick_config(torch.float32, 256, False, 32768), "an A100 needs smaller tiles"
    with pytest.raises(ValueError, match=r"torch.float32 q/k/v at head dim 200 .*65536 bytes"):
        pa._pick_config(torch.float32, 256, False, 32768, 65536, head_dim=200)


def test_shared_memory_limit_comes_from_the_device(monkeypatch):
    class Props:
        shared_memory_per_block_optin = _common.SMEM_SM80

    monkeypatch.setattr(_common, "_smem_limits", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    assert pa._smem_limit(torch.device("cpu")) is None
    assert pa._smem_limit(torch.device("cuda", 0)) == _common.SMEM_SM80

    # torch < 2.6 reports no opt-in limit: known by the capability, never an H100's guessed
    class OldTorchProps:
        def __init__(self, major, minor):
            self.major, self.minor = major, minor

    for (major, minor), limit in {(7, 5): _common.SMEM_SM75, (8, 0): _common.SMEM_SM80,
                                  (8, 6): _common.SMEM_SM86, (8, 9): _common.SMEM_SM86,
                                  (9, 0): _common.SMEM_SM90, (12, 0): _common.SMEM_SM86,
                                  (11, 7): _common.SMEM_SM86}.items():
        monkeypatch.setattr(_common, "_smem_limits", {})
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, p=OldTorchProps(major, minor): p)
        assert pa._smem_limit(torch.device("cuda", 0)) == limit, (major, minor)
    # the forward, the backward and the tile metadata all take their config from here
    monkeypatch.setattr(pa, "_smem_limit", lambda device: _common.SMEM_SM80)
    q = torch.empty(5, 1, 200)
    assert pa._config_for(q, False) == (256, pa._pick_config(torch.float32, 256, False, 5,
                                                             _common.SMEM_SM80))


def _native_triton_on_a_gpu(monkeypatch, smem_limit):
    """Makes backends see native Triton and a CUDA device whose blocks get `smem_limit`
    bytes of shared memory, with no flash-attn / xformers: "auto" then tries triton,
    then the reference. Only dispatch runs; no kernel is launched."""
    absent(monkeypatch, "flash_attn")
    absent(monkeypatch, "xformers.ops")
    # fresh probe results (restored afterwards): the peers are probed again, as absent
    native = backends.Probe(True, backends.triton().version, "native (simulated)")
    monkeypatch.setattr(backends, "_probe_results", {(backends._epoch, "triton"): native})
    monkeypatch.setattr(backends, "triton_interpreted", lambda: False)
    monkeypatch.setattr(pa, "_smem_limit", lambda device: smem_limit)


def test_auto_skips_triton_where_no_tile_config_fits_the_gpu(monkeypatch, seed):
    # 64 KiB per block (sm_75): fp32 at D = 200 needs BLOCK_D = 256, whose smallest tiles
    # take 66,560 B there; fp32 at D <= 128 and 16-bit at D = 200 still fit.
    _native_triton_on_a_gpu(monkeypatch, 65536)
    gpu = torch.device("cuda", 0)
    layout = PackedLayout.from_spans(UMM, device="cpu")

    def auto(dtype, head_dim):
        return backends.resolve("packed_attention", "auto", device=gpu, layout=layout,
                                dtype=dtype, head_dim=head_dim)

    assert auto(torch.float32, 128)[0] == "triton"
    assert auto(torch.bfloat16, 200)[0] == "triton"
    name, fn = auto(torch.float32, 200)
    assert name == "reference", f"auto chose {name!r}, whose tiles do not fit 64 KiB"
    # asked for by name it still refuses, naming q's dtype and head dim and the limit
    with pytest.raises(ValueError, match=r"impl='triton'.*torch.float32 q/k/v at head dim 200 "
                                         r".*65536 bytes"):
        backends.resolve("packed_attention", "triton", device=gpu, layout=layout,
                         dtype=torch.float32, head_dim=200)
    # what "auto" chose computes the call (on CPU tensors here: there is no GPU)
    q, k, v = make_qkv(layout.num_tokens, 2, 1, 200, torch.float32, device="cpu")
    assert_rel(fn(q, k, v, layout), attention64(q, k, v, layout, 200 ** -0.5)[0], 1e-5,
               "auto's fallback out")


def test_auto_skips_triton_for_a_head_dim_it_lacks(monkeypatch, seed):
    """End to end through the public op. On the CPU "auto" never takes the interpreted
    kernels; here it may (as it would on a GPU), and must still not take them at
    D > MAX_HEAD_DIM, which the interpreter refuses too."""
    monkeypatch.setattr(backends, "_TABLE", [
        dataclasses.replace(i, prefer=None) if (i.op, i.name) == ("packed_attention", "triton")
        else i for i in backends._TABLE])
    layout = PackedLayout.from_spans(UMM, device=DEV)
    call = dict(device=DEV, layout=layout, dtype=torch.float32)
    assert backends.resolve("packed_attention", "auto", head_dim=16, **call)[0] == "triton"
    assert backends.resolve("packed_attention", "auto", head_dim=264, **call)[0] == "reference"
    d = pa.MAX_HEAD_DIM + 8
    q, k, v = make_qkv(layout.num_tokens, 2, 1, d, torch.float32)
    out = uf.packed_attention(q, k, v, layout)
    assert_rel(out, attention64(q, k, v, layout, d ** -0.5)[0], 1e-5, f"auto out at D = {d}")
    with pytest.raises(ValueError, match=rf"q's head dim D = {d} is not supported"):
        uf.packed_attention(q, k, v, layout, impl="triton")


def test_custom_scale_and_large_scores(seed):
    # Scores of a few hundred: the online softmax must rescale without overflow. A
    # backward from a saved fp32 lse sees p = exp(s - lse) with a relative error of
    # ~|lse| * 2^-24 that the reference (softmax kept in autograd) does not have: the
    # gradients get that much on top of 2x the reference's error.
    layout = PackedLayout.from_spans(UMM, device=DEV)
    t = layout.num_tokens
    q, k, v = make_qkv(t, 2, 2, 16, torch.float32, scale=30.0)
    g_out, g_lse = torch.randn(t, 2, 16, device=DEV), torch.randn(2, t, device=DEV)
    got = run(fused, q, k, v, layout, g_out, g_lse, scale=0.9)
    want = run(oracle, *f64(q, k, v), layout, g_out, g_lse, scale=0.9)
    ref = run(ref_attention, q, k, v, layout, g_out, g_lse, scale=0.9)
    assert want[1].max() > 120, "test setup: scores are not large (exp would overflow)"
    lse_floor = 4 * want[1].abs().max().item() * 2.0 ** -24
    for name, a, b, r in zip(NAMES, got, want, ref):
        tol = 1e-5 if name in ("out", "lse") else 2 * rel_err(r, b) + 1e-5 + lse_floor
        assert_rel(a, b, tol, f"large scores {name}")


def test_tiles_are_block_sparse_and_only_they_are_visited(seed, monkeypatch):
    """Many short samples: the kernels visit exactly the CSR's tiles (counted through
    the interpreter's dots), and those are exactly the tiles with a visible pair."""
    if not backends.triton_interpreted():
        pytest.skip("counts the interpreter's dots")
    from triton.runtime import interpreter

    layout = PackedLayout.from_spans([[(7, "causal")], [(5, "full"), (3, "noise")]] * 6 + [[(4, "full")]],
                                     device=DEV)
    cfg = pa._pick_config(torch.float32, 16, True, layout.num_tokens)
    tiles = layout.tiles(cfg.fwd_block_m, cfg.fwd_block_n)
    assert (cfg.fwd_block_m, cfg.fwd_block_n) == (cfg.kv_block_m, cfg.kv_block_n) == (16, 16)
    mask = layout.dense_mask().cpu()
    t, nq = layout.num_tokens, tiles.num_q_tiles
    padded = torch.zeros(nq * 16, nq * 16, dtype=torch.bool)
    padded[:t, :t] = mask
    any_visible = padded.reshape(nq, 16, nq, 16).any(3).any(1)
    nnz = tiles.num_visible_tiles
    assert nnz == int(any_visible.sum()) and nnz < nq * nq // 2, (
        f"{nnz} tiles in the CSR, {int(any_visible.sum())} hold a visible pair, of {nq * nq}")

    dots = []
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, *args, **kwargs):
        dots.append(1)
        return create_dot(self, a, b, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)
    hq, hkv = 4, 2
    q, k, v = (x.requires_grad_() for x in make_qkv(t, hq, hkv, 16, torch.float32))
    out, lse = fused(q, k, v, layout, return_lse=True)
    assert len(dots) == 2 * nnz * hq, f"forward: {len(dots)} dots, expected 2 per visited tile"
    dots.clear()
    g_out = torch.randn_like(out)
    out.backward(g_out)
    # dk/dv: 4 dots per (tile, q head); dq: 3 per (tile, q head)
    assert len(dots) == 7 * nnz * hq, f"backward: {len(dots)} dots, expected 7 per visited tile"
    monkeypatch.undo()
    want = attention64(q, k, v, layout, 0.25)
    assert_rel(out, want[0], 1e-5, "out")
    assert_rel(lse, want[1], 1e-5, "lse")


def assert_op_matches_fp64(q, k, v, out, lse, layout, scale):
    """out, lse of a direct custom-op call and the gradients of a random upstream
    gradient, against the float64 oracle (fp32 inputs: 1e-5)."""
    g = torch.randn_like(out)
    out.backward(g)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want, want_lse = attention64(q64, k64, v64, layout, scale)
    want.backward(g.double())
    for name, a, b in (("out", out, want), ("lse", lse, want_lse), ("dq", q.grad, q64.grad),
                       ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_rel(a, b, 1e-5, name)


def test_full_tiles_never_read_the_token_ids(seed):
    """One full-mode sample of 64 tokens: every tile is full. Token ids that would make
    every pair invisible must not change anything: full tiles skip the mask."""
    layout = PackedLayout.from_spans([[(64, "full")]], device=DEV)
    cfg = pa._pick_config(torch.float32, 16, backends.triton_interpreted(), layout.num_tokens)
    fwd, kv = layout.tiles(cfg.fwd_block_m, cfg.fwd_block_n), layout.tiles(cfg.kv_block_m, cfg.kv_block_n)
    if not (bool(fwd.k_tile_full.all()) and bool(kv.q_tile_full.all())):
        pytest.skip("this tile size leaves partial tiles in a 64-token pack")
    q, k, v = (x.requires_grad_() for x in make_qkv(64, 2, 2, 16, torch.float32))
    distinct = torch.arange(64, dtype=torch.int32, device=DEV)  # every token its own sample
    out, lse = torch.ops.unimrg_fast.packed_attention_fwd(
        q, k, v, distinct, distinct, layout.span_modes, fwd.q_tile_ptr, fwd.k_tile_idx,
        fwd.k_tile_full, kv.k_tile_ptr, kv.q_tile_idx, kv.q_tile_full, 0.25,
        cfg.fwd_block_m, cfg.fwd_block_n, cfg.kv_block_m, cfg.kv_block_n)
    assert_op_matches_fp64(q, k, v, out, lse, layout, 0.25)


def test_partial_path_alone_is_exact(seed):
    """Every tile flagged partial: the per-element mask alone must give the same answer."""
    layout = random_layout(np.random.default_rng(seed))
    cfg = pa._pick_config(torch.float32, 16, backends.triton_interpreted(), layout.num_tokens)
    fwd, kv = layout.tiles(cfg.fwd_block_m, cfg.fwd_block_n), layout.tiles(cfg.kv_block_m, cfg.kv_block_n)
    assert bool(fwd.k_tile_full.any()), "test setup: the layout has no full tile"
    t = layout.num_tokens
    q, k, v = (x.requires_grad_() for x in make_qkv(t, 4, 2, 16, torch.float32))
    out, lse = torch.ops.unimrg_fast.packed_attention_fwd(
        q, k, v, layout.token_sample, layout.token_span, layout.span_modes, fwd.q_tile_ptr,
        fwd.k_tile_idx, torch.zeros_like(fwd.k_tile_full), kv.k_tile_ptr, kv.q_tile_idx,
        torch.zeros_like(kv.q_tile_full), 0.25, cfg.fwd_block_m, cfg.fwd_block_n,
        cfg.kv_block_m, cfg.kv_block_n)
    assert_op_matches_fp64(q, k, v, out, lse, layout, 0.25)


def test_backward_is_deterministic(seed):
    layout = random_layout(np.random.default_rng(seed))
    q, k, v = make_qkv(layout.num_tokens, 4, 1, 16, torch.float16)
    g_out = torch.randn(layout.num_tokens, 4, 16, device=DEV)
    g_lse = torch.randn(4, layout.num_tokens, device=DEV)
    first = run(fused, q, k, v, layout, g_out, g_lse, deterministic=True)
    second = run(fused, q, k, v, layout, g_out, g_lse, deterministic=True)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def _specialization_keys(kernel, monkeypatch, sink):
    """Records, for each launch of `kernel`, the key Triton compiles by: constexprs,
    launch options, and each runtime argument's type and specialisation."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends import BaseBackend
    from triton.runtime.jit import JITFunction

    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    sig = inspect.signature(jit.fn)
    run_launch = kernel.run

    def recording_run(*args, grid, warmup, **kwargs):
        params = {k: v for k, v in kwargs.items() if k in sig.parameters}
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in sig.parameters))
        bound = sig.bind(*args, **params).arguments
        key, naive = [], []
        for p in jit.params:
            value = bound[p.name]
            if p.is_constexpr:
                key.append(value)
                naive.append(value)
            else:
                key.append(native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                                  not p.do_not_specialize_on_alignment))
                naive.append(native_specialize_impl(BaseBackend, value, False, True, True))
        sink.append((tuple(map(str, key)) + options, tuple(map(str, naive)) + options))
        return run_launch(*args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(kernel, "run", recording_run)


def test_a_new_pack_reuses_the_compiled_kernels(seed, monkeypatch):
    """Two packs of other lengths (T % 16 and the alignment of the layout's arrays
    differ): every kernel launches with the same specialisation key, so nothing
    recompiles. The keys Triton would use by default must differ, or the test proves
    nothing."""
    pytest.importorskip("triton._C.libtriton")
    if "do_not_specialize_on_alignment" not in inspect.signature(pa.triton.jit).parameters:
        pytest.skip("this Triton has no do_not_specialize_on_alignment")
    kernels = ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
               "_attn_bwd_dq_kernel")
    seen = {name: [] for name in kernels}
    for name in kernels:
        _specialization_keys(getattr(pa, name), monkeypatch, seen[name])
    layouts = [PackedLayout.from_spans([[(9, "full"), (4, "causal")], [(3, "noise")]], pad_to=32,
                                       device=DEV),
               PackedLayout.from_spans([[(5, "full"), (1, "causal"), (20, "noise")], [(2, "causal")],
                                        [(7, "full")]], pad_to=45, device=DEV)]
    for layout in layouts:
        q, k, v = (x.requires_grad_() for x in make_qkv(layout.num_tokens, 4, 2, 16, torch.float16))
        fused(q, k, v, layout).sum().backward()
    for name in kernels:
        keys = {key for key, _ in seen[name]}
        assert len(seen[name]) == 2 and len(keys) == 1, f"{name}: {len(keys)} compiled variants"
    assert len({naive for _, naive in seen["_attn_fwd_kernel"]}) == 2, \
        "test setup: the two packs would not have recompiled anyway"


def test_strided_inputs(seed):
    layout = PackedLayout.from_spans(UMM, pad_to=83, device=DEV)
    t, hq, hkv, d = layout.num_tokens, 4, 2, 16
    # q, k, v as views of one fused projection [T, Hq + 2 Hkv, D]
    qkv = torch.randn(t, hq + 2 * hkv, d, device=DEV, requires_grad=True)
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    # and a head-major buffer [Hkv, T, D] seen as [T, Hkv, D]; a strided head dim
    v2 = torch.randn(hkv, t, d, device=DEV).transpose(0, 1)
    k2 = torch.randn(t, hkv, 2 * d, device=DEV)[..., ::2]
    for name, (a, b, c) in {"fused qkv": (q, k, v), "head-major v, strided D": (q, k2, v2)}.items():
        assert not (a.is_contiguous() and b.is_contiguous() and c.is_contiguous())
        out, lse = fused(a, b, c, layout, return_lse=True)
        want, want_lse = attention64(a, b, c, layout, d ** -0.5)
        assert_rel(out, want, 1e-5, f"{name}: out")
        assert_rel(lse, want_lse, 1e-5, f"{name}: lse")
    g = torch.randn(t, hq, d, device=DEV)
    fused(q, k, v, layout).backward(g)
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = qkv64.split([hq, hkv, hkv], dim=1)
    attention64(q64, k64, v64, layout, d ** -0.5)[0].backward(g.double())
    assert_rel(qkv.grad, qkv64.grad, 1e-5, "d(fused qkv)")


@pytest.mark.parametrize("frozen", ["q", "kv"])
def test_only_some_inputs_need_grad(frozen, seed):
    layout = PackedLayout.from_spans(UMM, device=DEV)
    q, k, v = make_qkv(layout.num_tokens, 2, 1, 16, torch.float32)
    q.requires_grad_(frozen != "q")
    k.requires_grad_(frozen != "kv")
    v.requires_grad_(frozen != "kv")
    g = torch.randn(layout.num_tokens, 2, 16, device=DEV)
    fused(q, k, v, layout).backward(g)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    attention64(q64, k64, v64, layout, 0.25)[0].backward(g.double())
    for x, x64, name in ((q, q64, "dq"), (k, k64, "dk"), (v, v64, "dv")):
        if x.requires_grad:
            assert_rel(x.grad, x64.grad, 1e-5, name)
        else:
            assert x.grad is None


def test_autocast_casts_like_the_reference(seed):
    layout = PackedLayout.from_spans(UMM, device=DEV)
    q, k, v = make_qkv(layout.num_tokens, 2, 2, 16, torch.float32)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        out = fused(q, k, v, layout)
    assert out.dtype == torch.bfloat16
    rounded = [x.to(torch.bfloat16) for x in (q, k, v)]
    want, _ = attention64(*rounded, layout, 0.25)
    assert_rel(out, want, TOL[torch.bfloat16], "autocast out")


def test_custom_ops_pass_opcheck(seed):
    layout = PackedLayout.from_spans([[(5, "full"), (3, "causal")], [(4, "noise")]], pad_to=19,
                                     device=DEV)
    cfg = pa._pick_config(torch.float32, 16, backends.triton_interpreted(), layout.num_tokens)
    fwd, kv = layout.tiles(cfg.fwd_block_m, cfg.fwd_block_n), layout.tiles(cfg.kv_block_m, cfg.kv_block_n)
    q, k, v = (x.requires_grad_() for x in make_qkv(19, 2, 1, 16, torch.float32))
    ids = (layout.token_sample, layout.token_span, layout.span_modes)
    blocks = (cfg.fwd_block_m, cfg.fwd_block_n, cfg.kv_block_m, cfg.kv_block_n)
    fwd_args = (q, k, v, *ids, fwd.q_tile_ptr, fwd.k_tile_idx, fwd.k_tile_full, kv.k_tile_ptr,
                kv.q_tile_idx, kv.q_tile_full, 0.3, *blocks)
    torch.library.opcheck(torch.ops.unimrg_fast.packed_attention_fwd.default, fwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = torch.ops.unimrg_fast.packed_attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(),
                out.detach(), lse.detach(), *fwd_args[3:12], 0.3, *blocks, True, True)
    torch.library.opcheck(torch.ops.unimrg_fast.packed_attention_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def _bad_calls():
    layout = PackedLayout.from_spans([[(3, "full"), (2, "causal")], [(4, "noise")]])  # T = 9
    q, k, v = make_qkv(9, 4, 2, 16, torch.float32, device="cpu")
    return layout, q, k, v


BAD = [
    ("q_tokens", lambda L, q, k, v: ((q[:8], k, v, L), {}), ValueError,
     "q has 8 tokens but the layout holds 9"),
    ("heads", lambda L, q, k, v: ((q[:, :3], k, v, L), {}), ValueError,
     r"q's head count \(3\) must be a multiple of k's and v's \(2\)"),
    ("head_dim", lambda L, q, k, v: ((q.new_zeros(9, 4, 264), k.new_zeros(9, 2, 264),
                                      v.new_zeros(9, 2, 264), L), {}), ValueError,
     "head dim D = 264 is not supported"),
    ("q_fp64", lambda L, q, k, v: ((q.double(), k, v, L), {}), TypeError, "q must have dtype"),
    ("k_dtype", lambda L, q, k, v: ((q, k.half(), v, L), {}), TypeError, "k must have q's dtype"),
    ("v_device", lambda L, q, k, v: ((q, k, v.to("meta"), L), {}), ValueError, "v must be on cpu"),
    ("layout_device", lambda L, q, k, v: ((q, k, v, L.to("meta")), {}), ValueError,
     "layout is on meta but q is on cpu"),
    ("scale", lambda L, q, k, v: ((q, k, v, L), {"scale": -1.0}), ValueError,
     "scale must be a finite number > 0"),
]


@pytest.mark.skipif(ON_CUDA, reason="the CPU lane's interpreter takes CPU tensors")
@pytest.mark.parametrize("make,exc,match", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_inputs_raise_naming_the_argument(make, exc, match):
    args, kwargs = make(*_bad_calls())
    with pytest.raises(exc, match=match):
        fused(*args, **kwargs)


def test_public_op_dispatches_to_the_kernel(seed):
    impl = next(i for i in backends.implementations("packed_attention") if i.name == "triton")
    assert impl.planned is None, "backends.py still marks the Triton packed_attention as planned"
    name, fn = backends.resolve("packed_attention", "triton", device=DEV)
    assert name == "triton" and fn is pa._triton
    layout = PackedLayout.from_spans(UMM, device=DEV)
    q, k, v = make_qkv(layout.num_tokens, 2, 1, 16, torch.float32)
    out, lse = uf.packed_attention(q, k, v, layout, impl="triton", return_lse=True)
    direct, direct_lse = pa._triton(q, k, v, layout, return_lse=True)
    assert torch.equal(out, direct) and torch.equal(lse, direct_lse)
    assert_rel(out, attention64(q, k, v, layout, 0.25)[0], 1e-5, "public out")
    assert isinstance(uf.packed_attention(q, k, v, layout, impl="triton"), torch.Tensor)


# ---------------------------------------------------------------------- GPU lane
def _umm_pack(num_tokens, device):
    """Understanding and generation samples of DESIGN.md 5, padded to num_tokens."""
    rng = np.random.default_rng(0)
    samples, total = [], 0
    while True:
        if rng.random() < 0.5:
            sample = [(1088, "full"), (int(rng.integers(32, 513)), "causal")]
        else:
            sample = [(1088, "full"), (int(rng.integers(8, 49)), "causal"),
                      (1024, "noise" if rng.random() < 0.5 else "full")]
        n = sum(length for length, _ in sample)
        if total + n > num_tokens - 1:
            break
        samples.append(sample)
        total += n
    return PackedLayout.from_spans(samples, pad_to=num_tokens, device=device)


def _per_sample64(q, k, v, layout, scale):
    """fp64 attention one sample at a time (the dense [T, T] mask is too big here)."""
    outs, lses, start = [], [], 0
    group = q.shape[1] // k.shape[1]
    for s, length in enumerate(layout.seqlens):
        sl = slice(start, start + length)
        qs, ks, vs = (x[sl].double().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~layout.sample_mask(s), float("-inf"))
        outs.append((torch.softmax(scores, -1) @ vs).transpose(0, 1))
        lses.append(torch.logsumexp(scores, -1))
        start += length
    return torch.cat(outs, 0), torch.cat(lses, 1)


def _gpu_check(dtype, t, hq, hkv, d):
    layout = _umm_pack(t, "cuda")
    q, k, v = make_qkv(t, hq, hkv, d, dtype, device="cuda")
    g_out = torch.randn(t, hq, d, device="cuda")
    g_lse = torch.randn(hq, t, device="cuda") * 0.1
    got = run(fused, q, k, v, layout, g_out, g_lse)
    want = run(lambda *a, **kw: _per_sample64(*a[:4], d ** -0.5), *f64(q, k, v), layout, g_out,
               g_lse)
    ref = run(ref_attention, q, k, v, layout, g_out, g_lse) if dtype != torch.float32 else None
    for i, name in enumerate(NAMES):
        err = assert_rel(got[i], want[i], TOL[dtype], f"{dtype} D={d} {name} vs fp64")
        if ref is not None:
            ref_err = rel_err(ref[i], want[i])
            assert err <= 2 * ref_err + FLOOR[dtype], (
                f"{dtype} D={d} {name}: kernel error {err:.3e} > 2 x reference error "
                f"{ref_err:.3e} + {FLOOR[dtype]:.0e}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_qwen_shapes_flash_rule(dtype):
    _gpu_check(dtype, 16384, 12, 2, 128)


@pytest.mark.gpu
def test_gpu_head_dim_64():
    _gpu_check(torch.float16, 8192, 8, 2, 64)


@pytest.mark.gpu
def test_gpu_fp32():
    _gpu_check(torch.float32, 4096, 4, 2, 128)


@pytest.mark.gpu
def test_gpu_no_host_sync():
    layout = _umm_pack(8192, "cuda")
    q, k, v = (x.requires_grad_() for x in make_qkv(8192, 12, 2, 128, torch.bfloat16, "cuda"))
    fused(q, k, v, layout).sum().backward()  # compiles, builds the tile metadata
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = fused(q, k, v, layout, return_lse=True)
        (out.float().sum() + lse.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _compile_check(layout, q, k, v, **compile_kw):
    """torch.compile(fullgraph=True) traces the public op (its dispatch, the custom ops'
    fake kernels, autograd) without a graph break and computes what eager does. The
    eager call comes first: it computes the layout's tile metadata (host numpy work)."""
    def attention(a, b, c):
        return uf.packed_attention(a, b, c, layout, impl="triton")

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    eager = attention(*leaves)
    g = torch.randn_like(eager)
    eager.backward(g)
    want = [x.grad for x in leaves]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    compiled = torch.compile(attention, fullgraph=True, **compile_kw)
    out = compiled(*leaves)
    out.backward(g)
    assert torch.equal(out, eager)
    for name, x, w in zip("qkv", leaves, want):
        assert torch.equal(x.grad, w), f"d{name} differs under torch.compile"


def test_torch_compile_traces_the_custom_ops(seed):
    layout = PackedLayout.from_spans(UMM, device=DEV)
    _compile_check(layout, *make_qkv(layout.num_tokens, 4, 2, 16, torch.float32),
                   backend="aot_eager")


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    layout = _umm_pack(4096, "cuda")
    _compile_check(layout, *make_qkv(4096, 4, 2, 64, torch.bfloat16, "cuda"))
